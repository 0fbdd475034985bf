"""Training checkpoints with ``torch.distributed.checkpoint`` (resumable, any world size) and the final HF export.

What is notable here:
- A checkpoint is the directory ``out_dir/checkpoints/step_N``: the sharded model and AdamW state written by
  ``dcp.save`` (each rank writes its own shards; DCP can reload them under another world size), one
  ``rng_rank{r}.pt`` per rank (torch CPU and CUDA RNG states) and ``trainer_state.json`` (the update counter and
  what determines the data order: run seed, epoch, position in the epoch).
- Atomic: everything is written into ``step_N.tmp``; only when all ranks are done does rank 0 ``os.replace`` it
  to ``step_N``. A crash mid-write leaves a ``.tmp`` directory that ``latest()`` never picks (and the next save
  removes), so a directory named ``step_N`` is always complete.
- What is NOT saved, on purpose: sampling generators. Rollout sampling is seeded per (seed, update, problem)
  (rl/rollout.py) and the data order per (seed, epoch), so the update counter restores both exactly.
- ``export_hf`` writes the policy as a Hugging Face safetensors directory via ``atmanrl.model.save_hf`` (readable
  by ``atmanrl.model.load`` and by ``transformers``).
- Never a non-finite number: ``check_finite`` stops training before an optimizer step whose loss or gradient norm
  is NaN/inf, and ``save``/``export_hf`` refuse weights that are not finite, so no checkpoint or export holds them.
  What comes from outside is checked too: a checkpoint whose weights or optimizer state hold NaN/inf is damaged
  (``load`` refuses it, ``load_latest`` falls back to an older one), and ``require_finite`` refuses a starting model
  that holds them, before an update could train on them.
- A damaged newest checkpoint (truncated shard, missing ``.metadata``, bad ``trainer_state.json``, NaN/inf inside)
  does not end a resume: ``load_latest`` warns, naming the directory and what is wrong, and falls back to the next
  older one. A checkpoint of another optimizer is not damaged: ``load`` says which optimizer wrote it
  (``CheckpointMismatchError``), and nothing is skipped.
- The optimizer's settings come from the config, not the checkpoint: after a resume ``apply_settings`` writes the
  configured ``lr``/``betas``/``weight_decay`` into the restored optimizer (its moments are kept) and returns what
  changed, for the log.
- A checkpoint that cannot be written (a full disk) is removed again and reported as ``CheckpointWriteError``: the
  directory, the reason, the free space, and that the newest complete checkpoint is intact.
- Trusted input: the RNG files are read with ``torch.load(weights_only=True)`` (tensors only, no code), but DCP's
  own ``.metadata`` is a pickle, so a checkpoint directory must come from a source you trust, like any PyTorch
  checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from atmanrl import dist
from atmanrl.config import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes a single process" when there is no process group -- which is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteError(UserError, RuntimeError):
    """A NaN/inf loss, gradient or weight; raised before it can reach the weights, a checkpoint or an export."""


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _all_finite(t: torch.Tensor) -> bool:
    """True iff no NaN/inf in ``t``. min/max propagate NaN and show inf: exact, and cheaper than
    ``isfinite(t).all()``, which materialises a boolean copy."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


@torch.no_grad()
def nonfinite_parameters(model, collective: bool = True) -> list[str]:
    """Names of the parameters holding a NaN/inf in this rank's shards; ``collective``: every rank must call it and
    every rank gets the verdict (a rank whose own shards are fine reports "(on another rank)")."""
    bad = [name for name, p in model.named_parameters() if not _all_finite(_local(p))]
    if not collective:
        return bad
    anywhere = dist.all_reduce(torch.tensor([float(len(bad))]), "max").item()
    return bad or (["(on another rank)"] if anywhere else [])


@torch.no_grad()
def check_finite(loss: float, model, where: str, grad_norm: float | None = None) -> float:
    """Raise NonFiniteError when ``loss`` (the global loss of an optimizer step) or the global gradient norm of
    ``model`` is not finite; call it before ``optimizer.step()`` on every rank. Returns the gradient norm.

    ``grad_norm``: the global norm when the caller already has it (``clip_grad_norm_`` returns it), so it is not
    computed twice."""
    if grad_norm is None:
        # One norm per gradient on its device (no float64 copy of a large gradient), then one sync.
        norms = [torch.linalg.vector_norm(_local(p.grad).detach().float()) for p in model.parameters()
                 if p.grad is not None]
        squares = torch.stack(norms).double().pow(2).sum().reshape(1).cpu() if norms else torch.zeros(1).double()
        grad_norm = math.sqrt(dist.all_reduce(squares).item())
    norm = grad_norm
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise NonFiniteError(
            f"{where}: the loss is {loss} and the gradient norm {norm}. Training stopped before the optimizer step, "
            "so no weight was changed and nothing non-finite was saved (the newest checkpoint is intact). Lower "
            "train.lr, set train.grad_clip, or use a wider model.dtype if the model overflows."
        )
    return norm


