"""Process group, FSDP2 sharding and rank-0 logging; the same code runs as one process or under ``torchrun``.

What is notable here:
- ``init()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). Without it there is no process group at
  all: a plain single process, the policy stays an ordinary module, and every collective below is the identity.
  Under torchrun (even ``--nproc_per_node 1``) the backend is nccl on GPU and gloo on CPU.
- ``shard()`` applies FSDP2 the torchtitan way: ``fully_shard`` on every transformer block, then on the root (the
  embedding, final norm and LM head, tied or not, live in the root group). On GPU the forward/backward run in
  bf16 with fp32 master weights and fp32 gradient reduction (``MixedPrecisionPolicy``); on CPU there is no mixed
  precision. Mixed precision casts parameters, not buffers: the RoPE frequencies stay float32, and so they do in
  the bf16 inference copy (``inference_copy``), or the sampler's log-probs would not be the policy's.
- Gradients are SUMMED over ranks: the trainer divides each rank's loss by the *global* number of rollouts, so
  the sum is exactly the single-process gradient. FSDP2 would average (``ReduceOp.AVG``); a divide factor of 1
  alone turns that into ``ReduceOp.PREMUL_SUM(1.0)``, an NCCL-only op that gloo refuses ("Cannot use
  ReduceOp.PREMUL_SUM with Gloo") for float32/bf16 gradients. So ``shard`` also forces sum-only collectives: the
  reduce-scatter is a plain ``ReduceOp.SUM`` on both backends, and FSDP2's post-division by the factor 1 is
  skipped (no extra kernel). On NCCL a plain SUM is the fast case (no custom PreMulSum op to create, zero-copy
  capable; PreMulSum has had bf16 bugs). Both setters exist from torch 2.8 on.
- ``gather_into()`` copies the full (unsharded) parameters into a plain, unsharded ``Llama`` -- the inference copy
  used for rollouts and the saliency mask. Why not generate with the sharded module itself? Every FSDP2 forward
  all-gathers, so every rank would have to run exactly the same number of forward calls: a rank whose rollouts all
  stopped early, or whose saliency needs fewer steps, would deadlock the others. One all-gather per update into a
  plain copy lets each rank generate and optimise masks on its own, at the cost of one extra model in memory.
- Work is spread, not assigned by problem: ``share`` gives each rank a contiguous equal slice of the update's
  rollouts (whatever ``problems_per_update`` is; a group may straddle two ranks), ``all_gather_list`` puts the
  rollouts back together on every rank, and ``spread`` splits the AtMan masks evenly over the ranks and gathers
  the results. Concatenation in rank order keeps every list in the single-process order.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from atmanrl.errors import UserError


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


def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root. A no-op without a process group.

    param_dtype: the compute dtype of forward/backward (``mixed_precision_dtype``), with float32 gradient
    reduction; None: the parameters' own dtype. Buffers (the RoPE frequencies) are never cast."""
    d = info()
    if not d.initialized:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UserError(f"training under torchrun needs torch >= 2.8 (FSDP2's sum-only gradient reduction); this "
                           f"is torch {torch.__version__}: upgrade torch, or run as one plain process (python, not "
                           f"torchrun)")
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    kwargs = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():  # sum, not average, over ranks: the loss is already divided by the global count
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM, not PREMUL_SUM(1.0): gloo has no PREMUL_SUM
    return model


def mixed_precision_dtype(mixed_precision: bool) -> torch.dtype | None:
    """The compute dtype the trainer gives ``shard`` and the inference copy: bf16 when ``model.mixed_precision``
    is on and there is a process group on GPU, else None (the parameters' dtype; a CPU computes float32)."""
    d = info()
    return torch.bfloat16 if mixed_precision and d.initialized and d.device.type == "cuda" else None


def inference_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain, frozen copy of ``model`` with its parameters in ``dtype`` (default: as they are): the trainer's
    sampler, refreshed by ``gather_into``. Make it before ``shard``. The RoPE frequencies stay float32 under the
    cast (``Llama._apply``) as they do in the sharded policy, so the log-probs the sampler records are the ones
    the policy's forward recomputes (tests/test_distributed.py)."""
    return copy.deepcopy(model).to(dtype or next(model.parameters()).dtype).requires_grad_(False)


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


def share(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """A rank's share of ``n`` ordered items (default: this rank's): contiguous, sizes differing by at most one.

    Rank ``r`` of ``W`` gets items ``[n*r//W, n*(r+1)//W)``, so concatenating the shares in rank order gives the
    items back in their order (``all_gather_list`` relies on it). ``range(n)`` without a process group."""
    d = info()
    r, w = d.rank if rank is None else rank, d.world_size if world_size is None else world_size
    return range(n * r // w, n * (r + 1) // w)


def all_gather_list(items: list) -> list:
    """Every rank's ``items`` (picklable objects), concatenated in rank order, on every rank (collective).

    The identity without a process group or with one process. Objects travel pickled (``all_gather_object``):
    meant for a few hundred rollouts or saliency results per update, not for weights."""
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return list(items)
    gathered: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def spread(fn: Callable[[list], list], items: list) -> list:
    """``fn`` of every item, computed an equal share per rank and gathered back in order (collective).

    Each rank calls ``fn`` once on its ``share`` of ``items`` (not at all when the share is empty), which must
    return one result per item; every rank returns the results of all items. The AtMan masks of an update are
    spread this way: the work is split evenly over all ranks whatever the number of problems per update."""
    mine = [items[i] for i in share(len(items))]
    return all_gather_list(fn(mine) if mine else [])


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def log(message: str) -> None:
    """Print on rank 0 only, to stderr (progress and notes; metrics go to metrics.jsonl)."""
    if info().is_main:
        print(message, file=sys.stderr, flush=True)
