"""The from-scratch Llama against independent references.

- Hugging Face `transformers.LlamaForCausalLM` (same random weights, saved by transformers and read by our loader):
  logits, and the attention-mask semantics of `attn_bias` (value and gradient).
- An explicit float64 re-implementation of attention in this file: a large negative bias on one key column is the
  same as deleting that key from every softmax.
- The KV cache: incremental decoding reproduces the full forward.
- The attention kernels (``Llama.attention``): FlexAttention (eager, on the CPU) and SDPA's memory-efficient
  variant against the SDPA reference, on the mask optimisation's call (prefix cache + per-query bias, gradient into
  the bias) and on the static decode step.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import torch.nn.attention.flex_attention as flex_module  # noqa: E402

from atmanrl.model.hf_checkpoint import load_hf  # noqa: E402
from atmanrl.model.llama import KVCache, Llama, LlamaConfig, attention_kernel, hidden_key_bias  # noqa: E402

# Two small configs: GQA in both, llama3 rope scaling with a short original context so that sequences longer than
# `original_max_position_embeddings` are cheap, tied and untied heads, an explicit head_dim that differs from
# hidden/heads in the second.
CONFIGS = {
    "gqa-llama3rope-untied": dict(
        vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        max_position_embeddings=256,
    ),
    "gqa-llama3rope-tied-headdim": dict(
        vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8),
        max_position_embeddings=256,
    ),
}
SEQ = 40  # longer than both original_max_position_embeddings (16 and 8)
TOL = 1e-4


def _hf_and_ours(name, tmp_path, attn_implementation="eager"):
    """A random HF model saved with `save_pretrained`, and ours loaded from that directory by our loader."""
    torch.manual_seed(hash(name) % 2**31)
    # deepcopy: transformers normalises the rope dict in place (adds rope_theta to it)
    hf_config = transformers.LlamaConfig(**copy.deepcopy(CONFIGS[name]), attn_implementation=attn_implementation)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF's default init is tiny (std 0.02) and norms are 1: randomise the norms too
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=torch.float32).eval()
    return hf, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name, tmp_path):
    hf, ours = _hf_and_ours(name, tmp_path)
    tokens = torch.randint(0, CONFIGS[name]["vocab_size"], (3, SEQ))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (3, SEQ, CONFIGS[name]["vocab_size"])
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attn_bias_equals_transformers_4d_float_mask(name, tmp_path):
    """Our `attn_bias` is HF's 4D float attention mask minus the causal part: same logits, same gradient."""
    hf, ours = _hf_and_ours(name, tmp_path)
    B, H = 2, CONFIGS[name]["num_attention_heads"]
    tokens = torch.randint(0, CONFIGS[name]["vocab_size"], (B, SEQ))
    bias = torch.randn(B, H, SEQ, SEQ, dtype=torch.float32)
    causal = torch.full((SEQ, SEQ), float("-inf")).triu(1)

    bias_ours = bias.clone().requires_grad_(True)
    bias_hf = bias.clone().requires_grad_(True)
    logits_ours = ours(tokens, attn_bias=bias_ours)
    logits_hf = hf(tokens, attention_mask=causal + bias_hf).logits
    assert (logits_ours - logits_hf).abs().max().item() <= TOL

    weights = torch.randn_like(logits_hf)  # a random scalar function of the logits
    (logits_ours * weights).sum().backward()
    (logits_hf * weights).sum().backward()
    grad_scale = bias_hf.grad.abs().max().item()
    assert grad_scale > 0
    assert (bias_ours.grad - bias_hf.grad).abs().max().item() <= TOL * max(1.0, grad_scale)
    # Entries above the diagonal are hidden by the causal mask: their gradient is exactly zero.
    upper = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
    assert bias_ours.grad[..., upper].abs().max().item() == 0.0


def _random_ours(name, seed=0):
    cfg = dict(CONFIGS[name])
    rs = dict(cfg.pop("rope_scaling"))
    rs.pop("rope_type")
    g = torch.Generator().manual_seed(seed)
    model = Llama(LlamaConfig(**cfg, rope_scaling=rs)).init_weights(std=0.1, generator=g).eval()
    return model