def _refuse_nonfinite(model, what: str, collective: bool = True) -> None:
    bad = nonfinite_parameters(model, collective)
    if bad:
        raise NonFiniteError(f"refusing to write {what}: the weights {bad[:5]}{' ...' if len(bad) > 5 else ''} hold "
                             "NaN/inf values. Lower train.lr or set train.grad_clip and resume from the last "
                             "checkpoint.")


def require_finite(model, what: str) -> None:
    """Refuse to train ``model`` when a weight holds NaN/inf (collective): ``what`` names where it came from."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(f"{what} holds NaN/inf values in {bad[:5]}{' ...' if len(bad) > 5 else ''}; training "
                             "on it would only spread them. Use an intact model (restore or re-download it).")


@torch.no_grad()
def nonfinite_optimizer_state(optimizer) -> list[str]:
    """Names (``param i: key``) of the optimizer state tensors holding NaN/inf on this rank, and "(on another
    rank)" when only another rank has one (collective)."""
    bad = [f"param {i}: {key}" for i, state in enumerate(optimizer.state.values()) for key, t in state.items()
           if torch.is_tensor(t) and t.is_floating_point() and not _all_finite(_local(t))]
    anywhere = dist.all_reduce(torch.tensor([float(len(bad))]), "max").item()
    return bad or (["(on another rank)"] if anywhere else [])


def apply_settings(optimizer, settings: dict) -> dict:
    """Write ``settings`` (``lr``, ``betas``, ``weight_decay``: what the config decides) into every param group of
    a restored optimizer; returns ``{name: (restored, now)}`` of those that changed."""
    changed = {}
    for group in optimizer.param_groups:
        for name, value in settings.items():
            old = tuple(group[name]) if isinstance(group[name], (list, tuple)) else group[name]
            if old != value:
                changed[name] = (old, value)
            group[name] = value
    return changed


