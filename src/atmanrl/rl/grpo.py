"""The GRPO math of the paper (section 3.3), one small pure function per formula.

What is notable here:
- ``outcome_reward`` is Eq. 4 (0 for a correct answer, -1 otherwise); ``total_reward`` adds the saliency reward
  (Eq. 3) with a weight: 1 is AtManRL, 0 is the paper's baseline.
- ``group_advantages`` is Eq. 5's baseline, ``A_i = R_i - mean_group(R)``, with an optional division by the group
  std (off by default: the paper does not divide, and the saliency reward is tiny next to the outcome reward, so a
  std would mostly blow up noise; docs/DESIGN.md, decision 5).
- ``group_standardised_saliency`` is ours, beyond the paper and off by default (``saliency.normalize: group``): the
  saliency reward standardised inside its group before it is weighted, so that ``weight`` is the saliency term's
  spread in advantage units whatever the outcome spread or the mask schedule (docs/toyworld.md says why).
- ``grpo_loss`` is Eq. 5. The paper writes one ratio per rollout, ``pi(a|q) / pi_old(a|q)``; for a 1024-token
  completion that product of per-token ratios is numerically wild, so the default is GRPO's per-token form (Shao
  et al. 2024): clip each token's ratio, average over the rollout's tokens, then over rollouts. ``ratio="sequence"``
  gives the literal Eq. 5.
- Normalisation is by an explicit ``count`` of rollouts: the trainer passes the number of rollouts in the *global*
  minibatch, so that summing gradients over ranks equals the single-process gradient (rl/trainer.py).
- With ``logp == logp_old`` (first pass over a fresh batch) the ratio is exactly 1, nothing is clipped, and the
  gradient is the plain REINFORCE-with-baseline gradient ``-1/N sum_i A_i * mean_t grad log pi(a_it)``
  (tests/test_grpo.py checks this against a hand computation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def outcome_reward(correct: torch.Tensor) -> torch.Tensor:
    """Eq. 4: 0 if the rollout's answer equals the ground truth, -1 otherwise (``correct`` is boolean)."""
    return torch.where(correct.bool(), 0.0, -1.0)


def total_reward(outcome: torch.Tensor, saliency: torch.Tensor, weight: float) -> torch.Tensor:
    """``R_total = R_Outcome + weight * R_Faithfulness`` (section 3.3; the paper uses weight 1, baseline 0)."""
    return outcome + weight * saliency


