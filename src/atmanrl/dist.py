"""Process group, FSDP2 sharding and rank-0 logging; the same code runs as one process or under ``torchrun``.

What is notable here:
- ``init()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Without it there is no process group at
  all: a plain single process, the policy stays an ordinary module, and every collective below is the identity.
  Under torchrun (even ``--nproc_per_node 1``) the backend is nccl on GPU and gloo on CPU.
- ``shard()`` applies FSDP2 the torchtitan way: ``fully_shard`` on every transformer block, then on the root (the
  embedding, final norm and LM head, tied or not, live in the root group). On GPU the forward/backward run in
  bf16 with fp32 master weights and fp32 gradient reduction (``MixedPrecisionPolicy``); on CPU there is no mixed
  precision.
- Gradients are SUMMED over ranks (gradient divide factor 1 on every FSDP module): the trainer divides each rank's
  loss by the *global* number of rollouts, so the sum is exactly the single-process gradient.
- ``gather_into()`` copies the full (unsharded) parameters into a plain, unsharded ``Llama`` -- the inference copy
  used for rollouts and the saliency mask. Why not generate with the sharded module itself? Every FSDP2 forward
  all-gathers, so every rank would have to run exactly the same number of forward calls: a rank whose rollouts all
  stopped early, or whose saliency needs fewer steps, would deadlock the others. One all-gather per update into a
  plain copy lets each rank generate and optimise masks on its own, at the cost of one extra model in memory.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool  # True when a process group exists (we are under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None


def init(device: str | None = None) -> DistInfo:
    """Set up the process group if torchrun started us; idempotent. ``device``: "cpu"/"cuda" (default: cuda if any)."""
    global _INFO
    if _INFO is not None:
        return _INFO
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(
                "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                device_id=dev if use_cuda else None,
            )
        _INFO = DistInfo(rank, world, local_rank, dev, True)
    else:
        _INFO = DistInfo(0, 1, 0, torch.device("cuda", 0) if use_cuda else torch.device("cpu"), False)
    return _INFO


def info() -> DistInfo:
    return _INFO if _INFO is not None else init()


def shutdown() -> None:
    """Destroy the process group (if we made one) and forget the cached DistInfo."""
    global _INFO
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    _INFO = None


def shard(model: nn.Module, mixed_precision: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root. A no-op without a process group."""
    d = info()
    if not d.initialized:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    kwargs = {"mesh": mesh}
    if mixed_precision_dtype(mixed_precision) is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():  # sum, not average, over ranks: the loss is already divided by the global count
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
    return model


def mixed_precision_dtype(mixed_precision: bool) -> torch.dtype | None:
    """bf16 when ``shard`` turns mixed precision on (a process group on GPU), else None (parameters' dtype)."""
    d = info()
    return torch.bfloat16 if mixed_precision and d.initialized and d.device.type == "cuda" else None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a (possibly) sharded DTensor; collective for DTensors, identity otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def gather_into(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src``'s full parameters (all-gathered if sharded) into the plain module ``dst`` of the same shape.

    Collective when ``src`` is sharded: every rank must call it. Tied weights appear once in ``named_parameters``
    on both sides, so the tie survives.
    """
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        dst_params[name].copy_(full_tensor(p.detach()).to(dst_params[name].dtype))


# ---------------------------------------------------------------------------------------------------------------
# Collectives that degrade to the identity in a single process
# ---------------------------------------------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum/min/max) of a CPU/GPU tensor; identity without a process group."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        ops = {"sum": torch_dist.ReduceOp.SUM, "min": torch_dist.ReduceOp.MIN, "max": torch_dist.ReduceOp.MAX}
        on_device = t.to(info().device)  # nccl reduces GPU tensors only; gloo takes CPU tensors as they are
        torch_dist.all_reduce(on_device, op=ops[op])
        if on_device is not t:
            t.copy_(on_device)
    return t


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def log(message: str) -> None:
    """Print on rank 0 only, to stderr (progress and notes; metrics go to metrics.jsonl)."""
    if info().is_main:
        print(message, file=sys.stderr, flush=True)
