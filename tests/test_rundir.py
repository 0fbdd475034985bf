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
    return train(cfg, policy=policy or tiny_policy(), task=TinyTask(), problems=list(range(8)),
                 eval_problems=list(range(4)))


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
    """Other settings than the run's: its metrics are not what this run would write again, so they are kept."""
    _run(tmp_path, "train.max_updates=1", "checkpoint.every=0")
    for p in (tmp_path / "checkpoints").iterdir():
        (p / "trainer_state.json").unlink()  # no complete checkpoint left, but metrics of update 1
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match="it has no complete checkpoint to resume from"):
        _run(tmp_path, "train.lr=0.02")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("resume", ["true", "false"])
def test_a_run_killed_before_its_first_checkpoint_starts_again_with_the_same_command(tmp_path, resume):
    """Issue 16, case 15: the held-out evaluation of update 0 (and the first updates' metrics) used to make the
    same command refuse the directory, although nothing of the run could be resumed or lost."""
    same = ("checkpoint.every=3", "eval.every=2", f"checkpoint.resume={resume}")
    killed = _run(tmp_path, *same, "checkpoint.stop_after=2", policy=tiny_policy())
    assert killed.updates == 2 and not checkpointing.latest(tmp_path / "checkpoints")
    assert (tmp_path / "eval.jsonl").read_text() and _updates(tmp_path) == [1, 2]
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "checkpoints" / "step_3.tmp").mkdir()  # the kill came while the first checkpoint was written
    with pytest.warns(RunDirWarning, match=r"stopped before its first checkpoint .*starting it again from update 0"):
        result = _run(tmp_path, *same)
    assert [r["update"] for r in result.metrics] == [1, 2, 3, 4] and _updates(tmp_path) == [1, 2, 3, 4]
    assert [json.loads(x)["update"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]


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


def test_overwrite_deletes_only_what_the_run_wrote_and_lists_what_it_kept(tmp_path, capsys):
    """Issue 16, case 2: overwrite also deleted a NOTES.md the run never wrote, without saying so."""
    _run(tmp_path, "checkpoint.export=true")
    (tmp_path / "NOTES.md").write_text("mine")
    (tmp_path / "checkpoints" / "README").write_text("mine too")
    (tmp_path / "policy" / "notes.txt").write_text("and this")
    _run(tmp_path, "checkpoint.overwrite=true", "train.max_updates=1", "checkpoint.every=0")
    err = capsys.readouterr().err
    assert "checkpoint.overwrite: deleted the earlier run" in err
    assert "kept NOTES.md, checkpoints/README, policy/notes.txt, which atmanrl did not write" in err
    assert (tmp_path / "NOTES.md").read_text() == "mine"
    assert (tmp_path / "policy" / "notes.txt").read_text() == "and this"
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == ["notes.txt"]  # the old export is gone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["README", "step_1"]
    assert _updates(tmp_path) == [1]


def test_a_model_directory_is_not_a_run_directory(tmp_path):
    """Issue 16, case 2: a Hugging Face model directory has a config.json; it used to count as a run directory, so
    the run rewrote config.json and the model could no longer be loaded."""
    from atmanrl.model import load_hf, save_hf

    model_dir = tmp_path / "model"
    save_hf(tiny_policy(), model_dir)
    (model_dir / "NOTES.md").write_text("mine")
    before = _snapshot(model_dir)
    for extra in ([], ["checkpoint.overwrite=true"], ["checkpoint.resume=false"]):
        with pytest.raises(RunDirError, match=r"not an atmanrl run \(NOTES\.md, config\.json, model\.safetensors\): "
                                              r"it has no atmanrl-run\.json.*nothing in it is resumed or deleted"):
            _run(model_dir, *extra)
    assert _snapshot(model_dir) == before
    load_hf(model_dir)


def test_a_run_of_an_earlier_version_without_the_marker_is_refused_with_the_way_to_adopt_it(tmp_path):
    _run(tmp_path)
    (tmp_path / rundir.MARKER).unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match=rf"did not write the marker yet, create it \(touch .*{rundir.MARKER}\)"):
        _run(tmp_path, "train.max_updates=5")
    assert _snapshot(tmp_path) == before
    (tmp_path / rundir.MARKER).touch()
    assert [r["update"] for r in _run(tmp_path, "train.max_updates=5").metrics] == [5]


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
    """Issue 16, case 15: a config.json truncated by a crash blocked the resume; now a failed write leaves the old
    file whole, and the error says what could not be written."""
    import errno

    _run(tmp_path, "checkpoint.stop_after=2")
    saved = (tmp_path / "config.json").read_bytes()

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", full)
    with pytest.raises(RunDirError, match=r"cannot write into out_dir=.* \(No space left on device\).*free space"):
        _run(tmp_path, "train.lr=0.02")
    assert (tmp_path / "config.json").read_bytes() == saved
    assert not (tmp_path / rundir.LOCK).exists()


@pytest.mark.parametrize("below, message", [("run", r"cannot create out_dir=.*file/run \(Not a directory\)"),
                                            ("", r"out_dir=.*file is a file, not a directory")])
def test_an_unusable_out_dir_is_one_sentence(tmp_path, below, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=message):
        _run(tmp_path / "file" / below if below else tmp_path / "file")


