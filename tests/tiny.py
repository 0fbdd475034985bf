"""The tiny policy, task and config that the trainer tests share (and the worker processes of the distributed test).

``TinyTask``: problem ``p`` is the prompt ``[BOS, 4 + p]``; the answer is correct when the completion's first token
is ``8 + p % 2``. Every completion is "answered"; with ``saliency=True`` the completion minus its last token is the
CoT and the gold token follows a delimiter, so the saliency path of the trainer runs too (tiny masks, few steps).
"""

from __future__ import annotations

import torch

from atmanrl.config import load_config
from atmanrl.model.llama import Llama, LlamaConfig
from atmanrl.saliency import SaliencyInput
from atmanrl.tasks import Score

BOS, DELIM, VOCAB = 1, 3, 16


def tiny_policy(seed: int = 0, dtype=torch.float32) -> Llama:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Llama(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(seed)).to(dtype)


class TinyTask:
    stop_ids: list = []
    pad_id = 0

    def __init__(self, saliency: bool = False):
        self.saliency = saliency

    def prompt(self, problem: int) -> list[int]:
        return [BOS, 4 + problem]

    def target(self, problem: int) -> int:
        return 8 + problem % 2

    def score(self, problem, prompt, completion) -> Score:
        correct = bool(completion) and completion[0] == self.target(problem)
        if not self.saliency:
            return Score(correct=correct, has_answer=True, cot_tokens=len(completion))
        cot = list(completion[:-1])
        tokens = list(prompt) + cot + [DELIM, self.target(problem)]
        n = len(prompt) + len(cot)
        return Score(correct, True, len(cot), SaliencyInput(tokens, len(prompt), (len(prompt), n), (n + 1, n + 2)))


def tiny_config(out_dir, *overrides):
    base = [
        f"out_dir={out_dir}", "rollout.group_size=8", "rollout.max_new_tokens=2", "train.problems_per_update=4",
        "train.num_minibatches=2", "train.micro_batch_size=8", "train.ppo_epochs=2", "train.lr=0.01",
        "train.epochs=100", "checkpoint.every=0", "checkpoint.export=false", "saliency.weight=0",
    ]
    return load_config(None, base + list(overrides))
