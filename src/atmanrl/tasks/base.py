"""What a problem is to the rest of the code: the ``Task`` protocol, its verdict ``Score`` and a typed ``Sample``.

What is notable here:
- Training and evaluation both stand on this layer: the trainer rolls out through a ``Task``, the evaluations
  sample through the same ``Task`` (``atmanrl.tasks.sampling``), and neither knows what a problem is.
- A ``Task`` turns a problem into prompt tokens and judges a completion; its ``Score`` carries the CoT/answer
  split (as text, and the CoT length in model tokens), the verdict, and what the saliency mask needs (prompt +
  the model's own CoT + ``#####`` + the GOLD answer, Eq. 2's teacher-forced sequence).
- A completion with no ``#####`` has no answer and no CoT/answer boundary: it is wrong (Eq. 4) and gets no mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from atmanrl.saliency import SaliencyInput


@dataclass
class Score:
    """A task's verdict on one completion."""

    correct: bool
    has_answer: bool  # the delimiter was written, so there is a CoT/answer split
    cot_tokens: int  # completion tokens before the delimiter (the whole completion when there is none)
    saliency_input: SaliencyInput | None = None  # prompt + CoT + "#####" + gold; None: no mask
    cot: str = ""  # the CoT as text (everything before the delimiter)
    answer: str | None = None  # the answer as text (after the delimiter); None when there is no delimiter


class Task(Protocol):
    """What training and evaluation need from a problem set."""

    stop_ids: list[int]
    pad_id: int

    def prompt(self, problem) -> list[int]: ...

    def score(self, problem, prompt: list[int], completion: list[int]) -> Score: ...


@dataclass
class Sample:
    """One completion of one problem: what was sampled and the task's verdict on it.

    ``problem`` is the index of the problem in the list that was sampled, ``sample`` which of its ``k`` completions
    this is (0 for a greedy one)."""

    problem: int
    sample: int
    prompt: list[int]
    tokens: list[int]  # the completion's token ids, the stop token included when one was hit
    logprobs: list[float]  # per-token log-probabilities under the sampling distribution
    finished: bool  # a stop token was hit (False: cut at max_new_tokens)
    score: Score

    @property
    def correct(self) -> bool:
        return self.score.correct

    @property
    def cot(self) -> str:
        return self.score.cot

    @property
    def answer(self) -> str | None:
        return self.score.answer

    @property
    def cot_tokens(self) -> int:
        return self.score.cot_tokens
