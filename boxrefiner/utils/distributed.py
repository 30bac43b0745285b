"""Runs across processes with `torch.distributed`, launched by `torchrun` (one process per GPU, or
several CPU processes): which rank this is, the device it owns, and the few collectives the tool
needs. Without torchrun everything here is a no-op for a world of one, so the one-process code path
is the same code.

    torchrun --nproc_per_node 4 -m boxrefiner train --config C.yaml
    torchrun --nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
        --nproc_per_node 8 -m boxrefiner train --config C.yaml

Backend: `nccl` when this process drives a CUDA device, else `gloo` (CPU), chosen automatically.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process in a world of
    more than one."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs, draws progress bars, writes metrics and checkpoints."""
    return rank() == 0


def rank_from_environment() -> int:
    """This process's rank as torchrun set it, also before the process group is joined (0 when not
    launched by torchrun, whatever a stray RANK variable says)."""
    if active():
        return rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns the device this rank owns (its
    `cuda:LOCAL_RANK` when `device` is CUDA, else `device`). A world of one is left alone."""
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    log.info("distributed: rank %d of %d (local rank %d), backend %s, device %s", rank(), world(), local_rank(),
             backend, device)
    return device


def backend() -> str:
    return str(dist.get_backend()) if active() else "none"


def close() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop request, a non-finite loss)."""
    if not active():
        return flag
    return sum_all([float(flag)])[0] > 0


def first_set(value: T | None) -> T | None:
    """The first rank's non-None `value` (e.g. the signal one rank received), on every rank."""
    return next((v for v in gather(value) if v is not None), None)


def gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not active():
        return [value]
    found: list[Any] = [None] * world()
    dist.all_gather_object(found, value)
    return found


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not active():
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list[T]) -> list[T]:
    """This rank's share of `items`: every world-th one, starting at its rank (disjoint, no padding)."""
    return items[rank()::world()]
