"""Meta LLaMA-v1 checkpoint directories: validation, shard merge/split, loading.

A directory holds params.json and consolidated.00.pth ... consolidated.{N-1}.pth,
N model-parallel shards split with fairscale's conventions (FORMATS.md section 3).
A run with model-parallel size M loads it when M divides N (each rank merges
N/M consecutive shards) or N divides M (each rank cuts its part of one shard).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from .generation import Generator
from .model import ModelArgs, Transformer
from .parallel import ParallelInfo
from .tokenizer import Tokenizer

COLUMN = {"wq", "wk", "wv", "w1", "w3", "output"}  # output rows split: dim 0
ROW = {"wo", "w2", "tok_embeddings"}  # input / embedding dim split: dim 1
IGNORED = {"rope.freqs"}  # Meta's files carry it; inference recomputes it
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


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
            raise ValueError(f"{key} {tuple(t.shape)} does not split into {n} shards along dim {dim}")
        parts = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def merge_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate consecutive shards into one (replicated tensors come from the first)."""
    merged = {}
    for key, t in shards[0].items():
        dim = split_dim(key)
        merged[key] = t if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim=dim)
    return merged


def read_params(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise ValueError(f"--ckpt_dir {ckpt_dir} is not a directory")
    if not path.is_file():
        raise ValueError(f"--ckpt_dir {ckpt_dir} has no params.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def shard_paths(ckpt_dir: str) -> list[Path]:
    """consolidated.00.pth ... in order; raises ValueError if none or numbering has gaps."""
    if not Path(ckpt_dir).is_dir():
        raise ValueError(f"--ckpt_dir {ckpt_dir} is not a directory")
    found = {}
    for p in Path(ckpt_dir).iterdir():
        m = _SHARD.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise ValueError(f"--ckpt_dir {ckpt_dir} has no consolidated.*.pth shards")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ValueError(f"--ckpt_dir {ckpt_dir}: shards are not contiguous, missing "
                         + ", ".join(f"consolidated.{i:02d}.pth" for i in missing))
    return [found[i] for i in range(len(found))]


def check_mapping(n_shards: int, mp_size: int, ckpt_dir: str) -> None:
    if n_shards % mp_size and mp_size % n_shards:
        raise ValueError(f"--model_parallel_size {mp_size} cannot load the {n_shards} shards of "
                         f"--ckpt_dir {ckpt_dir}: one must divide the other")


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:  # mmap: only the pages this rank touches are read
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # files written in the legacy (non-zip) format cannot be mapped
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--ckpt_dir: cannot read shard {path} (not a torch.save file, or truncated "
                         f"by an interrupted copy): {err}") from err


def load_rank_state(ckpt_dir: str, mp_size: int, mp_rank: int) -> dict[str, torch.Tensor]:
    """This model-parallel rank's part of the weights, reading only the shards it needs."""
    paths = shard_paths(ckpt_dir)
    n = len(paths)
    check_mapping(n, mp_size, ckpt_dir)
    if n >= mp_size:  # merge n/mp consecutive shards
        k = n // mp_size
        return merge_shards([_load(p) for p in paths[mp_rank * k:(mp_rank + 1) * k]])
    k = mp_size // n  # split: part (mp_rank % k) of shard mp_rank // k
    shard = _load(paths[mp_rank // k])
    out = {}
    for key, t in shard.items():
        dim = split_dim(key)
        out[key] = t if dim is None else t.chunk(k, dim=dim)[mp_rank % k].contiguous()
    return out


def _check_keys(model: Transformer, state: dict[str, torch.Tensor], ckpt_dir: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"--ckpt_dir {ckpt_dir} does not match the LLaMA-v1 model built from its "
                         f"params.json: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
           for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"--ckpt_dir {ckpt_dir}: shapes disagree with params.json: " + "; ".join(bad))


def load_model(ckpt_dir: str, tokenizer: Tokenizer, parallel: ParallelInfo,
               dtype: Optional[torch.dtype] = None) -> Transformer:
    """Validate `ckpt_dir` and build this rank's model in `dtype` on `parallel.device`."""
    params = read_params(ckpt_dir)
    args = ModelArgs.from_params(params, vocab_size=tokenizer.n_words)
    state = load_rank_state(ckpt_dir, parallel.mp_size, parallel.mp_rank)
    for key in IGNORED:
        state.pop(key, None)
    emb = state.get("tok_embeddings.weight")
    if emb is not None and emb.shape[0] != tokenizer.n_words:
        raise ValueError(f"tokenizer {tokenizer.model_path} has {tokenizer.n_words} pieces but "
                         f"tok_embeddings.weight in {ckpt_dir}/consolidated.*.pth has {emb.shape[0]} rows")
    with torch.device("meta"):  # no allocation, no random init: the shards supply every weight
        model = Transformer(args, parallel.mp_size)
    _check_keys(model, state, ckpt_dir)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is None:
        dtype = torch.float16 if parallel.device.type == "cuda" else torch.float32
    return model.to(device=parallel.device, dtype=dtype).eval().requires_grad_(False)


def load_generator(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
                   parallel: ParallelInfo, dtype: Optional[torch.dtype] = None) -> Generator:
    """Tokenizer + this rank's model, ready to generate. dtype: fp16 on CUDA, float32 on CPU by default."""
    if max_seq_len < 2:
        raise ValueError(f"--max_seq_len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise ValueError(f"--max_batch_size must be at least 1, got {max_batch_size}")
    read_params(ckpt_dir)  # directory and params.json errors before the tokenizer's
    shard_paths(ckpt_dir)
    tokenizer = Tokenizer(tokenizer_path)
    model = load_model(ckpt_dir, tokenizer, parallel, dtype)
    return Generator(model, tokenizer, max_seq_len, max_batch_size, parallel)
