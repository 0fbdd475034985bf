"""Rollouts: G sampled completions per problem, scored for the outcome reward (Eq. 4).

What is notable here:
- The trainer does not know what a problem is. A ``Task`` turns a problem into prompt tokens and judges a
  completion (``GSM8KTask`` for GSM8K and the synthetic word problems; tests plug in tiny tasks).
- Sampling is seeded per (run seed, update, problem): ``sampling_generator``. The G rollouts of a problem are one
  ``generate`` call with their own generator, so a problem's rollouts are the same whichever rank draws them and
  however many ranks there are -- the global batch does not depend on the world size, and resuming from a
  checkpoint needs no generator state (both are tested).
- ``logp_old`` is the generator's per-token log-probability (``log_softmax(logits / temperature)`` of the sampled
  token, the quantity ``sequence_logprobs`` recomputes), recorded at sampling time.
- Truncated rollouts. A completion with no ``#####`` (cut at ``max_new_tokens``, or stopped without one) has no
  answer: its outcome reward is -1 (Eq. 4: no answer is not the ground truth), and it gets no saliency mask --
  there is no CoT/answer boundary, so nothing to restore. Its saliency reward is set *neutral*: the mean saliency
  reward of the answered rollouts of its group (0 if none), so that only its outcome moves its advantage
  (rl/trainer.py). A completion that has ``#####`` but was cut inside the answer is judged on what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from atmanrl.model.generate import generate


@dataclass
class Score:
    """A task's verdict on one completion."""

    correct: bool
    has_answer: bool  # the delimiter was written, so there is a CoT/answer split
    cot_tokens: int  # completion tokens before the delimiter (the whole completion when there is none)
    saliency_input: Any = None  # what atmanrl.saliency needs (prompt + CoT + "#####" + gold); None: no mask


class Task(Protocol):
    """What the trainer needs from a problem set."""

    stop_ids: list[int]
    pad_id: int

    def prompt(self, problem) -> list[int]: ...

    def score(self, problem, prompt: list[int], completion: list[int]) -> Score: ...


@dataclass
class Rollout:
    problem: int  # index of the problem in the training set
    prompt: list[int]
    completion: list[int]  # sampled tokens, including the stop token when one was hit
    logp_old: list[float]  # per-token log-probs under the sampling policy
    finished: bool  # a stop token was hit (False: cut at max_new_tokens)
    score: Score
    outcome: float = 0.0  # Eq. 4
    saliency: float = 0.0  # Eq. 3 (as oriented by the saliency config)
    total: float = 0.0
    advantage: float = 0.0  # Eq. 5's A_i
    extra: dict = field(default_factory=dict)  # saliency diagnostics (answer loss at step 0, saturation, ...)


def sampling_generator(seed: int, update: int, problem: int, device="cpu") -> torch.Generator:
    """A generator seeded from (run seed, update, problem index) only -- not from the rank or the world size."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + update) * 1_000_033 + problem)
    return g


def rollout_group(model, task: Task, problem, problem_index: int, *, group_size: int, max_new_tokens: int,
                  temperature: float, top_p: float, generator: torch.Generator) -> list[Rollout]:
    """G completions of one problem (one batched ``generate`` call: the prompt is prefilled once), scored."""
    prompt = task.prompt(problem)
    completions = generate(model, [prompt] * group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, stop_ids=task.stop_ids, generator=generator, pad_id=task.pad_id)
    return [
        Rollout(problem_index, prompt, c.tokens, c.logprobs, c.finished, task.score(problem, prompt, c.tokens))
        for c in completions
    ]


class GSM8KTask:
    """GSM8K (or the synthetic GSM8K-style problems): chat prompt with the ``#####`` instruction, number matching."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = list(tokenizer.stop_ids)
        self.pad_id = tokenizer.pad_id

    def prompt(self, problem) -> list[int]:
        from atmanrl.data.gsm8k import build_prompt

        return build_prompt(self.tokenizer, problem.question)

    def score(self, problem, prompt: list[int], completion: list[int]) -> Score:
        from atmanrl.data import gsm8k
        from atmanrl.saliency import SaliencyInput

        spans = gsm8k.split_tokens(self.tokenizer, completion)  # trailing end-of-turn tokens belong to no span
        if spans.delim is None:  # no "#####": no answer, no CoT/answer boundary (see the module docstring)
            return Score(correct=False, has_answer=False, cot_tokens=spans.cot[1])
        text = self.tokenizer.decode([t for t in completion if t not in self.stop_ids])
        _, answer = gsm8k.split_completion(text)
        tokens, prompt_len, cot, gold = gsm8k.saliency_sequence(self.tokenizer, prompt, completion, problem.gold)
        return Score(correct=gsm8k.is_correct(answer, problem.gold), has_answer=True, cot_tokens=spans.cot[1],
                     saliency_input=SaliencyInput(tokens, prompt_len, cot, gold))
