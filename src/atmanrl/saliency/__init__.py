"""AtMan saliency of a chain of thought: the paper's contribution (sections 3.1-3.2, Eqs. 1-3).

- ``batch``: ``SaliencyInput`` (prompt + CoT + "#####" + gold answer, with spans) and the fast batched forward.
- ``mask``: the learnable AtMan mask over CoT key columns (Eq. 1's H^AtMan).
- ``optimize``: Eq. 2, the mask optimisation loop, and the API ``saliency(model, inputs, config)``.
- ``readout``: Eq. 3, the normalised mask, per-token saliency and both reward orientations.
- ``atman``: the original ATMAN explanation (one CoT token suppressed at a time) for comparison, and its converse
  ``reopen_one`` (every CoT token suppressed, one re-opened at a time; ours, beyond the paper).
- ``render``: terminal colours and a self-contained HTML heat map.
"""

from atmanrl.saliency.batch import AnswerBatch, SaliencyInput
from atmanrl.saliency.mask import AtManMask
from atmanrl.saliency.optimize import EarlyStop, SaliencyConfig, SaliencyResult, saliency

__all__ = [
    "AnswerBatch",
    "AtManMask",
    "EarlyStop",
    "SaliencyConfig",
    "SaliencyInput",
    "SaliencyResult",
    "saliency",
]
