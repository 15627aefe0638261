"""Process groups and devices, for every entry point (training, evaluation, rewriting).

`init_distributed_mode` decides how a process runs: under torchrun (RANK, WORLD_SIZE,
LOCAL_RANK set) it joins the process group, NCCL on a GPU and gloo on the CPU;
without RANK it is a single process and no group is created. Every other helper here
works in both cases, so callers never branch on it. `cleanup_distributed` is the one
place a process group is destroyed.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # True when a process group was created (torchrun)


def resolve_device(spec: str | None) -> torch.device:
    """``--device`` (cuda, cuda:1, cpu; default cuda if available), checked here so a typo
    or a missing GPU is one line, not a CUDA traceback."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"--device {spec!r} is not a device name (use cuda, cuda:1 or cpu)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return device


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """`--device` if given (cpu, cuda, cuda:N), else this process's GPU, else the CPU.
    A bare 'cuda' means this process's GPU: cuda:LOCAL_RANK."""
    device = resolve_device(requested) if requested else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} visible "
                             "GPUs; start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
    return device


def init_distributed_mode(device: str | None = None,
                          timeout: timedelta = timedelta(minutes=60)) -> DistInfo:
    """Join torchrun's process group if RANK is set, else run as one process.

    timeout: how long a collective may wait; callers whose ranks meet far apart (the
    main process evaluating alone, data-parallel rewriting groups finishing their
    shares hours apart) pass more than the backend's default.
    """
    if "RANK" not in os.environ:
        return DistInfo(device=pick_device(device, 0))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # before NCCL init: its communicators bind to the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, dev, True)


# How long the main thread lets go of the GIL before the process group is destroyed; see below.
GLOO_RELEASE_NAP_S = 0.05


def cleanup_distributed() -> None:
    """Destroy the process group, first letting gloo's worker threads finish their last op.

    With torch 2.14 an all-reduce that DDP starts inside backward carries a Python object
    (autograd's stashed context) that the gloo worker thread drops, taking the GIL, just
    after the op completes. If the interpreter starts to exit in that window, the worker
    is killed inside a destructor and the process aborts ('terminate called without an
    active exception', SIGABRT) after a run that succeeded: 9 of 60 two-process runs of
    a DDP step that exits at once. Sleeping releases the GIL so the workers can finish:
    0 of 150 runs with the nap. No-op without a process group.
    """
    if is_dist_avail_and_initialized():
        time.sleep(GLOO_RELEASE_NAP_S)
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_as_rank0() -> bool:
    """Global rank 0 under torchrun, or a plain single process; readable before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (float64, so sample counts stay exact)."""
    if not is_dist_avail_and_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_min_max(value: float, device: torch.device) -> tuple[float, float]:
    """(min, max) of one number over all ranks; used to check that ranks agree."""
    if not is_dist_avail_and_initialized():
        return value, value
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -t[1].item(), t[0].item()


# ---------------------------------------------------------------- control exchanges (default group)
def _boxed(fn: Callable[[], T]) -> tuple[str, object]:
    """("ok", fn()) or ("error", message): a rank's result or failure, ready to send."""
    try:
        return ("ok", fn())
    except (ValueError, OSError) as e:
        return ("error", str(e))


def _unboxed(box: tuple[str, object]):
    kind, value = box
    if kind == "error":
        raise ValueError(value)
    return value


def on_rank0(fn: Callable[[], T], rank: int) -> T:
    """fn() on global rank 0; its result, or its ValueError / OSError, on every rank
    (so no rank waits forever on one that failed). Without a process group: fn()."""
    if not is_dist_avail_and_initialized():
        return fn()
    box: list = [_boxed(fn) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return _unboxed(box[0])


def on_every_rank(fn: Callable[[], T], world_size: int) -> list[T]:
    """fn() on each rank; every rank gets everyone's results, or the first error (in rank order)."""
    if not is_dist_avail_and_initialized():
        return [fn()]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, _boxed(fn))
    return [_unboxed(box) for box in everyone]


def from_group_source(fn: Callable[[], T], is_source: bool, source: int, group) -> T:
    """fn() on `source` (a global rank) only; its result, or its ValueError / OSError, on every
    rank of `group`. For exchanges inside one group while other groups run at their own
    pace (a rewriting group's model-parallel ranks agreeing on the next shard). group None: fn()."""
    if group is None:
        return fn()
    box: list = [_boxed(fn) if is_source else None]
    dist.broadcast_object_list(box, src=source, group=group)
    return _unboxed(box[0])
