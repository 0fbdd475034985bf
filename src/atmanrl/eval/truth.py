"""Intervention truth: which CoT tokens the answer is read from, and how well a saliency map finds them.

One labeller and one scorer, used by the faithfulness tests (``atmanrl.eval.faithfulness.saliency_agreement``,
any tokenizer, numbers altered as text) and the toy world's study (``atmanrl.toy.truth``, single-token numbers
altered in place):

- **Labels by intervention** (``intervention_labels``). A CoT is kept up to its delimiter, one stretch of it (a
  number) is replaced by an altered one, and the answer the model then reads after the delimiter is compared with
  the answer it reads from the unaltered CoT. A token is *answer-carrying* when the majority of the alterations that
  touched it changed the answer; a token no alteration touched is not. What an alteration is (which stretches,
  which replacements) and how an answer is read (one forward's argmax, or greedy decoding of a few tokens) belong to
  the caller; the rule does not.
- **Scores** (``rank_scores``), per CoT: the AUROC of answer-carrying against all other CoT tokens (ties count one
  half; None when either class is empty) and the top-1 hit (is the highest-saliency token answer-carrying; None when
  no token is). Averaged over CoTs by the callers: within-CoT ranking is what a saliency map is for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def item_seed(seed: int, i: int) -> int:
    """The seed of item ``i``'s random alterations (mistakes, changed numbers) in a run seeded with ``seed``."""
    return seed * 100003 + i


@dataclass
class Alteration:
    """One altered copy of a CoT: the CoT tokens ``[t0, t1)`` replaced by ``tokens``."""

    t0: int
    t1: int
    tokens: list[int]

    def apply(self, cot: Sequence[int]) -> list[int]:
        return [*cot[: self.t0], *self.tokens, *cot[self.t1:]]


@dataclass
class Labels:
    carrying: list[bool]  # per CoT token: the majority of the alterations that touched it changed the answer
    share: list[float]  # per CoT token: the share of those alterations that changed it (0 when none touched it)
    reference: object  # the answer read from the unaltered CoT


def intervention_labels(cots: Sequence[Sequence[int]], alterations: Sequence[Sequence[Alteration]],
                        read: Callable[[list[tuple[int, list[int]]]], list], reference: Sequence | None = None
                        ) -> list[Labels]:
    """Label every token of every CoT by intervention (module docstring).

    cots: the CoT tokens of each item; alterations: each item's altered copies.
    read([(item, cot tokens), ...]): the answer the model reads after each (possibly altered) CoT, one call for
        every read of every item, so the caller can batch them.
    reference: the answers of the unaltered CoTs when the caller already has them (None: read them here).
    """
    jobs = [(i, a.apply(cots[i]), a) for i in range(len(cots)) for a in alterations[i]]
    asked = [] if reference is not None else [(i, list(c)) for i, c in enumerate(cots)]
    answers = read(asked + [(i, seq) for i, seq, _ in jobs])
    ref = list(reference) if reference is not None else answers[: len(cots)]
    changed = [[0] * len(c) for c in cots]
    tried = [[0] * len(c) for c in cots]
    for (i, _, a), answer in zip(jobs, answers[len(asked):]):
        for t in range(a.t0, a.t1):
            tried[i][t] += 1
            changed[i][t] += answer != ref[i]
    return [Labels([n > 0 and 2 * c > n for c, n in zip(changed[i], tried[i])],
                   [c / n if n else 0.0 for c, n in zip(changed[i], tried[i])], ref[i]) for i in range(len(cots))]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half); None when either class is empty."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def rank_scores(saliency: Sequence[float], carrying: Sequence[bool]) -> tuple[float | None, bool | None]:
    """(AUROC, top-1 hit) of one CoT's per-token saliency against its labels (module docstring)."""
    if len(saliency) != len(carrying):
        raise ValueError(f"{len(saliency)} saliency values for {len(carrying)} CoT tokens")
    if not any(carrying):
        return auroc(saliency, carrying), None
    best = max(range(len(saliency)), key=lambda t: saliency[t])
    return auroc(saliency, carrying), bool(carrying[best])
