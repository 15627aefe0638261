"""The processes of a rewriting run: the process group (common.distributed), the
model-parallel size chosen for the checkpoint, fairscale's groups (the engine), the
teardown, and the engine's errors given the flag that named the file."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from datetime import timedelta
from typing import Optional

import torch

from common.distributed import (cleanup_distributed, init_distributed_mode, is_dist_avail_and_initialized,
                                launched_as_rank0)
from rewrite.llama import (CheckpointError, ParallelError, ParallelInfo, TokenizerError, check_mapping, export_hf,
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


def setup_vllm_processes() -> ParallelInfo:
    """--engine vllm: every process is a data-parallel group of its own (vLLM runs a model's tensor-
    parallel ranks itself, --model_parallel_size of them); the process group, gloo, carries only the
    run's control exchanges (the plan, the totals), so it never competes with vLLM's own."""
    info = init_distributed_mode("cpu", CONTROL_TIMEOUT)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # decides the default dtype only
    return ParallelInfo.layout(info.rank, info.world_size, info.local_rank, 1, device)


def hf_folder(cfg, ckpt) -> Path:
    """The Hugging Face folder vLLM loads: --ckpt_dir itself, or its conversion (written once,
    reused on rerun: rewrite.llama.export_hf) in --convert_dir, by default CKPT.hf beside a local
    output, or under ~/.cache/laclip/hf/ for an object-storage output."""
    if ckpt.kind == "hf":
        return Path(ckpt.path)
    if cfg.convert_dir:
        target = Path(cfg.convert_dir)
    elif isinstance(cfg.output_filename, Path):
        target = cfg.output_filename.resolve().parent / f"{ckpt.path.name}.hf"
    else:
        target = Path.home() / ".cache" / "laclip" / "hf" / f"{ckpt.path.name}.hf"
    try:
        made = export_hf(ckpt, target, cfg.tokenizer_path, log=lambda line: print(line, flush=True))
    except CheckpointError as e:
        raise ValueError(f"--convert_dir: {e}") from None
    if launched_as_rank0():
        print(made.line, flush=True)
    return made.path


def load_vllm(cfg, ckpt, tokenizer, dtype: torch.dtype, parallel: ParallelInfo):
    """vLLM's engine on this process's GPUs (or the CPU), behind the native engine's interface."""
    from rewrite.vllm_engine import VllmGenerator, VllmSettings, start_llm, visible_devices
    tp = cfg.model_parallel_size or 1
    devices = visible_devices(parallel.local_rank, tp) if parallel.world_size > 1 else None
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # read by vLLM's engine process, started below
    settings = VllmSettings(hf_folder(cfg, ckpt), dtype, cfg.max_seq_len, cfg.max_batch_size, tp, cfg.seed,
                            cfg.gpu_memory_utilization or 0.9, cfg.share_prefixes,
                            json.dumps(cfg.vllm_args or {}, sort_keys=True))
    return VllmGenerator(start_llm(settings), tokenizer, cfg.max_seq_len)
