"""The run directory (``out_dir``): who may write into it, what a new run does with an earlier one, and its logs.

What is notable here:
- **A run directory is recognised by its marker**, ``atmanrl-run.json``, which ``prepare`` writes first into a new
  run directory. Never by ``config.json``: a Hugging Face model directory has one too. A directory that holds files
  but no marker is not a run directory: it is refused, and nothing in it is touched, even with ``overwrite``.
- **No run is lost silently.** ``prepare`` looks at ``out_dir`` before anything is written. An earlier run's
  history (a checkpoint, metrics or evaluation lines, an exported policy) is only ever continued (a resume, with
  ``checkpoint.resume: true`` and an intact checkpoint to resume from) or deleted on request
  (``checkpoint.overwrite: true``); anything else is refused with a message that names the three ways out
  (resume, overwrite, another ``out_dir``). One exception: a run that stopped before its first checkpoint (nothing
  to resume, no exported policy) is started again from update 0 when the settings are the same -- its logs are
  what the rerun writes again -- with a warning.
- **Overwrite deletes only what a run writes** (``RUN_FILES``: the marker, ``config.json``, the logs, the figure,
  ``checkpoints/step_N``, the exported ``policy/`` files); anything else in the directory (a ``NOTES.md``) is kept
  and the message lists it.
- **One run per directory.** ``prepare`` takes a lock file, ``out_dir/run.lock``, holding the host name and process
  id of its owner. It is created atomically (written beside, then hard-linked into place, which fails if it exists).
  A lock whose process is gone (same host, pid no longer alive) is stale: it is taken over with a warning, so a
  killed run never blocks the next one. A lock from another host cannot be checked from here: the message says
  which host and pid hold it and that deleting the file releases it. A process may take over its own lock (a
  ``train()`` call that raised earlier in the same process). ``release`` removes it (also at interpreter exit).
  A script that keeps using the directory after ``train()`` (the figure, evaluating ``policy/``) wraps both in
  ``hold(out_dir)``: ``train()``'s own release then leaves the lock in place until the block ends.
- **A resume continues the same data schedule and optimizer.** The problem order and the rollout seeds are
  functions of the settings in ``SCHEDULE_KEYS`` and the update counter, and the checkpoint holds the state of
  ``train.optimizer``; resuming with other values would silently train on another schedule (or fail to read the
  state), so ``prepare`` compares them with the run's saved ``config.json`` and refuses, naming the keys. Other
  differences are allowed and listed in a warning; ``train.lr``, ``train.betas`` and ``train.weight_decay`` are
  applied to the restored optimizer (the config decides them, not the checkpoint).
- ``config.json`` is written atomically (beside, then renamed), so a crash never leaves a truncated one.
- **Logs survive a crash mid-line.** ``trim_logs`` keeps the metrics/eval records up to the update a run (re)starts
  from; a partial last line (a kill while writing it) is dropped with a warning instead of blocking the resume.

All ranks call ``prepare``; rank 0 alone checks, locks, writes and deletes while the others wait at a barrier.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

from atmanrl import dist
from atmanrl.config import RunConfig, UserError, to_dict
from atmanrl.rl import checkpointing

LOCK = "run.lock"
MARKER = "atmanrl-run.json"
CONFIG = "config.json"
LOGS = ("metrics.jsonl", "eval.jsonl")
# What a run writes at the top of out_dir (checkpoints/ and policy/ are looked into: see _delete_run).
RUN_FILES = (MARKER, CONFIG, *LOGS, "figure2.png")
# What the policy export writes (atmanrl.model.save_hf and Tokenizer.save).
POLICY_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                "tokenizer.json", "tokenizer_config.json")

# The settings that decide which problems an update trains on and how its rollouts are sampled.
SCHEDULE_KEYS = ("data.path", "data.synthetic_problems", "data.max_problems", "data.seed",
                 "train.problems_per_update", "train.seed", "rollout.group_size")


# The checkpoint holds this optimizer's state; another optimizer cannot continue it.
STATE_KEYS = ("train.optimizer",)

# Applied to the restored optimizer on a resume (the trainer says so in its log).
OPTIMIZER_KEYS = ("train.lr", "train.betas", "train.weight_decay")

# Changed on purpose when a run is continued or extended: never worth a warning.
EXTENDS = ("out_dir", "train.epochs", "train.max_updates")


class RunDirError(UserError, RuntimeError):
    """``out_dir`` cannot be used as asked; the message names the directory and what to do."""


class RunDirWarning(UserWarning):
    """Something in ``out_dir`` was repaired or taken over (stale lock, partial log line, changed settings)."""


# ---------------------------------------------------------------------------------------------------------------
# What an earlier run left
# ---------------------------------------------------------------------------------------------------------------


def _log_records(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if line.strip())


def history(out: Path) -> list[str]:
    """What an earlier run left in ``out`` that a fresh start would destroy (empty: nothing to lose)."""
    found = []
    ckpt = out / "checkpoints"
    steps = sorted(p.name for p in ckpt.iterdir() if p.is_dir()) if ckpt.is_dir() else []
    if steps:
        found.append(f"checkpoints/{{{', '.join(steps)}}}")
    for name in LOGS:
        if n := _log_records(out / name):
            found.append(f"{name} ({n} record{'' if n == 1 else 's'})")
    if (out / "policy").exists():
        found.append("policy/ (an exported model)")
    return found


# ---------------------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def acquire(out: Path) -> Path:
    """Take ``out/run.lock`` for this process; raise RunDirError when a live run holds it (see module docstring)."""
    lock = out / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = out / f".{LOCK}.{me['host']}.{me['pid']}"
    try:
        tmp.write_text(json.dumps(me) + "\n")
    except OSError as e:
        raise RunDirError(f"cannot write into out_dir={out} ({e.strerror}); choose a directory you can write to, "
                          "or free space on its disk") from None
    try:
        for _ in range(3):  # a stale lock removed by us, then re-created by a racing run, is a live lock
            try:
                os.link(tmp, lock)  # atomic: fails when the lock exists
                atexit.register(release, out)
                return lock
            except FileExistsError:
                pass
            try:
                owner = json.loads(lock.read_text())
                host, pid = owner["host"], int(owner["pid"])
            except FileNotFoundError:
                continue  # released meanwhile
            except (ValueError, KeyError, TypeError):  # never ours: we write the lock whole (link of a full file)
                raise RunDirError(f"{lock} exists but is not a lock file written by atmanrl; if no run uses {out}, "
                                  "delete it and start again") from None
            if host == me["host"] and (pid == me["pid"] or not _alive(pid)):
                if not _remove_stale(lock, owner, out / f".{LOCK}.stale.{me['pid']}"):
                    continue  # another run replaced it meanwhile: look again
                if pid != me["pid"]:
                    warnings.warn(f"{lock}: took over the stale lock of process {pid} on {host}, which is no "
                                  "longer running (a killed run)", RunDirWarning, stacklevel=3)
                continue
            where = f"process {pid} on this host" if host == me["host"] else f"process {pid} on host {host}"
            raise RunDirError(
                f"{out} is in use by another run ({where}, since {owner.get('since', '?')}): two runs in one "
                f"out_dir would write the same checkpoints and metrics. Wait for it, choose another out_dir, or, "
                f"if that run is no longer running, delete {lock}."
            )
        raise RunDirError(f"could not take {lock}: other runs keep re-creating it; choose another out_dir")
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale(lock: Path, owner: dict, aside: Path) -> bool:
    """Remove ``lock`` if it still holds ``owner``. It is moved aside first (atomic) and checked there, so a live
    lock that another run wrote after we read the stale one is put back, never deleted."""
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    try:
        if json.loads(aside.read_text()) == owner:
            return True
        try:
            os.link(aside, lock)  # not the stale lock any more: restore it (unless a third run took the place)
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


# Directories whose lock ``hold`` keeps for this process: ``release`` leaves them locked.
_HELD: set[Path] = set()


def release(out: str | Path) -> None:
    """Remove ``out/run.lock`` if this process holds it (rank 0 at the end of a run; also at interpreter exit),
    unless ``hold`` keeps it."""
    if Path(out).resolve() in _HELD:
        return
    lock = Path(out) / LOCK
    try:
        owner = json.loads(lock.read_text())
    except (FileNotFoundError, ValueError):
        return
    if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(out_dir: str | Path):
    """Lock ``out_dir`` for this process (rank 0) for the whole block: a script that trains and then draws the
    figure or evaluates ``out_dir/policy`` keeps the directory, so no other run can take it in between."""
    out = Path(out_dir)
    if not dist.info().is_main:
        yield out
        return
    created = not out.exists()
    _make_dir(out)
    acquire(out)
    key = out.resolve()
    _HELD.add(key)
    try:
        yield out
    finally:
        _HELD.discard(key)
        release(out)
        if created and not any(out.iterdir()):
            out.rmdir()  # a run refused before it wrote anything leaves no empty directory behind


# ---------------------------------------------------------------------------------------------------------------
# Preparing the directory
# ---------------------------------------------------------------------------------------------------------------


def _make_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir={out} is a file, not a directory; choose a directory for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create out_dir={out} ({e.strerror}); choose a directory you can write to") from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, then rename it into place: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _changed(saved: dict, cfg: RunConfig) -> dict:
    """``{key: (saved, now)}`` of the settings that differ, apart from where the run writes, how long it runs and
    how it checkpoints."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in old.keys() | new.keys()
            if old.get(k) != new.get(k) and k not in EXTENDS and not k.startswith("checkpoint.")}


