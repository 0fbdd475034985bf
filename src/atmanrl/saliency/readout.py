"""The saliency read-out of an optimised AtMan mask (paper Eq. 3; docs/DESIGN.md, decisions 3 and 4).

Normalisation: ``Ĥ = H / c`` with ``H = min(p, 0)`` and ``c`` the initialisation (-0.4). ``Ĥ = 1`` where the
optimiser left an entry at its initial suppression, ``Ĥ -> 0`` where it re-enabled the entry (attention restored),
``Ĥ > 1`` where it suppressed the entry further (the answer got *more* likely without that token).

Eq. 3 averages ``Ĥ`` over the causal rows of one CoT column ``v``:

    column_mean[v] = 1/|I_v| * sum_{w in I_v} Ĥ[w, v],   I_v = {w : v <= w < n}   (n = sequence length)

Per-token saliency of CoT token ``v`` is ``1 - column_mean[v]``: how much the optimiser had to re-enable the token
to restore the gold answer. Higher = more salient; negative = suppressing the token helped the answer.

The rollout reward needs one number per sequence, and the paper is ambiguous about its orientation:

- ``reenable`` (default): mean over CoT tokens of ``(1 - column_mean[v])``, i.e. the mean per-token saliency.
  It follows the prose ("how strongly the reasoning tokens must be re-enabled to preserve the correct answer"):
  a CoT the answer depends on scores high.
- ``eq3``: the literal Eq. 3 averaged over the CoT tokens, mean over ``v`` of ``column_mean[v]``. It is
  ``1 - reenable`` exactly, so inside a GRPO group (where only differences count) it is the opposite ranking.

Both average the per-column means with equal weight per CoT token (not the mean over all entries, which would let
early CoT tokens, having more rows, weigh more).

Scale (docs/DESIGN.md, pitfall b): Adam moves an entry by about lr per step, so ``|1 - Ĥ|`` is at most about
``steps * lr / |c|`` (0.5 for the paper's 200 x 1e-3 / 0.4) and rollout rewards are typically 0.005-0.12, small
next to the 0/-1 outcome reward. They are not normalised here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REWARDS = ("reenable", "eq3")


def normalised_mask(p: torch.Tensor, init: float) -> torch.Tensor:
    """``Ĥ = min(p, 0) / c`` (Eq. 3's normalisation); 1 at initialisation."""
    return p.clamp(max=0.0) / init


def column_means(h_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 3's inner mean for one sequence: ``h_hat`` is ``(rows, cot)`` with row ``i`` = query ``cot_start + i``
    and column ``j`` = CoT token ``j``; column ``j``'s causal rows are ``i >= j``. Returns ``(cot,)``."""
    R, C = h_hat.shape
    causal = torch.arange(R, device=h_hat.device)[:, None] >= torch.arange(C, device=h_hat.device)[None, :]
    return (h_hat * causal).sum(0) / causal.sum(0)


def token_saliency(column_mean: torch.Tensor) -> torch.Tensor:
    """Per-token saliency ``1 - column_mean``: how much each CoT token was re-enabled (higher = more salient)."""
    return 1.0 - column_mean


@dataclass(frozen=True)
class Rewards:
    """A rollout's saliency reward in both orientations (module docstring)."""

    reenable: float
    eq3: float

    def oriented(self, reward: str) -> float:
        """The reward in orientation ``reward`` (one of ``REWARDS``)."""
        if reward not in REWARDS:
            raise ValueError(f"saliency reward orientation must be one of {REWARDS}, got {reward!r}")
        return self.reenable if reward == "reenable" else self.eq3


def rewards(column_mean: torch.Tensor) -> Rewards:
    """Both rollout-reward orientations from the per-token column means (see the module docstring).

    An empty CoT has no column to average; it gets 0.0 in both orientations (the caller flags it as degenerate).
    """
    if column_mean.numel() == 0:
        return Rewards(0.0, 0.0)
    return Rewards(reenable=(1.0 - column_mean.double()).mean().item(), eq3=column_mean.double().mean().item())
