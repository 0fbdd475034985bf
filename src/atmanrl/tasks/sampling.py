"""The one sampling loop: ``k`` completions of each problem through a ``Task``, greedy or seeded per row.

Table 1 (``atmanrl.eval.table1.evaluate``), the toy world's evaluation, the trainer's held-out evaluation and the
faithfulness tests all sample through ``sample``; the trainer's rollouts call ``generate`` once per update with
their own per-update seeds (``atmanrl.rl.rollout``).

What is notable here:
- **Seeds per row.** Completion ``j`` of problem ``i`` (its index in ``problems``) is drawn from the seed
  ``row_seed(seed, i, j)`` alone (counter-based noise, ``atmanrl.model.generate``): a run repeats, and its samples
  do not depend on ``batch_size`` or on what else is in the batch. ``seed_of`` replaces that formula where a caller
  keeps another one (the faithfulness tests draw one CoT per problem with ``row_seed(seed, i)``).
- **Batched across problems**: ``batch_size // k`` problems (all ``k`` completions of each) per ``generate`` call;
  the ``k`` completions of a problem share one prefill (``generate`` deduplicates identical prompts).
- Every completion is judged by the task (``Task.score``): the ``Sample`` carries the CoT/answer split and verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from atmanrl.model.generate import generate, row_seed
from atmanrl.tasks.base import Sample, Task


@torch.no_grad()
def sample(model, task: Task, problems: Sequence, *, max_new_tokens: int, k: int = 1, greedy: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
           seed_of: Callable[[int, int], int] | None = None,
           on_batch: Callable[[int, list[Sample]], None] | None = None) -> list[Sample]:
    """``k`` completions of every problem, problem-major (``k*i .. k*i+k-1`` are problem ``i``'s).

    greedy: argmax decoding (then ``k`` must be 1: greedy completions of one prompt are all the same).
    on_batch(problems done, the batch's samples): called after each ``generate`` call (progress lines).
    """
    if k < 1:
        raise ValueError(f"k = {k}: sample at least one completion per problem")
    if greedy and k != 1:
        raise ValueError(f"greedy decoding with k = {k}: the {k} completions would be identical; use k = 1")
    seed_of = seed_of or (lambda i, j: row_seed(seed, i, j))
    model.eval()
    prompts = [task.prompt(p) for p in problems]
    per_call = max(1, batch_size // k)
    out: list[Sample] = []
    for start in range(0, len(problems), per_call):
        rows = [(i, j) for i in range(start, min(start + per_call, len(problems))) for j in range(k)]
        completions = generate(model, [prompts[i] for i, _ in rows], max_new_tokens=max_new_tokens, greedy=greedy,
                               temperature=temperature, top_p=top_p, stop_ids=task.stop_ids, pad_id=task.pad_id,
                               seed=0 if greedy else [seed_of(i, j) for i, j in rows])
        batch = [Sample(i, j, prompts[i], c.tokens, c.logprobs, c.finished,
                        task.score(problems[i], prompts[i], c.tokens)) for (i, j), c in zip(rows, completions)]
        out += batch
        if on_batch is not None:
            on_batch(rows[-1][0] + 1, batch)
    return out
