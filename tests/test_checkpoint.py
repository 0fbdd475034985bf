"""Hugging Face checkpoint I/O: bit-exact round trips, transformers reading what we write (and the reverse), both
RoPE config spellings, and errors that name the file, the tensor and the fix.

Reference: `transformers.LlamaForCausalLM` (`from_pretrained` of our directory; `save_pretrained` of its own).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from atmanrl.model import Llama, LlamaConfig, RopeScaling, load_hf, load_llama_config, save_hf

TOL = 1e-4


def tiny(tied: bool, scaled: bool = True, vocab: int = 89) -> Llama:
    """A random GQA Llama (3 layers, 6 heads / 2 KV heads) with random norms, seeded."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16) if scaled else None,
        max_position_embeddings=128, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    model = Llama(config).init_weights(generator=torch.Generator().manual_seed(7 + tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def tokens(vocab: int, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", [None, 60_000])
def test_round_trip_bit_exact(tmp_path, tied, shard):
    model = tiny(tied)
    save_hf(model, tmp_path, max_shard_size=shard)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        stored.update(load_file(f))
    assert ("lm_head.weight" in stored) == (not tied)  # omitted when tied, as transformers does

    loaded = load_hf(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_round_trip_bfloat16(tmp_path):
    model = tiny(tied=False).to(torch.bfloat16)
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_hf(tmp_path, dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16 and torch.equal(loaded.state_dict()[name], t), name


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_what_we_save(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = tiny(tied)
    save_hf(model, tmp_path, max_shard_size=None if tied else 30_000)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    x = tokens(model.config.vocab_size, seq=40)  # longer than original_max_position_embeddings (16)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= TOL


def test_load_checkpoint_saved_by_transformers(tmp_path):
    """Random tiny HF model with llama3 RoPE scaling, untied, saved sharded by `save_pretrained` (whatever config
    spelling this transformers version writes)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=77, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=128,
        rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8),
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path)
    assert ours.config.rope_scaling == RopeScaling(4.0, 1.0, 4.0, 8) and not ours.config.tie_word_embeddings
    x = tokens(77, seq=30)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= TOL


def _config_json(model: Llama, tmp_path, spelling: str) -> LlamaConfig:
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if spelling == "rope_parameters":  # transformers 5.x: theta inside, rope_scaling gone
        cfg["rope_parameters"] = {**(cfg.pop("rope_scaling") or {"rope_type": "default"}),
                                  "rope_theta": cfg.pop("rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return load_llama_config(tmp_path)


@pytest.mark.parametrize("scaled", [True, False])
def test_rope_parameters_spelling(tmp_path, scaled):
    model = tiny(tied=True, scaled=scaled)
    new = _config_json(model, tmp_path / "new", "rope_parameters")
    old = _config_json(model, tmp_path / "old", "rope_scaling")
    assert new == old == model.config


def test_unsupported_rope_type(tmp_path):
    save_hf(tiny(tied=True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: RoPE type 'yarn' is not supported"):
        load_llama_config(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each error names the file, the tensor, and the fix
# ---------------------------------------------------------------------------------------------------------------


def _shards(path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_missing_config_json(tmp_path):
    save_hf(tiny(tied=True), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "copy it from the model's repository" in str(e.value)


def test_missing_shard(tmp_path):
    save_hf(tiny(tied=True), tmp_path, max_shard_size=60_000)
    gone = tmp_path / _shards(tmp_path)[1]
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert str(gone) in msg and "model.safetensors.index.json" in msg and "Fetch the missing shard" in msg


def test_wrong_shape(tmp_path):
    save_hf(tiny(tied=False), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(81, 48)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "'layers.1.mlp.up_proj.weight'" in msg and "(81, 48)" in msg and "(80, 48)" in msg
    assert str(tmp_path / "model.safetensors") in msg and "Check that config.json belongs to these weights" in msg


def test_unknown_tensor(tmp_path):
    save_hf(tiny(tied=True), tmp_path, max_shard_size=60_000)
    shard = tmp_path / _shards(tmp_path)[2]
    state = load_file(shard)
    state["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(48, 48)  # a 4th layer the config does not have
    save_file(state, shard)
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "layers.3.self_attn.q_proj.weight" in msg and str(shard) in msg and "does not match its config.json" in msg


def test_missing_lm_head_of_untied_model(tmp_path):
    save_hf(tiny(tied=False), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="set tie_word_embeddings to true"):
        load_hf(tmp_path)


def test_load_rejects_unknown_input(tmp_path):
    from atmanrl.model import load

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="neither an embedded model name"):
        load(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        load("no-such-model")


# ---------------------------------------------------------------------------------------------------------------
# Issue 10: hostile and damaged inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shard_paths_may_not_leave_the_model_directory(tmp_path, shard):
    model_dir = tmp_path / "model"
    save_hf(tiny(tied=True), model_dir, max_shard_size=60_000)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "outside.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json names the shard .* which is not a file in .*model; shard names "
                                         r"must be plain file names"):
        load_hf(model_dir)


@pytest.mark.parametrize("damage, what", [
    (lambda b: b"", "empty"),
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"\x00garbage" * 10, "garbage"),
])
def test_damaged_safetensors_name_the_file(tmp_path, damage, what):
    save_hf(tiny(tied=True), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=r"model\.safetensors \(\d+ bytes\) is not a readable safetensors file.*"
                                         r"empty, truncated or damaged\. Re-download"):
        load_hf(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("", r"config\.json is empty"),
    ('{"model_type": "llama", "hidden_size": 4', r"config\.json, line 1, column \d+: not valid JSON"),
    ("[1, 2]", r"config\.json: a config\.json must hold a JSON object, got list"),
])
def test_damaged_config_json_names_the_file(tmp_path, text, message):
    save_hf(tiny(tied=True), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path)


def test_non_utf8_config_json_names_the_file(tmp_path):
    save_hf(tiny(tied=True), tmp_path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "ll\xe4ma"}')
    with pytest.raises(ValueError, match=r"config\.json: byte \d+ is not UTF-8 text"):
        load_hf(tmp_path)


def test_damaged_index_names_the_file(tmp_path):
    save_hf(tiny(tied=True), tmp_path, max_shard_size=60_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json, line 1, column \d+: not valid JSON.*"
                                         r"safetensors index"):
        load_hf(tmp_path)


@pytest.mark.parametrize("key, value", [("hidden_size", "48"), ("num_hidden_layers", 0), ("vocab_size", -1),
                                        ("intermediate_size", 80.5)])
def test_config_json_with_a_wrong_value_names_file_and_key(tmp_path, key, value):
    save_hf(tiny(tied=True), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: {key} = {value!r} must be a positive integer"):
        load_hf(tmp_path)