def check_schedule(saved: dict, cfg: RunConfig, source: Path, warn: bool = True) -> None:
    """Refuse a resume whose data schedule or optimizer differs from the saved run's; warn about the other changed
    settings (``warn``)."""
    changed = _changed(saved, cfg)
    state = [k for k in STATE_KEYS if k in changed]
    if state:
        listed = ", ".join(f"{k} (saved {changed[k][0]!r}, now {changed[k][1]!r})" for k in state)
        raise RunDirError(
            f"cannot resume the run in {source.parent}: {listed} differ from its {source.name}, and its checkpoints "
            f"hold the state of the saved optimizer. Set them back to the saved values to resume, or start a new run "
            "in another out_dir."
        )
    schedule = [k for k in SCHEDULE_KEYS if k in changed]
    if schedule:
        listed = ", ".join(f"{k} (saved {changed[k][0]!r}, now {changed[k][1]!r})" for k in schedule)
        raise RunDirError(
            f"cannot resume the run in {source.parent}: {listed} differ from its {source.name}, so the resumed "
            "updates would draw other problems or other samples than the run so far. Set them back to the saved "
            "values, or start a new run (another out_dir, or checkpoint.overwrite=true to replace this one)."
        )
    if changed and warn:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" + (" (applied to the restored optimizer)" if k in OPTIMIZER_KEYS
                                                      else "") for k, (a, b) in sorted(changed.items()))
        warnings.warn(f"resuming {source.parent} with settings that differ from its {source.name}: {listed}",
                      RunDirWarning, stacklevel=4)


