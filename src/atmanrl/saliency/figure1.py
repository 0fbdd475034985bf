"""The paper's Figure 1 for one chain of thought, as a PNG (matplotlib, an optional extra: ``pip install
atmanrl[plot]``).

Three panels, top to bottom:

1. the optimised mask as a heat map: ``Ĥ`` (Eq. 3's normalisation, 1 = left at the initial suppression, 0 =
   re-enabled) with one row per query from the first CoT token to the end of the sequence and one column per CoT
   token; entries a query cannot see (above the causal diagonal) are blank. The row where the answer starts is
   marked: the rows below it are the ones Eq. 2's loss is read at.
2. the CoT text, each token on the colour of its per-token saliency ``1 - column mean of Ĥ`` (red = re-enabled:
   the answer needed it; blue = suppressed further), on the same scale as the HTML page of
   ``atmanrl.saliency.render``;
3. the answer loss (Eq. 2) at every mask step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from atmanrl.saliency.optimize import SaliencyResult
from atmanrl.saliency.render import colour


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the Figure 1 PNG needs matplotlib: pip install 'atmanrl[plot]' (or pip install "
                         "matplotlib)") from None
    return plt


WIDTH = 150  # characters per line of the text panel (monospace 8 pt on an 11-inch figure)


def _layout(tokens: Sequence[str], scores: torch.Tensor) -> tuple[list, int]:
    """Tokens placed as monospace text wrapped at ``WIDTH`` characters: ``(x, line, text, colour)`` and the line
    count; whitespace is skipped, newlines break lines."""
    scale = float(scores.abs().max()) if scores.numel() else 0.0
    x = line = 0
    placed = []
    for text, s in zip(tokens, scores.tolist(), strict=True):
        for k, part in enumerate(text.split("\n")):
            if k > 0:
                x, line = 0, line + 1
            if x + len(part) > WIDTH and x > 0:
                x, line = 0, line + 1
            if part.strip():
                placed.append((x, line, part, colour(s, scale)))
            x += len(part)
    return placed, line + 1


def _text_panel(ax, placed: list, lines: int) -> None:
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(lines - 0.5, -0.5)
    ax.axis("off")
    for x, y, part, (r, g, b) in placed:
        ax.text(x, y, part, family="monospace", fontsize=8, va="center", ha="left",
                bbox={"facecolor": (r / 255, g / 255, b / 255), "edgecolor": "none", "pad": 0.6})


def figure1(result: SaliencyResult, cot_tokens: Sequence[str], path: str | Path, *, answer_row: int | None = None,
            title: str = "") -> Path:
    """Write the three-panel PNG for one ``SaliencyResult`` (computed with ``SaliencyConfig(return_mask=True)``).

    answer_row: the mask row (0 = first CoT token) where the gold answer starts, marked on the heat map.
    """
    if result.mask is None:
        raise ValueError("Figure 1 needs the optimised mask: compute the saliency with "
                         "SaliencyConfig(return_mask=True)")
    if not result.ok:
        raise ValueError(f"no saliency to draw: the input is degenerate ({result.status})")
    plt = _pyplot()
    h_hat = result.mask.double().clone()  # (rows, n_cot)
    rows, cols = h_hat.shape
    causal = torch.arange(rows)[:, None] >= torch.arange(cols)[None, :]
    h_hat[~causal] = float("nan")
    placed, lines = _layout(cot_tokens, result.saliency)
    text_height = 0.3 + 0.22 * lines
    fig, (ax_map, ax_text, ax_loss) = plt.subplots(
        3, 1, figsize=(11, 6 + text_height + 2.5), gridspec_kw={"height_ratios": [6, text_height, 2.5]})
    image = ax_map.imshow(h_hat.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax_map, label="Ĥ = H / c  (1: still suppressed, 0: re-enabled)")
    ax_map.set_xlabel("CoT token (key column)")
    ax_map.set_ylabel("query row (from the first CoT token)")
    step = max(1, cols // 40)
    ax_map.set_xticks(range(0, cols, step))
    ax_map.set_xticklabels([repr(cot_tokens[j])[1:-1] for j in range(0, cols, step)], rotation=90, fontsize=6)
    if answer_row is not None:
        ax_map.axhline(answer_row - 0.5, color="red", linewidth=1)
        ax_map.text(cols - 0.5, 0, "rows below the red line predict the answer (Eq. 2)", color="red", ha="right",
                    va="top", fontsize=7)
    ax_map.set_title(title or "AtMan mask after optimisation (Eq. 2), normalised (Eq. 3)")
    _text_panel(ax_text, placed, lines)
    ax_text.set_title("per-token saliency 1 - mean Ĥ (red: re-enabled, the answer needed it; blue: suppressed "
                      "further)", fontsize=9)
    ax_loss.plot(range(len(result.loss_curve)), result.loss_curve, color="#d62728")
    ax_loss.set_xlabel("mask optimisation step")
    ax_loss.set_ylabel("answer CE (Eq. 2)")
    ax_loss.grid(alpha=0.3)
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
