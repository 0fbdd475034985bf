"""Rollouts: G sampled completions per problem, scored for the outcome reward (Eq. 4).

What is notable here:
- The trainer does not know what a problem is. A ``Task`` (``atmanrl.tasks``) turns a problem into prompt tokens
  and judges a completion. Tasks live with their data (``atmanrl.tasks.gsm8k.GSM8KTask``) and are picked by name
  from ``atmanrl.tasks.registry``; tests plug in tiny ones.
- One ``generate`` call per update and rank (``rollout_update``): the rank's rows of the update's problems x G
  rollouts in one batch (each distinct prompt prefilled once), instead of one small batch per problem. The rows
  are the rank's contiguous share of the update's rollouts (``dist.share``), so a group may be split over ranks
  and every rank works whatever the number of problems per update; the trainer gathers the rollouts back.
- Sampling is seeded per row: rollout ``g`` of problem ``i`` at update ``u`` has the seed ``row_seed(seed, u, i,
  g)``, and ``generate`` draws a row's tokens from its seed alone (counter-based noise, see
  ``atmanrl.model.generate``). So a problem's rollouts are the same whichever rank draws them, however many ranks
  there are and whatever else is in the batch -- the global batch does not depend on the world size, and resuming
  from a checkpoint needs no generator state (all tested).
- ``logp_old`` is the generator's per-token log-probability (``log_softmax(logits / temperature)`` of the sampled
  token, the quantity ``sequence_logprobs`` recomputes), recorded at sampling time.
- Truncated rollouts. A completion with no ``#####`` (cut at ``max_new_tokens``, or stopped without one) has no
  answer: its outcome reward is -1 (Eq. 4: no answer is not the ground truth), and it gets no saliency mask --
  there is no CoT/answer boundary, so nothing to restore. Its saliency reward is set *neutral*: the mean saliency
  reward of the answered rollouts of its group (0 if none), so that only its outcome moves its advantage
  (rl/trainer.py). A completion that has ``#####`` but was cut inside the answer is judged on what it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from atmanrl.model.generate import generate, row_seed
from atmanrl.saliency import SaliencyResult
from atmanrl.tasks import Score, Task


@dataclass
class Rollout:
    problem: int  # index of the problem in the training set
    prompt: list[int]
    completion: list[int]  # sampled tokens, including the stop token when one was hit
    logp_old: list[float]  # per-token log-probs under the sampling policy
    finished: bool  # a stop token was hit (False: cut at max_new_tokens)
    score: Score
    outcome: float = 0.0  # Eq. 4
    saliency_reward: float = 0.0  # R_Faithfulness, Eq. 3 (as oriented by the saliency config)
    total: float = 0.0
    advantage: float = 0.0  # Eq. 5's A_i
    # The AtMan mask's result (reward, status, answer loss at step 0, saturation, ...); None when no mask was
    # optimised (no answer, or the baseline arm).
    saliency_result: SaliencyResult | None = None


def rollout_update(model, task: Task, problems: list, indices: list[int], *, group_size: int, max_new_tokens: int,
                   temperature: float, top_p: float, seed: int, update: int, device, rows: range | None = None,
                   on_step: Callable[[int], None] | None = None) -> list[Rollout]:
    """The rollouts ``rows`` of ``problems`` x G in ONE ``generate`` call, scored; problem-major order (rollout
    ``k*G + g`` is rollout ``g`` of ``problems[k]``).

    problems: the update's problem objects; indices: their indices in the training set (they name the rollouts and
    seed them: ``row_seed(seed, update, index, g)``, from these only -- not from the rank, the world size or the
    batch the rollout is generated in). rows: which of the ``len(problems) * G`` rollouts to draw (default all;
    the trainer passes this rank's share). device: where ``model`` lives (checked, so a mis-placed inference copy
    fails here with a clear message instead of inside the first matmul). on_step: passed to ``generate``.
    """
    if len(problems) != len(indices):
        raise ValueError(f"{len(problems)} problems but {len(indices)} indices; pass one training-set index per "
                         f"problem")
    param, want = next(model.parameters()), torch.device(device)
    if param.device.type != want.type or want.index is not None and param.device.index != want.index:
        raise ValueError(f"the rollout model is on {param.device}, not on {device}; move it there before rolling out")
    prompts = [task.prompt(p) for p in problems]
    everything = [(k, g) for k in range(len(problems)) for g in range(group_size)]
    rows = [everything[i] for i in (range(len(everything)) if rows is None else rows)]
    if not rows:
        return []
    completions = generate(model, [prompts[k] for k, _ in rows], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, stop_ids=task.stop_ids, pad_id=task.pad_id,
                           seed=[row_seed(seed, update, indices[k], g) for k, g in rows], on_step=on_step)
    return [
        Rollout(indices[k], prompts[k], c.tokens, c.logprobs, c.finished, task.score(problems[k], prompts[k], c.tokens))
        for (k, _), c in zip(rows, completions)
    ]

