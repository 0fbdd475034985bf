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