def prepare(cfg: RunConfig) -> Path:
    """Make ``cfg.out_dir`` ready for this run (all ranks call it; rank 0 does the work): lock it, resume, delete or
    refuse the earlier run as the config says (module docstring), and write the marker and ``config.json``. Returns
    the directory."""
    out = Path(cfg.out_dir)
    d = dist.info()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir={out} is a file, not a directory; choose a directory for the run")
    if d.is_main:  # the other ranks wait: a refusal here ends the job (torchrun stops every rank)
        _make_dir(out)
        acquire(out)
        try:
            _check_and_clear(out, cfg)
            if not (out / MARKER).is_file():
                write_atomic(out / MARKER, json.dumps({"written_by": "atmanrl", "what": "a training run directory",
                                                       "created": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
            write_atomic(out / CONFIG, json.dumps(to_dict(cfg), indent=2) + "\n")
        except OSError as e:
            release(out)
            raise RunDirError(f"cannot write into out_dir={out} ({e.strerror}); choose a directory you can write "
                              "to, or free space on its disk") from None
        except BaseException:
            release(out)
            raise
    dist.barrier()
    return out


def _entries(out: Path) -> list[str]:
    """The names in ``out`` apart from the lock and its helper files."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK and not p.name.startswith(f".{LOCK}."))


def _not_a_run(out: Path, names: list[str]) -> RunDirError:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    legacy = "checkpoints" in names or "metrics.jsonl" in names
    return RunDirError(
        f"out_dir={out} already holds files that are not an atmanrl run ({shown}): it has no {MARKER}, the marker "
        "every atmanrl run directory has, so nothing in it is resumed or deleted. Choose an empty or new out_dir"
        + (f"; if it is a run of an atmanrl version that did not write the marker yet, create it (touch "
           f"{out / MARKER}) and run again." if legacy else ".")
    )


def _saved_config(out: Path) -> dict | None:
    """The earlier run's settings (``config.json``), or None when it has none."""
    try:
        return json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{out / CONFIG} is not valid JSON ({e}); the run's saved settings cannot be compared "
                          "with this run. Restore the file or start a new run in another out_dir.") from None


def check(cfg: RunConfig) -> str:
    """What ``prepare`` would do with ``cfg.out_dir`` -- "fresh", "overwrite", "resume" or "restart" -- without
    writing anything; raises the ``RunDirError`` ``prepare`` would raise. Drivers of many runs (sweep.py,
    reproduce_toy.py) call it for every run before the first one starts."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir={out} is a file, not a directory; choose a directory for the run")
    if not out.is_dir():
        return "fresh"
    _check_lock(out)
    return _decide(out, cfg)


def _check_lock(out: Path) -> None:
    """Refuse (without touching it) a lock held by another live process of this host or by another host."""
    try:
        owner = json.loads((out / LOCK).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or one acquire() reports in full
    if host != socket.gethostname() or (pid != os.getpid() and _alive(pid)):
        raise RunDirError(f"{out} is in use by another run (process {pid} on host {host}); wait for it or choose "
                          "another out_dir")


def _decide(out: Path, cfg: RunConfig, warn: bool = False) -> str:
    """The decision of the module docstring for an existing ``out``; a refusal raises ``RunDirError``."""
    names = _entries(out)
    if MARKER not in names:
        if names:
            raise _not_a_run(out, names)
        return "fresh"
    found = history(out)
    if not found:
        return "fresh"
    if cfg.checkpoint.overwrite:
        return "overwrite"
    saved = _saved_config(out)
    if cfg.checkpoint.resume and checkpointing.latest(out / "checkpoints") is not None:
        if saved is None:
            raise RunDirError(f"{out} has checkpoints but no {CONFIG}, so this resume cannot be checked against the "
                              "run's settings. Restore the file, or start a new run in another out_dir.")
        check_schedule(saved, cfg, out / CONFIG, warn)
        return "resume"
    if _stopped_before_first_checkpoint(out) and saved is not None and not _changed(saved, cfg):
        return "restart"
    why = ("checkpoint.resume is false" if not cfg.checkpoint.resume
           else "it has no complete checkpoint to resume from")
    raise RunDirError(
        f"out_dir={out} holds an earlier run ({'; '.join(found)}) and {why}; starting over would destroy it. "
        "Resume it (checkpoint.resume=true, when it has a checkpoint), replace it (checkpoint.overwrite=true), "
        "or choose another out_dir."
    )


def _check_and_clear(out: Path, cfg: RunConfig) -> None:
    """Act on ``_decide``: delete the earlier run (overwrite) or the interrupted checkpoints (restart)."""
    decision = _decide(out, cfg, warn=True)
    found = history(out)
    if decision == "overwrite":
        kept = _delete_run(out)
        dist.log(f"checkpoint.overwrite: deleted the earlier run in {out} ({'; '.join(found)})"
                 + (f"; kept {', '.join(kept)}, which atmanrl did not write" if kept else ""))
    elif decision == "restart":
        for step in (out / "checkpoints").glob("step_*"):  # none is complete: a save the kill interrupted
            if step.is_dir() and checkpointing.STEP_DIR.match(step.name.removesuffix(".tmp")):
                shutil.rmtree(step, ignore_errors=True)
        warnings.warn(f"{out}: the earlier run stopped before its first checkpoint ({'; '.join(found)}); starting it "
                      "again from update 0 with the same settings", RunDirWarning, stacklevel=3)


def _stopped_before_first_checkpoint(out: Path) -> bool:
    """No complete checkpoint and no exported policy: nothing of the run can be continued or lost but its logs."""
    return checkpointing.latest(out / "checkpoints") is None and not (out / "policy").exists()


def _delete_run(out: Path) -> list[str]:
    """Delete what a run wrote into ``out`` (``RUN_FILES``, ``checkpoints/step_N[.tmp]``, the ``policy/`` export);
    returns what was kept because atmanrl did not write it."""
    kept = []
    for p in sorted(out.iterdir()):
        if p.name == LOCK or p.name.startswith(f".{LOCK}."):
            continue
        if p.is_file() and p.name != MARKER and (p.name in RUN_FILES or (p.name.startswith(".") and p.name.endswith(
                ".tmp") and p.name[1:-4] in RUN_FILES)):  # .config.json.tmp: an interrupted write_atomic
            p.unlink()
        elif p.name == "checkpoints" and p.is_dir() and not p.is_symlink():
            kept += _delete_inside(p, lambda q: q.is_dir() and checkpointing.STEP_DIR.match(q.name.removesuffix(
                ".tmp")) is not None)
        elif p.name == "policy" and p.is_dir() and not p.is_symlink():
            kept += _delete_inside(p, lambda q: q.is_file() and any(q.match(g) for g in POLICY_FILES))
        elif p.name != MARKER:
            kept.append(p.name)
    return kept


def _delete_inside(folder: Path, ours) -> list[str]:
    """Delete the entries of ``folder`` for which ``ours(entry)``, then the folder when it is empty; returns the
    kept entries as ``folder/name``."""
    kept = []
    for q in sorted(folder.iterdir()):
        if ours(q) and not q.is_symlink():
            shutil.rmtree(q) if q.is_dir() else q.unlink()
        else:
            kept.append(f"{folder.name}/{q.name}")
    if not kept:
        folder.rmdir()
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """The JSON records of a ``.jsonl`` log. A partial last line (a kill mid-write) is dropped with a warning; a
    broken line elsewhere is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if n == len(lines):
                warnings.warn(f"{path}, line {n}: dropping a partial last record (the run was stopped while "
                              "writing it)", RunDirWarning, stacklevel=2)
                continue
            raise RunDirError(f"{path}, line {n}: not a JSON record; the log is damaged. Delete that line (the "
                              "update it describes is repeated by the resume) and start again.") from None
    return records


def trim_logs(out: Path, start: int) -> None:
    """Keep the metrics/eval records of updates ``<= start`` (the update the run (re)starts from), so a resumed
    run has no duplicate updates; a fresh start (0) keeps no evaluation (update 0 is evaluated again). Rank 0."""
    for name in LOGS:
        f = out / name
        if f.is_file():
            keep = [r for r in read_records(f) if isinstance(r, dict) and r.get("update", 0) <= start]
            if name == "eval.jsonl" and start == 0:
                keep = []
            write_atomic(f, "".join(json.dumps(r) + "\n" for r in keep))
