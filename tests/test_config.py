"""Typed configs: YAML + key.sub=value overrides, and errors that name the key."""

from pathlib import Path

import pytest

from atmanrl.config import ConfigError, RunConfig, from_dict, load_config, to_dict

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
        ("train.micro_batch_size=0", r"train\.micro_batch_size=0 must be >= 1"),
        ("train.ppo_epochs=0", r"train\.ppo_epochs=0 must be >= 1"),
        ("train.num_minibatches=-1", r"train\.num_minibatches=-1 must be >= 1"),
        ("train.problems_per_update=-2", r"train\.problems_per_update=-2 must be >= 1"),
        ("train.epochs=0", r"train\.epochs=0 must be >= 1"),
        ("train.max_updates=0", r"train\.max_updates=0 must be >= 1, or null"),
        ("train.lr=0", r"train\.lr=0\.0 must be > 0"),
        ("train.weight_decay=-0.1", r"train\.weight_decay=-0\.1 must be >= 0"),
        ("train.betas=[0.9, 1.0]", r"train\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)"),
        ("rollout.max_new_tokens=0", r"rollout\.max_new_tokens=0 must be >= 1"),
        ("rollout.group_size=1", r"rollout\.group_size=1 must be >= 2"),
        ("rollout.temperature=0", r"rollout\.temperature=0\.0 must be > 0"),
        ("rollout.temperature=-1", r"rollout\.temperature=-1\.0 must be > 0"),
        ("rollout.top_p=0", r"rollout\.top_p=0\.0 must be in \(0, 1\]"),
        ("rollout.top_p=1.5", r"rollout\.top_p=1\.5 must be in \(0, 1\]"),
        ("checkpoint.every=-1", r"checkpoint\.every=-1 must be >= 0"),
        ("checkpoint.keep=0", r"checkpoint\.keep=0 must be >= 1"),
        ("eval.problems=0", r"eval\.problems=0 must be >= 1"),
        ("eval.every=-5", r"eval\.every=-5 must be >= 0"),
        ("eval.max_new_tokens=0", r"eval\.max_new_tokens=0 must be >= 1, or null"),
        ("data.synthetic_problems=0", r"data\.synthetic_problems=0 must be >= 1"),
        ("saliency.scale=0", r"saliency\.scale=0\.0 must be > 0"),
        ("saliency.scale=-10", r"saliency\.scale=-10\.0 must be > 0"),
        ("saliency.steps=0", r"saliency\.steps=0 must be >= 1"),
        ("saliency.steps=-3", r"saliency\.steps=-3 must be >= 1"),
        ("saliency.init=0", r"saliency\.init=0\.0 must be < 0 \(the initial mask value c"),
        ("saliency.betas=[0.6, 1.5]", r"saliency\.betas=\[0\.6, 1\.5\] must be two numbers in \[0, 1\)"),
        ("saliency.max_batch=0", r"saliency\.max_batch=0 must be >= 1"),
        ("saliency.weight=-1", r"saliency\.weight=-1\.0 must be >= 0 \(0: the outcome-only baseline.*eq3"),
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

    with pytest.raises(ValueError, match="micro_batch_size=0 must be >= 1"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match="grad_clip=-1 must be > 0, or null"):
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
    with pytest.raises(ValueError, match=r"init=0.5 must be < 0 \(the initial mask value c"):
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


# ---------------------------------------------------------------------------------------------------------------
# Configs that state only their difference (base:), overrides that merge, values never cut at a comment
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_configs_resolve_to_the_pinned_settings():
    """The arm configs became `base:` + their difference; each still loads to exactly the RunConfig it gave as a
    full copy (tests/data/shipped_configs.json was written from the full files before they were shortened)."""
    import json

    pinned = json.loads((Path(__file__).parent / "data" / "shipped_configs.json").read_text())
    for name, expected in pinned.items():
        assert to_dict(load_config(CONFIGS / name)) == expected, name
        assert load_config(CONFIGS / name) == from_dict(RunConfig, expected), name


