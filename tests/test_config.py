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