def group_standardised_saliency(saliency: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Ours, beyond the paper: ``(s_i - mean_group(s)) / std_group(s)`` over the G rollouts of each query.

    saliency: ``(P, G)``. The population std, as ``group_advantages`` uses; a group whose saliency rewards spread by
    ``eps`` or less gets 0 everywhere (nothing to rank, and dividing would turn rounding into a full-size signal).
    With it, ``weight * z`` has a within-group std of exactly ``weight`` in every group that has one, so the weight
    means the same in a group whose outcomes all agree (where the paper's raw term is the only signal) as in one
    whose outcomes split (where the raw term is ~30x smaller than the outcome's spread in the toy world). Dividing
    by the outcome's spread instead was not chosen: it is 0 exactly in the groups that matter most here.
    """
    mean = saliency.mean(dim=1, keepdim=True)
    std = saliency.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (saliency - mean) / std.clamp(min=eps), torch.zeros_like(saliency))


def group_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6):
    """Eq. 5's baseline: ``A_i = R_i - mean_group(R)`` over the G rollouts of each query.

    rewards: ``(P, G)`` -- P queries, G rollouts each. Returns ``(advantages (P, G), zero_variance (P,))``;
    a zero-variance group (all rollouts equally rewarded) has all-zero advantages and contributes no gradient.
    ``std_normalize`` divides by the group's (population) std plus ``eps``.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    advantages = rewards - mean
    if std_normalize:
        advantages = advantages / (std + eps)
    return advantages, (std.squeeze(1) == 0)


def clipped_objective(ratio: torch.Tensor, advantage: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 5's summand: ``min(r * A, clip(r, 1 - eps, 1 + eps) * A)`` elementwise (to be maximised)."""
    return torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)


def is_clipped(ratio: torch.Tensor, advantage: torch.Tensor, eps: float) -> torch.Tensor:
    """Where the clipped branch is active (and so carries no gradient): r > 1+eps with A > 0, or r < 1-eps with A < 0."""
    return ((ratio > 1 + eps) & (advantage > 0)) | ((ratio < 1 - eps) & (advantage < 0))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) (Schulman's k3, as in GRPO): ``exp(d) - d - 1`` with ``d = ref - logp``."""
    d = ref_logp - logp
    return d.exp() - d - 1


@dataclass
class LossStats:
    """Sums (not means) so that micro-batches and ranks can be added up before dividing."""

    units: float = 0.0  # ratios looked at: tokens ("token") or rollouts ("sequence")
    clipped: float = 0.0  # of those, how many had the clipped branch active
    ratio_sum: float = 0.0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    kl_sum: float = 0.0  # sum over rollouts of the per-rollout mean KL (0 when kl_beta is 0)

    def add(self, other: "LossStats") -> "LossStats":
        return LossStats(self.units + other.units, self.clipped + other.clipped, self.ratio_sum + other.ratio_sum,
                         min(self.ratio_min, other.ratio_min), max(self.ratio_max, other.ratio_max),
                         self.kl_sum + other.kl_sum)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps: float = 0.2,
    ratio: Literal["token", "sequence"] = "token",
    count: int | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Eq. 5, ``L_GRPO = -1/N sum_i min(r_i A_i, clip(r_i, 1-eps, 1+eps) A_i)`` (+ optional ``kl_beta * KL``).

    logp, logp_old, mask: ``(B, T)`` per-token log-probs of the sampled completion tokens under the current and
    the sampling policy, and which entries are real tokens. advantages: ``(B,)``. count: the N of Eq. 5 (default
    B); pass the global minibatch size when the batch is split over micro-batches or ranks. Rows with no tokens
    (empty completions) contribute nothing.
    """
    mask = mask.to(logp.dtype)
    logp_old = logp_old.to(logp.dtype)
    n_tokens = mask.sum(dim=1)  # (B,)
    log_ratio = (logp - logp_old) * mask
    adv = advantages.to(logp.dtype)
    if ratio == "token":
        r = log_ratio.exp()  # (B, T); 1 on padding
        objective = clipped_objective(r, adv[:, None], eps)
        per_rollout = (objective * mask).sum(1) / n_tokens.clamp(min=1)  # mean over each rollout's tokens
        clipped = (is_clipped(r, adv[:, None], eps).to(logp.dtype) * mask).sum()
        units, r_real = mask.sum(), r.detach()[mask.bool()]
    elif ratio == "sequence":
        r = log_ratio.sum(1).exp()  # (B,): pi(a|q) / pi_old(a|q), the product of the token ratios
        per_rollout = clipped_objective(r, adv, eps)
        has_tokens = (n_tokens > 0).to(logp.dtype)
        per_rollout = per_rollout * has_tokens
        clipped = (is_clipped(r, adv, eps).to(logp.dtype) * has_tokens).sum()
        units, r_real = has_tokens.sum(), r.detach()[has_tokens.bool()]
    else:
        raise ValueError(f"ratio must be 'token' or 'sequence', got {ratio!r}")
    kl = torch.zeros_like(per_rollout)
    if kl_beta:
        if ref_logp is None:
            raise ValueError("kl_beta > 0 needs ref_logp, the reference policy's per-token log-probs")
        kl = (kl_k3(logp, ref_logp.to(logp.dtype)) * mask).sum(1) / n_tokens.clamp(min=1)
    n = logp.shape[0] if count is None else count
    loss = -(per_rollout - kl_beta * kl).sum() / n
    stats = LossStats(
        units=float(units),
        clipped=float(clipped),
        ratio_sum=float(r_real.sum()) if r_real.numel() else 0.0,
        ratio_min=float(r_real.min()) if r_real.numel() else float("inf"),
        ratio_max=float(r_real.max()) if r_real.numel() else float("-inf"),
        kl_sum=float(kl.detach().sum()),
    )
    return loss, stats
