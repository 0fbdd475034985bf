"""The paper's Table 1: sampling and scoring (``evaluate``), summary numbers and the Markdown table.

``evaluate`` samples ``k`` completions per problem through any registered task (``atmanrl.tasks.sampling``), keeps
every sample as a JSON-ready record (prompt, completion, CoT and answer text, correctness, CoT length in model
tokens, spaCy composition) and summarises them. Definitions (docs/DESIGN.md, decision 10): the CoT is everything
before the first ``#####``; a completion without the delimiter is all CoT, has no answer and is incorrect. Sample
``j`` of problem ``i`` has its own seed ``(seed, i, j)``, so a run repeats whatever ``batch_size`` is.

Columns, as in the paper: Avg. token / CoT, Numbers %, Stop words %, Symbols %, Pass@k; we add mean accuracy.
Given a baseline, every other row shows its relative change against it, as the paper's table does: ``119.7
(-36%)`` means 36 % fewer CoT tokens than the baseline (``(x - base) / base``, rounded to a whole percent). Columns
that are themselves percentages also show the change in percentage points, which is what the paper's text quotes
("a 4% decrease in stop words": 29.27 -> 25.23 is -14 % relative, -4.04 points): ``25.23 (-14%, -4.04 pp)``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from atmanrl.config import EvalConfig, RolloutConfig
from atmanrl.eval.composition import Composition, composition
from atmanrl.eval.passk import mean_accuracy, pass_at_k
from atmanrl.tasks import Sample, Task
from atmanrl.tasks.sampling import sample

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


def summarize(samples: Sequence[Sample], compositions: Sequence[Composition]) -> dict:
    """Table 1 numbers from the samples and the spaCy composition of each one's CoT.

    pass@k counts every sample of a problem (k = samples per problem); percentages are 0-100.
    """
    if not samples:
        raise ValueError("no samples to summarise")
    if len(compositions) != len(samples):
        raise ValueError(f"{len(compositions)} compositions for {len(samples)} samples; pass one per sample")
    by_problem: dict[int, list[bool]] = {}
    for s in samples:
        by_problem.setdefault(s.problem, []).append(bool(s.correct))
    correct = list(by_problem.values())
    k = max(len(c) for c in correct)
    shares = sum(compositions, Composition()).percent()
    return {
        "problems": len(correct),
        "k": k,
        "samples": len(samples),
        "avg_cot_tokens": sum(s.cot_tokens for s in samples) / len(samples),
        "numbers_pct": shares["numbers"],
        "stop_words_pct": shares["stop_words"],
        "symbols_pct": shares["symbols"],
        "pass_at_k": 100 * pass_at_k(correct),
        "accuracy": 100 * mean_accuracy(correct),
        "with_answer_pct": 100 * sum(s.answer is not None for s in samples) / len(samples),
    }


def record(s: Sample, problem, tokenizer, comp: Composition) -> dict:
    """One sample as the JSON record the results files keep (read by ``side_by_side``, the faithfulness tests)."""
    return {"problem": s.problem, "sample": s.sample, "question": problem.question, "gold": problem.gold,
            "prompt": tokenizer.decode(s.prompt), "completion": tokenizer.decode(s.tokens, skip_special_tokens=True),
            "cot": s.cot, "answer": s.answer, "correct": s.correct, "finished": s.finished,
            "completion_tokens": len(s.tokens), "cot_tokens": s.cot_tokens, "composition": vars(comp)}


def evaluate(model, task: Task, problems: list, *, k: int = 4, max_new_tokens: int = RolloutConfig.max_new_tokens,
             temperature: float = 0.7, top_p: float = 1.0, seed: int = EvalConfig.seed, batch_size: int = 64,
             progress: bool = True) -> dict:
    """Sample ``k`` completions per problem through ``task`` and score them: ``{"summary": ..., "samples": [...]}``.

    ``task`` is a registered task (``atmanrl.tasks.registry.make_task``; it decodes with ``task.tokenizer``).
    Defaults follow the training run's: ``max_new_tokens`` = ``rollout.max_new_tokens``, ``seed`` = ``eval.seed``.
    """
    t0, seen = time.perf_counter(), []

    def report(done: int, batch: list[Sample]) -> None:
        seen.extend(batch)
        if progress:
            acc = sum(s.correct for s in seen) / len(seen)
            print(f"[eval] {done}/{len(problems)} problems, {len(seen)} samples, accuracy {acc:.3f}, "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    samples = sample(model, task, problems, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, batch_size=batch_size, on_batch=report)
    comps = composition([s.cot for s in samples])
    return {"summary": summarize(samples, comps),
            "samples": [record(s, problems[s.problem], task.tokenizer, c) for s, c in zip(samples, comps)]}


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
