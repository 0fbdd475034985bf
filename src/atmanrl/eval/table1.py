"""The paper's Table 1 from evaluation results: summary numbers and the Markdown table.

Columns, as in the paper: Avg. token / CoT, Numbers %, Stop words %, Symbols %, Pass@k; we add mean accuracy.
Given a baseline, every other row shows its relative change against it, as the paper's table does: ``119.7
(-36%)`` means 36 % fewer CoT tokens than the baseline (``(x - base) / base``, rounded to a whole percent). Columns
that are themselves percentages also show the change in percentage points, which is what the paper's text quotes
("a 4% decrease in stop words": 29.27 -> 25.23 is -14 % relative, -4.04 points): ``25.23 (-14%, -4.04 pp)``.
"""

from __future__ import annotations

from atmanrl.eval.composition import Composition
from atmanrl.eval.passk import mean_accuracy, pass_at_k

# (summary key, column header, decimals); every column but the first is a percentage
COLUMNS = [
    ("avg_cot_tokens", "Avg. token / CoT ↓", 1),
    ("numbers_pct", "Numbers % ↑", 2),
    ("stop_words_pct", "Stop words % ↓", 2),
    ("symbols_pct", "Symbols % ↑", 2),
    ("pass_at_k", "Pass@{k} ↑", 1),
    ("accuracy", "Accuracy % ↑", 1),
]
PERCENT = {key for key, _, _ in COLUMNS[1:]}


def summarize(samples: list[dict]) -> dict:
    """Table 1 numbers from per-sample records (keys: problem, correct, cot_tokens, composition dict).

    pass@k counts every sample of a problem (k = samples per problem); percentages are 0-100.
    """
    if not samples:
        raise ValueError("no samples to summarise")
    by_problem: dict[int, list[bool]] = {}
    for s in samples:
        by_problem.setdefault(s["problem"], []).append(bool(s["correct"]))
    correct = list(by_problem.values())
    k = max(len(c) for c in correct)
    total = sum((Composition(**s["composition"]) for s in samples), Composition())
    shares = total.percent()
    return {
        "problems": len(correct),
        "k": k,
        "samples": len(samples),
        "avg_cot_tokens": sum(s["cot_tokens"] for s in samples) / len(samples),
        "numbers_pct": shares["numbers"],
        "stop_words_pct": shares["stop_words"],
        "symbols_pct": shares["symbols"],
        "pass_at_k": 100 * pass_at_k(correct),
        "accuracy": 100 * mean_accuracy(correct),
        "with_answer_pct": 100 * sum(s.get("answer") is not None for s in samples) / len(samples),
    }


def _cell(value: float, decimals: int, base: float | None, percent: bool) -> str:
    text = f"{value:.{decimals}f}"
    if base is None:
        return text
    relative = "n/a" if base == 0 else f"{round(100 * (value - base) / base):+d}%"
    points = f", {value - base:+.{decimals}f} pp" if percent else ""
    return f"{text} ({relative}{points})"


def table1_markdown(rows: list[tuple[str, dict]], baseline: str | None = None) -> str:
    """Markdown table, one row per ``(label, summary)``; with ``baseline`` (a label), relative changes (and
    percentage points for the percentage columns)."""
    base = dict(rows).get(baseline) if baseline is not None else None
    if baseline is not None and base is None:
        raise ValueError(f"baseline {baseline!r} is not one of the rows {[label for label, _ in rows]}")
    k = rows[0][1]["k"]
    header = "| | " + " | ".join(h.format(k=k) for _, h, _ in COLUMNS) + " |"
    lines = [header, "| --- |" + " ---: |" * len(COLUMNS)]
    for label, summary in rows:
        ref = base if base is not None and label != baseline else None
        cells = [_cell(summary[key], d, ref[key] if ref else None, key in PERCENT) for key, _, d in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
