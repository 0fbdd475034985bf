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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from atmanrl import dist

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


def save(ckpt_root: str | Path, update: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write ``ckpt_root/step_{update}`` atomically (all ranks call this). Returns the final directory."""
    d = dist.info()
    root = Path(ckpt_root)
    final, tmp = root / f"step_{update}", root / f"step_{update}.tmp"
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
        state = dict(trainer_state, update=update, world_size=d.world_size)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()  # every rank's shards are on disk before the rename makes the checkpoint visible
    if d.is_main:
        if final.exists():  # a re-run of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(_complete(root))[:-keep] if keep > 0 else []:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()
    return final


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


def load(path: str | Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state from ``path``; returns the trainer state dict."""
    d = dist.info()
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json); delete it or pick "
                                f"another step_N directory")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not d.initialized)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more ranks than saved: those ranks keep their seed
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads(state_file.read_text())


def export_hf(plain_model, path: str | Path, tokenizer=None) -> Path:
    """Write a plain (unsharded) ``Llama`` as a Hugging Face safetensors directory, with its tokenizer when given
    (then ``atmanrl.model.load(path)`` and the evaluation script read it directly); call on rank 0 only."""
    from atmanrl.model import save_hf

    path = save_hf(plain_model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path
