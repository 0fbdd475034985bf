"""The task registry: which problems the trainer trains on and which ``Task`` judges them (config key ``data.task``).

    task = make_task(cfg.data.task, tokenizer)           # prompt tokens in, a Score out (atmanrl.tasks.Task)
    problems = load_problems(cfg.data)                   # the training problems
    held_out = load_eval_problems(cfg.data, cfg.eval)    # the trainer's held-out evaluation draw

A task is one entry of ``TASKS``: how to build its ``Task`` from the policy's tokenizer, and how to read (or
generate) its problems. Adding a task is adding one entry; nothing in ``atmanrl.rl`` or ``atmanrl.eval`` changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from atmanrl.config import ConfigError, DataConfig, EvalConfig
from atmanrl.tasks import gsm8k, toyworld
from atmanrl.tasks.base import Task
from atmanrl.tasks.synthetic import synthetic_problems


@dataclass(frozen=True)
class TaskEntry:
    make: Callable[[Any], Task]  # tokenizer -> Task
    # (path, n, seed, held_out) -> problems: the problems of the file at ``path``, or ``n`` generated with ``seed``
    # when ``path`` is None (the config's data.path / data.synthetic_problems / data.seed, or the eval block's).
    # ``held_out`` asks for evaluation problems: a task that generates its problems draws them from a split that
    # never shares a question with the training one (a file's split is the file itself).
    problems: Callable[[str | None, int, int, bool], list]


def _gsm8k_problems(path: str | None, n: int, seed: int, held_out: bool) -> list:
    """A GSM8K jsonl file, or ``n`` of the embedded synthetic GSM8K-style problems (no download needed; the
    held-out ones differ by their seed only: eval.seed vs data.seed)."""
    return synthetic_problems(n, seed) if path is None else gsm8k.read_gsm8k(path)


def _toyworld_problems(path: str | None, n: int, seed: int, held_out: bool) -> list:
    """``n`` seeded toy-world problems of the train or the test split (the toy world has no files)."""
    if path is not None:
        raise ConfigError(f"data.task: toyworld generates its problems; data.path and eval.path must be null, "
                          f"got {path!r}")
    return toyworld.toy_problems(n, seed, "test" if held_out else "train")


TASKS: dict[str, TaskEntry] = {
    "gsm8k": TaskEntry(make=gsm8k.GSM8KTask, problems=_gsm8k_problems),
    "toyworld": TaskEntry(make=toyworld.ToyTask, problems=_toyworld_problems),
}


def task_entry(name: str) -> TaskEntry:
    """The registry entry of ``name``; an unknown name is a config error that lists the valid ones."""
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task {name!r}; valid tasks are: {', '.join(sorted(TASKS))} "
                          f"(a new task is one entry of TASKS in atmanrl/tasks/registry.py)")
    return TASKS[name]


def make_task(name: str, tokenizer) -> Task:
    """The ``Task`` called ``name`` for a policy with this tokenizer."""
    return task_entry(name).make(tokenizer)


def load_problems(data: DataConfig) -> list:
    """The training problems of ``data.task``: ``data.path``'s file, or ``data.synthetic_problems`` generated ones
    when the path is null; the first ``data.max_problems`` of them when that is set."""
    problems = task_entry(data.task).problems(data.path, data.synthetic_problems, data.seed, False)
    return problems[: data.max_problems] if data.max_problems is not None else problems


def load_eval_problems(data: DataConfig, eval_cfg: EvalConfig) -> list:
    """The held-out problems of ``data.task`` for the trainer's ``eval`` block: ``eval.problems`` of them, drawn
    with ``eval.seed`` from ``eval.path``'s file (the paper: 500 GSM8K test problems drawn with a fixed seed), or
    generated with ``eval.seed`` when the path is null."""
    problems = task_entry(data.task).problems(eval_cfg.path, eval_cfg.problems, eval_cfg.seed, True)
    if len(problems) > eval_cfg.problems:
        problems = gsm8k.draw_problems(problems, eval_cfg.problems, eval_cfg.seed)
    return problems