def test_a_read_only_out_dir_is_one_sentence(read_only_tmp):
    tmp_path = read_only_tmp
    with pytest.raises(RunDirError, match=r"cannot write into out_dir=.* \(Read-only file system\); choose a "
                                          r"directory you can write to"):
        _run(tmp_path / "run")


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


def test_hold_keeps_the_lock_after_train_until_the_script_is_done(tmp_path, monkeypatch):
    """Issue 16, case 3: train() released the lock, then run_gsm8k.py drew the figure and evaluated policy/; a
    second run with overwrite=true took the directory in that window and wiped it."""
    with rundir.hold(tmp_path):
        _run(tmp_path, "train.max_updates=1", "checkpoint.export=true")
        owner = json.loads((tmp_path / rundir.LOCK).read_text())
        assert owner["pid"] == os.getpid()
        monkeypatch.setattr(rundir.os, "getpid", os.getppid)  # now we are another (live) process
        with pytest.raises(RunDirError, match=r"in use by another run"):
            rundir.prepare(tiny_config(tmp_path, "checkpoint.overwrite=true"))
        monkeypatch.undo()
        assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert not (tmp_path / rundir.LOCK).exists()


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


def test_a_resume_with_another_optimizer_is_refused_without_calling_the_checkpoints_damaged(tmp_path):
    """Issue 16, case 8: train.optimizer=sgd on resume called intact checkpoints damaged and advised overwrite."""
    _run(tmp_path, "checkpoint.stop_after=2")
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match=r"train\.optimizer \(saved 'adamw', now 'sgd'\) differ.*hold the state "
                                          r"of the saved optimizer\. Set them back") as e:
        _run(tmp_path, "train.optimizer=sgd")
    assert "damaged" not in str(e.value) and "overwrite" not in str(e.value)
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


def _poison_checkpoint(step, where, monkeypatch):
    """Rewrite the checkpoint ``step`` with a NaN in its embedding (``"weights"``) or in AdamW's first moment
    (``"adam"``), as a damaged disk or a buggy tool would leave it (save itself refuses non-finite weights)."""
    policy = tiny_policy()
    optimizer = torch.optim.AdamW(policy.parameters())
    state = checkpointing.load(step, policy, optimizer)
    with torch.no_grad():
        if where == "weights":
            policy.embed_tokens.weight[3, 0] = float("nan")
        else:
            next(iter(optimizer.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    with monkeypatch.context() as m:
        m.setattr(checkpointing, "_refuse_nonfinite", lambda *a, **k: None)
        checkpointing.save(step.parent, state["update"], policy, optimizer, {}, keep=9)


@pytest.mark.parametrize("where, named", [("weights", "embed_tokens.weight"), ("adam", "optimizer state param 0")])
def test_a_nonfinite_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, monkeypatch, where, named):
    """Issue 16, case 6: NaN in the newest checkpoint trained two garbage updates, then advised a lower lr, on every
    rerun; NaN in the Adam state was reported as "the newest checkpoint is intact"."""
    _run(tmp_path, "checkpoint.keep=3")
    _poison_checkpoint(tmp_path / "checkpoints" / "step_4", where, monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=rf"step_4 holds NaN/inf values \({named}"):
        policy = tiny_policy()
        checkpointing.load(tmp_path / "checkpoints" / "step_4", policy, torch.optim.AdamW(policy.parameters()))
    with pytest.warns(RuntimeWarning, match=rf"skipping the damaged checkpoint .*step_4: .*NaN/inf values \({named}"):
        result = _run(tmp_path, "train.max_updates=5", "checkpoint.keep=3")
    assert [r["update"] for r in result.metrics] == [3, 4, 5] and _updates(tmp_path) == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(p).all() for p in result.policy.parameters())


def test_a_nonfinite_starting_model_is_refused_before_any_update(tmp_path):
    policy = tiny_policy()
    with torch.no_grad():
        policy.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"the starting model \(model\.name_or_path=.*\) holds NaN/inf values in "
                                             r"\['layers\.0\.mlp\.down_proj\.weight'\]; training on it"):
        _run(tmp_path, policy=policy)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_a_full_disk_while_checkpointing_is_one_sentence_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Issue 16, case 10: a full disk gave a 60-line traceback ending 'unexpected pos 704 vs 598'."""
    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.extend([f] if str(f).endswith("rng_rank0.pt") else [])
        if len(calls) == 2:  # the second checkpoint's RNG file
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(checkpointing.CheckpointWriteError, match=r"cannot write the checkpoint step_4 into .*"
                                                                 r"unexpected pos 704 vs 598; \d+ MiB free on its "
                                                                 r"disk\)\. A full disk .*free space, then run "
                                                                 r"again with checkpoint\.resume=true to resume "
                                                                 r"from step_2, which is intact"):
        _run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]
    monkeypatch.undo()
    assert [r["update"] for r in _run(tmp_path).metrics] == [3, 4]


def test_a_checkpoint_of_another_optimizer_is_intact_not_damaged(tmp_path):
    _run(tmp_path, "train.max_updates=2")
    policy = tiny_policy()
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"step_2 holds the state of AdamW, not of SGD; "
                                                                    r"set train\.optimizer back"):
        checkpointing.load_latest(tmp_path / "checkpoints", policy, torch.optim.SGD(policy.parameters(), lr=0.1))
