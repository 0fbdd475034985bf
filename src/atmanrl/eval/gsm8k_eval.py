"""Evaluate a model on GSM8K-style problems: k samples per problem, scored and described (Table 1).

Every sample is kept: prompt, completion text, CoT and answer text, correctness, CoT length in model tokens and
its spaCy composition. Definitions (docs/DESIGN.md, decision 10):
- CoT length: model tokens before the first ``#####`` (``split_tokens``); a completion without the delimiter is
  all CoT (its text tokens, the end-of-turn token excluded) and has no answer, so it is incorrect.
- Sampling: sample ``j`` of problem ``i`` has its own seed ``(seed, i, j)`` (``generate``'s per-row seeds), so a
  run repeats and its samples do not depend on ``batch_size``; the k samples of a problem share a prefill
  (``generate`` deduplicates identical prompts).
- Batched across problems: ``batch_size`` sequences (``batch_size // k`` problems) per ``generate`` call. On a GPU a
  large batch is what makes decoding fast; the default suits both.
"""

from __future__ import annotations

import sys
import time

from atmanrl.config import EvalConfig, RolloutConfig
from atmanrl.data.gsm8k import Problem, build_prompt, is_correct, split_completion, split_tokens
from atmanrl.eval.composition import composition
from atmanrl.eval.table1 import summarize
from atmanrl.model.generate import generate, row_seed


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    k: int = 4,
    max_new_tokens: int = RolloutConfig.max_new_tokens,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = EvalConfig.seed,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Sample ``k`` completions per problem and score them. Returns ``{"summary": ..., "samples": [...]}``.

    Defaults follow the training run's: ``max_new_tokens`` = ``rollout.max_new_tokens``, ``seed`` = ``eval.seed``
    (``atmanrl.config``).
    """
    per_batch = max(1, batch_size // k)  # problems per generate call (their k samples stay together)
    samples, t0 = [], time.perf_counter()
    for start in range(0, len(problems), per_batch):
        chunk = problems[start: start + per_batch]
        prompts = [build_prompt(tokenizer, p.question) for p in chunk]
        seeds = [row_seed(seed, start + i, j) for i in range(len(chunk)) for j in range(k)]
        outs = generate(model, [p for p in prompts for _ in range(k)], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_ids=tokenizer.stop_ids, seed=seeds,
                        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        for j, out in enumerate(outs):
            i = start + j // k
            problem = problems[i]
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            cot, answer = split_completion(text)
            spans = split_tokens(tokenizer, out.tokens)
            samples.append({
                "problem": i, "sample": j % k, "question": problem.question, "gold": problem.gold,
                "prompt": tokenizer.decode(prompts[j // k]), "completion": text, "cot": cot, "answer": answer,
                "correct": is_correct(answer, problem.gold), "finished": out.finished,
                "completion_tokens": len(out.tokens), "cot_tokens": spans.cot[1] - spans.cot[0],
            })
        if progress:
            done = min(start + per_batch, len(problems))
            acc = sum(s["correct"] for s in samples) / len(samples)
            print(f"[eval] {done}/{len(problems)} problems, {len(samples)} samples, accuracy {acc:.3f}, "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    for s, comp in zip(samples, composition([s["cot"] for s in samples])):
        s["composition"] = vars(comp)
    return {"summary": summarize(samples), "samples": samples}
