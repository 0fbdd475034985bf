"""The AtMan saliency module, pinned formula by formula (paper Eqs. 1-3, docs/DESIGN.md decisions 1-4).

References used here, all independent of the code under test:
- the mask's entries, written out with loops over (row, column) from the definition;
- a float64 tiny transformer with an explicit softmax (this file) for the Eq. 2 loss and its gradient;
- ``torch.autograd.gradcheck`` (finite differences) on the loss as a function of p;
- hand-computed read-outs (Eq. 3) and rewards in both orientations;
- a tiny model built by hand in which one CoT token is the only route to the answer (planted truth).
The plain Hugging Face path is compared in ``test_saliency_plain.py``; SmolLM2 checks in ``test_saliency_smollm2.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from atmanrl.model.llama import Llama, LlamaConfig
from atmanrl.saliency import AnswerBatch, AtManMask, EarlyStop, SaliencyConfig, SaliencyInput, saliency
from atmanrl.saliency.atman import atman_explanation, reopen_one
from atmanrl.saliency.batch import sequences_per_batch
from atmanrl.saliency.optimize import spearman
from atmanrl.saliency.readout import column_means, normalised_mask, rewards, token_saliency
from atmanrl.saliency.render import html_page, terminal

VOCAB = 53


def tiny(seed=0, dtype=torch.float64, layers=2, tied=False) -> Llama:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = Llama(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(seed)).to(dtype).eval()
    return model


def random_input(g, n_prompt, n_cot, n_answer, prompt=None) -> SaliencyInput:
    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return SaliencyInput.from_parts(ids(n_prompt) if prompt is None else prompt, ids(n_cot), [1, 2], ids(n_answer))


def random_batch(seed) -> list[SaliencyInput]:
    """Four sequences of different lengths: two share a prompt, one has a longer prompt, one no prompt at all."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, VOCAB, (4,), generator=g).tolist()
    return [
        random_input(g, 0, 6, 2, prompt=shared),
        random_input(g, 0, 3, 1, prompt=shared),
        random_input(g, 9, 7, 3),
        random_input(g, 0, 5, 2, prompt=[]),
    ]


# ---------------------------------------------------------------------------------------------------------------
# The mask (Eq. 1's H^AtMan, docs/DESIGN.md decision 1)
# ---------------------------------------------------------------------------------------------------------------


def expected_bias(x: SaliencyInput, value_of) -> torch.Tensor:
    """The definition, entry by entry: ``value_of(w, v)`` where v is a CoT column and w >= v, else 0."""
    n = len(x.tokens)
    out = torch.zeros(n, n, dtype=torch.float64)
    for w in range(n):
        for v in range(n):
            if x.cot[0] <= v < x.cot[1] and w >= v:
                out[w, v] = value_of(w, v)
    return out


def full_layout_bias(mask: AtManMask, inputs) -> torch.Tensor:
    n = max(len(x.tokens) for x in inputs)
    starts = [x.cot[0] for x in inputs]
    return mask(n, n, starts, starts)[:, 0]  # (B, n, n)


def test_initial_mask_is_minus_four_on_causal_cot_entries_and_zero_elsewhere():
    inputs = random_batch(0)
    mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], dtype=torch.float64)
    bias = full_layout_bias(mask, inputs)
    for b, x in enumerate(inputs):
        n = len(x.tokens)
        assert torch.equal(bias[b, :n, :n], expected_bias(x, lambda w, v: -4.0))
        assert torch.all(bias[b, n:] == 0) and torch.all(bias[b, :, n:] == 0)
        h_hat = normalised_mask(mask.sequence_p(b), mask.init)
        causal = torch.ones_like(h_hat, dtype=torch.bool).tril()
        assert torch.all(h_hat[causal] == 1.0)  # Ĥ = 1 at init


