"""Process groups for rewriting: model parallel (MP) inside data parallel (DP).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without RANK the run is one
process and no process group is created (one process cannot need fairscale's
groups, since MP > 1 needs MP processes). Ranks are laid out as fairscale does:
consecutive ranks form one MP group, so rank = dp_rank * mp_size + mp_rank.
`setup_parallel` starts a run, `teardown_parallel` ends it (the only place that
destroys groups); `on_rank0` / `on_every_rank` are the run's few control
exchanges, which also work as plain calls without a process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

# Timeout of the default group's collectives. Besides the lock-step model-parallel
# traffic (fairscale's own groups, default timeout), the default group carries the
# run's few control exchanges, and ranks can arrive at those far apart: rank 0 scans
# the caption file while the others wait, and at the end every data-parallel group
# waits for the slowest one to finish its share (hours apart at LAION scale, or after
# an uneven resume). NCCL's default of 10 minutes would abort such a run at its very
# end. A rank that dies is caught by torchrun, which stops the others, not by this.
CONTROL_TIMEOUT = timedelta(hours=24)
T = TypeVar("T")


@dataclass
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    mp_size: int
    mp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device  # cuda:local_rank when a GPU is visible, else cpu

    @property
    def is_writer(self) -> bool:
        """One writer per DP group: every MP rank generates the same text."""
        return self.mp_rank == 0

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "ParallelInfo":
        """A one-process layout (tests, library use)."""
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, 0, 1, 0, 1, 0, device)


def count_shards(ckpt_dir: str) -> int:
    from .checkpoint import shard_paths  # checkpoint imports this module: import late
    return len(shard_paths(ckpt_dir))


def choose_mp_size(n_shards: int, world_size: int, requested: Optional[int]) -> int:
    """Default: one rank per shard, fewer if there are fewer processes. Raises ValueError if unmappable."""
    mp = requested if requested is not None else min(n_shards, world_size)
    if mp < 1:
        raise ValueError(f"--model_parallel_size must be >= 1, got {mp}")
    if world_size % mp:
        raise ValueError(f"--model_parallel_size {mp} does not divide the {world_size} processes "
                         f"(torchrun --nproc_per_node); pass --model_parallel_size explicitly")
    check_mapping(n_shards, mp)
    return mp


def check_mapping(n_shards: int, mp_size: int, ckpt_dir: str = "") -> None:
    """N shards load on M model-parallel ranks when one divides the other (merge or cut)."""
    if n_shards % mp_size and mp_size % n_shards:
        where = f"--ckpt_dir {ckpt_dir}" if ckpt_dir else "--ckpt_dir"
        raise ValueError(f"--model_parallel_size {mp_size} cannot load the {n_shards} shards of {where}: "
                         "one must divide the other")


def setup_parallel(ckpt_dir: str, model_parallel_size: Optional[int] = None, seed: int = 1,
                   device: Optional[str] = None) -> ParallelInfo:
    """Init process groups (NCCL on GPU, gloo on CPU) and fairscale MP groups; seed every rank alike.

    device: force 'cpu' or 'cuda' (default: cuda when available).
    """
    n_shards = count_shards(ckpt_dir)
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if "RANK" not in os.environ:
        if model_parallel_size not in (None, 1):
            raise ValueError(f"--model_parallel_size {model_parallel_size} needs that many processes: "
                             f"launch with torchrun --nproc_per_node {model_parallel_size}")
        torch.manual_seed(seed)
        return ParallelInfo.single(torch.device("cuda" if use_cuda else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    mp = choose_mp_size(n_shards, world, model_parallel_size)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} visible GPUs; "
                             "start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)  # before NCCL init: its communicators bind to the current device
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=CONTROL_TIMEOUT)
    if mp > 1:
        from fairscale.nn.model_parallel import initialize as fs
        if not fs.model_parallel_is_initialized():
            fs.initialize_model_parallel(mp)
        elif fs.get_model_parallel_world_size() != mp:
            raise ValueError(f"fairscale model parallel is already set up with size "
                             f"{fs.get_model_parallel_world_size()}, not --model_parallel_size {mp}")
    torch.manual_seed(seed)  # same seed on every rank: MP ranks must agree on any random draw
    return ParallelInfo(rank, world, local_rank, mp, rank % mp, world // mp, rank // mp, dev)


def teardown_parallel() -> None:
    """End of a run: drop fairscale's model-parallel groups, then the process group.

    fairscale keeps its groups in module globals; destroying only the process group
    leaves them pointing at dead groups, and a process group left to the interpreter's
    exit can abort it ('terminate called without an active exception'). No-op
    without a process group (one process).
    """
    if not _dist_on():
        return
    from fairscale.nn.model_parallel import initialize as fs
    if fs.model_parallel_is_initialized():
        fs.destroy_model_parallel()
    dist.destroy_process_group()


# ---------------------------------------------------------------- control exchanges (default group)
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    if not _dist_on():
        return fn()
    box: list = [_boxed(fn) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return _unboxed(box[0])


def on_every_rank(fn: Callable[[], T], world_size: int) -> list[T]:
    """fn() on each rank; every rank gets everyone's results, or the first error (in rank order)."""
    if not _dist_on():
        return [fn()]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, _boxed(fn))
    return [_unboxed(box) for box in everyone]
