"""Issue 10, data loss and non-finite training: the run directory and the checkpoints, fed the faults a careless or
hostile user produces. Every test runs the real ``train()`` on the tiny policy of test_trainer.py (about a second
per call) or the checkpoint functions directly."""

import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
from tiny import TinyTask, tiny_config, tiny_policy

from atmanrl.rl import checkpointing, rundir, trainer
from atmanrl.rl.checkpointing import CorruptCheckpointError, NonFiniteError
from atmanrl.rl.rundir import RunDirError, RunDirWarning
from atmanrl.rl.trainer import train

pytestmark = pytest.mark.usefixtures("single_process_one_thread")  # conftest.py


def _run(out_dir, *overrides, policy=None):
    cfg = tiny_config(out_dir, "train.max_updates=4", "checkpoint.every=2", *overrides)
    return train(cfg, policy=policy or tiny_policy(), task=TinyTask(), problems=list(range(8)))


def _snapshot(run_dir):
    """Every file of a run directory with its bytes (the lock excepted)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


def _updates(run_dir):
    return [json.loads(x)["update"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# A rerun never destroys an earlier run silently
# ---------------------------------------------------------------------------------------------------------------


def test_fresh_run_refuses_an_earlier_run_and_leaves_it_intact(tmp_path):
    _run(tmp_path)
    before = _snapshot(tmp_path)
    assert "checkpoints/step_4/trainer_state.json" in before and _updates(tmp_path) == [1, 2, 3, 4]
    with pytest.raises(RunDirError, match=r"holds an earlier run \(checkpoints/\{step_2, step_4\}; metrics\.jsonl "
                                          r"\(4 records\)\) and checkpoint\.resume is false.*checkpoint\.resume=true"
                                          r".*checkpoint\.overwrite=true.*another out_dir"):
        _run(tmp_path, "checkpoint.resume=false")
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / rundir.LOCK).exists()  # the refusal released the lock


def test_resume_without_a_checkpoint_refuses_rather_than_truncating_the_metrics(tmp_path):
    _run(tmp_path, "train.max_updates=1", "checkpoint.every=0")
    for p in (tmp_path / "checkpoints").iterdir():
        (p / "trainer_state.json").unlink()  # no complete checkpoint left, but metrics of update 1
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match="it has no complete checkpoint to resume from"):
        _run(tmp_path)
    assert _snapshot(tmp_path) == before


def test_overwrite_deletes_the_earlier_run_and_starts_over(tmp_path):
    _run(tmp_path)
    (tmp_path / "checkpoints" / "step_4" / "marker").write_text("old")
    result = _run(tmp_path, "checkpoint.overwrite=true", "train.max_updates=1", "checkpoint.every=0")
    assert [r["update"] for r in result.metrics] == [1] and _updates(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]


def test_a_directory_that_is_not_a_run_is_refused_and_never_deleted(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    for extra in ([], ["checkpoint.overwrite=true"]):
        with pytest.raises(RunDirError, match=r"already holds files that are not an atmanrl run \(thesis\.tex\)"):
            _run(tmp_path, *extra)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_an_empty_or_missing_out_dir_starts_fresh(tmp_path):
    _run(tmp_path / "new" / "run", "train.max_updates=1")
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "empty", "train.max_updates=1")
    assert _updates(tmp_path / "empty") == [1]


# ---------------------------------------------------------------------------------------------------------------
# One run per directory: the lock
# ---------------------------------------------------------------------------------------------------------------


def _write_lock(run_dir, host, pid):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.LOCK).write_text(json.dumps({"host": host, "pid": pid, "since": "2026-01-01 00:00:00"}))


def test_a_live_run_holds_the_directory(tmp_path):
    _write_lock(tmp_path, socket.gethostname(), os.getppid())  # our parent: alive, another process
    with pytest.raises(RunDirError, match=rf"in use by another run \(process {os.getppid()} on this host.*delete "
                                          rf".*run\.lock"):
        _run(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_lock_from_another_host_is_refused_naming_the_host(tmp_path):
    _write_lock(tmp_path, "gpu-node-17", 4242)
    with pytest.raises(RunDirError, match=r"process 4242 on host gpu-node-17.*delete"):
        _run(tmp_path)


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    _write_lock(tmp_path, socket.gethostname(), dead.pid)
    with pytest.warns(RunDirWarning, match=rf"took over the stale lock of process {dead.pid}"):
        _run(tmp_path, "train.max_updates=1")
    assert _updates(tmp_path) == [1] and not (tmp_path / rundir.LOCK).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no helper files left


def test_an_unreadable_lock_is_refused_not_deleted(tmp_path):
    (tmp_path / rundir.LOCK).write_text("not json")
    with pytest.raises(RunDirError, match=r"run\.lock exists but is not a lock file written by atmanrl.*delete it"):
        _run(tmp_path)
    assert (tmp_path / rundir.LOCK).read_text() == "not json"


def test_the_lock_is_held_while_training(tmp_path):
    seen = []

    def on_update(record):
        seen.append(json.loads((tmp_path / rundir.LOCK).read_text()))

    cfg = tiny_config(tmp_path, "train.max_updates=1")
    train(cfg, policy=tiny_policy(), task=TinyTask(), problems=list(range(8)), on_update=on_update)
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (tmp_path / rundir.LOCK).exists()


# ---------------------------------------------------------------------------------------------------------------
# Resume: damaged checkpoints, partial log lines, a changed schedule
# ---------------------------------------------------------------------------------------------------------------


def _truncate_shard(step):
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _drop_metadata(step):
    (step / ".metadata").unlink()


def _garble_state(step):
    (step / "trainer_state.json").write_text('{"update": 4, "epo')


@pytest.mark.parametrize("damage", [_truncate_shard, _drop_metadata, _garble_state])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    _run(tmp_path, "train.max_updates=4", "checkpoint.keep=3")
    damage(tmp_path / "checkpoints" / "step_4")
    with pytest.warns(RuntimeWarning, match=r"skipping the damaged checkpoint .*step_4"):
        result = _run(tmp_path, "train.max_updates=5", "checkpoint.keep=3")
    assert [r["update"] for r in result.metrics] == [3, 4, 5]  # resumed from step_2
    assert _updates(tmp_path) == [1, 2, 3, 4, 5]  # no duplicate updates 3-4 in the log
    assert checkpointing.latest(tmp_path / "checkpoints").name == "step_5"
    policy = tiny_policy()
    checkpointing.load(tmp_path / "checkpoints" / "step_4", policy, torch.optim.AdamW(policy.parameters()))


def test_all_checkpoints_damaged_is_one_clear_error(tmp_path):
    _run(tmp_path)
    for step in (tmp_path / "checkpoints").iterdir():
        _drop_metadata(step)
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match=r"(?s)no checkpoint in .* can "
                                                                                   r"be loaded.*step_4.*step_2.*"
                                                                                   r"overwrite"):
        _run(tmp_path, "train.max_updates=5")


def test_a_partial_last_metrics_line_does_not_block_a_resume(tmp_path):
    _run(tmp_path, "checkpoint.stop_after=2")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"update": 3, "epoch": 0, "reward_out')  # killed while writing update 3
    with pytest.warns(RunDirWarning, match=r"metrics\.jsonl, line 3: dropping a partial last record"):
        result = _run(tmp_path)
    assert [r["update"] for r in result.metrics] == [3, 4] and _updates(tmp_path) == [1, 2, 3, 4]


def test_a_broken_line_inside_the_metrics_names_file_and_line(tmp_path):
    _run(tmp_path, "checkpoint.stop_after=2")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("garbage\n" + "\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl, line 1: not a JSON record"):
        _run(tmp_path)


@pytest.mark.parametrize("override, key", [("data.seed=1", "data.seed"),
                                           ("train.problems_per_update=2", "train.problems_per_update"),
                                           ("rollout.group_size=4", "rollout.group_size"),
                                           ("train.seed=7", "train.seed")])
def test_a_resume_with_another_data_schedule_is_refused(tmp_path, override, key):
    _run(tmp_path, "checkpoint.stop_after=2")
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match=rf"cannot resume .*{key} \(saved .*, now .*\) differ"):
        _run(tmp_path, override)
    assert _snapshot(tmp_path) == before


def test_a_resume_with_other_harmless_settings_warns(tmp_path):
    _run(tmp_path, "checkpoint.stop_after=2")
    with pytest.warns(RunDirWarning, match=r"train\.lr: 0\.01 -> 0\.02"):
        result = _run(tmp_path, "train.lr=0.02")
    assert [r["update"] for r in result.metrics] == [3, 4]


# ---------------------------------------------------------------------------------------------------------------
# Security: the RNG file is read with weights_only=True
# ---------------------------------------------------------------------------------------------------------------


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls open(marker, "w"): code run from the checkpoint
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_rng_file_is_refused_and_never_runs(tmp_path):
    _run(tmp_path / "run", "train.max_updates=2", "checkpoint.keep=1")
    step = tmp_path / "run" / "checkpoints" / "step_2"
    marker = tmp_path / "pwned"
    with open(step / "rng_rank0.pt", "wb") as f:
        pickle.dump({"torch": _Planted(marker)}, f)
    with pytest.raises(CorruptCheckpointError, match=r"rng_rank0\.pt is not an RNG state file.*refused"):
        policy = tiny_policy()
        checkpointing.load(step, policy, torch.optim.AdamW(policy.parameters()))
    assert not marker.exists()
    with pytest.warns(RuntimeWarning, match="skipping the damaged checkpoint"), \
            pytest.raises(CorruptCheckpointError, match="no checkpoint .* can be loaded"):
        _run(tmp_path / "run", "train.max_updates=3")
    assert not marker.exists()


def test_rng_state_still_round_trips_with_weights_only(tmp_path):
    _run(tmp_path, "train.max_updates=2", "checkpoint.keep=1")
    saved = torch.load(tmp_path / "checkpoints" / "step_2" / "rng_rank0.pt", weights_only=True)
    torch.manual_seed(123)
    policy = tiny_policy()
    checkpointing.load(tmp_path / "checkpoints" / "step_2", policy, torch.optim.AdamW(policy.parameters()))
    assert torch.equal(torch.get_rng_state(), saved["torch"])


# ---------------------------------------------------------------------------------------------------------------
# Non-finite numbers stop the run before the optimizer step; never saved or exported
# ---------------------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_before_the_optimizer_step_and_nothing_nonfinite_is_written(tmp_path, monkeypatch):
    real, poison = trainer.grpo_loss, []

    def poisoned(*args, **kwargs):  # the loss turns NaN once update 1 is done
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if poison else loss), stats

    monkeypatch.setattr(trainer, "grpo_loss", poisoned)
    policy = tiny_policy()
    cfg = tiny_config(tmp_path, "train.max_updates=6", "checkpoint.every=1", "checkpoint.keep=9",
                      "checkpoint.export=true")
    with pytest.raises(NonFiniteError, match=r"optimizer step 1 of this update: the loss is nan.*before the "
                                             r"optimizer step.*train\.lr"):
        train(cfg, policy=policy, task=TinyTask(), problems=list(range(8)), on_update=lambda r: poison.append(1))
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    done = _updates(tmp_path)
    assert 1 <= len(done) < 6 and done == list(range(1, len(done) + 1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{u}" for u in done]
    assert not (tmp_path / "policy").exists()


def test_check_finite_reports_an_infinite_gradient():
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    assert checkpointing.check_finite(1.0, model, "here") > 0
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="here: the loss is 1.0 and the gradient norm inf"):
        checkpointing.check_finite(1.0, model, "here")


def test_a_clipped_step_is_checked_with_the_norm_before_clipping(tmp_path):
    """With train.grad_clip the norm comes from clip_grad_norm_ (not computed twice): an infinite gradient still
    stops the step, and the weights are untouched."""
    from atmanrl.rl.trainer import optimizer_step

    model = torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 2)).sum().backward()
    model.weight.grad[0, 0] = float("inf")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    cfg = tiny_config(tmp_path, "train.grad_clip=1.0")
    with pytest.raises(NonFiniteError, match="step 1: the loss is 0.5 and the gradient norm inf"):
        optimizer_step(model, optimizer, cfg, 0.5, "step 1")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(NonFiniteError, match="gradient norm nan"):
        checkpointing.check_finite(1.0, torch.nn.Linear(2, 2), "here", grad_norm=float("nan"))


def test_save_and_export_refuse_nonfinite_weights(tmp_path):
    policy = tiny_policy()
    with torch.no_grad():
        policy.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"checkpoint step_3: the weights \['norm\.weight'\]"):
        checkpointing.save(tmp_path / "ckpt", 3, policy, torch.optim.AdamW(policy.parameters()), {})
    with pytest.raises(NonFiniteError, match=r"exported policy .*: the weights \['norm\.weight'\]"):
        checkpointing.export_hf(policy, tmp_path / "policy")
    assert not (tmp_path / "ckpt" / "step_3").exists() and not (tmp_path / "policy").exists()
