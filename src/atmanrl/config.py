"""Typed run configuration: dataclasses, filled from YAML and ``key.sub=value`` command-line overrides.

What is notable here:
- The dataclasses below ARE the schema. YAML only exists at the edge (``experiments/configs/*.yaml``); a field's
  Python type decides how a YAML/command-line value is checked and converted.
- Every mistake is an error sentence that names the offending key: an unknown key lists the valid keys at that
  level, a wrongly typed value says which type was expected, a ``Literal`` lists the allowed choices.
- PyYAML reads ``8e-7`` (no dot) as a *string*; float fields therefore accept strings that parse as floats.
- Numbers default to the paper's section 3.4 setting; ``experiments/configs/cpu_default.yaml`` shrinks them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key and what to do."""


@dataclass
class ModelConfig:
    # A Hugging Face Llama directory, a .gguf file, or a name `atmanrl.model.load` knows ("smollm2-135m-instruct").
    name_or_path: str = "smollm2-135m-instruct"
    # dtype of the master weights (and of the optimizer state). The paper trains in bf16: on GPU keep float32
    # master weights and let `mixed_precision` run forward/backward in bf16 (FSDP2 MixedPrecisionPolicy).
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    mixed_precision: bool = True  # bf16 compute under FSDP2; only on GPU (ignored on CPU)


@dataclass
class DataConfig:
    path: str | None = None  # GSM8K jsonl (train split); None: the embedded synthetic problems
    synthetic_problems: int = 64  # how many synthetic problems when `path` is None
    max_problems: int | None = None  # keep the first N problems of the file (None: all)
    seed: int = 0  # seeds the synthetic problems and the per-epoch shuffle


@dataclass
class RolloutConfig:
    group_size: int = 8  # G: rollouts per problem (the GRPO group)
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class SaliencyRewardConfig:
    """The AtMan saliency reward (paper section 3.2, Eq. 2 and 3). ``weight: 0`` is the paper's baseline arm."""

    weight: float = 1.0  # R_total = R_outcome + weight * R_saliency; 0 skips the mask optimisation entirely
    steps: int = 200
    lr: float = 1e-3
    betas: tuple[float, float] = (0.6, 0.9999)
    weight_decay: float = 0.05
    init: float = -0.4  # c, the initial mask value
    scale: float = 10.0  # bias = scale * min(p, 0)
    reward: Literal["reenable", "eq3"] = "reenable"  # DESIGN.md decision 4
    max_batch: int | None = None  # rollouts per mask-optimisation batch; None: from free GPU memory (CPU: all)


@dataclass
class GRPOConfig:
    eps: float = 0.2  # PPO clip range (Eq. 5)
    # "token": per-token ratios, clipped, averaged per sequence then over sequences (GRPO, Shao et al.);
    # "sequence": one ratio per rollout, pi(a|q)/pi_old(a|q), the paper's literal Eq. 5.
    ratio: Literal["token", "sequence"] = "token"
    std_normalize: bool = False  # divide advantages by the group std (the paper does not)
    kl_beta: float = 0.0  # > 0 adds beta * KL(pi || pi_ref) to a frozen copy of the initial policy (paper: none)


@dataclass
class TrainConfig:
    problems_per_update: int = 8  # queries per update (paper: 8), split across ranks
    ppo_epochs: int = 2  # passes over each update's rollouts (paper: "two gradient passes per batch")
    # optimizer steps per pass: the update's rollouts are dealt into this many minibatches (strided, so each
    # minibatch holds rollouts of every problem). Paper: "a mini-batch of 2" -- we read it as 2 minibatches; the
    # other reading (2 rollouts per step) is num_minibatches = problems_per_update * group_size / 2.
    num_minibatches: int = 2
    micro_batch_size: int = 2  # sequences per forward/backward on one rank (memory only; gradients accumulate)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 8e-7
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None: no clipping (the paper does not say)
    epochs: int = 5  # passes over the training problems
    max_updates: int | None = None  # stop early after this many updates (None: all epochs)
    seed: int = 0  # seeds rollout sampling (per update and problem, see rl/rollout.py)


@dataclass
class CheckpointConfig:
    every: int = 50  # save every N updates (and after the last one); 0: only at the end
    keep: int = 2  # how many step_N directories to keep
    resume: bool = True  # continue from the newest complete checkpoint in out_dir if there is one
    stop_after: int | None = None  # stop (as if killed) after this update; for testing resume
    export: bool = True  # write the final policy as a Hugging Face safetensors directory (out_dir/policy)


@dataclass
class EvalConfig:
    """Periodic evaluation for the paper's Figure 2 (accuracy and response length during training)."""

    every: int = 0  # evaluate every N updates (and before the first); 0: never
    path: str | None = None  # GSM8K jsonl (test split); None: held-out synthetic problems
    problems: int = 64
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    seed: int = 1234


@dataclass
class RunConfig:
    out_dir: str = "runs/atmanrl"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    saliency: SaliencyRewardConfig = field(default_factory=SaliencyRewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks
# ---------------------------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 8e-7 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and wrongly typed values are errors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here are: {', '.join(names)}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in data.items()})


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) -- what ``from_dict`` reads back; written next to every run."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def _set_dotted(data: dict, dotted: str, value: Any, cls) -> None:
    """Set ``data[a][b] = value`` for ``a.b``, checking every part of the path against the dataclass schema."""
    parts = dotted.split(".")
    node, node_cls, seen = data, cls, []
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            where = ".".join(seen) or "the top level"
            raise ConfigError(
                f"unknown config key '{dotted}' ('{part}' is not a field of {where}); "
                f"valid keys there are: {', '.join(names)}"
            )
        seen.append(part)
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(sub_cls):
            raise ConfigError(f"config key '{'.'.join(seen)}' is a value, not a section; '{dotted}' goes too deep")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(seen)}' must be a mapping")
        node_cls = sub_cls


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-6"`` -> ``("train.lr", 1e-06)``; the value is read as YAML (``null``, ``[0.6, 0.99]``...)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (for example train.lr=1e-6)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=RunConfig):
    """Read a YAML file (optional) and apply ``key.sub=value`` overrides; returns a checked ``cls`` instance."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, cls)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None
