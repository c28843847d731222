"""Multi-process fastft on torch.distributed (launch with ``torchrun``).

When a process group is initialised:

- **Sharded cache building** (``tier="disk"``): every rank runs the frozen prefix on its own
  share of the chunks and writes them into the one cache folder, which must be on a
  filesystem every rank sees; rank 0 creates the folder first and marks it complete after
  all ranks are done (see :func:`fastft.cache.sharded.build_sharded`). The memory tiers
  (``host``, ``device``) and ``auto`` are built by every rank for itself, as on one process.
- **Head training**: :class:`fastft.FineTuner` trains its new layers with
  ``DistributedDataParallel``: every rank draws the same global ``randperm`` (same seed),
  takes its contiguous slice of each global batch, and the gradient all-reduce makes the
  update equal to single-process training with the same global batch (gloo on CPU, nccl on
  GPU).

This module only wraps torch.distributed (it imports nothing else of fastft), so the cache
cache builds and the trainer can both use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of row indices."""
    rank, world = rank_and_world()
    if world == 1:
        return rows
    return rows.tensor_split(world)[rank]


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when a process group is active."""
    if not is_distributed() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DDP(module, device_ids=device_ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place; a no-op on one process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` on one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (what other ranks pass is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
