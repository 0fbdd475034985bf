"""The paper's Figures 3-5: two models' chains of thought for the same problem, side by side, with spaCy's tags
coloured -- numbers (``pos_ == "NUM"``), symbols (``pos_ == "SYM"``) and stop words (``is_stop``), the three
categories Table 1 counts (``atmanrl.eval.composition``).

Input: the per-sample records of two evaluation result files (``experiments/eval_gsm8k.py`` JSON, the baseline
first). Output: one self-contained HTML page (inline CSS, no scripts). Everything a model wrote is HTML-escaped, so
a completion containing ``<script>`` or ``&`` shows as text.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from atmanrl.eval.composition import load_spacy

# category -> (CSS class, background, legend text); a token that is both a number and a stop word is a number
CATEGORIES = {
    "num": ("#ffd166", "numbers (NUM)"),
    "sym": ("#8ecae6", "symbols (SYM)"),
    "stop": ("#e5e5e5", "stop words"),
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; color: #222; line-height: 1.5; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1.5rem; margin-bottom: 2.5rem; }
.cot { font-family: ui-monospace, monospace; font-size: 0.9rem; white-space: pre-wrap; background: #fafafa;
       border: 1px solid #ddd; padding: 0.6rem; }
.q { background: #f4f4f4; padding: 0.5rem 0.8rem; white-space: pre-wrap; }
.meta { color: #555; font-size: 0.85rem; }
.legend span { padding: 0 0.4rem; margin-right: 0.6rem; }
""" + "".join(f".{name} {{ background: {colour}; }}\n" for name, (colour, _) in CATEGORIES.items())


def category(token) -> str | None:
    """The Table 1 category of one spaCy token, or None."""
    if token.pos_ == "NUM":
        return "num"
    if token.pos_ == "SYM":
        return "sym"
    if token.is_stop:
        return "stop"
    return None


def tagged_html(text: str) -> str:
    """``text`` as HTML: every spaCy token escaped, the Table 1 categories wrapped in coloured spans."""
    out = []
    for token in load_spacy()(text):
        shown = html.escape(token.text)
        name = None if token.is_space else category(token)
        out.append(f'<span class="{name}">{shown}</span>' if name else shown)
        out.append(html.escape(token.whitespace_))
    return "".join(out)


def pick_sample(samples: Sequence[dict], problem: int) -> dict:
    """The sample shown for ``problem``: its first one that wrote ``#####``, else its first one."""
    mine = [s for s in samples if s["problem"] == problem]
    if not mine:
        raise ValueError(f"no sample of problem {problem} in the results file")
    return next((s for s in mine if s.get("answer") is not None), mine[0])


def _column(label: str, s: dict) -> str:
    verdict = "correct" if s.get("correct") else "wrong"
    answer = s.get("answer")
    answer_text = "(no #####)" if answer is None else f"##### {answer.strip()}"
    return (f"<div><h3>{html.escape(label)}</h3><div class='cot'>{tagged_html(s['cot'])}</div>"
            f"<p class='meta'>{html.escape(answer_text)} &mdash; {verdict} (gold {html.escape(str(s.get('gold')))}), "
            f"{html.escape(str(s.get('cot_tokens', '?')))} CoT tokens</p></div>")


def side_by_side_html(baseline: dict, atmanrl: dict, problems: Sequence[int],
                      title: str = "Chains of thought side by side") -> str:
    """One page with, for each problem index, the baseline's CoT (left) and AtManRL's (right).

    ``baseline`` and ``atmanrl`` are evaluation results (``label`` and ``samples``); both must hold the same
    question at each index (the same ``--data``, ``--n`` and ``--seed``).
    """
    legend = "".join(f'<span class="{name}">{html.escape(text)}</span>' for name, (_, text) in CATEGORIES.items())
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='legend'>spaCy tags: {legend}</p>"]
    for problem in problems:
        left, right = pick_sample(baseline["samples"], problem), pick_sample(atmanrl["samples"], problem)
        if left["question"] != right["question"]:
            raise ValueError(
                f"problem {problem} differs between the two results files ({left['question'][:60]!r} vs "
                f"{right['question'][:60]!r}); evaluate both models with the same --data, --n and --seed")
        parts.append(f"<h2>Problem {problem}</h2><div class='q'>{html.escape(left['question'])}</div>")
        parts.append(f"<div class='pair'>{_column(baseline['label'], left)}{_column(atmanrl['label'], right)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