def test_bias_is_scale_times_clamped_p_and_only_mask_entries_get_gradient():
    """bias = 10 * min(p, 0) on the mask entries; the Jacobian d bias / d p is 10 there and exactly 0 elsewhere."""
    inputs = random_batch(1)
    g = torch.Generator().manual_seed(2)
    mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], dtype=torch.float64)
    with torch.no_grad():  # random p of both signs, on every stored entry (padding ones too)
        mask.p.copy_(torch.empty_like(mask.p).uniform_(-1, 0.3, generator=g))
    bias = full_layout_bias(mask, inputs)
    upstream = torch.randn(bias.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((bias * upstream).sum(), [mask.p])
    for b, x in enumerate(inputs):
        cs, n = x.cot[0], len(x.tokens)
        p = mask.p[b].detach()

        def p_at(w, v):
            return p[w - cs, v - cs].item()

        assert torch.equal(bias[b, :n, :n].detach(), expected_bias(x, lambda w, v: 10 * min(p_at(w, v), 0.0)))
        # d bias[w, v] / d p[w, v] = 10 where p < 0, 0 where the clamp is active (p > 0); nothing anywhere else.
        want = expected_bias(x, lambda w, v: 10.0 * upstream[b, w, v].item() * (p_at(w, v) < 0))
        got = torch.zeros(n, n, dtype=torch.float64)
        got[cs:, cs: x.cot[1]] = grad[b, : x.mask_rows, : x.n_cot]
        assert torch.equal(got, want)
        stored = torch.zeros_like(grad[b], dtype=torch.bool)
        stored[: x.mask_rows, : x.n_cot] = torch.ones(x.mask_rows, x.n_cot, dtype=torch.bool).tril()
        assert torch.all(grad[b][~stored] == 0)  # padding and above-diagonal parameters: exactly zero gradient


def test_fast_layout_places_each_entry_at_its_own_query_and_key_slot():
    """AnswerBatch's prefix-cached layout: sequence b's token at absolute position i is query i - P_b and key
    slot P - P_b + i; the bias there must be the definition's entry (w, v)."""
    inputs = random_batch(3)
    model = tiny()
    batch = AnswerBatch(model, inputs)
    mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], dtype=torch.float64)
    bias = mask(*batch.bias_shape, batch.row_offset, batch.col_offset)[:, 0]
    for b, x in enumerate(inputs):
        n, P_b = len(x.tokens), x.prompt_len
        want = expected_bias(x, lambda w, v: -4.0)
        got = torch.zeros(n, n, dtype=torch.float64)
        for w in range(P_b, n):
            for v in range(n):
                slot = batch.P - P_b + v if v < P_b else batch.P + v - P_b
                got[w, v] = bias[b, w - P_b, slot]
        assert torch.equal(got, want)
        assert bias[b].abs().sum() == want.abs().sum()  # and nothing else anywhere


# ---------------------------------------------------------------------------------------------------------------
# Eq. 2: the loss and its gradient
# ---------------------------------------------------------------------------------------------------------------


