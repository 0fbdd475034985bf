"""Tasks: what a problem is to training and evaluation alike.

- ``base``: the ``Task`` protocol (prompt tokens in, a ``Score`` out) and the typed ``Sample``.
- ``sampling``: the one sampling loop, problems x k completions through a task, greedy or seeded per row.
- ``registry``: tasks by name (config key ``data.task``) and their training / held-out problems.
- ``gsm8k`` (files, prompts, strict answers, ``GSM8KTask``), ``synthetic`` (the embedded GSM8K-style generator) and
  ``toyworld`` (the planted-truth world, ``ToyTask``).
"""

from atmanrl.tasks.base import Sample, Score, Task

__all__ = ["Sample", "Score", "Task"]
