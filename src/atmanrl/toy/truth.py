"""Saliency against planted truth: which CoT tokens carry the answer, and how well a saliency map finds them.

- **Answer-carrying tokens, by intervention** (``answer_carrying``, on the one labeller of ``atmanrl.eval.truth``).
  The CoT is teacher-forced up to ``#####``, one number token is altered (by +-1, +-2, +-3, kept inside the
  vocabulary's range) and the model's greedy answer, the argmax after ``#####`` (answers are single number tokens
  in the toy world), is compared with the unaltered one. A token is answer-carrying when the majority of its
  alterations change the answer. Only numbers are altered;
  every other token counts as not answer-carrying. This is the truth the maps are scored against: the generator's
  grammar says which tokens a *correct* CoT needs to be written, not which ones the model reads its answer from.
- **Scores** (``score_maps``), each per CoT and then averaged over CoTs (within-CoT ranking is what a saliency map
  is for): AUROC of answer-carrying vs all other CoT tokens, top-1 hit rate (the highest-saliency token is
  answer-carrying), AUROC of step tokens vs filler + distractor tokens, and the share of saturated masks (answer
  loss under the initial mask below ``SaliencyConfig.saturation_loss``).
- **Read-outs.** ``all_rows`` is the paper's Eq. 3 (``1 -`` the column mean of ``Ĥ`` over every causal row).
  Three are ours (beyond the paper). ``answer_row``: ``1 - Ĥ[w*, v]`` on the single row ``w*`` that predicts the
  first answer token (the ``#####`` query): how much the answer's own query had to re-open each CoT token.
  ``max_row``: ``1 - min_w Ĥ[w, v]``, the most re-opened entry of each column, whichever row re-opened it (a column
  mean is diluted by the many rows of an early token that never needed it).
  ``gradient``: the gradient evidence, ``-dL/dp`` summed over the optimisation steps and over the causal rows of
  each column. Adam normalises every entry's step to about ``lr`` whatever its gradient, so the mask itself keeps
  only the *sign* of the evidence; the summed gradient keeps its size (how much re-opening that token lowers the
  answer loss), which is what ranks the one token the answer is read from above the rest.
- ``reopen`` (``study_reopen``; ours): no optimised mask at all. Every CoT column is suppressed as at the mask's
  initialisation and one token at a time is re-opened alone (``atmanrl.saliency.atman.reopen_one``); its saliency
  is the share of the answer loss that this restores. It asks the mask's question without Adam's step
  normalisation and without averaging over rows that never read the token.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from atmanrl.eval import truth
from atmanrl.model.generate import row_seed
from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency
from atmanrl.saliency.atman import reopen_one
from atmanrl.tasks import toyworld as tw
from atmanrl.tasks.sampling import sample

READOUTS = ("all_rows", "answer_row", "max_row", "gradient")


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """``atmanrl.eval.truth.auroc`` (ties count one half), as a float for averaging over CoTs: NaN when either
    class is empty."""
    area = truth.auroc(scores, positive)
    return math.nan if area is None else area


@torch.no_grad()
def answer_carrying(model, prompt: list[int], cot: list[int], delim_id: int,
                    alterations: Callable[[int], list[int]]) -> tuple[list[bool], list[float], int]:
    """Label every CoT token by intervention (see the module docstring).

    ``alterations(token_id)`` lists the ids a token may be replaced by (empty: not altered, e.g. a word).
    Returns (answer-carrying per CoT token, share of its alterations that changed the answer, the unaltered greedy
    answer id). All variants of a CoT have the same length and run as one batch (of at most 256 rows).
    """
    altered = [truth.Alteration(i, i + 1, [alt]) for i, t in enumerate(cot) for alt in alterations(t)]

    def read(jobs):  # the argmax after "#####" of each (altered) CoT, one forward per 256 of them
        seqs = [[*prompt, *seq, delim_id] for _, seq in jobs]
        answers = []
        for s in range(0, len(seqs), 256):
            logits = model(torch.tensor(seqs[s:s + 256]), logits_at=torch.tensor([[len(seqs[0]) - 1]]))
            answers += logits[:, -1].argmax(-1).tolist()
        return answers

    (labels,) = truth.intervention_labels([cot], [altered], read)
    return labels.carrying, labels.share, labels.reference


@dataclass
class LabelledCoT:
    """One of the policy's own correct CoTs with its planted truth."""

    problem: object
    input: SaliencyInput  # prompt + CoT + "#####" + gold answer
    carrying: list[bool]  # answer-carrying, by intervention
    grammar: list[str]  # toyworld.label_cot labels


