"""Typed run configuration: dataclasses, filled from YAML and ``key.sub=value`` command-line overrides.

What is notable here:
- The dataclasses below ARE the schema. YAML only exists at the edge (``experiments/configs/*.yaml``); a field's
  Python type decides how a YAML/command-line value is checked and converted.
- Every mistake is an error sentence that names the offending key: an unknown key lists the valid keys at that
  level, a wrongly typed value says which type was expected, a ``Literal`` lists the allowed choices.
- PyYAML reads ``8e-7`` (no dot) as a *string*; float fields therefore accept strings that parse as floats, but
  never NaN or infinity.
- Ranges are checked when a section is built (``__post_init__``), so a bad value fails at config load, before any
  model is loaded; ``RunConfig``'s docstring lists where 0 is allowed. The saliency section extends
  ``atmanrl.saliency.SaliencyConfig``, the one owner of the mask settings and their checks.
- One validation style: every range rule is ``check_range`` (config fields) or ``number_arg`` (a script's numeric
  argument, built on ``check_range``), and each says "VALUE must be RULE (why)".
- A config file may start from another: ``base: toy_atmanrl.yaml`` (a path relative to the file) takes every
  setting of that file, and the file then states only its difference. Mappings merge key by key, so
  ``saliency: {weight: 0}`` changes the weight and keeps the base's other saliency settings; an override
  ``saliency={steps: 2}`` merges the same way.
- An override's value is YAML, but never silently cut: ``out_dir=/runs/a #2`` (YAML would read `` #2`` as a
  comment) is refused with the quoting that keeps it, and a string field takes a bare ``2024`` as the text "2024".
- ``UserError`` is the base of every error a user can fix from its message (a file, key or limit and what to do):
  the scripts print it as one sentence and exit with code 2.
- Numbers default to the paper's section 3.4 setting; ``experiments/configs/cpu_default.yaml`` shrinks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from atmanrl.errors import UserError, broken_rule, check_range  # noqa: F401 (check_range: re-exported)
from atmanrl.saliency.optimize import SaliencyConfig


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and what to do."""


# torch dtype of each ``model.dtype`` choice.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def require(ok: bool, message: str) -> None:
    """Raise the check's ``ValueError(message)`` (it starts with the field name; ``from_dict`` prefixes the
    section) unless ``ok``: the one way a section states a rule that is not a plain range."""
    if not ok:
        raise ValueError(message)


