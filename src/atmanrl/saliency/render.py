"""Pictures of a saliency result: the CoT coloured by per-token saliency, in a terminal and as a standalone HTML page.

Colour scale (both outputs): per-token saliency ``1 - column mean of Ĥ`` (``atmanrl.saliency.readout``), divided
by the largest absolute value in the CoT so the scale uses its full range. Red = re-enabled (the answer needed the
token), blue = suppressed further (the answer was better off without it), white = left at the initial suppression.
The HTML page is self-contained (inline CSS and SVG, no scripts, no network): the heat map with a legend, the
answer loss curve (Eq. 2) over the optimisation steps, the rewards in both orientations, the initial and unmasked
losses with a saturation warning, and optionally the original ATMAN explanation of the same CoT as a second heat
map.
"""

from __future__ import annotations

import html as _html
import math
from collections.abc import Sequence

import torch

from atmanrl.saliency.atman import AtmanExplanation, ReopenOne
from atmanrl.saliency.optimize import SaliencyResult

_RED, _BLUE, _WHITE = (214, 39, 40), (31, 119, 180), (255, 255, 255)


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """Diverging colour of ``value`` on ``[-scale, scale]``: blue - white - red."""
    t = 0.0 if scale <= 0 or not math.isfinite(value) else max(-1.0, min(1.0, value / scale))
    end = _RED if t > 0 else _BLUE
    return tuple(round(w + abs(t) * (e - w)) for w, e in zip(_WHITE, end))


def _scale(scores: torch.Tensor) -> float:
    return float(scores.abs().max()) if scores.numel() else 0.0


