"""The fast saliency path against the plain one.

The plain path is the implementation one writes first, and the reference here: Hugging Face
``transformers.LlamaForCausalLM`` holding the same weights, the whole sequence in every step (no prefix cache),
the AtMan bias built entry by entry as a dense ``(S, S)`` parameter inside a 4D float attention mask that requires
grad, the full LM head, ``loss.backward()`` (weights keep ``requires_grad``: their gradients are computed and
thrown away). The plain path lives in ``tests/references.py``, which ``benchmarks/saliency.py`` also times; nothing
in ``src/`` ever imports transformers.
"""

from __future__ import annotations

import pytest
import torch
from references import hf_twin, ours_as_dense, plain_mask_steps

from atmanrl.model.llama import Llama, LlamaConfig
from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------------


def _tiny(dtype=torch.float64, seed=0):
    cfg = LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    g = torch.Generator().manual_seed(seed)
    return Llama(cfg).init_weights(std=0.3, generator=g).to(dtype).eval()


def _random_input(g: torch.Generator, prompt: list[int], n_cot: int, n_answer: int) -> SaliencyInput:
    def ids(n):
        return torch.randint(3, 61, (n,), generator=g).tolist()

    return SaliencyInput.from_parts(prompt, ids(n_cot), [1, 2], ids(n_answer))


def test_fast_path_equals_plain_transformers_path():
    """Prefix cache + answer-only head + batching (ours) reach the same mask as HF's full-sequence 4D mask.

    float64, 8 steps, three sequences of different lengths in one batch (two share a prompt, one has a longer
    prompt), each compared with its own plain run. Tolerance 1e-6 on the losses and on p: transformers computes the
    rotary angles in float32 even for a float64 model (~1e-7 relative); any error in the fast layout is >= 1e-3.
    """
    model = _tiny()
    hf = hf_twin(model, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    prompt_a = torch.randint(3, 61, (5,), generator=g).tolist()
    prompt_b = torch.randint(3, 61, (9,), generator=g).tolist()
    inputs = [
        _random_input(g, prompt_a, 7, 2),
        _random_input(g, prompt_a, 4, 3),
        _random_input(g, prompt_b, 6, 1),
    ]
    config = SaliencyConfig(steps=8, return_mask=True)
    ours = saliency(model, inputs, config)
    for x, r in zip(inputs, ours):
        p_plain, losses = plain_mask_steps(hf, x, config, config.steps)
        assert r.ok
        assert max(abs(a - b) for a, b in zip(r.loss_curve, losses)) <= 1e-6
        diff = (ours_as_dense(r.mask, x, config.init) - p_plain.double()).abs().max().item()
        assert diff <= 1e-6, diff
        moved = (p_plain - torch.where(p_plain != 0, config.init, 0.0)).abs().max().item()
        assert moved > 1e-3  # the masks did move: the comparison is not between two initial masks