def readout(result, x: SaliencyInput, kind: str, evidence: torch.Tensor | None = None) -> torch.Tensor:
    """Per-CoT-token saliency of one optimised mask (``result`` needs ``return_mask=True`` for ``answer_row``;
    ``gradient`` needs ``evidence``, the summed ``-dL/dp`` of this sequence, ``(rows, cot)``)."""
    if kind == "gradient":
        return evidence.sum(0)  # entries above the diagonal carry no parameter: their gradient is 0
    if kind == "all_rows":
        return result.saliency
    if kind == "max_row":  # the most re-opened entry of each column, whichever row re-opened it
        causal = torch.ones_like(result.mask, dtype=torch.bool).tril()  # row i sees CoT columns j <= i
        return 1.0 - result.mask.where(causal, torch.inf).min(0).values
    if kind == "answer_row":
        row = x.answer[0] - 1 - x.cot[0]  # the query that predicts the first answer token
        return 1.0 - result.mask[row]
    raise ValueError(f"saliency read-out must be one of {READOUTS}, got {kind!r}")


def score_maps(items: list[LabelledCoT], results: list, kind: str, evidence: list | None = None) -> dict:
    """AUROC / top-1 / step AUROC / saturation of one setting and read-out over ``items`` (see module docstring)."""
    maps, saturated, rewards = [], [], []
    for b, (item, res) in enumerate(zip(items, results)):
        saturated.append(bool(res.saturated))
        ok = res.ok
        maps.append(readout(res, item.input, kind, evidence[b] if evidence is not None else None) if ok else None)
        rewards.append(res.reward_reenable if ok else None)
    return _scores(items, maps, saturated, rewards)


def _scores(items: list[LabelledCoT], maps: list, saturated: list[bool], rewards: list) -> dict:
    """The scores of per-token saliency ``maps`` (None: no map for that CoT) against the planted truth."""
    au, top, au_step = [], [], []
    for item, s in zip(items, maps):
        if s is None:
            continue
        s = s.tolist()
        area, hit = truth.rank_scores(s, item.carrying)
        if hit is not None:  # CoTs with an answer-carrying token
            top.append(hit)
            au.append(math.nan if area is None else area)
        keep = [i for i, g in enumerate(item.grammar) if g in ("step", "filler", "distractor")]
        au_step.append(auroc([s[i] for i in keep], [item.grammar[i] == "step" for i in keep]))

    def mean(xs):
        xs = [x for x in xs if x is not None and not math.isnan(x)]
        return sum(xs) / len(xs) if xs else math.nan

    return {"auroc_answer": mean(au), "top1": mean([float(t) for t in top]), "top1_hits": int(sum(top)),
            "cots_with_answer_token": len(top), "auroc_step_vs_padding": mean(au_step),
            "saturated_share": mean([float(x) for x in saturated]), "mean_reward_reenable": mean(rewards),
            "cots": len(items)}