def number_arg(kind: type, what: str, low=None, high=None, *, low_open=False, high_open=False):
    """An argparse ``type=``: a ``kind`` (int or float) number in the range, else the sentence argparse prints
    after the argument's name ("argument --k: 0 must be >= 1 (samples per problem)"); the scripts' one check."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'} "
                                             f"({what})") from None
        rule = broken_rule(value, low, high, low_open=low_open, high_open=high_open)
        if rule is not None:
            raise argparse.ArgumentTypeError(f"{text} {rule} ({what})")
        return value

    return parse


def text_arg(name: str, empty: bool = True):
    """An argparse ``type=`` for text: bytes that are not UTF-8 (``$'\\xff'``, which Python passes on as a lone
    surrogate that no tokenizer or file system call accepts) are refused, and so is an empty value unless ``empty``."""

    def parse(text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
            which = f" (byte 0x{byte:02x})" if byte is not None else ""
            raise argparse.ArgumentTypeError(f"not UTF-8 text{which}; pass UTF-8 text") from None
        if not empty and not text.strip():
            raise argparse.ArgumentTypeError(f"{name} must not be empty")
        return text

    return parse


def device_arg(name: str, text: str) -> torch.device:
    """``text`` as a torch device that exists on this machine (cpu, cuda, cuda:N), else a ``UserError`` naming
    ``name`` (the flag) and what to pass."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{name} {text!r} is not a device torch knows; pass cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{name} {text}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{name} {text}: this machine has no CUDA GPU (torch.cuda.is_available() is False); pass "
                        f"{name} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{name} {text}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def _finite(obj) -> None:
    """No float field (or float in a tuple field) of the section ``obj`` may be NaN or infinite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        numbers = value if isinstance(value, tuple) else (value,)
        require(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                f"{f.name}={value!r} is not a finite number; give a finite value")


@dataclass
class ModelConfig:
    # A Hugging Face Llama directory, a .gguf file, or a name `atmanrl.model.load` knows ("smollm2-135m-instruct").
    name_or_path: str = "smollm2-135m-instruct"
    # dtype of the master weights (and of the optimizer state), a key of DTYPES. The paper trains in bf16: on GPU
    # keep float32 master weights and let `mixed_precision` run forward/backward in bf16 (FSDP2 MixedPrecisionPolicy).
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    mixed_precision: bool = True  # bf16 compute under FSDP2; only on GPU (ignored on CPU)
    # The kernel of masked attention calls (the AtMan mask's optimisation, the compiled decode step): "auto" is
    # FlexAttention on a GPU and the SDPA reference on a CPU; "sdpa" forces the reference everywhere (docs/DESIGN.md,
    # decision 14). atmanrl.model.llama.ATTENTION_KERNELS lists the choices.
    attention: Literal["auto", "sdpa", "flex", "efficient"] = "auto"


@dataclass
class DataConfig:
    task: str = "gsm8k"  # which problems and scoring: a name registered in atmanrl/tasks/registry.py (gsm8k, toyworld)
    path: str | None = None  # GSM8K jsonl (train split); None: the embedded synthetic problems
    synthetic_problems: int = 64  # how many synthetic problems when `path` is None; > 0
    max_problems: int | None = None  # keep the first N problems of the file (None: all); > 0
    seed: int = 0  # seeds the synthetic problems and the per-epoch shuffle

    def __post_init__(self):
        check_range("synthetic_problems", self.synthetic_problems, 1)
        check_range("max_problems", self.max_problems, 1, none_ok=True)


@dataclass
class RolloutConfig:
    group_size: int = 8  # G: rollouts per problem (the GRPO group); >= 2
    max_new_tokens: int = 1024  # > 0
    temperature: float = 1.0  # > 0 (the sampling policy's logits are divided by it)
    top_p: float = 1.0  # in (0, 1]; 1: no nucleus truncation

    def __post_init__(self):
        _finite(self)
        check_range("group_size", self.group_size, 2, why="GRPO's baseline is the mean reward of the other rollouts "
                                                          "of the same problem")
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_range("temperature", self.temperature, 0, low_open=True)
        check_range("top_p", self.top_p, 0, 1, low_open=True, why="1: sample from the whole distribution")


@dataclass
class SaliencyRewardConfig(SaliencyConfig):
    """The AtMan saliency reward (paper section 3.2, Eq. 2 and 3). ``weight: 0`` is the paper's baseline arm.

    Every mask field (``init``, ``scale``, ``steps``, ``lr``, ``betas``, ``weight_decay``, ``reward``,
    ``max_batch``, ...) and its range check belong to ``atmanrl.saliency.SaliencyConfig``, which this extends with
    the weight; the trainer hands this section to ``saliency()`` as it is.
    """

    weight: float = 1.0  # R_total = R_outcome + weight * R_saliency; >= 0; 0 skips the mask optimisation entirely

    def __post_init__(self):
        super().__post_init__()
        check_range("weight", self.weight, 0, why="0: the outcome-only baseline; for the other reward orientation "
                                                  "set saliency.reward: eq3 instead of a negative weight")


@dataclass
class GRPOConfig:
    eps: float = 0.2  # PPO clip range (Eq. 5); > 0
    # "token": per-token ratios, clipped, averaged per sequence then over sequences (GRPO, Shao et al.);
    # "sequence": one ratio per rollout, pi(a|q)/pi_old(a|q), the paper's literal Eq. 5.
    ratio: Literal["token", "sequence"] = "token"
    std_normalize: bool = False  # divide advantages by the group std (the paper does not)
    kl_beta: float = 0.0  # >= 0; > 0 adds beta * KL(pi || pi_ref) to a frozen copy of the initial policy (paper: 0)

    def __post_init__(self):
        _finite(self)
        check_range("eps", self.eps, 0, low_open=True, why="the clip range [1 - eps, 1 + eps]; the paper: 0.2")
        check_range("kl_beta", self.kl_beta, 0, why="0 switches the KL term off")


@dataclass
class TrainConfig:
    problems_per_update: int = 8  # queries per update (paper: 8), split across ranks; > 0
    ppo_epochs: int = 2  # passes over each update's rollouts (paper: "two gradient passes per batch"); > 0
    # optimizer steps per pass (> 0): the update's rollouts are dealt into this many minibatches (strided, so each
    # minibatch holds rollouts of every problem). Paper: "a mini-batch of 2" -- we read it as 2 minibatches; the
    # other reading (2 rollouts per step) is num_minibatches = problems_per_update * group_size / 2.
    num_minibatches: int = 2
    micro_batch_size: int = 2  # sequences per forward/backward on one rank (memory only; gradients accumulate); > 0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 8e-7  # > 0
    betas: tuple[float, float] = (0.9, 0.999)  # each in [0, 1)
    weight_decay: float = 0.0  # >= 0
    grad_clip: float | None = None  # max global grad norm, > 0; None: no clipping (the paper does not say)
    epochs: int = 5  # passes over the training problems; > 0
    max_updates: int | None = None  # stop early after this many updates (None: all epochs); > 0
    seed: int = 0  # seeds rollout sampling (per update and problem, see rl/rollout.py)

    def __post_init__(self):
        _finite(self)
        for name in ("problems_per_update", "ppo_epochs", "num_minibatches", "micro_batch_size", "epochs"):
            check_range(name, getattr(self, name), 1)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("max_updates", self.max_updates, 1, none_ok=True)
        check_range("grad_clip", self.grad_clip, 0, low_open=True, none_ok=True,
                    why="null: no clipping; a negative norm flips the sign of every gradient")
        check_range("weight_decay", self.weight_decay, 0)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"betas={list(self.betas)} must be two numbers in [0, 1) (AdamW's default: [0.9, 0.999])")


@dataclass
class CheckpointConfig:
    every: int = 50  # save every N updates (and after the last one); 0: only at the end; >= 0
    keep: int = 2  # how many step_N directories to keep; >= 1
    # Continue from the newest intact checkpoint in out_dir if there is one. An out_dir that already holds a run
    # (a checkpoint, metrics or an exported policy) is never started over silently: without a checkpoint to
    # resume from, or with resume: false, the run refuses to start unless `overwrite` is true (rl/rundir.py).
    resume: bool = True
    overwrite: bool = False  # start from update 0 and DELETE the earlier run in out_dir (resume is then ignored)
    stop_after: int | None = None  # stop (as if killed) after this update; for testing resume; > 0
    export: bool = True  # write the final policy as a Hugging Face safetensors directory (out_dir/policy)

    def __post_init__(self):
        check_range("every", self.every, 0, why="0: one checkpoint, after the last update")
        check_range("keep", self.keep, 1, why="a resume needs the newest checkpoint")
        check_range("stop_after", self.stop_after, 1, none_ok=True)


@dataclass
class EvalConfig:
    """Periodic evaluation for the paper's Figure 2 (accuracy and response length during training)."""

    every: int = 0  # evaluate every N updates (and before the first); 0: never; >= 0
    path: str | None = None  # GSM8K jsonl (test split); None: held-out synthetic problems
    problems: int = 64  # > 0
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens; > 0
    seed: int = 1234

    def __post_init__(self):
        check_range("every", self.every, 0, why="0: no evaluation during training")
        check_range("problems", self.problems, 1)
        check_range("max_new_tokens", self.max_new_tokens, 1, none_ok=True)


