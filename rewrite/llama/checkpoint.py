"""Meta LLaMA-v1 checkpoint directories: validation, shard merge/split, loading.

A directory holds params.json and consolidated.00.pth ... consolidated.{N-1}.pth,
N model-parallel shards split with fairscale's conventions (docs/formats.md, "Meta LLaMA
weights").
A run with model-parallel size M loads it when M divides N (each rank merges
N/M consecutive shards) or N divides M (each rank cuts its part of one shard).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import CheckpointError
from .generation import Generator
from .model import ModelArgs, Transformer
from .parallel import ParallelInfo, check_mapping
from .tokenizer import Tokenizer

COLUMN = {"wq", "wk", "wv", "w1", "w3", "output"}  # output rows split: dim 0
ROW = {"wo", "w2", "tok_embeddings"}  # input / embedding dim split: dim 1
IGNORED = {"rope.freqs"}  # Meta's files carry it; inference recomputes it
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def split_dim(key: str) -> Optional[int]:
    """Dimension along which `key` is split across model-parallel ranks; None if replicated."""
    name = key.rsplit(".", 2)[-2] if "." in key else key
    if name in COLUMN:
        return 0
    if name in ROW:
        return 1
    return None


def split_state_dict(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Cut a full state dict into n shards (clones, so torch.save writes only each part)."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in state.items():
        dim = split_dim(key)
        if dim is not None and t.shape[dim] % n:
            raise CheckpointError(f"{key} {tuple(t.shape)} does not split into {n} shards along dim {dim}")
        parts = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def merge_shards(shards: list[dict[str, torch.Tensor]], place: Callable[[torch.Tensor], torch.Tensor] = _same
                 ) -> dict[str, torch.Tensor]:
    """Concatenate consecutive shards into one (replicated tensors come from the first).

    place: applied to every part before the concatenation (a move to the GPU and
    the run's dtype), so the merge happens where the result lives.
    """
    merged = {}
    for key, t in shards[0].items():
        dim = split_dim(key)
        if dim is None or len(shards) == 1:
            merged[key] = place(t)
        else:
            merged[key] = torch.cat([place(s[key]) for s in shards], dim=dim)
    return merged


def read_params(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no params.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def shard_paths(ckpt_dir: str) -> list[Path]:
    """consolidated.00.pth ... in order; raises CheckpointError if none or numbering has gaps."""
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    found = {}
    for p in Path(ckpt_dir).iterdir():
        m = _SHARD.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise CheckpointError(f"{ckpt_dir} has no consolidated.*.pth shards")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: shards are not contiguous, missing "
                         + ", ".join(f"consolidated.{i:02d}.pth" for i in missing))
    return [found[i] for i in range(len(found))]


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A shard, memory-mapped: only the pages this rank touches are read. Tensors only
    (weights_only): a shard is never allowed to run code. Every LLaMA file is in torch's
    zip format (the default since torch 1.6, years before LLaMA), which mmap needs."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read shard {path} (not a torch.save file of tensors, or truncated "
                              f"by an interrupted copy): {err}") from err


def _rank_shards(ckpt_dir: str, mp_size: int, mp_rank: int) -> tuple[list[dict[str, torch.Tensor]], int, int]:
    """(the shards this rank reads, memory-mapped; part; parts). N shards on M ranks:
    N >= M merges N/M consecutive shards (part 0 of 1); N < M cuts part
    mp_rank % (M/N) of M/N out of shard mp_rank // (M/N)."""
    paths = shard_paths(ckpt_dir)
    n = len(paths)
    check_mapping(n, mp_size, str(ckpt_dir))
    if n >= mp_size:
        k = n // mp_size
        return [_load(p) for p in paths[mp_rank * k:(mp_rank + 1) * k]], 0, 1
    k = mp_size // n
    return [_load(paths[mp_rank // k])], mp_rank % k, k


def rank_shapes(shards: list[dict[str, torch.Tensor]], parts: int) -> dict[str, torch.Size]:
    """Shapes of this rank's tensors, known before any is merged, cut or copied."""
    shapes = {}
    for key, t in shards[0].items():
        shape, dim = list(t.shape), split_dim(key)
        if dim is not None and dim < len(shape):
            shape[dim] = shape[dim] * len(shards) // parts
        shapes[key] = torch.Size(shape)
    return shapes


def load_rank_state(ckpt_dir: str, mp_size: int, mp_rank: int, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None,
                    check: Optional[Callable[[dict[str, torch.Size]], None]] = None) -> dict[str, torch.Tensor]:
    """This model-parallel rank's part of the weights, reading only the shards it needs.

    Tensors are moved to `device` and `dtype` (default: as stored, on the CPU) one
    at a time, parts before a merge and after a cut: peak memory is the result
    plus one tensor, and the host never holds a merged copy (13B's two shards
    merged on one GPU would otherwise take 26 GB of RAM in every process).
    check(shapes) runs first, on the memory-mapped files, so a checkpoint that
    does not fit fails before anything is copied.
    """
    shards, part, parts = _rank_shards(ckpt_dir, mp_size, mp_rank)
    if check is not None:
        check(rank_shapes(shards, parts))

    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or t.device, dtype=dtype or t.dtype)

    if parts == 1:
        return merge_shards(shards, place)
    out = {}
    for key, t in shards[0].items():
        dim = split_dim(key)
        out[key] = place(t if dim is None else t.chunk(parts, dim=dim)[part]).contiguous()
    return out


def _check_state(model: Transformer, shapes: dict[str, torch.Size], ckpt_dir: str, tokenizer: Tokenizer) -> None:
    """The tokenizer's vocabulary, exactly the model's keys (IGNORED aside), params.json's shapes."""
    shapes = {k: v for k, v in shapes.items() if k not in IGNORED}
    emb = shapes.get("tok_embeddings.weight")
    if emb is not None and emb[0] != tokenizer.n_words:
        raise CheckpointError(f"tokenizer {tokenizer.model_path} has {tokenizer.n_words} pieces but "
                         f"tok_embeddings.weight in {ckpt_dir}/consolidated.*.pth has {emb[0]} rows")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir} does not match the LLaMA-v1 model built from its "
                         f"params.json: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k} {tuple(shapes[k])} (expected {tuple(v.shape)})"
           for k, v in expected.items() if shapes[k] != v.shape]
    if bad:
        raise CheckpointError(f"{ckpt_dir}: shapes disagree with params.json: " + "; ".join(bad))


def load_model(ckpt_dir: str, tokenizer: Tokenizer, parallel: ParallelInfo,
               dtype: Optional[torch.dtype] = None) -> Transformer:
    """Validate `ckpt_dir` and build this rank's model in `dtype` on `parallel.device`."""
    args = ModelArgs.from_params(read_params(ckpt_dir), vocab_size=tokenizer.n_words)
    if dtype is None:
        dtype = torch.float16 if parallel.device.type == "cuda" else torch.float32
    with torch.device("meta"):  # no allocation, no random init: the shards supply every weight
        model = Transformer(args, parallel.mp_size)
    state = load_rank_state(ckpt_dir, parallel.mp_size, parallel.mp_rank, parallel.device, dtype,
                            check=lambda shapes: _check_state(model, shapes, ckpt_dir, tokenizer))
    for key in IGNORED:
        state.pop(key, None)
    # assign: the parameters become the loaded tensors, already on the device and in dtype
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_generator(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
                   parallel: ParallelInfo, dtype: Optional[torch.dtype] = None,
                   tokenizer: Optional[Tokenizer] = None) -> Generator:
    """Tokenizer + this rank's model, ready to generate. dtype: fp16 on CUDA, float32 on CPU by
    default. tokenizer: tokenizer_path already loaded (the CLI has it from its prompt checks)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    read_params(ckpt_dir)  # directory and params.json errors before the tokenizer's
    shard_paths(ckpt_dir)
    tokenizer = tokenizer or Tokenizer(tokenizer_path)
    model = load_model(ckpt_dir, tokenizer, parallel, dtype)
    return Generator(model, tokenizer, max_seq_len, max_batch_size, parallel)
