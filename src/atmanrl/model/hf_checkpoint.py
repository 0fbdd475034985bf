"""Read and write Hugging Face Llama checkpoints: ``config.json`` + safetensors (one file, or shards + index).

What is notable here:
- Our parameter names are Hugging Face's minus the ``model.`` prefix, so loading is a rename. Names and shapes are
  checked strictly before anything is loaded: an unknown, missing or misshapen tensor is an error that names the
  file, the tensor, the expected and actual shape, and what to do.
- Both RoPE config spellings are read: ``rope_scaling`` (+ top-level ``rope_theta``, transformers 4.x) and
  ``rope_parameters`` (transformers 5.x, where ``rope_theta`` may live inside it). ``rope_type`` "default" or absent
  means no scaling, "llama3" is the Llama-3 scaling; anything else is refused.
- Tied heads: when ``lm_head.weight`` is absent (Hugging Face omits it when tied) the head is the embedding. When
  saving a tied model, ``lm_head.weight`` is omitted the same way, so ``transformers`` loads what we write.
- The model is built on the ``meta`` device and the loaded tensors are assigned to it: no random initialisation,
  no second copy of the weights in memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig, RopeScaling, rope_inv_freq

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------------


def _rope_from_hf(cfg: dict, path: Path) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either ``rope_parameters`` (new) or ``rope_scaling`` (old)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(
            f"{path}: RoPE type {kind!r} is not supported (only 'default' and 'llama3', the Llama-3.x scaling). "
            "Use a Llama-3.x checkpoint or extend atmanrl/model/llama.py:rope_inv_freq."
        )
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"{path}: llama3 RoPE scaling lacks the key {e.args[0]!r}; the config.json is incomplete.")
    return float(theta), scaling


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; empty, truncated, non-UTF-8 or non-object files are errors naming the file."""
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path} is empty; a {what} must hold a JSON object. Re-download it from the model's "
                         "repository.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start} is not UTF-8 text; the {what} is damaged. Re-download it.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); the {what} is "
                         "truncated or damaged. Re-download it.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} must hold a JSON object, got {type(data).__name__}")
    return data


def load_llama_config(path: str | Path) -> LlamaConfig:
    """``LlamaConfig`` from a Hugging Face ``config.json`` (or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. A Hugging Face model directory needs its config.json next to the safetensors "
            "files; copy it from the model's repository."
        )
    cfg = _read_json(path, "config.json")
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{path}: model_type is {model_type!r}; atmanrl implements the Llama architecture only.")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{path}: {key} = {cfg[key]!r} is not supported (our Llama has {key} = {ok!r}).")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{path}: {key} = {value!r} must be a positive integer; the config.json is damaged.")
    theta, scaling = _rope_from_hf(cfg, path)
    try:
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),  # defaults: those of transformers' LlamaConfig
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )
    except KeyError as e:
        raise ValueError(f"{path}: required key {e.args[0]!r} is missing from config.json.")


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` dict that transformers' ``LlamaForCausalLM`` reads (old ``rope_scaling`` spelling, which
    both transformers 4.x and 5.x understand)."""
    scaling = None if config.rope_scaling is None else {"rope_type": "llama3", **asdict(config.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------------------------------------------
# Building a model from tensors
# ---------------------------------------------------------------------------------------------------------------


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of ``config`` holds (no ``lm_head.weight`` when tied)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def model_from_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor], source: str, device="cpu") -> Llama:
    """A ``Llama`` holding exactly the tensors of ``state`` (our names), after strict name and shape checks.

    ``source`` names where the tensors came from, for error messages. ``lm_head.weight`` may be absent when the
    config ties it to the embedding.
    """
    expected = expected_shapes(config)
    if config.tie_word_embeddings:
        if "lm_head.weight" in state:
            emb = state.get("embed_tokens.weight")
            if emb is not None and not torch.equal(state["lm_head.weight"], emb):
                raise ValueError(
                    f"{source}: the config ties lm_head to the embedding, but lm_head.weight differs from "
                    "embed_tokens.weight. Set tie_word_embeddings to false in config.json."
                )
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(
            f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''} for a Llama with "
            f"{config.num_hidden_layers} layers. The checkpoint does not match its config.json (layer count?) or is "
            "not a plain Llama checkpoint."
        )
    missing = sorted(set(expected) - set(state))
    if missing:
        hint = (" It has no lm_head.weight: set tie_word_embeddings to true in config.json if the head is tied."
                if missing == ["lm_head.weight"] else " The checkpoint is incomplete (a shard missing?).")
        raise ValueError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}.{hint}")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {got}, but the config expects {shape}. Check that "
                "config.json belongs to these weights (hidden_size, intermediate_size, heads, vocab_size)."
            )
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # The RoPE frequencies are a non-persistent buffer (never in a checkpoint): compute them in float32.
    model.inv_freq = rope_inv_freq(config).to(device)
    return model


