"""The original ATMAN explanation (Deiseroth et al., 2023; paper section 3.1), for comparison with the learned mask.

ATMAN suppresses one token at a time with a *fixed* attention manipulation and reads off how the output changes.
Here, as the paper recaps it: for each CoT token ``v`` in turn, the bias ``suppression`` (default -4, the learned
mask's initial value ``10 * -0.4``) is added to key column ``v`` in every causal row ``w >= v``, every layer and
head, and the change of the gold answer's cross-entropy (Eq. 2's loss) is reported:

    delta[v] = CE(answer | column v suppressed) - CE(answer | no suppression)

``delta > 0``: the answer needs that token. One forward per CoT token, no gradients; the suppressed copies run in
batches that share the prompt prefix (``AnswerBatch``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atmanrl.model.llama import Llama
from atmanrl.saliency.batch import AnswerBatch, SaliencyInput


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
