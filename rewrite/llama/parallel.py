"""Process-group setup for rewriting: model parallel (MP) inside data parallel (DP).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without RANK the run is one
process and no process group is created (one process cannot need fairscale's
groups, since MP > 1 needs MP processes). Ranks are laid out as fairscale does:
consecutive ranks form one MP group, so rank = dp_rank * mp_size + mp_rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


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
    if n_shards % mp and mp % n_shards:
        raise ValueError(f"--model_parallel_size {mp} cannot load the {n_shards} shards of --ckpt_dir: "
                         "one must divide the other")
    return mp


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
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if mp > 1:
        from fairscale.nn.model_parallel import initialize as fs
        if not fs.model_parallel_is_initialized():
            fs.initialize_model_parallel(mp)
        elif fs.get_model_parallel_world_size() != mp:
            raise ValueError(f"fairscale model parallel is already set up with size "
                             f"{fs.get_model_parallel_world_size()}, not --model_parallel_size {mp}")
    torch.manual_seed(seed)  # same seed on every rank: MP ranks must agree on any random draw
    return ParallelInfo(rank, world, local_rank, mp, rank % mp, world // mp, rank // mp, dev)