# ---------------------------------------------------------------------------------------------------------------
# safetensors I/O
# ---------------------------------------------------------------------------------------------------------------


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from the index when there is one."""
    index = path / INDEX
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not weight_map or not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'; the index file is broken. Re-download or re-save it.")
        files = []
        root = path.resolve()
        for name in dict.fromkeys(weight_map.values()):
            f = path / str(name)
            # A shard must be a file of this directory: an index naming "../x" or "/abs/x" could read any file.
            if not isinstance(name, str) or Path(name).is_absolute() or f.resolve().parent != root:
                raise ValueError(
                    f"{index} names the shard {name!r}, which is not a file in {path}; shard names must be plain "
                    "file names in the model directory. The index is damaged or was crafted: re-download it."
                )
            files.append(f)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} is listed in {index} but does not exist; the download is incomplete. Fetch the missing "
                    "shard (or every file named in the index) into the same directory."
                )
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise FileNotFoundError(
        f"No weights in {path}: expected {SINGLE}, or {INDEX} with its shards model-0000k-of-0000n.safetensors."
    )


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """A ``Llama`` from a Hugging Face checkpoint directory, its tensors cast to ``dtype`` on ``device``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; load_hf expects a Hugging Face model directory.")
    config = load_llama_config(path)
    state, origin = {}, {}
    for file in _shard_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    if hf_name.endswith("rotary_emb.inv_freq"):
                        continue  # old checkpoints stored the RoPE buffer; we recompute it
                    name = hf_name.removeprefix("model.")
                    if name in state:
                        raise ValueError(f"{file}: tensor {hf_name!r} also appears in {origin[name]}; remove one "
                                         "copy.")
                    state[name] = f.get_tensor(hf_name).to(dtype=dtype, device=device)
                    origin[name] = file.name
        except ValueError:
            raise
        except Exception as e:  # safetensors' SafetensorError: empty, truncated or not a safetensors file
            size = file.stat().st_size
            raise ValueError(
                f"{file} ({size} bytes) is not a readable safetensors file ({type(e).__name__}: {e}); it is empty, "
                "truncated or damaged. Re-download it (compare its size with the model repository's)."
            ) from None
    try:
        return model_from_state_dict(config, state, source=str(path), device=device)
    except ValueError as e:
        # Point at the file holding the offending tensor.
        bad = next((n for n in origin if f"'{n}'" in str(e)), None)
        if bad is not None:
            raise ValueError(f"{e} (tensor {bad!r} is stored in {path / origin[bad]})") from None
        raise


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size: use bytes (int) or e.g. '500MB', '5GB'.")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_hf(model: Llama, path: str | Path, max_shard_size: int | str | None = None) -> Path:
    """Write ``config.json`` and the weights as Hugging Face does: ``model.safetensors``, or, when larger than
    ``max_shard_size`` bytes, shards ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    The tensors are written in the model's dtype, bit for bit."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: transformers re-ties it from the embedding
        tensors[("" if name == "lm_head.weight" else "model.") + name] = t.detach().to("cpu").contiguous()
    dtype = next(iter(tensors.values())).dtype
    (path / CONFIG).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")

    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    shards, size = [[]], 0  # greedy packing in parameter order; a tensor larger than the limit gets its own shard
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    for stale in [path / SINGLE, path / INDEX, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # never leave an old shard set next to a new one
    if len(shards) == 1:
        save_file(tensors, str(path / SINGLE), metadata={"format": "pt"})
        return path
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return path
