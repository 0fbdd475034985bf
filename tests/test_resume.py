"""Kill-and-resume: a run stopped right after a checkpoint and resumed continues exactly like an uninterrupted run.

The interrupted run stops after update 2 (``checkpoint.stop_after``, the same exit point as a kill after the
checkpoint was written); a new ``train`` call with fresh model and optimizer objects resumes from ``step_2``. Its
updates 3 and 4 must equal the uninterrupted run's: every metric except wall-clock times, exactly (AdamW state,
data order and sampling seeds restored), and the final parameters bit for bit. The saliency arm is on, so the mask
optimisation is part of what must repeat.
"""

import json

import pytest
import torch
from tiny import TinyTask, tiny_config, tiny_policy

from atmanrl import dist
from atmanrl.rl import checkpointing
from atmanrl.rl.trainer import train

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py

TIMES = {"time_rollout", "time_saliency", "time_update", "tokens_per_s"}


def _run(out_dir, *overrides):
    cfg = tiny_config(out_dir, "train.max_updates=4", "checkpoint.every=2", "checkpoint.export=true",
                      "saliency.weight=1", "saliency.steps=3", "rollout.max_new_tokens=3", *overrides)
    return train(cfg, policy=tiny_policy(), task=TinyTask(saliency=True), problems=list(range(8)))


def _records(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMES}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(tmp_path):
    full = _run(tmp_path / "full")
    stopped = _run(tmp_path / "resumed", "checkpoint.stop_after=2")
    assert stopped.updates == 2 and checkpointing.latest(tmp_path / "resumed" / "checkpoints").name == "step_2"
    dist.shutdown()
    resumed = _run(tmp_path / "resumed")
    assert [r["update"] for r in resumed.metrics] == [3, 4]
    expected = _records(tmp_path / "full")
    assert _records(tmp_path / "resumed") == expected  # the file: updates 1-2 from before, 3-4 after the resume
    assert any(r["clip_fraction"] > 0 for r in expected)  # the runs did move the policy between passes
    for (name, a), b in zip(full.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    """A crash mid-write leaves step_N.tmp; latest() ignores it, and a directory without trainer_state.json too."""
    _run(tmp_path, "train.max_updates=2", "checkpoint.export=false")
    root = tmp_path / "checkpoints"
    (root / "step_4.tmp").mkdir()
    (root / "step_6").mkdir()  # no trainer_state.json: not complete
    assert checkpointing.latest(root).name == "step_2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpointing.load(root / "step_6", tiny_policy(), torch.optim.AdamW(tiny_policy().parameters()))


def test_a_changed_lr_is_applied_to_the_restored_optimizer_and_logged(tmp_path, capsys):
    """Issue 16, case 5: a changed train.lr (or weight_decay) on resume was warned about and recorded in
    config.json, yet the optimizer kept the checkpoint's value: the policy was bit-identical to the old lr's."""
    _run(tmp_path / "a", "checkpoint.stop_after=2")
    _run(tmp_path / "b", "checkpoint.stop_after=2")
    same = _run(tmp_path / "a")
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"train\.lr: 0\.01 -> 0\.5 \(applied to the restored optimizer\).*"
                                         r"train\.weight_decay: 0\.0 -> 0\.1 \(applied"):
        changed = _run(tmp_path / "b", "train.lr=0.5", "train.weight_decay=0.1")
    assert "resumed from" in (err := capsys.readouterr().err)
    assert "train.lr 0.01 -> 0.5 applied to the restored optimizer" in err
    assert "train.weight_decay 0.0 -> 0.1 applied to the restored optimizer" in err
    assert any(not torch.equal(a, b) for a, b in zip(same.policy.parameters(), changed.policy.parameters()))


def test_apply_settings_keeps_the_moments_and_reports_the_changes():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    changed = checkpointing.apply_settings(optimizer, {"lr": 0.5, "betas": (0.9, 0.999), "weight_decay": 0.1})
    assert changed == {"lr": (1e-3, 0.5), "weight_decay": (0.0, 0.1)}
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["weight_decay"] == 0.1
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, optimizer.state.values()))


def test_resuming_past_the_last_update_says_so(tmp_path, capsys):
    _run(tmp_path, "checkpoint.export=false")
    result = _run(tmp_path, "train.max_updates=3", "checkpoint.export=false")
    assert result.metrics == []
    assert "nothing to train: the checkpoint is at update 4, at or past this run's last update 3" in \
        capsys.readouterr().err


def test_a_generation_length_beyond_the_models_context_is_refused_before_any_rollout(tmp_path):
    """Issue 16, case 14: rollout.max_new_tokens=100000 ended in a traceback from inside the first rollout."""
    from atmanrl.config import ConfigError

    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens=100000 leaves no room for the prompt in the "
                                          r"model's context of 64 positions"):
        _run(tmp_path, "rollout.max_new_tokens=100000")
    assert not (tmp_path / "metrics.jsonl").exists()
