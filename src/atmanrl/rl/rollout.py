"""Rollouts: G sampled completions per problem, scored for the outcome reward (Eq. 4).

What is notable here:
- The trainer does not know what a problem is. A ``Task`` turns a problem into prompt tokens and judges a
  completion. Tasks live with their data (``atmanrl.data.gsm8k_task.GSM8KTask``) and are picked by name from
  ``atmanrl.data.tasks``; tests plug in tiny ones.
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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from atmanrl.model.generate import generate

if TYPE_CHECKING:
    from atmanrl.saliency import SaliencyResult


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
    # The AtMan mask's result (reward, status, answer loss at step 0, saturation, ...); None when no mask was
    # optimised (no answer, or the baseline arm).
    saliency_result: SaliencyResult | None = None


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


def rollout_update(model, task: Task, problems: list, indices: list[int], *, group_size: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, update: int, device) -> list[Rollout]:
    """All rollouts of one update on this rank: ``group_size`` completions of each of ``problems``, in order.

    ``indices[k]`` is the training-set index of ``problems[k]``: it seeds that problem's sampling
    (``sampling_generator``) and is recorded in its rollouts, so the result depends on neither the rank nor the
    number of ranks. The G rollouts of a problem are consecutive (rollouts ``k*G .. k*G+G-1`` are problem ``k``).
    """
    rollouts: list[Rollout] = []
    for problem, i in zip(problems, indices, strict=True):
        rollouts += rollout_group(model, task, problem, i, group_size=group_size, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_p=top_p,
                                  generator=sampling_generator(seed, update, i, device))
    return rollouts