@pytest.mark.parametrize("name, base, keys", [
    ("toy_baseline.yaml", "toy_atmanrl.yaml", {"out_dir", "saliency"}),
    ("toy_eq3.yaml", "toy_atmanrl.yaml", {"out_dir", "saliency"}),
    ("toy_atmanrl_w10.yaml", "toy_atmanrl.yaml", {"out_dir", "saliency"}),
    ("toy_eq3_w10.yaml", "toy_eq3.yaml", {"out_dir", "saliency"}),
    ("cpu_default.yaml", "toy_atmanrl.yaml", {"out_dir", "checkpoint"}),
    ("paper_llama32_3b_baseline.yaml", "paper_llama32_3b_atmanrl.yaml", {"out_dir", "saliency"}),
])
def test_arm_configs_are_their_base_and_their_difference(name, base, keys):
    import yaml

    own = yaml.safe_load((CONFIGS / name).read_text())
    assert own.pop("base") == base and set(own) == keys
    assert sum(len(v) if isinstance(v, dict) else 1 for v in own.values()) <= 2  # one or two changed settings


def test_a_base_chain_merges_sections_key_by_key(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("out_dir: a\nsaliency:\n  steps: 7\n  lr: 0.5\ntrain:\n  lr: 1.0e-3\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nsaliency:\n  weight: 0\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nout_dir: b\n")  # relative to its own directory
    c = load_config(tmp_path / "sub" / "leaf.yaml", ["train.epochs=3"])
    assert (c.out_dir, c.saliency.steps, c.saliency.lr, c.saliency.weight, c.train.lr, c.train.epochs) == (
        "b", 7, 0.5, 0.0, 1e-3, 3)


@pytest.mark.parametrize("files, top, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml", r"a\.yaml: its base chain comes back to it"),
    ({"a.yaml": "base: missing.yaml\n"}, "a.yaml", r"missing\.yaml does not exist \(the base of .*a\.yaml\)"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "train:\n  lrr: 1\n"}, "a.yaml",
     r"b\.yaml: unknown config key 'train\.lrr'"),
    ({"a.yaml": "base: b.yaml\ntrain:\n  lr: -1\n", "b.yaml": "{}\n"}, "a.yaml", r"a\.yaml: train\.lr=-1\.0 must be"),
    ({"a.yaml": "base: 5\n"}, "a.yaml", r"a\.yaml: base: must name another config file"),
])
def test_base_errors_name_the_file_at_fault(tmp_path, files, top, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / top)


def test_a_section_override_merges_instead_of_replacing_the_section():
    """saliency={steps: 2} used to replace the whole section: cpu_default's saliency.lr fell back to 1e-3."""
    c = load_config(CONFIGS / "cpu_default.yaml", ["saliency={steps: 2}"])
    assert (c.saliency.steps, c.saliency.lr, c.saliency.weight) == (2, 2e-2, 1.0)


@pytest.mark.parametrize("override", ["out_dir=/runs/victim #2", "out_dir=/runs/victim  # the second",
                                      "train.lr=1e-4 #fast"])
def test_an_override_is_never_cut_at_a_yaml_comment(override):
    """`out_dir=/runs/victim #2` used to become /runs/victim -- another run, resumed or (overwrite) deleted."""
    with pytest.raises(ConfigError, match=r"reads '#.*' as a comment and would drop it.*quote the value"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key, expected", [("out_dir='/runs/victim #2'", "out_dir", "/runs/victim #2"),
                                                     ("out_dir=runs/a#2", "out_dir", "runs/a#2"),
                                                     ("out_dir=2024", "out_dir", "2024"),
                                                     ("model.name_or_path=yes", "model.name_or_path", "yes"),
                                                     ("data.path=null", "data.path", None)])
def test_a_string_field_keeps_the_text_as_written(override, key, expected):
    c = to_dict(load_config(None, [override]))
    for part in key.split("."):
        c = c[part]
    assert c == expected


def test_one_range_rule_for_configs_and_script_arguments():
    import argparse

    from atmanrl.config import check_range, number_arg

    with pytest.raises(ValueError, match=r"^k=0 must be >= 1 \(samples\)$"):
        check_range("k", 0, 1, why="samples")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^0 must be >= 1 \(samples\)$"):
        number_arg(int, "samples", 1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^1\.5 must be in \(0, 1\] \(nucleus mass\)$"):
        number_arg(float, "nucleus mass", 0, 1, low_open=True)("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^nan must be a finite number"):
        number_arg(float, "lr", 0, low_open=True)("nan")
    assert number_arg(float, "lr", 0, low_open=True)("1e-3") == 1e-3