def test_zero_bias_changes_nothing():
    model = _random_ours("gqa-llama3rope-untied")
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        plain = model(tokens)
        zeros = model(tokens, attn_bias=torch.zeros(2, 1, 24, 24))
    assert torch.equal(plain, zeros)


def _reference_forward_f64(model: Llama, tokens: torch.Tensor, dropped_key: int) -> torch.Tensor:
    """Our Llama re-done explicitly in float64, with key `dropped_key` deleted from every softmax (no bias at all)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, S = tokens.shape
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    inv_freq = model.inv_freq.double()
    angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (S, d/2)

    def rope(x):  # (B, h, S, d), half-split pairs (i, i + d/2)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        c, s = angles.cos(), angles.sin()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    x = sd["embed_tokens.weight"][tokens]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, H, d).transpose(1, 2))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, Hkv, d).transpose(1, 2))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, Hkv, d).transpose(1, 2)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        out = torch.zeros(B, H, S, d, dtype=torch.float64)
        for w in range(S):  # query row w attends over keys {0..w} minus the dropped one
            keys = [j for j in range(w + 1) if j != dropped_key]
            scores = (q[:, :, w: w + 1] @ k[:, :, keys].transpose(-1, -2)) / math.sqrt(d)
            out[:, :, w] = (scores.softmax(-1) @ v[:, :, keys])[:, :, 0]
        x = x + out.transpose(1, 2).reshape(B, S, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["embed_tokens.weight"]
    return rms(x, sd["norm.weight"]) @ head.T


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_large_negative_bias_on_a_column_removes_that_key(name):
    model = _random_ours(name, seed=3)
    S, dropped = 12, 5
    tokens = torch.randint(0, model.config.vocab_size, (2, S))
    bias = torch.zeros(1, 1, S, S)
    bias[..., dropped] = -1e9  # every row w >= dropped loses key `dropped`
    with torch.no_grad():
        got = model(tokens, attn_bias=bias).double()
        plain = model(tokens).double()
    expected = _reference_forward_f64(model, tokens, dropped_key=dropped)
    assert (got - expected).abs().max().item() <= 1e-4
    # Rows before the dropped column never saw it; rows after it must change (the key mattered).
    assert (got[:, dropped:] - plain[:, dropped:]).abs().max().item() > 1e-3
    assert (got[:, :dropped] - plain[:, :dropped]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cache_incremental_decoding_reproduces_full_forward(name):
    model = _random_ours(name, seed=7)
    B, S, prefix = 2, 30, 11
    tokens = torch.randint(0, model.config.vocab_size, (B, S))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, B, max_len=S)
        steps = [model(tokens[:, :prefix], cache=cache)]
        for t in range(prefix, S):
            steps.append(model(tokens[:, t: t + 1], cache=cache, start_pos=t))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-5


def test_logits_at_selects_positions():
    model = _random_ours("gqa-llama3rope-tied-headdim", seed=1)
    tokens = torch.randint(0, model.config.vocab_size, (2, 15))
    index = torch.tensor([[3, 14], [0, 7]])
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, logits_at=index)
    assert torch.allclose(picked, full.gather(1, index[..., None].expand(-1, -1, full.shape[-1])), atol=1e-6)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="needs a KV cache"):
        _random_ours("gqa-llama3rope-untied")(torch.zeros(1, 2, dtype=torch.long), start_pos=3)


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """Let eager FlexAttention run its backward on the CPU. Its public wrapper refuses q/k/v that require grad on a
    CPU (inductor's CPU flex kernel has no backward), but the eager backward is the device-agnostic dense one
    (``sdpa_dense_backward``, registered for CompositeExplicitAutograd) -- the numerics these tests check."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_bf16_model_keeps_a_float32_bias_exact(kernel, flex_backward_on_cpu):
    """A bf16 model must not round the AtMan bias to bf16 (steps of 1/64 near -4): a bias change of 1e-3 around -4
    changes the output, and the bias gradient is float32, finite and non-zero -- on the reference and on flex."""
    model = _random_ours("gqa-llama3rope-untied", seed=5).to(torch.bfloat16)
    model.attention = kernel
    S, col = 10, 4
    tokens = torch.randint(0, model.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(0))

    def logits(value):
        bias = torch.zeros(1, 1, S, S)
        bias[..., col:, col] = value
        return model(tokens, attn_bias=bias)[0, col:].float()

    assert torch.tensor(-3.99).bfloat16() == torch.tensor(-3.98).bfloat16()  # what bf16 would do to the bias
    with torch.no_grad():
        a, b = logits(-4.0), logits(-3.999)
    assert (a - b).abs().max().item() > 0  # vanished (exactly 0) when the bias was cast to bf16
    p = torch.full((S - col,), -4.0, requires_grad=True)
    bias = torch.zeros(S, S).index_put((torch.arange(col, S), torch.full((S - col,), col)), p)[None, None]
    out = model(tokens, attn_bias=bias)
    (grad,) = torch.autograd.grad(out.float().logsumexp(-1).sum(), [p])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert grad.dtype == torch.float32


def test_static_start_pos_equals_int_start_pos():
    """A 0-dim tensor start_pos (the compiled decode step: whole cache, in-place writes) gives the int path's logits."""
    model = _random_ours("gqa-llama3rope-tied-headdim", seed=2)
    B, S, prefix = 2, 14, 6
    tokens = torch.randint(0, model.config.vocab_size, (B, S))
    with torch.no_grad():
        ints, tensors = KVCache(model.config, B, max_len=S + 5), KVCache(model.config, B, max_len=S + 5)
        a = [model(tokens[:, :prefix], cache=ints)]
        b = [model(tokens[:, :prefix], cache=tensors)]
        for t in range(prefix, S):
            a.append(model(tokens[:, t: t + 1], cache=ints, start_pos=t))
            b.append(model(tokens[:, t: t + 1], cache=tensors, start_pos=torch.tensor(t)))
    assert (torch.cat(a, 1) - torch.cat(b, 1)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel", ["flex", "efficient"])
def test_static_decode_step_on_each_kernel_equals_the_reference(kernel):
    """The compiled decode step's call (one query, the whole static cache, later slots hidden, padded slots hidden
    by a key bias) on flex / efficient gives the SDPA reference's logits, across flex's 128-key block boundary."""
    model = _random_ours("gqa-llama3rope-tied-headdim", seed=4)
    B, S, prefix, slots = 2, 150, 118, 160
    tokens = torch.randint(0, model.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(1))
    hidden = torch.zeros(B, slots, dtype=torch.bool)
    hidden[0, :5] = True  # row 0's prompt is left-padded
    key_bias = hidden_key_bias(hidden, torch.float32)
    logits = {}
    for name in ("sdpa", kernel):
        model.attention = name
        cache = KVCache(model.config, B, max_len=slots)
        with torch.no_grad():
            steps = [model(tokens[:, :prefix], key_bias[..., :prefix], cache=cache)[:, -1:]]
            for t in range(prefix, S):
                steps.append(model(tokens[:, t: t + 1], key_bias, cache=cache, start_pos=torch.tensor(t)))
        logits[name] = torch.cat(steps, 1)
    assert (logits[kernel] - logits["sdpa"]).abs().max().item() <= 1e-5


def _mask_optimisation_call(model: Llama, bias_param: torch.Tensor, P: int, T: int):
    """The saliency module's call: a prompt prefix in the cache (left-padded in row 0), then the suffix with a
    per-query bias (padding + ``bias_param``) that requires grad; returns the logits."""
    B = bias_param.shape[0]
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.config.vocab_size, (B, P + T), generator=g)
    hidden = torch.zeros(B, P + T, dtype=torch.bool)
    hidden[0, :4] = True
    pad = hidden_key_bias(hidden, bias_param.dtype)
    cache = KVCache(model.config, B, max_len=P + T, dtype=model.embed_tokens.weight.dtype)
    with torch.no_grad():
        model(tokens[:, :P], pad[..., :P], cache=cache)
    return model(tokens[:, P:], pad + bias_param, cache=cache, start_pos=P)


@pytest.mark.parametrize("dtype, out_tol, grad_tol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 2e-6, 2e-6)])
def test_flex_equals_the_reference_on_the_mask_optimisation(dtype, out_tol, grad_tol, flex_backward_on_cpu):
    """FlexAttention (bias in the score_mod, causal block mask, grouped-query heads) against the SDPA reference on
    the mask optimisation's call, 3 layers, a suffix longer than one 128-query block: the same logits and the same
    gradient in the bias (tolerances relative to the largest entry; float64 equal to rounding)."""
    model = _random_ours("gqa-llama3rope-tied-headdim", seed=6).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    P, T = 9, 140
    bias0 = torch.randn(2, 1, T, P + T, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out, grad = {}, {}
    for kernel in ("sdpa", "flex"):
        model.attention = kernel
        bias = bias0.clone().requires_grad_(True)
        logits = _mask_optimisation_call(model, bias, P, T)
        (grad[kernel],) = torch.autograd.grad(logits.logsumexp(-1).sum(), [bias])
        out[kernel] = logits.detach()
    scale = grad["sdpa"].abs().max().item()
    assert scale > 0
    assert (out["flex"] - out["sdpa"]).abs().max().item() <= out_tol * out["sdpa"].abs().max().item()
    assert (grad["flex"] - grad["sdpa"]).abs().max().item() <= grad_tol * scale
    causal_hidden = torch.arange(P + T)[None, :] > P + torch.arange(T)[:, None]
    assert grad["flex"][..., causal_hidden].abs().max().item() == 0.0  # keys after the query: exactly no gradient


def test_efficient_kernel_rounds_the_bias_to_the_models_dtype():
    """The memory-efficient candidate: on a float32 model it is the reference (to float rounding, gradient
    included); on a bf16 model it adds the bias in bf16, so a 1e-3 change of a -4 bias vanishes -- the cost that
    docs/DESIGN.md weighs against flex."""
    model = _random_ours("gqa-llama3rope-tied-headdim", seed=7)
    for p in model.parameters():
        p.requires_grad_(False)
    P, T = 6, 20
    bias0 = torch.randn(2, 1, T, P + T, generator=torch.Generator().manual_seed(4))
    out, grad = {}, {}
    for kernel in ("sdpa", "efficient"):
        model.attention = kernel
        bias = bias0.clone().requires_grad_(True)
        logits = _mask_optimisation_call(model, bias, P, T)
        (grad[kernel],) = torch.autograd.grad(logits.logsumexp(-1).sum(), [bias])
        out[kernel] = logits.detach()
    assert (out["efficient"] - out["sdpa"]).abs().max().item() <= 1e-5
    assert (grad["efficient"] - grad["sdpa"]).abs().max().item() <= 1e-5 * grad["sdpa"].abs().max().item()
    model = model.to(torch.bfloat16)
    model.attention = "efficient"
    with torch.no_grad():
        a, b = (_mask_optimisation_call(model, torch.full((2, 1, T, P + T), v), P, T) for v in (-4.0, -3.999))
    assert torch.equal(a, b)


def test_attention_kernel_choice():
    """``auto``: flex on CUDA for the hot calls (static decode, per-query bias), SDPA otherwise and off CUDA; a
    misspelt choice is an error naming the attribute and the choices."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_kernel("auto", cuda, hot=True) == "flex"
    assert attention_kernel("auto", cuda, hot=False) == "sdpa"
    assert attention_kernel("auto", cpu, hot=True) == "sdpa"
    assert attention_kernel("efficient", cpu) == "efficient"
    with pytest.raises(ValueError, match=r"Llama.attention is 'flash'; use one of \['auto', 'sdpa', 'flex'"):
        attention_kernel("flash", cpu)