def save(ckpt_root: str | Path, update: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write ``ckpt_root/step_{update}`` atomically (all ranks call this). Returns the final directory."""
    d = dist.info()
    _refuse_nonfinite(model, f"checkpoint step_{update}")
    root = Path(ckpt_root)
    final, tmp = root / f"step_{update}", root / f"step_{update}.tmp"
    try:
        _write(root, tmp, final, update, model, optimizer, trainer_state, keep, d)
    except (OSError, RuntimeError, CheckpointException) as e:  # torch.save on a full disk: "unexpected pos 704 vs 598"
        raise _write_error(root, tmp, final, e) from e
    return final


def _write(root, tmp, final, update, model, optimizer, trainer_state, keep, d) -> None:
    if d.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from a crash while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not d.initialized)
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    if d.is_main:
        state = dict(trainer_state, update=update, world_size=d.world_size, optimizer=type(optimizer).__name__)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()  # every rank's shards are on disk before the rename makes the checkpoint visible
    if d.is_main:
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(_complete(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()


def _write_error(root: Path, tmp: Path, final: Path, e: BaseException) -> CheckpointWriteError:
    """The sentence for a checkpoint that could not be written; the partial ``.tmp`` directory is removed."""
    shutil.rmtree(tmp, ignore_errors=True)
    detail = (e.strerror if isinstance(e, OSError) and e.strerror else
              (str(e).strip().splitlines() or [type(e).__name__])[-1])[:200]
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        free = "free space unknown"
    newest = latest(root)
    return CheckpointWriteError(
        f"cannot write the checkpoint {final.name} into {root} ({type(e).__name__}: {detail}; {free}). A full disk "
        f"is the usual cause: free space, then run again with checkpoint.resume=true to resume from "
        f"{newest.name + ', which is intact' if newest else 'the start (no checkpoint was completed)'}."
    )


def _complete(root: Path) -> list[int]:
    """Update numbers of the complete checkpoints under ``root`` (``.tmp`` directories are never complete)."""
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            steps.append(int(m.group(1)))
    return steps


def latest(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    steps = _complete(Path(ckpt_root))
    return Path(ckpt_root) / f"step_{max(steps)}" if steps else None


class CorruptCheckpointError(UserError, RuntimeError):
    """A ``step_N`` directory that cannot be loaded; the message names the directory and what is wrong."""


class CheckpointMismatchError(UserError, RuntimeError):
    """An intact checkpoint that this run's settings cannot continue (another optimizer)."""


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint that could not be written (a full disk); the message names the directory and the free space."""


def _trainer_state(path: Path) -> dict:
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json); delete it or pick "
                                f"another step_N directory")
    try:
        state = json.loads(state_file.read_text())
        update = state["update"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{state_file} is damaged ({type(e).__name__}: {e}); it must be a JSON object "
                                     "with the 'update' counter") from None
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != update:
        raise CorruptCheckpointError(f"{state_file} says update {update}, but the directory is {path.name}")
    if not (path / ".metadata").is_file():
        raise CorruptCheckpointError(f"{path} has no .metadata (DCP's index of the shards); the checkpoint is "
                                     "incomplete")
    return state


def load(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state from ``path``; returns the trainer state dict.

    A damaged checkpoint raises ``CorruptCheckpointError`` naming the directory and the file at fault. The RNG file
    is read with ``weights_only=True``: a planted pickle is refused, never run."""
    d = dist.info()
    path = Path(path)
    trainer_state = _trainer_state(path)
    saved_by = trainer_state.get("optimizer")
    if saved_by is not None and saved_by != type(optimizer).__name__:
        raise CheckpointMismatchError(f"{path} holds the state of {saved_by}, not of {type(optimizer).__name__}; set "
                                      "train.optimizer back to the run's optimizer to resume it (the checkpoint is "
                                      "intact)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not d.initialized)
    except (Exception, CheckpointException) as e:  # CheckpointException (a BaseException) wraps a shard's error
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(f"{path}: the model/optimizer shards cannot be read ({type(e).__name__}: "
                                     f"{detail[:300]})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    bad = nonfinite_parameters(model) + [f"optimizer state {n}" for n in nonfinite_optimizer_state(optimizer)]
    if bad:
        shown = ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
        raise CorruptCheckpointError(f"{path} holds NaN/inf values ({shown}); training from it would only spread them")
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: those ranks keep their seed
        try:
            rng = torch.load(rng_file, weights_only=True)  # tensors only: a crafted pickle cannot run code
            _set_rng_state(rng)
        except Exception as e:
            raise CorruptCheckpointError(f"{rng_file} is not an RNG state file written by atmanrl "
                                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); it was "
                                         "refused without running anything in it") from e
    return trainer_state


def load_latest(ckpt_root: str | Path, model, optimizer) -> tuple[Path, dict] | None:
    """Load the newest checkpoint under ``ckpt_root`` that loads; ``(path, trainer_state)``, or None when there
    is none. A damaged one is skipped with a warning naming it (the next save of that step replaces it); when
    every one is damaged, ``CorruptCheckpointError`` lists them all."""
    root = Path(ckpt_root)
    failures = []
    for step in sorted(_complete(root), reverse=True):
        path = root / f"step_{step}"
        try:
            return path, load(path, model, optimizer)
        except (CorruptCheckpointError, FileNotFoundError) as e:
            failures.append(str(e))
            warnings.warn(f"skipping the damaged checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
    if failures:
        raise CorruptCheckpointError(
            f"no checkpoint in {root} can be loaded:\n  " + "\n  ".join(failures) + "\nIf they are intact, the "
            "model differs from the run's (model.name_or_path): set it back. Otherwise restore one of them, or start "
            "over with checkpoint.overwrite=true (this deletes the run in out_dir)."
        )
    return None


def export_hf(plain_model, path: str | Path, tokenizer=None) -> Path:
    """Write a plain (unsharded) ``Llama`` as a Hugging Face safetensors directory, with its tokenizer when given
    (then ``atmanrl.model.load(path)`` and the evaluation script read it directly); call on rank 0 only."""
    from atmanrl.model import save_hf

    _refuse_nonfinite(plain_model, f"the exported policy {path}", collective=False)  # rank 0 only
    path = save_hf(plain_model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path
