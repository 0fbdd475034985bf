"""The AtMan mask ``H^AtMan`` as a learnable object (paper sections 3.1-3.2, Eq. 1; docs/DESIGN.md, decision 1).

For a sequence with CoT tokens ``[cs, ce)`` and length ``n``, the mask has one parameter ``p[w, v]`` for every
causal entry whose key column is a CoT token: query row ``w`` and CoT column ``v`` with ``w >= v``. Rows before
the CoT cannot see a CoT column, so the parameters form a lower-triangular block of ``n - cs`` rows by
``ce - cs`` columns, stored as ``p[b, i, j]`` for row ``cs + i`` and column ``cs + j``.

- Initialisation: ``p = c = -0.4`` on every entry ("uniformly suppresses attention to reasoning tokens").
- The bias added to the attention scores (Eq. 1) is ``scale * min(p, 0)`` with ``scale = 10``: clamped to <= 0
  because the mask should only find tokens that can be left suppressed, scaled for faster convergence
  (paper, "Value scaling"). At initialisation every CoT entry is ``10 * -0.4 = -4``.
- Every other entry of the bias is exactly 0: prompt columns, the delimiter and answer columns, entries above the
  diagonal. Those entries carry no parameter; padding entries of the batched ``p`` are held at 0 and multiplied
  by a 0/1 ``valid`` mask, so they get exactly zero gradient.
- One mask per sequence, shared by all layers and heads: the bias is ``(B, 1, Q, K)`` and broadcasts over heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class AtManMask(nn.Module):
    """Parameters ``p`` of the AtMan mask for a batch of sequences, each with its own CoT span and length.

    cot_lengths[b]: number of CoT tokens (mask columns) of sequence ``b``.
    row_counts[b]: number of mask rows, ``len(tokens) - cot_start`` (every query from the first CoT token on).
    """

    def __init__(
        self,
        cot_lengths: Sequence[int],
        row_counts: Sequence[int],
        init: float = -0.4,
        scale: float = 10.0,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if init >= 0:
            raise ValueError(f"the mask initialisation c must be negative (the paper uses -0.4), got {init}")
        for b, (c, r) in enumerate(zip(cot_lengths, row_counts, strict=True)):
            if c > r:
                raise ValueError(f"sequence {b}: {c} CoT columns but only {r} rows; rows start at the first CoT token")
        self.init, self.scale = float(init), float(scale)
        self.cot_lengths, self.row_counts = list(cot_lengths), list(row_counts)
        R, C = max(self.row_counts, default=0), max(self.cot_lengths, default=0)
        i = torch.arange(R, device=device)[None, :, None]
        j = torch.arange(C, device=device)[None, None, :]
        cols = torch.tensor(self.cot_lengths, device=device)[:, None, None]
        rows = torch.tensor(self.row_counts, device=device)[:, None, None]
        valid = (j < cols) & (i < rows) & (i >= j)  # (B, R, C): causal entries in CoT columns
        self.register_buffer("valid", valid, persistent=False)
        self.p = nn.Parameter(init * valid.to(dtype))

    def block(self) -> torch.Tensor:
        """``scale * min(p, 0)`` on the mask entries and exactly 0 elsewhere, ``(B, R, C)`` (Eq. 1's H^AtMan)."""
        return self.scale * self.p.clamp(max=0.0) * self.valid

    def forward(
        self, n_queries: int, n_keys: int, row_offset: Sequence[int], col_offset: Sequence[int]
    ) -> torch.Tensor:
        """The attention bias ``(B, 1, n_queries, n_keys)``: sequence ``b``'s block placed at query
        ``row_offset[b]`` and key ``col_offset[b]``, zeros everywhere else. Differentiable in ``p``.

        For the full sequence (no KV cache) both offsets are the CoT start; ``AnswerBatch`` provides the offsets of
        its prefix-cached layout. (The module's ``forward``, so ``torch.func.functional_call`` can swap ``p``.)
        """
        block = self.block()
        rows = []
        for b, (r, c) in enumerate(zip(self.row_counts, self.cot_lengths, strict=True)):
            r0, c0 = row_offset[b], col_offset[b]
            if r0 < 0 or c0 < 0 or r0 + r > n_queries or c0 + c > n_keys:
                raise ValueError(
                    f"sequence {b}: a {r}x{c} mask block at (query {r0}, key {c0}) does not fit a "
                    f"{n_queries}x{n_keys} attention bias"
                )
            rows.append(F.pad(block[b, :r, :c], (c0, n_keys - c0 - c, r0, n_queries - r0 - r)))
        return torch.stack(rows)[:, None]

    def sequence_p(self, b: int) -> torch.Tensor:
        """The parameters of sequence ``b`` as a ``(rows, cot)`` tensor (0 above the diagonal)."""
        return self.p[b, : self.row_counts[b], : self.cot_lengths[b]]
