"""Typed configs: YAML + key.sub=value overrides, and errors that name the key."""

from pathlib import Path

import pytest

from atmanrl.config import ConfigError, RunConfig, load_config, to_dict, from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def test_defaults_are_the_papers_numbers():
    c = RunConfig()
    assert (c.train.problems_per_update, c.rollout.group_size, c.rollout.max_new_tokens) == (8, 8, 1024)
    assert (c.train.ppo_epochs, c.train.lr, c.grpo.eps, c.train.epochs) == (2, 8e-7, 0.2, 5)
    s = c.saliency
    assert (s.init, s.scale, s.steps, s.lr, s.betas, s.weight_decay, s.weight) == (
        -0.4, 10.0, 200, 1e-3, (0.6, 0.9999), 0.05, 1.0)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 8e-7\n  grad_clip: 1.0\nsaliency:\n  betas: [0.5, 0.99]\n")
    c = load_config(f, ["train.lr=1e-6", "saliency.weight=0", "data.path=/x.jsonl", "train.grad_clip=null",
                        "grpo.ratio=sequence"])
    assert c.train.lr == 1e-6 and isinstance(c.train.lr, float)  # PyYAML reads "1e-6" as a string
    assert c.saliency.betas == (0.5, 0.99) and c.saliency.weight == 0.0
    assert c.data.path == "/x.jsonl" and c.train.grad_clip is None and c.grpo.ratio == "sequence"
    assert from_dict(RunConfig, to_dict(c)) == c  # what the trainer writes to config.json reads back


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*valid keys.*\blr\b"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"'trian\.lr'.*valid keys.*\btrain\b"):
        load_config(None, ["trian.lr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'rollout\.group_sise'.*group_size"):
        load_config(f)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("model.mixed_precision=yes please", "expected true/false"),
        ("grpo.ratio=product", r"'product' is not one of \['token', 'sequence'\]"),
        ("saliency.reward=mean", r"is not one of \['reenable', 'eq3'\]"),
        ("saliency.betas=[0.9]", "saliency.betas: expected a list of 2 values"),
        ("train.lr.x=1", "is a value, not a section"),
        ("train.lr", "must look like key.sub=value"),
    ],
)
def test_type_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shipped_configs_load():
    for name in ["cpu_default.yaml", "paper_llama32_3b_atmanrl.yaml", "paper_llama32_3b_baseline.yaml"]:
        load_config(CONFIGS / name)
    atman = load_config(CONFIGS / "paper_llama32_3b_atmanrl.yaml")
    base = load_config(CONFIGS / "paper_llama32_3b_baseline.yaml")
    assert atman.saliency.weight == 1.0 and base.saliency.weight == 0.0
    # the two arms differ only in the saliency weight and where they write
    a, b = to_dict(atman), to_dict(base)
    a["saliency"]["weight"] = b["saliency"]["weight"]
    a["out_dir"] = b["out_dir"]
    assert a == b
    assert to_dict(atman)["train"] == to_dict(RunConfig())["train"] | {"grad_clip": atman.train.grad_clip}