@dataclass
class RunConfig:
    """The whole run. Ranges are checked when a section is built (every check names its key); zero is allowed only
    where it means something: ``checkpoint.every: 0`` (save only at the end), ``eval.every: 0`` (no evaluation),
    ``saliency.weight: 0`` (the baseline arm), ``grpo.kl_beta: 0`` (no KL term), ``saliency.lr: 0`` (a mask that
    never moves). No float may be NaN or infinite."""

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
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # "X | None": X's own error says more than the union's
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads 8e-7 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number; give a finite value")
        return number
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
    values = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # a range check of the section; its message starts with the field name
        raise ConfigError(f"{prefix}{e}") from None


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) -- what ``from_dict`` reads back; written next to every run."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied, mappings merged key by key (a section states only what it changes)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _is_text_field(tp) -> bool:
    """``str`` or ``str | None``: a field whose override is taken as the text written."""
    options = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    return options == [str]


def _set_dotted(data: dict, dotted: str, value: Any, cls, raw: str | None = None) -> None:
    """Set ``data[a][b] = value`` for ``a.b``, checking every part of the path against the dataclass schema. A
    mapping given for a section merges into it; ``raw`` (the override's text) is used as it is written for a string
    field that YAML would read as a number or a boolean (``out_dir=2024``)."""
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
        tp = typing.get_type_hints(node_cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(node.get(part), dict):
                value = merge(node[part], value)
            elif raw is not None and _is_text_field(tp) and isinstance(value, (bool, int, float)):
                value = raw.strip()
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{'.'.join(seen)}' is a value, not a section; '{dotted}' goes too deep")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(seen)}' must be a mapping")
        node_cls = tp


def _comment(raw: str) -> str:
    """What YAML would drop from ``raw`` as a comment ('' when nothing): the text after its last token."""
    try:
        tokens = [t for t in yaml.scan(raw) if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    except yaml.YAMLError:
        return ""  # safe_load reports the syntax error
    end = max((t.end_mark.index for t in tokens), default=0)
    return raw[end:].strip()


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-6"`` -> ``("train.lr", 1e-06)``; the value is read as YAML (``null``, ``[0.6, 0.99]``...).
    A value YAML would cut short at a comment (``out_dir=/runs/a #2`` -> ``/runs/a``) is refused, never cut."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (for example train.lr=1e-6)")
    key, raw = text.split("=", 1)
    if comment := _comment(raw):
        raise ConfigError(f"override '{text}': YAML reads '{comment}' as a comment and would drop it from the "
                          f"value; quote the value to keep it ({key.strip()}='{raw.strip()}', with the shell's own "
                          "quotes around the whole override) or leave the comment out")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({_first_line(e)}); quote it or fix "
                          "the brackets") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _read_yaml(path: Path) -> dict:
    """The mapping in a YAML file; undecodable bytes and YAML syntax errors name the file and the line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); give a readable YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text; save the config "
                          "file as UTF-8") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or _first_line(e)
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax there (indentation, a missing ':' "
                          "or an unclosed bracket or quote)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def read_config_file(path: str | Path, cls=RunConfig, _chain: tuple[Path, ...] = ()) -> dict:
    """The settings of a config file as a dict, its ``base:`` chain resolved (the base first, then the file's own
    keys merged over it). Each file is checked on its own, so an error names the file at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (f" (the base of {_chain[-1]})" if _chain else ""))
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: its base chain comes back to it ({cycle}); remove one of the base: keys")
    data = _read_yaml(path)
    base = data.pop("base", None)
    try:
        from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: must name another config file (a path relative to {path.parent}), got "
                          f"{base!r}")
    merged = merge(read_config_file(path.parent / base, cls, (*_chain, path.resolve())), data)
    try:
        from_dict(cls, merged)
    except ConfigError as e:
        raise ConfigError(f"{path} (with its base {base}): {e}") from None
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls=RunConfig):
    """Read a YAML file (optional; its ``base:`` chain resolved) and apply ``key.sub=value`` overrides; returns a
    checked ``cls`` instance. An error names the file when the file is at fault, else the override."""
    data = read_config_file(path, cls) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value, cls, raw=text.split("=", 1)[1])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"command-line override: {e}") from None