def reference_answer_loss(model: Llama, x: SaliencyInput, bias: torch.Tensor) -> torch.Tensor:
    """Eq. 2 for one sequence, written out in float64: explicit attention softmax over keys j <= w with the
    additive ``bias (n, n)``, full sequence, full LM head, no cache. Differentiable in ``bias``."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    n = len(x.tokens)
    tokens = torch.tensor(x.tokens)
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    angles = torch.arange(n, dtype=torch.float64)[:, None] * model.inv_freq.double()[None, :]

    def rope(v):  # (h, n, d), half-split pairs (i, i + d/2)
        a, b = v[..., : d // 2], v[..., d // 2:]
        return torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], -1)

    causal = torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)
    h = sd["embed_tokens.weight"][tokens]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        a = rms(h, sd[p + "input_layernorm.weight"])
        q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).view(n, H, d).transpose(0, 1))
        k = rope((a @ sd[p + "self_attn.k_proj.weight"].T).view(n, Hkv, d).transpose(0, 1))
        v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(n, Hkv, d).transpose(0, 1)
        k, v = k.repeat_interleave(H // Hkv, 0), v.repeat_interleave(H // Hkv, 0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + causal + bias  # Eq. 1
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        weights = weights / weights.sum(-1, keepdim=True)  # the softmax, explicitly
        h = h + (weights @ v).transpose(0, 1).reshape(n, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        a = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(a @ sd[p + "mlp.gate_proj.weight"].T) * (a @ sd[p + "mlp.up_proj.weight"].T)) @ sd[
            p + "mlp.down_proj.weight"].T
    logits = rms(h, sd["norm.weight"]) @ sd["lm_head.weight"].T
    a0, a1 = x.answer
    logp = torch.log_softmax(logits[a0 - 1: a1 - 1], -1)
    return -logp.gather(-1, tokens[a0:a1, None]).mean()


def test_loss_and_gradient_equal_explicit_float64_softmax_reference():
    """Our batched fast path (prefix cache, answer-only head) vs the explicit reference, at a random mask: same
    loss, same gradient with respect to every mask parameter."""
    model = tiny(seed=4)
    inputs = random_batch(5)
    g = torch.Generator().manual_seed(6)
    batch = AnswerBatch(model, inputs)
    mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], dtype=torch.float64)
    with torch.no_grad():
        mask.p.mul_(torch.empty_like(mask.p).uniform_(0.0, 3.0, generator=g))  # random p in [-1.2, 0]
    losses = batch.losses(mask(*batch.bias_shape, batch.row_offset, batch.col_offset))
    (grad,) = torch.autograd.grad(losses.sum(), [mask.p])
    for b, x in enumerate(inputs):
        p_b = mask.sequence_p(b).detach().clone().requires_grad_(True)
        n, cs = len(x.tokens), x.cot[0]
        bias = torch.zeros(n, n, dtype=torch.float64)
        bias = bias.index_put((torch.arange(cs, n)[:, None], torch.arange(cs, x.cot[1])[None, :]),
                              10 * p_b.clamp(max=0) * torch.ones_like(p_b).tril())
        ref = reference_answer_loss(model, x, bias)
        (ref_grad,) = torch.autograd.grad(ref, [p_b])
        assert abs(losses[b].item() - ref.item()) <= 1e-12
        scale = ref_grad.abs().max().item()
        assert scale > 1e-4  # a real gradient, not two zeros
        assert (grad[b, : x.mask_rows, : x.n_cot] - ref_grad).abs().max().item() <= 1e-12 * max(1.0, scale)


def test_gradient_passes_gradcheck():
    """Finite differences on Eq. 2 as a function of p (float64, tiny model, two sequences in one batch)."""
    model = tiny(seed=7, layers=1)
    g = torch.Generator().manual_seed(8)
    inputs = [random_input(g, 2, 3, 1), random_input(g, 1, 2, 1)]
    batch = AnswerBatch(model, inputs)
    mask = AtManMask([x.n_cot for x in inputs], [x.mask_rows for x in inputs], dtype=torch.float64)
    p0 = (mask.p.detach() * torch.empty_like(mask.p).uniform_(0.2, 2.0, generator=g)).requires_grad_(True)

    def loss_of(p):
        bias = torch.func.functional_call(mask, {"p": p}, (*batch.bias_shape, batch.row_offset, batch.col_offset))
        return batch.losses(bias)

    assert torch.autograd.gradcheck(loss_of, (p0,), eps=1e-6, atol=1e-8)


def test_batched_equals_one_by_one():
    """Four sequences optimised together equal each optimised alone (float64, 3 steps; tolerance 1e-12)."""
    model = tiny(seed=9)
    inputs = random_batch(10)
    config = SaliencyConfig(steps=3, return_mask=True)
    together = saliency(model, inputs, config)
    for x, r in zip(inputs, together):
        (alone,) = saliency(model, [x], config)
        assert r.ok and alone.ok
        assert (r.mask - alone.mask).abs().max().item() <= 1e-12
        assert max(abs(a - b) for a, b in zip(r.loss_curve, alone.loss_curve)) <= 1e-12
        assert abs(r.reward - alone.reward) <= 1e-12
    chunked = saliency(model, inputs, SaliencyConfig(steps=3, return_mask=True, max_batch=3))
    for r, c in zip(together, chunked):
        assert (r.mask - c.mask).abs().max().item() <= 1e-12


def test_an_update_at_once_equals_group_by_group():
    """The masks of three GRPO groups (3 rollouts each, one prompt per group) in one call -- one batch on a CPU,
    each prompt computed once -- equal the group-by-group calls (float64, 3 steps; tolerance 1e-12)."""
    model = tiny(seed=13)
    g = torch.Generator().manual_seed(13)
    groups = []
    for n_prompt in (3, 7, 5):
        prompt = torch.randint(3, VOCAB, (n_prompt,), generator=g).tolist()
        groups.append([random_input(g, 0, int(n_cot), 2, prompt=prompt) for n_cot in (4, 6, 2)])
    inputs = [x for group in groups for x in group]
    assert sequences_per_batch(model, inputs) == len(inputs)  # CPU: all at once
    assert AnswerBatch(model, inputs).n_prompts == 3
    config = SaliencyConfig(steps=3, return_mask=True)
    together = saliency(model, inputs, config)
    by_group = [r for group in groups for r in saliency(model, group, config)]
    for a, b in zip(together, by_group):
        assert a.ok and b.ok
        assert (a.mask - b.mask).abs().max().item() <= 1e-12
        assert abs(a.reward - b.reward) <= 1e-12


def test_inputs_the_model_cannot_read_are_clear_errors():
    model = tiny(seed=14)
    with pytest.raises(ValueError, match=f"token id {VOCAB} at position 1, outside the model's vocabulary"):
        saliency(model, [SaliencyInput.from_parts([5, VOCAB], [6, 7], [1], [8])])
    with pytest.raises(ValueError, match="max_position_embeddings 128"):
        saliency(model, [SaliencyInput.from_parts([5] * 100, [6] * 30, [1], [8])])


def test_weights_are_frozen_and_untouched():
    model = tiny(seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saliency(model, random_batch(12)[:2], SaliencyConfig(steps=3))
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_optimiser_follows_adamw_by_hand():
    """One step of the loop is exactly AdamW(lr 1e-3, betas (0.6, 0.9999), wd 0.05) on the Eq. 2 gradient."""
    model = tiny(seed=13)
    (x,) = random_batch(14)[2:3]
    batch = AnswerBatch(model, [x])
    mask = AtManMask([x.n_cot], [x.mask_rows], dtype=torch.float64)
    (g,) = torch.autograd.grad(batch.losses(mask(*batch.bias_shape, batch.row_offset, batch.col_offset)).sum(),
                               [mask.p])
    p0, lr, (b1, b2), wd, eps = mask.p.detach(), 1e-3, (0.6, 0.9999), 0.05, 1e-8
    m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g * g / (1 - b2)
    want = p0 * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    (r,) = saliency(model, [x], SaliencyConfig(steps=1, return_mask=True))
    got = r.mask.double() * -0.4  # Ĥ * c = p (all entries stay negative)
    assert (got - want[0, : x.mask_rows, : x.n_cot]).abs().max().item() <= 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Eq. 3: read-out and both reward orientations
# ---------------------------------------------------------------------------------------------------------------


def test_readout_and_both_rewards_on_a_hand_computed_mask():
    # Rows = queries from the first CoT token on, columns = 2 CoT tokens; row 0 cannot see column 1.
    p = torch.tensor([[-0.4, 0.0], [-0.2, -0.4], [0.1, -0.6]])
    h_hat = normalised_mask(p, -0.4)
    assert torch.allclose(h_hat, torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 1.5]]))  # min(p,0)/c; p>0 -> 0
    col = column_means(h_hat)
    assert torch.allclose(col, torch.tensor([(1 + 0.5 + 0) / 3, (1.0 + 1.5) / 2]))  # 0.5 and 1.25
    assert torch.allclose(token_saliency(col), torch.tensor([0.5, -0.25]))
    r = rewards(col)
    assert r.reenable == pytest.approx((0.5 - 0.25) / 2, abs=1e-12)  # 0.125
    assert r.eq3 == pytest.approx((0.5 + 1.25) / 2, abs=1e-12)  # 0.875
    assert r.eq3 == pytest.approx(1 - r.reenable, abs=1e-12)
    assert (r.oriented("reenable"), r.oriented("eq3")) == (r.reenable, r.eq3)
    with pytest.raises(ValueError, match="orientation"):
        r.oriented("reverse")


def test_reward_orientation_is_selected_by_config_and_untouched_mask_gives_zero_reenable():
    model = tiny(seed=15)
    x = random_batch(16)[0]
    (r_re,) = saliency(model, [x], SaliencyConfig(steps=2, lr=0.0, weight_decay=0.0))  # mask never moves
    assert r_re.reward == r_re.reward_reenable == 0.0 and r_re.reward_eq3 == 1.0
    (r1,) = saliency(model, [x], SaliencyConfig(steps=3))
    (r2,) = saliency(model, [x], SaliencyConfig(steps=3, reward="eq3"))
    assert r1.reward == r1.reward_reenable and r2.reward == r2.reward_eq3
    assert r1.reward_reenable == pytest.approx(1 - r1.reward_eq3, abs=1e-12)
    with pytest.raises(ValueError, match="reenable"):
        SaliencyConfig(reward="inverse")


# ---------------------------------------------------------------------------------------------------------------
# Planted truth: one CoT token is the only route to the answer
# ---------------------------------------------------------------------------------------------------------------

KEY, DELIM, ANSWER = 3, 1, 2


def planted_model() -> Llama:
    """One layer, one head, by hand. Queries are 0, so attention is uniform over the visible keys (plus the mask).
    Only the KEY token has a value, and it points along the ANSWER token's unembedding: the answer logit grows
    with the attention the delimiter row pays to KEY, and attending to any other token only dilutes it. The MLP is
    off. (Random values on the other tokens would open a second route: through the final RMSNorm, attending to a
    value that cancels part of the attention output raises the answer's share of the normalised residual.)"""
    d = 16
    cfg = LlamaConfig(vocab_size=d, hidden_size=d, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Llama(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed_tokens.weight.copy_(torch.eye(d))  # token t -> e_t
        attn = model.layers[0].self_attn
        wv = torch.zeros(d, d, dtype=torch.float64)
        wv[ANSWER, KEY] = 3.0  # only KEY has a value, and it points along e_ANSWER
        attn.v_proj.weight.copy_(wv)
        attn.o_proj.weight.copy_(torch.eye(d))
        model.layers[0].input_layernorm.weight.fill_(1.0)
        model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.lm_head.weight[ANSWER, ANSWER] = 8.0  # the answer's logit reads e_ANSWER
    return model


@pytest.mark.parametrize("seed", [0, 3])
def test_planted_route_token_gets_the_highest_saliency(seed):
    model = planted_model()
    g = torch.Generator().manual_seed(seed)
    filler = torch.randint(4, 16, (10,), generator=g).tolist()
    where = int(torch.randint(0, 10, (1,), generator=g))
    cot = filler[:where] + [KEY] + filler[where:]
    prompt = torch.randint(4, 16, (3,), generator=g).tolist()
    x = SaliencyInput.from_parts(prompt, cot, [DELIM], [ANSWER])
    (r,) = saliency(model, [x], SaliencyConfig(steps=30))
    assert r.ok and r.loss_curve[-1] < r.initial_loss
    assert int(r.saliency.argmax()) == where
    assert r.saliency[where] > 0  # re-enabled ...
    others = torch.cat([r.saliency[:where], r.saliency[where + 1:]])
    assert torch.all(others < r.saliency[where])
    # ... and the original ATMAN agrees: suppressing KEY alone hurts the answer most.
    explanation = atman_explanation(model, x)
    assert int(explanation.delta_loss.argmax()) == where and explanation.delta_loss[where] > 0


def test_atman_delta_equals_explicit_single_column_suppression():
    model = tiny(seed=17)
    x = random_batch(18)[2]
    explanation = atman_explanation(model, x, suppression=-3.0, batch_size=4)  # two chunks of copies
    n = len(x.tokens)
    base = reference_answer_loss(model, x, torch.zeros(n, n, dtype=torch.float64)).item()
    assert explanation.base_loss == pytest.approx(base, abs=1e-12)
    for j in range(x.n_cot):
        v = x.cot[0] + j
        bias = torch.zeros(n, n, dtype=torch.float64)
        bias[v:, v] = -3.0
        want = reference_answer_loss(model, x, bias).item() - base
        assert explanation.delta_loss[j].item() == pytest.approx(want, abs=1e-6)  # the deltas are float32


def test_reopen_one_equals_explicit_biases_and_is_the_same_batched():
    model = tiny(seed=23)
    inputs = random_batch(29)  # different prompt / CoT / answer lengths in one batch
    got = reopen_one(model, inputs, init=-0.7, scale=10.0)
    assert any(r.suppressed_loss < r.unmasked_loss for r in got)  # both branches of the definition are met ...
    assert any(r.reward > 0 and r.restored.min() < 0 and r.restored.max() > 1 for r in got)  # ... and the clipping
    for x, r in zip(inputs, got):
        n, (c0, c1) = len(x.tokens), x.cot

        def loss(open_columns=()):
            bias = torch.zeros(n, n, dtype=torch.float64)
            for v in range(c0, c1):
                if v not in open_columns:
                    bias[v:, v] = -7.0  # 10 x -0.7 on every causal row of a suppressed CoT column
            return reference_answer_loss(model, x, bias).item()

        none, everything = loss(range(c0, c1)), loss()
        assert r.unmasked_loss == pytest.approx(none, abs=1e-9)
        assert r.suppressed_loss == pytest.approx(everything, abs=1e-9)
        if everything - none >= 0.01:
            want = torch.tensor([(everything - loss([c0 + j])) / (everything - none) for j in range(x.n_cot)],
                                dtype=torch.float64)
        else:  # suppressing the CoT does not hurt the answer (input 0 of this batch): nothing to restore
            want = torch.zeros(x.n_cot, dtype=torch.float64)
        torch.testing.assert_close(r.restored.double(), want, atol=1e-5, rtol=0)  # restored is float32
        assert r.reward == pytest.approx(want.clamp(0, 1).mean().item(), abs=1e-5)
        (alone,) = reopen_one(model, [x], init=-0.7)
        torch.testing.assert_close(alone.restored, r.restored, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_reopen_one_finds_the_planted_route_token(seed):
    model = planted_model()
    g = torch.Generator().manual_seed(seed)
    filler = torch.randint(4, 16, (10,), generator=g).tolist()
    where = int(torch.randint(0, 10, (1,), generator=g))
    x = SaliencyInput.from_parts(torch.randint(4, 16, (3,), generator=g).tolist(),
                                 filler[:where] + [KEY] + filler[where:], [DELIM], [ANSWER])
    (r,) = reopen_one(model, [x])
    assert r.suppressed_loss > r.unmasked_loss
    assert int(r.restored.argmax()) == where and r.restored[where] > 0.5  # KEY alone restores most of the loss
    others = torch.cat([r.restored[:where], r.restored[where + 1:]])
    assert torch.all(others <= 0)  # re-opening any other token only dilutes the attention paid to KEY


def test_method_reopen_one_is_reopen_ones_restored_share_in_a_saliency_result():
    model = tiny(seed=23)
    inputs = random_batch(29)
    cfg = SaliencyConfig(method="reopen_one", init=-0.7, max_batch=2)  # in chunks of 2: still the batched values
    got = saliency(model, inputs, cfg)
    want = reopen_one(model, inputs, init=-0.7)
    assert any(w.reward > 0 for w in want)  # the comparison is not trivially all zeros
    for g, w in zip(got, want):
        assert g.ok and g.steps == 0 and g.loss_curve == []
        torch.testing.assert_close(g.saliency, w.restored, atol=1e-6, rtol=0)
        assert g.reward == g.reward_reenable == pytest.approx(w.reward, abs=1e-6)
        assert g.reward_eq3 == pytest.approx(1 - w.reward, abs=1e-6)
        assert (g.initial_loss, g.unmasked_loss) == pytest.approx((w.suppressed_loss, w.unmasked_loss), abs=1e-9)
        assert g.saturated == (w.suppressed_loss - w.unmasked_loss < cfg.saturation_loss)
    assert any(g.saturated for g in got) and not all(g.saturated for g in got)  # input 0 costs < 0.01 nats
    (eq3,) = saliency(model, inputs[1:2], dataclasses.replace(cfg, reward="eq3"))
    assert eq3.reward == pytest.approx(1 - want[1].reward, abs=1e-6)
    # degenerate inputs keep their defined results with either method
    empty = SaliencyInput.from_parts([1, 2], [], [DELIM], [ANSWER])
    assert [r.status for r in saliency(model, [empty, inputs[1]], cfg)] == ["empty_cot", "ok"]


def test_method_and_normalize_are_checked_and_off_by_default():
    assert (SaliencyConfig().method, SaliencyConfig().normalize) == ("mask", "none")
    with pytest.raises(ValueError, match="method='reopen'.*reopen_one"):
        SaliencyConfig(method="reopen")
    with pytest.raises(ValueError, match="normalize='std'.*group"):
        SaliencyConfig(normalize="std")


def test_reopen_one_refuses_an_empty_cot():
    x = SaliencyInput.from_parts([1, 2], [], [DELIM], [ANSWER])
    with pytest.raises(ValueError, match="input 0 has 0 CoT"):
        reopen_one(planted_model(), [x])


# ---------------------------------------------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------------------------------------------


def test_degenerate_inputs_are_reported_with_neutral_reward_and_leave_the_batch_alone():
    model = tiny(seed=19)
    poison = VOCAB - 1
    with torch.no_grad():
        model.embed_tokens.weight[poison] = math.nan  # any sequence reading this token has a NaN loss
    g = torch.Generator().manual_seed(20)
    good = [random_input(g, 4, 5, 2), random_input(g, 3, 6, 1)]
    good = [SaliencyInput(tuple(t if t != poison else 5 for t in x.tokens), x.prompt_len, x.cot, x.answer)
            for x in good]
    nan_cot = SaliencyInput.from_parts([7, 8], [9, poison, 10], [1, 2], [11])
    empty_cot = SaliencyInput.from_parts([7, 8], [], [1, 2], [11, 12])
    no_answer = SaliencyInput.from_parts([7, 8], [9, 10], [1, 2], [])
    config = SaliencyConfig(steps=4, return_mask=True)
    mixed = saliency(model, [good[0], nan_cot, empty_cot, good[1], no_answer], config)
    assert [r.status for r in mixed] == ["ok", "nonfinite_loss", "empty_cot", "ok", "no_answer"]
    for r in (mixed[1], mixed[2], mixed[4]):
        assert r.reward == r.reward_reenable == r.reward_eq3 == 0.0 and r.saliency.numel() == 0 and not r.ok
    assert math.isnan(mixed[1].initial_loss)
    clean = saliency(model, good, config)
    for r, c in zip([mixed[0], mixed[3]], clean):
        # Same numbers up to float64 round-off (the batch shapes differ, so matmul blocking may differ).
        assert (r.mask - c.mask).abs().max().item() <= 1e-12
        assert r.reward == pytest.approx(c.reward, abs=1e-12)
        assert r.loss_curve == pytest.approx(c.loss_curve, abs=1e-12)
    assert saliency(model, [], config) == []


def test_bad_spans_are_a_clear_error():
    with pytest.raises(ValueError, match="out of order"):
        SaliencyInput(tokens=[1, 2, 3, 4], prompt_len=2, cot=(1, 3), answer=(3, 4))


# ---------------------------------------------------------------------------------------------------------------
# Early stopping, Spearman, rendering
# ---------------------------------------------------------------------------------------------------------------


def test_spearman_matches_hand_values():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; against [1, 2, 3, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(4.5 / math.sqrt(22.5))


def test_early_stop_is_off_by_default_and_stops_when_the_ranking_settles():
    model = tiny(seed=21)
    inputs = random_batch(22)[:2]
    assert SaliencyConfig().early_stop is None and SaliencyConfig().steps == 200
    always = saliency(model, inputs, SaliencyConfig(steps=12, early_stop=EarlyStop(every=2, rho=-1.0, min_steps=4)))
    assert all(r.steps == 4 and len(r.loss_curve) == 4 for r in always)
    never = saliency(model, inputs, SaliencyConfig(steps=6, early_stop=EarlyStop(every=2, rho=1.1, min_steps=2)))
    assert all(r.steps == 6 for r in never)


def test_compressed_schedule_keeps_steps_times_lr():
    c = SaliencyConfig.compressed(20, reward="eq3")
    assert (c.steps, c.lr, c.reward) == (20, pytest.approx(1e-2), "eq3")
    assert c.betas == (0.6, 0.9999) and c.weight_decay == 0.05 and c.init == -0.4 and c.scale == 10.0


def test_render_terminal_and_html():
    model = tiny(seed=23)
    x = random_batch(24)[0]
    (r,) = saliency(model, [x], SaliencyConfig(steps=3))
    tokens = [f"t{i}<&>" for i in range(x.n_cot)]
    text = terminal(tokens, r.saliency)
    assert text.count("\x1b[48;2;") == x.n_cot and "t0<&>" in text
    page = html_page(r, tokens, question="Q?", answer="42", atman=atman_explanation(model, x))
    assert page.startswith("<!DOCTYPE html>") and page.count('class="tok"') == 2 * x.n_cot
    assert "t0&lt;&amp;&gt;" in page and "<svg" in page and "linear-gradient" in page
    assert f"{r.reward_reenable:+.5f}" in page and "<script" not in page
    (reopened,) = reopen_one(model, [x], init=-5.0)  # the third panel: re-open one, beside the mask and ATMAN
    page = html_page(r, tokens, atman=atman_explanation(model, x), reopen=reopened)
    assert page.count('class="tok"') == 3 * x.n_cot and "Re-open one" in page
    assert f"{reopened.reward:+.5f}" in page and f"{reopened.suppressed_loss:.4f}" in page
