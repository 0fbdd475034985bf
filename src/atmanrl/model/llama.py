"""Llama-3.2, written from scratch, with a native additive attention mask.

What is notable here:
- Every attention block takes ``attn_bias``: a float tensor that is added to the pre-softmax scores
  ``Q K^T / sqrt(d)`` together with the causal mask. This is the paper's Eq. 1,
  ``H = Q K^T / sqrt(d) + H^AtMan``; the AtMan saliency mask (``atmanrl.saliency``) enters the model here, and
  gradients flow into it.
- Rotary embeddings use the half-split layout of Hugging Face checkpoints (not the interleaved layout of
  llama.cpp / Meta's original code), with the Llama-3 frequency scaling (``rope_type: llama3``).
- Module and parameter names equal Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix, so loading a
  checkpoint is a rename, not a re-layout (``atmanrl.model.hf_checkpoint``).
- A KV cache (``KVCache``) lets a forward pass start at any slot: incremental decoding, and the saliency module's
  reuse of a prompt prefix computed once. ``start_pos`` may be a tensor: the forward then writes its slots in place
  and attends over the whole cache (hiding later slots with the causal mask), so every decode step has the same
  shapes -- what a compiled, CUDA-graph-captured decode step needs (``atmanrl.model.generate``).
- Padded keys are hidden one way, ``hidden_key_bias``: a finite ``finfo.min`` bias (weight exactly 0 next to any
  visible key; a query whose every key is hidden gets a harmless uniform softmax instead of NaN).
- The bias keeps its precision: scores and bias are added in the wider of the model's and the bias's dtype. A bf16
  model with a float32 AtMan bias runs that attention in float32, because bf16 has steps of 1/64 near -4 (-3.99
  and -3.98 would both become -3.984) and the mask optimiser's small steps would vanish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RopeScaling:
    """Llama-3 RoPE frequency scaling (``rope_type: llama3`` in Hugging Face configs)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 24
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)``, rescaled as Llama 3 does for long context."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3: wavelengths longer than original_max / low_freq_factor are slowed down by `factor`, those shorter
    # than original_max / high_freq_factor are kept, and the band in between is interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for integer positions ``(B, S)`` -> two tensors ``(B, 1, S, head_dim)``."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (B, S, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # half-split layout: dims i and i + d/2 rotate together
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, S, d)``: pairs (x_i, x_{i+d/2}) by the angle of frequency i."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------


