"""One update's metrics record: the JSON line the trainer appends to ``metrics.jsonl``.

What is notable here:
- Every rank builds a dict of rank-local SUMS (rollouts, rewards, tokens, ratio statistics, ...) and the dict is
  reduced in ONE all-reduce (``reduce_dict``); only the extremes need two more (min of the ratios; max of the
  ratios and of the phase times -- the slowest rank sets the pace). Means are taken after the reduction, so the
  record is the same for any number of ranks.
- A per-rollout metric is one line of ``PER_ROLLOUT``: its value for one rollout; the record holds its mean over
  all rollouts of the update.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from atmanrl import dist
from atmanrl.rl.grpo import LossStats
from atmanrl.rl.rollout import Rollout

# record key -> the value of one rollout; the record holds the mean over every rollout of the update.
PER_ROLLOUT: dict[str, Callable[[Rollout], float]] = {
    "reward_outcome": lambda r: r.outcome,  # Eq. 4
    "reward_saliency": lambda r: r.saliency_reward,  # Eq. 3
    "reward_total": lambda r: r.total,
    "accuracy": lambda r: float(r.score.correct),
    "answered": lambda r: float(r.score.has_answer),  # the delimiter was written
    "truncated": lambda r: float(not r.finished),  # cut at max_new_tokens
    "completion_len": lambda r: float(len(r.completion)),
}


def reduce_dict(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """``values`` reduced over ranks with ``op`` ("sum", "min" or "max") in one all-reduce; identity in a single
    process. Every rank must pass the same keys in the same order (the same code builds them)."""
    flat = dist.all_reduce(torch.tensor([float(v) for v in values.values()], dtype=torch.float64), op)
    return dict(zip(values, flat.tolist()))


def update_record(update: int, epoch: int, rollouts: list[Rollout], zero_var: torch.Tensor, losses: list[float],
                  stats: LossStats, grad_norms: list[float], times: dict[str, float]) -> dict:
    """The metrics of one update over all ranks (collective: every rank calls it).

    ``rollouts`` and ``zero_var`` (one flag per group) are this rank's; ``losses`` and ``grad_norms`` are already
    global (one per optimizer step); ``stats`` are this rank's ratio statistics; ``times`` the phase durations.
    """
    sums = {key: sum(value(r) for r in rollouts) for key, value in PER_ROLLOUT.items()}
    sums.update({
        "rollouts": len(rollouts),
        "cot_tokens": sum(r.score.cot_tokens for r in rollouts if r.score.has_answer),  # mean over answered ones
        "zero_variance_groups": float(zero_var.sum()),
        "groups": zero_var.numel(),
        "ratio_units": stats.units, "ratio_clipped": stats.clipped, "ratio_sum": stats.ratio_sum,
        "kl_sum": stats.kl_sum,
        # rollouts whose answer loss was ~0 before the mask moved (saturation: the saliency carries little)
        "saliency_saturated": sum(r.saliency_result is not None and r.saliency_result.saturated for r in rollouts),
    })
    total = reduce_dict(sums)
    low = reduce_dict({"ratio_min": stats.ratio_min}, "min")
    high = reduce_dict({"ratio_max": stats.ratio_max, **times}, "max")

    n, units = total["rollouts"], total["ratio_units"]
    record = {"update": update, "epoch": epoch}
    record.update({key: total[key] / n for key in PER_ROLLOUT})
    record.update({
        "cot_len": total["cot_tokens"] / max(total["answered"], 1),
        "zero_variance_groups": int(total["zero_variance_groups"]), "groups": int(total["groups"]),
        "loss": sum(losses) / max(len(losses), 1), "losses": losses,  # the global loss of every optimizer step
        # ratio statistics are null when no micro-batch carried a gradient (every group zero-variance)
        "clip_fraction": total["ratio_clipped"] / max(units, 1),
        "ratio_mean": total["ratio_sum"] / units if units else None,
        "ratio_min": low["ratio_min"] if units else None,
        "ratio_max": high["ratio_max"] if units else None,
    })
    record.update({key: high[key] for key in times})
    record["tokens_per_s"] = total["completion_len"] / max(high.get("time_rollout", 0.0), 1e-9)
    if total["kl_sum"]:
        record["kl"] = total["kl_sum"] / n
    if grad_norms:
        record["grad_norm"] = sum(grad_norms) / len(grad_norms)
    record["saliency_saturated"] = int(total["saliency_saturated"])
    return record
