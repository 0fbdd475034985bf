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
- The bias keeps its precision: scores and bias are added in the wider of the model's and the bias's dtype, because
  bf16 has steps of 1/64 near -4 (-3.99 and -3.98 would both become -3.984) and the mask optimiser's small steps
  would vanish.
- Which kernel runs a masked attention call is ``Llama.attention`` (``ATTENTION_KERNELS``; docs/DESIGN.md, "The
  attention kernel"). ``sdpa``, the reference: the causal mask and the bias summed into one dense mask for
  ``scaled_dot_product_attention``; a bf16 model with a float32 AtMan bias then runs that attention in float32 on
  SDPA's math backend. ``flex``: FlexAttention (compiled on CUDA), with the bias added by a ``score_mod`` to the
  kernel's float32 scores (the bias is not rounded, q/k/v stay bf16), the causal structure in the same ``score_mod``
  plus a block mask that skips the key blocks above the diagonal, and grouped-query heads read in place
  (``enable_gqa``). ``efficient``: SDPA's memory-efficient kernel, keys/values copied out to the query heads and the
  bias rounded to the model's dtype (a candidate kept for measurement). ``auto`` (default): ``flex`` on CUDA for
  the mask optimisation and the compiled decode step, ``sdpa`` for the rest and everywhere off CUDA
  (``attention_kernel``). Calls without a mask (plain causal training forwards, unpadded prefills, eager decoding
  without padding) always use SDPA's ``is_causal``/maskless path, which is flash attention on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention


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
# Attention kernels
# ---------------------------------------------------------------------------------------------------------------

ATTENTION_KERNELS = ("auto", "sdpa", "flex", "efficient")
FLEX_BLOCK = 128  # FlexAttention's block of queries / keys (its default sparse block size)


def attention_kernel(choice: str, device: torch.device, hot: bool = True) -> str:
    """The kernel a masked attention call runs for ``Llama.attention == choice``.

    ``auto`` is ``flex`` on CUDA for the ``hot`` calls -- a static decode step, and a bias with one row per query
    (the AtMan mask; ~90 % of a paper update) -- and ``sdpa`` for the rest (a padded prefill: a key-only bias, once
    per call) and everywhere off CUDA (eager FlexAttention materialises the scores like SDPA's math path, so on a
    CPU it buys nothing; its numerics are tested there). Few call kinds on flex keep its compiled variants few.
    """
    if choice not in ATTENTION_KERNELS:
        raise ValueError(f"Llama.attention is {choice!r}; use one of {list(ATTENTION_KERNELS)}")
    if choice == "auto":
        return "flex" if device.type == "cuda" and hot else "sdpa"
    return choice


@dataclass
class AttnMask:
    """The causal mask and the bias of one forward, as the chosen kernel takes them (built once per forward).

    ``sdpa`` / ``efficient``: ``dense`` = causal mask + bias, one tensor. ``flex``: the ``bias`` as given
    (``(B|1, H|1, S|1, K)``), the slot of query 0 (``start_pos``, a 0-dim tensor) and the ``block_mask`` of the key
    blocks below the diagonal.
    """

    kernel: str
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    start_pos: torch.Tensor | None = None
    block_mask: BlockMask | None = None


def causal_block_mask(s_q: int, s_k: int, start_pos: int | torch.Tensor, device=None) -> BlockMask:
    """FlexAttention's block mask for causal attention of ``s_q`` queries from slot ``start_pos`` over ``s_k`` keys.

    Each block of ``FLEX_BLOCK`` queries visits the key blocks up to the one holding its last query's slot; the
    blocks wholly above the diagonal (most of the unwritten static cache in a decode step) are skipped. The exact
    diagonal is drawn by the ``score_mod`` (``_flex_causal``), so every visited block is a "full" block and the
    mask function is ``noop_mask``: one function object for every call, so a compiled caller does not recompile for
    a new mask closure. Built from tensor arithmetic (no ``create_block_mask``), so it works inside a compiled,
    CUDA-graph-captured decode step where ``start_pos`` is a device tensor.
    """
    n_q, n_k = -(-s_q // FLEX_BLOCK), -(-s_k // FLEX_BLOCK)
    rows = torch.arange(n_q, device=device)
    last_slot = start_pos + torch.clamp((rows + 1) * FLEX_BLOCK, max=s_q) - 1  # slot of each block's last query
    n_visible = torch.clamp(last_slot // FLEX_BLOCK + 1, max=n_k).to(torch.int32)[None, None]  # (1, 1, n_q)
    indices = torch.arange(n_k, device=device, dtype=torch.int32).repeat(n_q, 1)[None, None]  # (1, 1, n_q, n_k)
    return BlockMask.from_kv_blocks(torch.zeros_like(n_visible), indices, n_visible, indices,
                                    BLOCK_SIZE=FLEX_BLOCK, seq_lengths=(s_q, s_k))


def _flex_causal(q, k, v, bias, start_pos, block_mask):
    """FlexAttention with ``score_mod`` = causal (key slot <= query slot) + ``bias[b, h, q, k]``.

    The bias is read inside the kernel and added to its float32 scores, so a float32 AtMan bias keeps its
    precision on a bf16 model without casting q/k/v (and its gradient is accumulated over the heads in the kernel,
    never materialised per head). Size-1 dims of the bias broadcast (index 0). The score_mod is defined here, inside
    the (compiled) function, so that a new bias tensor is a new input, not a new closure to guard on.
    """
    if bias is None:
        def score_mod(score, b, h, i, j):
            return torch.where(j <= i + start_pos, score, float("-inf"))
    else:
        nb, nh, nq, nk = (n > 1 for n in bias.shape)

        def score_mod(score, b, h, i, j):
            value = score + bias[b if nb else 0, h if nh else 0, i if nq else 0, j if nk else 0]
            return torch.where(j <= i + start_pos, value, float("-inf"))
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def _flex_causal_compiled():
    """``_flex_causal`` under ``torch.compile``, built on the first CUDA call (building it imports torch._dynamo,
    seconds that a CPU-only run need not pay). ``dynamic``: one graph for every sequence length and batch size
    instead of a static graph per shape (the mask optimisation's shapes change with every batch of rollouts)."""
    return torch.compile(_flex_causal, dynamic=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask | None) -> torch.Tensor:
    """Eq. 1's ``softmax(Q K^T / sqrt(d) + causal + H^AtMan) V`` for ``q (B, H, S, d)``, ``k, v (B, Hkv, K, d)``,
    on the kernel ``mask`` names; the output is in q's dtype. ``mask`` None: plain causal attention (or one query
    that sees every key), which SDPA runs without materialising a mask (flash attention on a GPU)."""
    dtype, gqa = q.dtype, q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    if mask.kernel == "flex":
        eager = q.device.type != "cuda" or torch.compiler.is_compiling()
        return (_flex_causal if eager else _flex_causal_compiled())(q, k, v, mask.bias, mask.start_pos,
                                                                    mask.block_mask)
    if mask.kernel == "efficient":  # K/V copied out to the query heads; the mask is in q's dtype (Llama.forward)
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
        only_efficient = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]) if q.is_cuda else contextlib.nullcontext()
        with only_efficient:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense.to(dtype))
    # The reference: a mask wider than q (a float32 AtMan bias on a bf16 model) is not rounded to q's dtype; the
    # attention then runs in the mask's dtype (module docstring).
    if mask.dense.dtype != dtype:
        q, k, v = q.to(mask.dense.dtype), k.to(mask.dense.dtype), v.to(mask.dense.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa).to(dtype)


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
        out = attend(q, k, v, mask)  # Eq. 1: softmax(Q K^T / sqrt(d) + causal mask + H^AtMan) V
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


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
        self.attention = "auto"  # the kernel of masked attention calls: one of ATTENTION_KERNELS (module docstring)

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
        mask = None  # causal only: one query sees every cached slot, or SDPA's is_causal on a square block
        if static or attn_bias is not None or (S > 1 and start_pos != 0):
            mask = self._mask(S, cache.max_len if static else start_pos + S, start_pos, attn_bias, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start_pos)
        x = self.norm(x)
        if logits_at is not None:
            index = logits_at.to(tokens.device).expand(B, -1)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(x)

    def _mask(self, s_q: int, s_k: int, start_pos, attn_bias, dtype) -> AttnMask:
        """The causal mask + ``attn_bias`` of one forward, in the form ``self.attention``'s kernel takes."""
        device = self.inv_freq.device
        static = isinstance(start_pos, torch.Tensor)
        kernel = attention_kernel(self.attention, device, static or attn_bias is not None and attn_bias.dim() > 1
                                  and attn_bias.shape[-2] > 1)
        if kernel == "flex":
            start = start_pos if static else torch.full((), start_pos, device=device)
            bias = None if attn_bias is None else attn_bias[(None,) * (4 - attn_bias.dim())]
            return AttnMask("flex", bias=bias, start_pos=start,
                            block_mask=causal_block_mask(s_q, s_k, start_pos, device))
        if kernel == "sdpa" and attn_bias is not None:
            # Scores + bias in the wider dtype: a float32 AtMan bias is not rounded to bf16 (module docstring).
            dtype = torch.promote_types(dtype, attn_bias.dtype)
        dense = causal_mask(s_q, s_k, start_pos, device, dtype)
        return AttnMask(kernel, dense=dense if attn_bias is None else dense + attn_bias.to(dtype))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
