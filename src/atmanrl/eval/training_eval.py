"""Held-out evaluation during training (the paper's Figure 2: accuracy and response length over updates).

The trainer's ``eval`` block calls ``evaluate_heldout`` before the first update and every ``eval.every`` updates,
and ``append_heldout`` writes the result as one line of ``eval.jsonl``. Unlike the Table 1 evaluation
(``atmanrl.eval.table1.evaluate``: k sampled completions per problem, every sample kept), this one is greedy,
one completion per problem, and keeps only global sums: cheap enough to run inside a training run, and it works for
any task through the trainer's ``Task`` protocol (``atmanrl.tasks.sampling.sample``, greedy). Each rank scores a
strided share of the problems; one all-reduce adds them up.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atmanrl import dist
from atmanrl.progress import Progress
from atmanrl.tasks import Task
from atmanrl.tasks.sampling import sample


@torch.no_grad()
def evaluate_heldout(model, task: Task, problems: list, *, max_new_tokens: int, batch_size: int = 8) -> dict:
    """Greedy completions of this rank's share of ``problems``; global accuracy and mean lengths (collective)."""
    d = dist.info()
    mine = problems[d.rank::d.world_size]
    with Progress("held-out eval", len(mine), "problems") as progress:
        def advance(_, batch):
            progress.advance(len(batch), tokens=sum(len(s.tokens) for s in batch))

        samples = sample(model, task, mine, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size,
                         on_batch=advance)
    sums = torch.tensor([len(samples), sum(s.correct for s in samples), sum(len(s.tokens) for s in samples),
                         sum(s.cot_tokens for s in samples)], dtype=torch.float64)  # problems, correct, tokens, CoT
    n, correct, length, cot = dist.all_reduce(sums).tolist()
    return {"eval_accuracy": correct / max(n, 1), "eval_completion_len": length / max(n, 1),
            "eval_cot_len": cot / max(n, 1), "eval_problems": int(n)}


def append_heldout(out_dir: Path, update: int, result: dict) -> None:
    """One line of ``out_dir/eval.jsonl`` and a log line (rank 0 only)."""
    if dist.info().is_main:
        with (Path(out_dir) / "eval.jsonl").open("a") as f:
            f.write(json.dumps({"update": update, **result}) + "\n")
        dist.log(f"[eval @ update {update}] accuracy {result['eval_accuracy']:.3f}, "
                 f"mean response {result['eval_completion_len']:.1f} tokens")