class KVCache:
    """Static per-layer key/value buffers ``(B, n_kv_heads, max_len, head_dim)``.

    A forward pass with ``start_pos=t`` writes its keys/values into slots ``[t, t + S)`` and attends over slots
    ``[0, t + S)``. Slots are storage positions; the rotary *positions* can differ (left padding), see
    ``Llama.forward``.
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v (B, Hkv, S, d)`` at slots ``[start_pos, start_pos + S)``; return the keys/values to attend.

        An int ``start_pos`` returns slots ``[0, start_pos + S)``. A tensor ``start_pos`` (0-dim) writes in place with
        ``index_copy_`` and returns the whole buffers: the shapes never change, so a compiled step is reused.
        """
        if isinstance(start_pos, torch.Tensor):
            slots = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, slots, k)
            self.v[layer].index_copy_(2, slots, v)
            return self.k[layer], self.v[layer]
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} slots; a forward to slot {end} does not fit")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, index: torch.Tensor) -> "KVCache":
        """A cache holding the rows ``index`` of this one (e.g. a prompt prefix repeated for G rollouts)."""
        new = object.__new__(KVCache)
        new.k = [k.index_select(0, index) for k in self.k]
        new.v = [v.index_select(0, index) for v in self.v]
        new.max_len = self.max_len
        return new


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # at least float32 (bf16 runs); float64 stays float64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start_pos: int):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, d)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, d)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)  # (B, Hkv, start_pos + S, d)
        # Eq. 1: softmax(Q K^T / sqrt(d) + mask) V, where `mask` = causal mask + H^AtMan (the attn_bias).
        # mask None means plain causal attention, which SDPA does without materialising a mask (see Llama.forward).
        # A mask wider than the model's dtype (a float32 AtMan bias on a bf16 model) is not rounded to the model's
        # dtype: the attention then runs in the mask's dtype (see the module docstring).
        dtype = q.dtype
        if mask is not None and mask.dtype != dtype:
            q, k, v = q.to(mask.dtype), k.to(mask.dtype), v.to(mask.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and S > 1, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.o_proj(out.to(dtype).transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def causal_mask(s_q: int, s_k: int, start_pos: int | torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive causal mask ``(S_q, S_k)``: query slot ``start_pos + i`` sees key slots ``<= start_pos + i``.

    The paper writes the causal restriction as ``H_M = H o T`` with a lower-triangular T; in additive form the
    entries above the diagonal are -inf (softmax weight exactly 0). ``start_pos`` may be a 0-dim tensor (static
    decoding: the shapes then do not depend on it).
    """
    q_slot = start_pos + torch.arange(s_q, device=device)[:, None]
    k_slot = torch.arange(s_k, device=device)[None, :]
    mask = torch.zeros(s_q, s_k, device=device, dtype=dtype)
    return mask.masked_fill(k_slot > q_slot, float("-inf"))


def hidden_key_bias(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The one way to hide keys (padding): ``hidden (B, S_k)`` bool -> additive bias ``(B, 1, 1, S_k)``.

    Hidden keys get ``finfo(dtype).min``: finite, so a query whose every key is hidden (a left-pad query) gets a
    uniform softmax instead of NaN, and ``exp`` of it underflows to exactly 0 next to any visible key.
    """
    bias = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    return bias.masked_fill(hidden, torch.finfo(dtype).min)[:, None, None, :]


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.bfloat16()`` / ``.half()`` cast the parameters but keep the RoPE frequencies at
        least float32, as FSDP2's mixed precision does (it casts parameters, not buffers). In bf16, ``inv_freq``
        is off by up to 2^-9 relative: a phase error of ~1 rad at position 700 on the faster frequencies, so a bf16
        copy (the trainer's sampler) would not compute the log-probs of the policy it samples for."""
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype.is_floating_point and torch.finfo(self.inv_freq.dtype).bits < 32:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)  # the unrounded values
        return self

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random initialisation (normal(0, std) matrices, unit norms) for tests and benchmarks."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, S, V)`` for ``tokens (B, S)``.

        attn_bias: float, broadcastable to ``(B, n_heads, S, start_pos + S)``; added to ``Q K^T / sqrt(d)`` in every
            attention block together with the causal mask (Eq. 1). Use -inf (or a large negative number) to hide a
            key, e.g. padding. Gradients flow into it.
        positions: rotary positions ``(B, S)`` (default ``start_pos + arange(S)``); differs from the slots when
            prompts are left-padded.
        cache: a ``KVCache``; keys/values of this call go to slots ``[start_pos, start_pos + S)`` and the queries
            attend over ``[0, start_pos + S)``. Without a cache ``start_pos`` must be 0. A 0-dim tensor
            ``start_pos`` attends over all ``cache.max_len`` slots (later ones hidden by the causal mask), so the
            shapes do not depend on it; ``attn_bias`` then spans ``cache.max_len`` keys.
        logits_at: indices ``(B, K)`` of the positions whose logits are wanted; the LM head (the largest matrix of
            a small model) then runs on ``K`` positions instead of ``S``. Returns ``(B, K, V)``.
        """
        B, S = tokens.shape
        static = isinstance(start_pos, torch.Tensor)
        if cache is None and (static or start_pos != 0):
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier slots")
        if positions is None:
            positions = (start_pos + torch.arange(S, device=tokens.device)).expand(B, S)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        if not static and attn_bias is None and (S == 1 or start_pos == 0):
            mask = None  # causal only: one query sees every cached slot, or SDPA's is_causal on a square block
        else:
            # Scores + bias in the wider dtype: a float32 AtMan bias is not rounded to bf16 (module docstring).
            dtype = x.dtype if attn_bias is None else torch.promote_types(x.dtype, attn_bias.dtype)
            n_keys = cache.max_len if static else start_pos + S
            mask = causal_mask(S, n_keys, start_pos, tokens.device, dtype)
            if attn_bias is not None:
                mask = mask + attn_bias.to(dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start_pos)
        x = self.norm(x)
        if logits_at is not None:
            index = logits_at.to(tokens.device).expand(B, -1)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(x)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
