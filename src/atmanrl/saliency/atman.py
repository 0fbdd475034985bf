"""The original ATMAN explanation (Deiseroth et al., 2023; paper section 3.1), for comparison with the learned mask.

ATMAN suppresses one token at a time with a *fixed* attention manipulation and reads off how the output changes.
Here, as the paper recaps it: for each CoT token ``v`` in turn, the bias ``suppression`` (default -4, the learned
mask's initial value ``10 * -0.4``) is added to key column ``v`` in every causal row ``w >= v``, every layer and
head, and the change of the gold answer's cross-entropy (Eq. 2's loss) is reported:

    delta[v] = CE(answer | column v suppressed) - CE(answer | no suppression)

``delta > 0``: the answer needs that token. One forward per CoT token, no gradients; the suppressed copies run in
batches that share the prompt prefix (``AnswerBatch``).

**Re-open one** (``reopen_one``; ours, beyond the paper and beyond ATMAN). The converse of ATMAN, asked from the
learned mask's starting point: every CoT column starts suppressed (bias ``scale * init`` in every causal row, as
the AtMan mask at its initialisation), and one token at a time is re-opened alone. Its saliency is the share of the
answer loss that re-opening it restores:

    restored[v] = (CE_all - CE_v) / (CE_all - CE_none)

with ``CE_all`` the answer CE with every CoT column suppressed, ``CE_v`` the same with column ``v`` open, and
``CE_none`` without suppression. When ``CE_all - CE_none < min_span`` (0.01 nats) suppressing the CoT does not hurt
the answer enough to say which token restores it, and every token gets 0. It asks what the mask optimisation asks
-- which tokens must be re-enabled to restore the answer -- without Adam's per-entry step normalisation and without
Eq. 3's average over rows that never read the token: a token the answer is copied from restores most of the loss on
its own. ``restored`` can be negative (re-opening that token alone made the answer less likely) and, for a small
``CE_all - CE_none``, far below -1; the ranking keeps it, but the rollout reward counts only what is restored: the
mean over CoT tokens of ``restored`` clipped to [0, 1] (high when few tokens carry the whole answer). One forward
per CoT column for the whole batch of inputs (as many columns as the longest CoT), no gradients; a caller with more
inputs than fit in memory at once passes them in chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from atmanrl.model.llama import Llama
from atmanrl.saliency.batch import AnswerBatch, SaliencyInput
from atmanrl.saliency.mask import AtManMask


@dataclass
class AtmanExplanation:
    base_loss: float  # answer CE without suppression
    delta_loss: torch.Tensor  # (n_cot,) CE with CoT token v suppressed minus base_loss (CPU, float32)
    suppression: float


def atman_explanation(
    model: Llama, x: SaliencyInput, suppression: float = -4.0, batch_size: int = 16
) -> AtmanExplanation:
    """Suppress each CoT token of ``x`` alone and report the change of the answer cross-entropy (module docstring)."""
    if x.n_cot == 0 or x.n_answer == 0:
        raise ValueError(
            f"ATMAN needs CoT and answer tokens; this input has {x.n_cot} CoT and {x.n_answer} answer tokens"
        )
    deltas = []
    with torch.no_grad():
        base = AnswerBatch(model, [x]).losses()[0].item()
        for start in range(0, x.n_cot, batch_size):
            columns = list(range(start, min(x.n_cot, start + batch_size)))
            batch = AnswerBatch(model, [x] * len(columns))  # one unique prompt: its prefix is computed once
            bias = torch.zeros(len(columns), 1, *batch.bias_shape, device=batch.device, dtype=batch.dtype)
            r0, c0 = batch.row_offset[0], batch.col_offset[0]
            for k, j in enumerate(columns):
                bias[k, 0, r0 + j: r0 + x.mask_rows, c0 + j] = suppression  # rows w >= v of column v
            deltas.append(batch.losses(bias).float().cpu() - base)
    return AtmanExplanation(base_loss=base, delta_loss=torch.cat(deltas), suppression=suppression)


@dataclass
class ReopenOne:
    """``reopen_one``'s result for one input (module docstring)."""

    restored: torch.Tensor  # (n_cot,) share of the answer loss restored by re-opening CoT token v alone (CPU)
    suppressed_loss: float  # answer CE with every CoT column suppressed (CE_all)
    unmasked_loss: float  # answer CE without suppression (CE_none)

    @property
    def reward(self) -> float:
        """The rollout reward of this read-out: the mean over CoT tokens of ``restored`` clipped to [0, 1]."""
        return self.restored.double().clamp(0.0, 1.0).mean().item()


def reopen_one(model: Llama, inputs: Sequence[SaliencyInput], init: float = -5.0, scale: float = 10.0,
               min_span: float = 0.01) -> list[ReopenOne]:
    """Re-open one CoT token at a time from full suppression (ours, beyond the paper; module docstring).

    ``init`` / ``scale``: the suppression ``scale * init`` on every causal entry of a CoT column, as the AtMan mask
    at its initialisation (the paper's -0.4 / 10 gives -4, which leaves the CoT partly visible; the default -5,
    selected against the toy world's planted truth, gives -50, i.e. the CoT is hidden). ``min_span``: see the
    module docstring.
    """
    for i, x in enumerate(inputs):
        if x.n_cot == 0 or x.n_answer == 0:
            raise ValueError(f"input {i} has {x.n_cot} CoT and {x.n_answer} answer tokens; re-opening needs both "
                             "non-empty (drop such rollouts or give them a neutral reward)")
    if not inputs:
        return []
    with torch.no_grad():
        batch = AnswerBatch(model, inputs)
        mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], init, scale,
                         device=batch.device, dtype=torch.promote_types(batch.dtype, torch.float32))

        def losses(p: torch.Tensor) -> torch.Tensor:
            mask.p.copy_(p)
            return batch.losses(mask(*batch.bias_shape, batch.row_offset, batch.col_offset)).double().cpu()

        suppressed = init * mask.valid.to(mask.p.dtype)
        none, everything = losses(torch.zeros_like(suppressed)), losses(suppressed)
        reopened = torch.empty(len(inputs), suppressed.shape[2], dtype=torch.float64)
        for v in range(suppressed.shape[2]):  # column v open in every sequence (past its CoT: no entry, no effect)
            p = suppressed.clone()
            p[:, :, v] = 0.0
            reopened[:, v] = losses(p)
    out = []
    for b, x in enumerate(inputs):
        span = everything[b] - none[b]
        restored = (everything[b] - reopened[b, : x.n_cot]) / span if span >= min_span else torch.zeros(x.n_cot)
        out.append(ReopenOne(restored.float(), float(everything[b]), float(none[b])))
    return out