# ---------------------------------------------------------------------------------------------------------------
# Range checks at config load (issue 10: settings that trained silently wrong or crashed late)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.grad_clip=-1", r"train\.grad_clip=-1\.0 must be > 0, or null.*flips the sign"),
        ("train.grad_clip=0", r"train\.grad_clip=0\.0 must be > 0"),
        ("grpo.eps=0", r"grpo\.eps=0\.0 must be > 0"),
        ("grpo.eps=-0.2", r"grpo\.eps=-0\.2 must be > 0"),
        ("grpo.kl_beta=-1", r"grpo\.kl_beta=-1\.0 must be >= 0"),
        ("train.micro_batch_size=0", r"train\.micro_batch_size=0 must be > 0"),
        ("train.ppo_epochs=0", r"train\.ppo_epochs=0 must be > 0"),
        ("train.num_minibatches=-1", r"train\.num_minibatches=-1 must be > 0"),
        ("train.problems_per_update=-2", r"train\.problems_per_update=-2 must be > 0"),
        ("train.epochs=0", r"train\.epochs=0 must be > 0"),
        ("train.max_updates=0", r"train\.max_updates=0 must be > 0 \(or null\)"),
        ("train.lr=0", r"train\.lr=0\.0 must be > 0"),
        ("train.weight_decay=-0.1", r"train\.weight_decay=-0\.1 must be >= 0"),
        ("train.betas=[0.9, 1.0]", r"train\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)"),
        ("rollout.max_new_tokens=0", r"rollout\.max_new_tokens=0 must be > 0"),
        ("rollout.group_size=1", r"rollout\.group_size=1 must be >= 2"),
        ("rollout.temperature=0", r"rollout\.temperature=0\.0 must be > 0"),
        ("rollout.temperature=-1", r"rollout\.temperature=-1\.0 must be > 0"),
        ("rollout.top_p=0", r"rollout\.top_p=0\.0 must be in \(0, 1\]"),
        ("rollout.top_p=1.5", r"rollout\.top_p=1\.5 must be in \(0, 1\]"),
        ("checkpoint.every=-1", r"checkpoint\.every=-1 must be >= 0"),
        ("checkpoint.keep=0", r"checkpoint\.keep=0 must be >= 1"),
        ("eval.problems=0", r"eval\.problems=0 must be > 0"),
        ("eval.every=-5", r"eval\.every=-5 must be >= 0"),
        ("eval.max_new_tokens=0", r"eval\.max_new_tokens=0 must be > 0"),
        ("data.synthetic_problems=0", r"data\.synthetic_problems=0 must be > 0"),
        ("saliency.scale=0", r"saliency\.scale=0\.0 must be > 0"),
        ("saliency.scale=-10", r"saliency\.scale=-10\.0 must be > 0"),
        ("saliency.steps=0", r"saliency\.steps=0 must be >= 1"),
        ("saliency.steps=-3", r"saliency\.steps=-3 must be >= 1"),
        ("saliency.init=0", r"saliency\.init=0\.0: the initial mask value c must be negative"),
        ("saliency.betas=[0.6, 1.5]", r"saliency\.betas=\[0\.6, 1\.5\] must be two numbers in \[0, 1\)"),
        ("saliency.max_batch=0", r"saliency\.max_batch=0 must be >= 1"),
        ("saliency.weight=-1", r"saliency\.weight=-1\.0 must be a finite number >= 0.*eq3"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("key", ["train.lr", "rollout.temperature", "saliency.lr", "grpo.eps", "saliency.weight",
                                 "train.grad_clip", "rollout.top_p"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", ".nan"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}: .* is not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_non_finite_values_in_a_yaml_file_name_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.lr: inf is not a finite number"):
        load_config(f)


@pytest.mark.parametrize("override", ["eval.every=0", "checkpoint.every=0", "saliency.weight=0", "grpo.kl_beta=0",
                                      "saliency.lr=0", "train.grad_clip=null", "train.max_updates=null"])
def test_zero_stays_allowed_where_it_means_something(override):
    load_config(None, [override])


def test_range_checks_also_guard_direct_construction():
    from atmanrl.config import TrainConfig

    with pytest.raises(ValueError, match="micro_batch_size=0 must be > 0"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="grad_clip=-1 must be > 0"):
        TrainConfig(grad_clip=-1)
    with pytest.raises(ValueError, match="lr=inf is not a finite number"):
        TrainConfig(lr=float("inf"))


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  lr: 1e-6\n  epochs: [1, 2\nrollout:\n  group_size: 4\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line \d+, column \d+: invalid YAML"):
        load_config(f)
    f.write_text("train:\n  lr: 1e-6\n   epochs: 2\n")  # bad indentation
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 3, column \d+: invalid YAML"):
        load_config(f)


def test_non_utf8_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("train:\n  lr: 1e-6\n# Gr\u00fc\u00dfe\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml, line 3: byte 0xfc is not UTF-8 text"):
        load_config(f)


def test_invalid_yaml_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'saliency\.betas=\[0\.6, 0\.9': the value is not valid YAML"):
        load_config(None, ["saliency.betas=[0.6, 0.9"])


def test_saliency_section_is_the_saliency_modules_config():
    """One owner: the run config's saliency section IS a saliency.SaliencyConfig (plus the weight), so the trainer
    hands it to saliency() unchanged and the mask checks live in one place."""
    from atmanrl.saliency import SaliencyConfig

    c = load_config(CONFIGS / "paper_llama32_3b_atmanrl.yaml", ["saliency.steps=20", "saliency.reward=eq3"])
    assert isinstance(c.saliency, SaliencyConfig)
    assert (c.saliency.steps, c.saliency.reward, c.saliency.max_batch) == (20, "eq3", None)
    defaults = SaliencyConfig()
    for f in ("init", "scale", "steps", "lr", "betas", "weight_decay", "reward", "max_batch"):
        assert getattr(RunConfig().saliency, f) == getattr(defaults, f), f
    with pytest.raises(ValueError, match="init=0.5: the initial mask value c must be negative"):
        SaliencyConfig(init=0.5)  # the same check, reached without the run config


def test_dtypes_live_with_the_config():
    import torch

    from atmanrl.config import DTYPES, ModelConfig

    choices = __import__("typing").get_args(__import__("typing").get_type_hints(ModelConfig)["dtype"])
    assert set(DTYPES) == set(choices) and DTYPES["bfloat16"] is torch.bfloat16


def test_an_error_names_the_file_only_when_the_file_is_at_fault(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"^command-line override: train\.lr: 'inf' is not a finite number"):
        load_config(f, ["train.lr=inf"])
    f.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.lr=-1\.0 must be > 0"):
        load_config(f, ["train.epochs=2"])


def test_nested_saliency_sections_name_the_full_key():
    c = load_config(None, ["saliency.early_stop={every: 5, rho: 0.9, min_steps: 10}"])
    assert c.saliency.early_stop.every == 5
    with pytest.raises(ConfigError, match=r"^saliency\.early_stop\.every=0 must be >= 1"):
        load_config(None, ["saliency.early_stop={every: 0}"])