def terminal(tokens: Sequence[str], scores: torch.Tensor) -> str:
    """The CoT with each token on a 24-bit ANSI background of its saliency colour."""
    scale = _scale(scores)
    out = []
    for text, s in zip(tokens, scores.tolist(), strict=True):
        r, g, b = colour(s, scale)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{text}\x1b[0m")
    return "".join(out)


def ranking(tokens: Sequence[str], scores: torch.Tensor, k: int = 10) -> str:
    """The ``k`` most salient CoT tokens as plain text lines: rank, position, score, token."""
    order = torch.argsort(scores, descending=True)[:k].tolist()
    return "\n".join(f"{i + 1:3d}. #{j:<4d} {scores[j].item():+.4f}  {tokens[j]!r}" for i, j in enumerate(order))


def _spans(tokens: Sequence[str], scores: torch.Tensor, fmt: str) -> str:
    scale = _scale(scores)
    spans = []
    for j, (text, s) in enumerate(zip(tokens, scores.tolist(), strict=True)):
        r, g, b = colour(s, scale)
        shown = _html.escape(text).replace("\n", "&#8629;<br>")
        spans.append(f'<span class="tok" style="background:rgb({r},{g},{b})" title="#{j}: {s:{fmt}}">{shown}</span>')
    return "".join(spans)


def _legend(scale: float, label: str) -> str:
    stops = ", ".join(
        f"rgb{colour(t * scale, scale)} {round((t + 1) * 50)}%" for t in (-1.0, -0.5, 0.0, 0.5, 1.0)
    )
    return (
        f'<div class="legend"><span>{-scale:+.4f}</span><span class="bar" style="background:linear-gradient(to right, '
        f'{stops})"></span><span>{scale:+.4f}</span><span class="note">{_html.escape(label)}</span></div>'
    )


def loss_curve_svg(losses: Sequence[float], width: int = 560, height: int = 200) -> str:
    """An inline SVG line plot of the answer loss per optimisation step, with axis labels."""
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        return "<p>(no finite loss to plot)</p>"
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top, bottom = 60, 10, 10, 30
    w, h = width - left - right, height - top - bottom
    n = max(len(losses) - 1, 1)
    points = " ".join(
        f"{left + w * i / n:.1f},{top + h * (hi - v) / (hi - lo):.1f}" for i, v in enumerate(losses) if math.isfinite(v)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="curve">'
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" stroke="#999"/>'
        f'<polyline fill="none" stroke="#d62728" stroke-width="2" points="{points}"/>'
        f'<text x="{left - 5}" y="{top + 10}" text-anchor="end" font-size="11">{hi:.4f}</text>'
        f'<text x="{left - 5}" y="{top + h}" text-anchor="end" font-size="11">{lo:.4f}</text>'
        f'<text x="{left}" y="{height - 8}" font-size="11">step 0</text>'
        f'<text x="{left + w}" y="{height - 8}" text-anchor="end" font-size="11">step {len(losses) - 1}</text>'
        f'<text x="{left + w / 2}" y="{height - 8}" text-anchor="middle" font-size="11">answer cross-entropy '
        f"(Eq. 2) per mask step</text></svg>"
    )


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; line-height: 1.5; }
.cot { font-family: ui-monospace, monospace; font-size: 0.95rem; line-height: 1.9; white-space: normal; }
.tok { padding: 1px 0; border-radius: 2px; white-space: pre-wrap; }
.legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
.legend .bar { display: inline-block; width: 16rem; height: 0.9rem; border: 1px solid #999; }
.legend .note { color: #555; }
table { border-collapse: collapse; } td { padding: 0.15rem 0.8rem 0.15rem 0; }
.warn { color: #b00; font-weight: bold; } .box { background: #f4f4f4; padding: 0.5rem 0.8rem; white-space: pre-wrap; }
"""


def html_page(
    result: SaliencyResult,
    cot_tokens: Sequence[str],
    *,
    question: str = "",
    answer: str = "",
    title: str = "AtMan saliency of a chain of thought",
    config_note: str = "",
    atman: AtmanExplanation | None = None,
    reopen: ReopenOne | None = None,
) -> str:
    """A self-contained HTML page for one ``SaliencyResult`` (see the module docstring)."""
    esc = _html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    if question:
        parts.append(f"<h2>Question</h2><div class='box'>{esc(question)}</div>")
    if not result.ok:
        parts.append(f"<p class='warn'>Degenerate input: {esc(result.status)}. No saliency to show.</p>")
    else:
        parts.append("<h2>Chain of thought, coloured by learned saliency</h2>")
        parts.append(_legend(_scale(result.saliency), "per-token saliency 1 - mean(Ĥ) over causal rows; red = "
                                                      "re-enabled (needed for the answer), blue = suppressed further"))
        parts.append(f"<div class='cot'>{_spans(cot_tokens, result.saliency, '+.4f')}</div>")
    if answer:
        parts.append(f"<h2>Gold answer (teacher-forced)</h2><div class='box'>##### {esc(answer)}</div>")
    rows = [
        ("saliency reward, reenable (default)", f"{result.reward_reenable:+.5f}"),
        ("saliency reward, eq3 (literal Eq. 3)", f"{result.reward_eq3:+.5f}"),
        ("answer loss, no mask", f"{result.unmasked_loss:.4f}"),
        ("answer loss, initial mask (step 0)", f"{result.initial_loss:.4f}"),
        ("answer loss, last step", f"{result.loss_curve[-1]:.4f}" if result.loss_curve else "-"),
        ("mask optimisation steps", str(result.steps)),
    ]
    parts.append("<h2>Numbers</h2><table>" + "".join(f"<tr><td>{esc(k)}</td><td>{v}</td></tr>" for k, v in rows)
                 + "</table>")
    if result.saturated:
        parts.append("<p class='warn'>Saturated: the answer loss under the initial mask is already near 0, so the "
                     "mask gradients are tiny and the saliency carries little information.</p>")
    if config_note:
        parts.append(f"<p>{esc(config_note)}</p>")
    if result.loss_curve:
        parts.append("<h2>Loss curve</h2>" + loss_curve_svg(result.loss_curve))
    if atman is not None:
        parts.append("<h2>Original ATMAN: one token suppressed at a time</h2>")
        parts.append(_legend(_scale(atman.delta_loss), f"change of the answer CE when the token's column gets a "
                                                      f"fixed bias of {atman.suppression:g}; red = the answer "
                                                      f"needs it"))
        parts.append(f"<div class='cot'>{_spans(cot_tokens, atman.delta_loss, '+.4f')}</div>")
        parts.append(f"<p>answer CE without suppression: {atman.base_loss:.4f}</p>")
    if reopen is not None:
        parts.append("<h2>Re-open one (ours, beyond the paper): every CoT token hidden, one re-opened at a time</h2>")
        parts.append(_legend(_scale(reopen.restored), "share of the answer loss that re-opening the token alone "
                                                      "restores; red = the answer is read from it"))
        parts.append(f"<div class='cot'>{_spans(cot_tokens, reopen.restored, '+.3f')}</div>")
        parts.append(f"<p>answer CE with the whole CoT suppressed {reopen.suppressed_loss:.4f}, without suppression "
                     f"{reopen.unmasked_loss:.4f}; its rollout reward (mean restored share, clipped to [0, 1]) "
                     f"{reopen.reward:+.5f}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
