"""GSM8K as a training task: the ``Task`` the trainer rolls out (prompt tokens in, a ``Score`` out).

What is notable here:
- The trainer knows nothing about GSM8K: it sees this class only through the ``Task`` protocol
  (``atmanrl.rl.rollout``) and picks it by name (``data.task: gsm8k``, the default) in ``atmanrl.data.tasks``.
- The same class serves the GSM8K files and the embedded synthetic GSM8K-style problems: both are ``Problem``
  objects with a question and a gold number.
- ``score`` judges the text after the first ``#####`` (``gsm8k.is_correct``) and, when there is a delimiter,
  builds the saliency input: prompt + the model's own CoT tokens + ``#####`` + the GOLD answer (Eq. 2's
  teacher-forced sequence, ``gsm8k.saliency_sequence``). Without a delimiter there is no answer and no mask.
"""

from __future__ import annotations

from atmanrl.data import gsm8k
from atmanrl.rl.rollout import Score


class GSM8KTask:
    """GSM8K (or the synthetic GSM8K-style problems): chat prompt with the ``#####`` instruction, number matching."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = list(tokenizer.stop_ids)
        self.pad_id = tokenizer.pad_id

    def prompt(self, problem: gsm8k.Problem) -> list[int]:
        return gsm8k.build_prompt(self.tokenizer, problem.question)

    def score(self, problem: gsm8k.Problem, prompt: list[int], completion: list[int]) -> Score:
        from atmanrl.saliency import SaliencyInput

        spans = gsm8k.split_tokens(self.tokenizer, completion)  # trailing end-of-turn tokens belong to no span
        if spans.delim is None:  # no "#####": no answer, no CoT/answer boundary (see atmanrl.rl.rollout)
            return Score(correct=False, has_answer=False, cot_tokens=spans.cot[1])
        text = self.tokenizer.decode([t for t in completion if t not in self.stop_ids])
        _, answer = gsm8k.split_completion(text)
        tokens, prompt_len, cot, gold = gsm8k.saliency_sequence(self.tokenizer, prompt, completion, problem.gold)
        return Score(correct=gsm8k.is_correct(answer, problem.gold), has_answer=True, cot_tokens=spans.cot[1],
                     saliency_input=SaliencyInput(tokens, prompt_len, cot, gold))
