"""Held-out evaluation in the toy world: the paper's Table 1 block plus what only a planted-truth world can count.

For every problem: one greedy completion (pass@1 greedy) and ``k`` sampled ones. Over the sampled completions, as
Table 1 does (``atmanrl.eval.summarize``): pass@k, mean accuracy, mean CoT tokens, spaCy shares of numbers / stop
words / symbols. Added here, from the generator's grammar labels (``toyworld.label_cot``), pooled over the sampled
CoTs: the share of filler and of distractor tokens among CoT tokens, the needed-step coverage (mean share of the
problem's steps written correctly), how often each style was written (a CoT with filler, with distractors, or
dense: neither) and the accuracy of the CoTs of each style. The same numbers for the greedy completions carry a
``greedy_`` prefix.
"""

from __future__ import annotations

import torch

from atmanrl.data import toyworld as tw
from atmanrl.eval.composition import composition
from atmanrl.eval.table1 import summarize
from atmanrl.model.generate import generate, row_seed


def describe(task: tw.ToyTask, problem: tw.Problem, completion: list[int]) -> dict:
    """One completion as a record: correctness, CoT length, grammar-label counts, step coverage."""
    cot, answer = task.split(completion)
    words = task.words(cot)
    labels = tw.label_cot(problem, words)
    return {
        "correct": answer is not None and task.words(answer) == [problem.gold],
        "answer": None if answer is None else " ".join(task.words(answer)),
        "cot": " ".join(words),
        "cot_tokens": len(cot),
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


@torch.no_grad()
def evaluate_toy(model, tokenizer, problems: list, *, k: int = 4, temperature: float = 1.0, seed: int = 0,
                 max_new_tokens: int = 64, batch_size: int = 64) -> dict:
    """Greedy + ``k`` sampled completions per problem. Returns ``{"summary": {...}, "samples": [...]}``."""
    task = tw.ToyTask(tokenizer)
    model.eval()
    prompts = [task.prompt(p) for p in problems]
    greedy, samples = [], []
    for s in range(0, len(problems), batch_size):
        chunk = prompts[s:s + batch_size]
        outs = generate(model, chunk, max_new_tokens=max_new_tokens, greedy=True, stop_ids=task.stop_ids,
                        pad_id=task.pad_id)
        greedy += [describe(task, problems[s + i], o.tokens) for i, o in enumerate(outs)]
    per = max(1, batch_size // k)
    for s in range(0, len(problems), per):
        chunk = [p for p in prompts[s:s + per] for _ in range(k)]
        outs = generate(model, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                        stop_ids=task.stop_ids, pad_id=task.pad_id,  # one seed per (problem, sample)
                        seed=[row_seed(seed, s + j // k, j % k) for j in range(len(chunk))])
        for j, o in enumerate(outs):
            i = s + j // k
            samples.append({"problem": i, "sample": j % k, **describe(task, problems[i], o.tokens)})
    for rec, comp in zip(samples, composition([r["cot"] for r in samples])):
        rec["composition"] = vars(comp)
    summary = summarize(samples)
    summary.update(_toy_shares(samples))
    summary["pass_at_1_greedy"] = 100 * sum(r["correct"] for r in greedy) / len(greedy)
    summary.update({f"greedy_{key}": v for key, v in _toy_shares(greedy).items()})
    summary["greedy_avg_cot_tokens"] = sum(r["cot_tokens"] for r in greedy) / len(greedy)
    return {"summary": summary, "samples": samples, "greedy": greedy}


TOY_COLUMNS = [("pass_at_1_greedy", "Pass@1 greedy %"), ("filler_pct", "Filler %"),
               ("distractor_pct", "Distractor %"), ("step_coverage_pct", "Step coverage %")]


def before_after(start: str, trained: str, problems: int = 100, k: int = 4, seed: int = 0) -> str:
    """The closing block of a toy run: the start and the trained policy on the same held-out problems and samples,
    in Table 1's layout (relative changes against the start) plus the toy world's own columns."""
    from atmanrl.eval.table1 import table1_markdown
    from atmanrl.model import load

    held_out = tw.make_problems(problems, 0, "test")
    rows = []
    for label, name in (("before", start), ("after", trained)):
        model, tokenizer = load(name)
        rows.append((label, evaluate_toy(model, tokenizer, held_out, k=k, seed=seed)["summary"]))
    extra = ["| | " + " | ".join(h for _, h in TOY_COLUMNS) + " |", "| --- |" + " ---: |" * len(TOY_COLUMNS)]
    extra += [f"| {label} | " + " | ".join(f"{s[key]:.1f}" for key, _ in TOY_COLUMNS) + " |" for label, s in rows]
    return (f"Held-out toy problems: {problems}, {k} samples each at T = 1 (greedy for pass@1).\n\n"
            + table1_markdown(rows, baseline="before") + "\n\n" + "\n".join(extra))