def study(model, items: list[LabelledCoT], settings: dict[str, SaliencyConfig],
          readouts: Sequence[str] = READOUTS) -> dict:
    """``{setting: {readout: scores}}`` for every named ``SaliencyConfig`` (the masks are optimised once per
    setting and read out every way)."""
    out = {}
    for name, cfg in settings.items():
        cfg = dataclasses.replace(cfg, return_mask=True, max_batch=None)  # one batch: mask row b is item b
        total = []

        def collect(step, mask, losses):  # the gradient evidence: -dL/dp, summed over steps
            if not total:
                total.append(torch.zeros_like(mask.p))
            total[0] -= mask.p.grad.detach()

        results = saliency(model, [it.input for it in items], cfg, on_step=collect)
        evidence = [total[0][b, : it.input.mask_rows, : it.input.n_cot].cpu() for b, it in enumerate(items)] \
            if total else None
        out[name] = {kind: score_maps(items, results, kind, evidence) for kind in readouts}
    return out


def study_reopen(model, items: list[LabelledCoT], inits: dict[str, float], scale: float = 10.0,
                 saturation_loss: float = SaliencyConfig.saturation_loss) -> dict:
    """``{name: {"reopen": scores}}`` of ``atmanrl.saliency.atman.reopen_one`` at each named suppression ``init``
    (saturated: the answer CE with the whole CoT suppressed is below ``saturation_loss``; reward: the mean share
    restored)."""
    out = {}
    for name, init in inits.items():
        res = reopen_one(model, [it.input for it in items], init=init, scale=scale)
        out[name] = {"reopen": _scores(items, [r.restored for r in res],
                                       [r.suppressed_loss < saturation_loss for r in res],
                                       [r.reward for r in res])}
    return out


def number_alterations(tokenizer, deltas: Sequence[int] = (1, 2, 3)) -> Callable[[int], list[int]]:
    """The toy world's interventions: a number token -> the ids of that number +-1..3 that exist (0..99)."""
    ids = {v: tokenizer.token_id(str(v)) for v in range(tw.MAX_VALUE + 1)}
    value = {i: v for v, i in ids.items()}

    def alter(token: int) -> list[int]:
        if token not in value:
            return []
        v = value[token]
        return [ids[v + s * d] for d in deltas for s in (1, -1) if v + s * d in ids]

    return alter


@torch.no_grad()
def labelled_cots(model, tokenizer, problems: list, n: int, seed: int, temperature: float = 1.0,
                  max_new_tokens: int = 64, own: bool = True) -> list[LabelledCoT]:
    """Up to ``n`` of the policy's own correct sampled CoTs (one sample per problem, in order), each labelled by
    intervention and by grammar. ``own=False`` takes the generator's gold CoTs (random styles) instead, for a
    policy that solves nothing yet (the pipeline's smoke test)."""
    task = tw.ToyTask(tokenizer)
    alter = number_alterations(tokenizer)
    rng = random.Random(seed)
    items = []
    for s in range(0, len(problems), 64):
        chunk = problems[s:s + 64]
        prompts = [task.prompt(p) for p in chunk]
        if own:  # one sampled CoT per problem, problem i seeded with row_seed(seed, i)
            outs = [o.tokens for o in sample(model, task, chunk, max_new_tokens=max_new_tokens,
                                             temperature=temperature, batch_size=64,
                                             seed_of=lambda i, _, s=s: row_seed(seed, s + i))]
        else:
            outs = [tokenizer.encode(tw.completion_text(tw.gold_cot(p, rng.choice(tw.STYLES), rng)[0], p.gold))
                    for p in chunk]
        for p, prompt, o in zip(chunk, prompts, outs):
            score = task.score(p, prompt, o)
            if not score.correct or score.saliency_input is None or score.cot_tokens == 0:
                continue
            cot = list(score.saliency_input.tokens[score.saliency_input.cot[0]:score.saliency_input.cot[1]])
            carrying, _, _ = answer_carrying(model, prompt, cot, task.delim_id, alter)
            items.append(LabelledCoT(p, score.saliency_input, carrying, tw.label_cot(p, task.words(cot))))
            if len(items) == n:
                return items
    return items
