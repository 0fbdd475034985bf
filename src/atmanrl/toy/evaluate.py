"""Held-out evaluation in the toy world: the paper's Table 1 block plus what only a planted-truth world can count.

For every problem: one greedy completion (pass@1 greedy) and ``k`` sampled ones, through the one sampling loop
(``atmanrl.tasks.sampling``). Over the sampled completions, as
Table 1 does (``atmanrl.eval.summarize``): pass@k, mean accuracy, mean CoT tokens, spaCy shares of numbers / stop
words / symbols. Added here, from the generator's grammar labels (``toyworld.label_cot``), pooled over the sampled
CoTs: the share of filler and of distractor tokens among CoT tokens, the needed-step coverage (mean share of the
problem's steps written correctly), how often each style was written (a CoT with filler, with distractors, or
dense: neither) and the accuracy of the CoTs of each style. The same numbers for the greedy completions carry a
``greedy_`` prefix.
"""

from __future__ import annotations

from atmanrl.eval.composition import composition
from atmanrl.eval.table1 import summarize, table1_markdown
from atmanrl.model import load
from atmanrl.tasks import Sample
from atmanrl.tasks import toyworld as tw
from atmanrl.tasks.sampling import sample


def describe(sample: Sample, problem: tw.Problem) -> dict:
    """One completion as a record: correctness, CoT length, grammar-label counts, step coverage."""
    words = sample.cot.split()
    labels = tw.label_cot(problem, words)
    return {
        "problem": sample.problem,
        "sample": sample.sample,
        "correct": sample.correct,
        "answer": sample.answer,
        "cot": sample.cot,
        "cot_tokens": sample.cot_tokens,
        **{f"n_{lab}": labels.count(lab) for lab in tw.LABELS},
        "coverage": tw.step_coverage(problem, words),
    }


def _toy_shares(records: list[dict]) -> dict:
    n_tokens = max(sum(r["cot_tokens"] for r in records), 1)
    n = len(records)
    return {
        "filler_pct": 100 * sum(r["n_filler"] for r in records) / n_tokens,
        "distractor_pct": 100 * sum(r["n_distractor"] for r in records) / n_tokens,
        "other_pct": 100 * sum(r["n_other"] for r in records) / n_tokens,
        "step_coverage_pct": 100 * sum(r["coverage"] for r in records) / n,
        "style_filler_pct": 100 * sum(r["n_filler"] > 0 for r in records) / n,
        "style_distractor_pct": 100 * sum(r["n_distractor"] > 0 for r in records) / n,
        "style_dense_pct": 100 * sum(r["n_filler"] == 0 and r["n_distractor"] == 0 for r in records) / n,
        **{f"accuracy_{style}_pct": _accuracy([r for r in records if _style(r) == style]) for style in tw.STYLES},
    }


def _style(record: dict) -> str:
    """The style a CoT was written in (a CoT with both kinds of padding counts as filler)."""
    return "filler" if record["n_filler"] else "distractor" if record["n_distractor"] else "dense"


def _accuracy(records: list[dict]) -> float:
    return 100 * sum(r["correct"] for r in records) / len(records) if records else float("nan")


def evaluate_toy(model, tokenizer, problems: list, *, k: int = 4, temperature: float = 1.0, seed: int = 0,
                 max_new_tokens: int = 64, batch_size: int = 64) -> dict:
    """Greedy + ``k`` sampled completions per problem (``atmanrl.tasks.sampling.sample``).
    Returns ``{"summary": {...}, "samples": [...], "greedy": [...]}`` (records of ``describe``)."""
    task = tw.ToyTask(tokenizer)
    greedy = sample(model, task, problems, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    sampled = sample(model, task, problems, k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     batch_size=batch_size)
    comps = composition([s.cot for s in sampled])
    samples = [{**describe(s, problems[s.problem]), "composition": vars(c)} for s, c in zip(sampled, comps)]
    greedy_records = [describe(s, problems[s.problem]) for s in greedy]
    summary = summarize(sampled, comps)
    summary.update(_toy_shares(samples))
    summary["pass_at_1_greedy"] = 100 * sum(r["correct"] for r in greedy_records) / len(greedy_records)
    summary.update({f"greedy_{key}": v for key, v in _toy_shares(greedy_records).items()})
    summary["greedy_avg_cot_tokens"] = sum(r["cot_tokens"] for r in greedy_records) / len(greedy_records)
    return {"summary": summary, "samples": samples, "greedy": greedy_records}


TOY_COLUMNS = [("pass_at_1_greedy", "Pass@1 greedy %"), ("filler_pct", "Filler %"),
               ("distractor_pct", "Distractor %"), ("step_coverage_pct", "Step coverage %")]


def before_after(start: str, trained: str, problems: int = 100, k: int = 4, seed: int = 0) -> str:
    """The closing block of a toy run: the start and the trained policy on the same held-out problems and samples,
    in Table 1's layout (relative changes against the start) plus the toy world's own columns."""
    held_out = tw.toy_problems(problems, 0, "test")
    rows = []
    for label, name in (("before", start), ("after", trained)):
        model, tokenizer = load(name)
        rows.append((label, evaluate_toy(model, tokenizer, held_out, k=k, seed=seed)["summary"]))
    extra = ["| | " + " | ".join(h for _, h in TOY_COLUMNS) + " |", "| --- |" + " ---: |" * len(TOY_COLUMNS)]
    extra += [f"| {label} | " + " | ".join(f"{s[key]:.1f}" for key, _ in TOY_COLUMNS) + " |" for label, s in rows]
    return (f"Held-out toy problems: {problems}, {k} samples each at T = 1 (greedy for pass@1).\n\n"
            + table1_markdown(rows, baseline="before") + "\n\n" + "\n".join(extra))
