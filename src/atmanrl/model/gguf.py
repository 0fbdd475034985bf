"""Import a Llama GGUF file (llama.cpp's format): dequantized weights, config from metadata, and the tokenizer.

What is notable here:
- Every tensor is dequantized to float32 by the ``gguf`` package (``gguf.quants.dequantize``), then cast.
- llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its *interleaved* RoPE (pairs
  ``(x_2i, x_2i+1)``) computes what Hugging Face's *half-split* RoPE (pairs ``(x_i, x_i+d/2)``) computes. Our model
  uses the half-split layout, so ``unpermute_qk`` undoes it; without it the logits of SmolLM2 differ by tens and
  greedy text is garbage (``tests/test_gguf.py`` checks both ways).
- GGUF stores tensor dimensions innermost first; the numpy array ``dequantize`` returns is already ``(out, in)``,
  the ``nn.Linear`` layout. Shapes are still checked against the model.
- The ``gguf`` package is an optional dependency, imported only here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .hf_checkpoint import expected_shapes, model_from_state_dict
from .llama import Llama, LlamaConfig, RopeScaling, rope_inv_freq
from .tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> our parameter name ({i}: layer index).
_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "Reading GGUF files needs the `gguf` package: pip install gguf (or pip install 'atmanrl[gguf]')."
        ) from e
    return gguf


def gguf_name_to_ours(name: str) -> str | None:
    m = _LAYER.match(name)
    key = name if m is None else "blk.{i}." + name[m.end():]
    ours = _NAMES.get(key)
    return None if ours is None else ours.format(i=m.group(1) if m else "")


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation of q/k rows (half-split -> interleaved RoPE), per head: row ``j`` of the first half
    and row ``j`` of the second half become rows ``2j`` and ``2j+1``."""
    out, d_in = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d_in).transpose(1, 2).reshape(out, d_in)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_qk``: interleaved rows back to the half-split layout of Hugging Face / our RoPE."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def read_fields(reader) -> dict:
    """All metadata of a ``GGUFReader`` as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _f32(value) -> float:
    """GGUF stores floats as float32 (1e-5 becomes 9.9999997e-06): take the shortest decimal that rounds to it,
    which is the value the model's config.json had."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def config_from_metadata(
    fields: dict, shapes: dict, path: str, rope_freqs: np.ndarray | None = None
) -> LlamaConfig:
    """``LlamaConfig`` from GGUF metadata (``llama.*`` keys); the vocabulary size is the embedding's row count and
    the head is tied when there is no ``output.weight``. ``shapes``: tensor name -> GGUF shape."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; atmanrl implements the Llama architecture "
            f"(general.architecture = 'llama'). Use a Llama-family GGUF (Llama 3.x, SmolLM2) or convert the model."
        )

    def get(key, default=None):
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata key 'llama.{key}' is missing; the file looks truncated or broken.")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    emb = shapes.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{path}: GGUF tensor 'token_embd.weight' is missing; the file is not a complete model.")
    vocab = int(emb[-1])  # GGUF shape (hidden, vocab): innermost first
    scaling_type = fields.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ValueError(
            f"{path}: RoPE scaling type {scaling_type!r} is not supported (only Llama-3 scaling, stored as the "
            "rope_freqs tensor). Load the Hugging Face checkpoint of this model instead."
        )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(fields.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(fields.get("llama.attention.key_length", hidden // n_heads)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_f32(fields.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=None,
        max_position_embeddings=int(fields.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
    )
    rotary = fields.get("llama.rope.dimension_count", config.head_dim)
    if rotary != config.head_dim:
        raise ValueError(
            f"{path}: RoPE rotates {rotary} of {config.head_dim} head dimensions; partial rotary embeddings are not "
            "part of the Llama architecture implemented here."
        )
    if rope_freqs is not None:  # Llama 3.1+: the llama3 RoPE scaling, stored as per-frequency divisors
        config.rope_scaling = _llama3_scaling_from_freqs(rope_freqs, config, path)
    return config


def _llama3_scaling_from_freqs(divisors: np.ndarray, config: LlamaConfig, path: str) -> RopeScaling:
    """llama.cpp stores Llama-3 scaling as ``inv_freq / divisors``. The largest divisor is the factor; the other
    parameters are those of every Llama 3.1/3.2 release (low 1, high 4, original context 8192). We check that they
    reproduce the stored divisors exactly rather than trusting them."""
    divisors = torch.from_numpy(np.array(divisors, dtype=np.float32)).reshape(-1)
    scaling = RopeScaling(factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    plain = LlamaConfig(**{**config.__dict__, "rope_scaling": None})
    implied = rope_inv_freq(plain) / rope_inv_freq(LlamaConfig(**{**config.__dict__, "rope_scaling": scaling}))
    if implied.shape != divisors.shape or not torch.allclose(implied, divisors, rtol=1e-4, atol=0.0):
        raise ValueError(
            f"{path}: the rope_freqs tensor does not match Llama-3 RoPE scaling with factor {scaling.factor}, "
            "low_freq_factor 1, high_freq_factor 4, original context 8192. Load the Hugging Face checkpoint of this "
            "model instead (its config.json states the scaling)."
        )
    return scaling


GGUF_MAGIC = b"GGUF"


def _open_reader(gguf, path: Path):
    """``gguf.GGUFReader`` of ``path``; an empty, truncated or non-GGUF file is a ValueError naming the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        what = "it is empty" if size == 0 else f"it starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}"
        raise ValueError(f"{path} ({size} bytes) is not a GGUF file: {what}. Check the path, or re-download the "
                         "model file.")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # struct/numpy errors from a file cut short
        raise ValueError(f"{path} ({size} bytes) is a damaged GGUF file ({type(e).__name__}: {e}); it is probably "
                         "truncated. Re-download it.") from None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Llama, Tokenizer]:
    """``(model, tokenizer)`` from a Llama GGUF file, dequantized to float32 then cast to ``dtype``."""
    gguf = _import_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found.")
    reader = _open_reader(gguf, path)
    fields = read_fields(reader)
    raw = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(s) for s in t.shape) for name, t in raw.items()}
    freqs = raw.get("rope_freqs.weight")
    freqs = None if freqs is None else gguf.quants.dequantize(freqs.data, freqs.tensor_type)
    config = config_from_metadata(fields, shapes, str(path), rope_freqs=freqs)

    expected = expected_shapes(config)
    state = {}
    for name, t in raw.items():
        if name == "rope_freqs.weight":
            continue  # folded into config.rope_scaling above
        ours = gguf_name_to_ours(name)
        if ours is None:
            raise ValueError(
                f"{path}: unexpected GGUF tensor {name!r} for a Llama model; this file is not a plain Llama "
                "checkpoint (or needs a mapping in atmanrl/model/gguf.py)."
            )
        # np.array copies: F32 tensors come back as read-only views of the memory-mapped file.
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        if ours in expected and tuple(w.shape) != expected[ours]:
            raise ValueError(
                f"{path}: GGUF tensor {name!r} ({ours}) dequantizes to shape {tuple(w.shape)}, but the metadata "
                f"implies {expected[ours]} (out, in). The file's llama.* metadata does not match its tensors; "
                "re-convert the model with llama.cpp's convert_hf_to_gguf.py."
            )
        if ours.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_attention_heads)
        elif ours.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_key_value_heads)
        state[ours] = w.to(dtype=dtype, device=device)
    model = model_from_state_dict(config, state, source=str(path), device=device)
    tokenizer = Tokenizer.from_gguf_fields(fields, path=str(path))
    return model, tokenizer


def gguf_metadata(path: str | Path) -> dict:
    """The metadata of a GGUF file as a dict (handy to inspect a file: architecture, chat template, ...)."""
    return read_fields(_open_reader(_import_gguf(), Path(path)))


__all__ = ["load_gguf", "gguf_metadata", "permute_qk", "unpermute_qk", "SUPPORTED_ARCHITECTURES"]
