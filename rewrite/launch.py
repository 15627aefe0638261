"""The processes of a rewriting run: the process group (common.distributed), the
model-parallel size chosen for the checkpoint, fairscale's groups (the engine), the
teardown, and the engine's errors given the flag that named the file."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch

from common.distributed import cleanup_distributed, init_distributed_mode, is_dist_avail_and_initialized
from rewrite.llama import (CheckpointError, ParallelError, ParallelInfo, TokenizerError, check_mapping,
                           init_model_parallel, open_checkpoint, teardown_model_parallel)

# Timeout of the default group's collectives. Besides the lock-step model-parallel
# traffic (fairscale's own groups, default timeout), the default group carries the
# run's few control exchanges, and ranks can arrive at those far apart: rank 0 scans
# the caption file while the others wait, and at the end every data-parallel group
# waits for the slowest one to finish its share (hours apart at LAION scale, or after
# an uneven resume). NCCL's default of 10 minutes would abort such a run at its very
# end. A rank that dies is caught by torchrun, which stops the others, not by this.
CONTROL_TIMEOUT = timedelta(hours=24)


@contextmanager
def engine_errors_name_flags(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
               model_parallel_size: Optional[int] = None) -> Iterator[None]:
    """Engine errors (which name files only) become errors naming the flag that gave the file."""
    try:
        yield
    except CheckpointError as e:
        raise ValueError(f"--ckpt_dir: {e}") from None
    except TokenizerError as e:
        raise ValueError(f"--tokenizer_path: {e}") from None
    except ParallelError as e:
        given = "" if model_parallel_size is None else f" {model_parallel_size}"
        raise ValueError(f"--model_parallel_size{given}: {e} (--ckpt_dir {ckpt_dir})") from None


def choose_mp_size(n_shards: int, world_size: int, requested: Optional[int]) -> int:
    """Default: one rank per shard of a Meta checkpoint, fewer if there are fewer processes (a Hugging
    Face folder counts as one shard: model parallelism is asked for). Raises ValueError if unmappable."""
    mp = requested if requested is not None else min(n_shards, world_size)
    if mp < 1:
        raise ValueError(f"--model_parallel_size must be >= 1, got {mp}")
    if world_size % mp:
        raise ValueError(f"--model_parallel_size {mp} does not divide the {world_size} processes "
                         f"(torchrun --nproc_per_node); pass --model_parallel_size explicitly")
    try:
        check_mapping(n_shards, mp)
    except ParallelError as e:
        raise ValueError(f"--model_parallel_size {mp}: {e}") from None
    return mp


def setup_parallel(ckpt_dir, model_parallel_size: Optional[int] = None, seed: int = 1,
                   device: Optional[str] = None) -> ParallelInfo:
    """Process group (NCCL on GPU, gloo on CPU; none for one process), fairscale's
    model-parallel groups, and the same seed on every rank. device: force 'cpu' or
    'cuda' (default: cuda when available). ckpt_dir: a folder, or the checkpoint opened from it."""
    with engine_errors_name_flags(ckpt_dir):
        ckpt = open_checkpoint(ckpt_dir) if isinstance(ckpt_dir, (str, os.PathLike)) else ckpt_dir
    n_shards = ckpt.mp_shards  # Meta: its shard count; Hugging Face: 1
    if "RANK" not in os.environ and model_parallel_size not in (None, 1):
        raise ValueError(f"--model_parallel_size {model_parallel_size} needs that many processes: "
                         f"launch with torchrun --nproc_per_node {model_parallel_size}")
    mp = choose_mp_size(n_shards, int(os.environ.get("WORLD_SIZE", 1)), model_parallel_size)
    info = init_distributed_mode(device, CONTROL_TIMEOUT)
    init_model_parallel(mp)
    torch.manual_seed(seed)  # same seed on every rank: MP ranks must agree on any random draw
    return ParallelInfo.layout(info.rank, info.world_size, info.local_rank, mp, info.device)


def teardown_parallel() -> None:
    """End of a run: drop fairscale's groups, then the process group. A process group
    left to the interpreter's exit can abort it ('terminate called without an active
    exception'). No-op without a process group (one process)."""
    if is_dist_avail_and_initialized():
        teardown_model_parallel()
        cleanup_distributed()
