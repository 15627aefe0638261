"""Model-parallel (MP) layout inside data parallel (DP), and fairscale's groups.

The process group itself is the caller's (one process has none: MP > 1 needs MP
processes). Ranks are laid out as fairscale does: consecutive ranks form one MP
group, so rank = dp_rank * mp_size + mp_rank. `init_model_parallel` creates
fairscale's groups for a layout, `teardown_model_parallel` drops them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ParallelError


@dataclass
class ParallelInfo:
    rank: int
    world_size: int
    local_rank: int
    mp_size: int
    mp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device  # where this rank's model lives

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

    @classmethod
    def layout(cls, rank: int, world_size: int, local_rank: int, mp_size: int,
               device: torch.device) -> "ParallelInfo":
        """Rank `rank` of `world_size` processes in groups of `mp_size` consecutive ranks."""
        if mp_size < 1 or world_size % mp_size:
            raise ParallelError(f"model-parallel size {mp_size} does not divide the {world_size} processes")
        return cls(rank, world_size, local_rank, mp_size, rank % mp_size, world_size // mp_size,
                   rank // mp_size, device)


def check_mapping(n_shards: int, mp_size: int, where: str = "the checkpoint") -> None:
    """N shards load on M model-parallel ranks when one divides the other (merge or cut)."""
    if n_shards % mp_size and mp_size % n_shards:
        raise ParallelError(f"the {n_shards} shards of {where} cannot be loaded on {mp_size} model-parallel "
                            "ranks: one count must divide the other")


def init_model_parallel(mp_size: int) -> None:
    """fairscale's model-parallel groups of `mp_size` consecutive ranks (a process group must
    exist when mp_size > 1); nothing to do for mp_size 1."""
    if mp_size == 1:
        return
    from fairscale.nn.model_parallel import initialize as fs
    if not fs.model_parallel_is_initialized():
        fs.initialize_model_parallel(mp_size)
    elif fs.get_model_parallel_world_size() != mp_size:
        raise ParallelError(f"fairscale model parallel is already set up with size "
                            f"{fs.get_model_parallel_world_size()}, not {mp_size}")


def teardown_model_parallel() -> None:
    """Drop fairscale's model-parallel groups, which it keeps in module globals: destroying
    only the process group would leave them pointing at dead groups. No-op if none."""
    from fairscale.nn.model_parallel import initialize as fs
    if fs.model_parallel_is_initialized():
        fs.destroy_model_parallel()
