"""Loading a checkpoint of any supported format (formats.py) onto this model-parallel rank.

Every format offers its tensors as slices of the full tensors under the model's names,
so one routine serves them all: each rank reads exactly its part of every tensor (the
rows or columns the model's layout gives it, rewrite.llama.model.split_dim), moved to
the device and cast one tensor at a time. Everything is validated on shapes alone
(memory-mapped files, safetensors headers) before any tensor is copied.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import CheckpointError, TokenizerError
from .formats import (Checkpoint, WeightSource, default_dtype, find_tokenizer, load_tokenizer,
                      open_checkpoint)
from .generation import Generator
from .model import ModelArgs, Transformer, fuse_projections, split_dim
from .parallel import ParallelInfo
from .sentencepiece_tokenizer import TokenizerBase
from .vocab_checks import check_vocab_rows, mask_padded_rows


def read_rank_state(source: WeightSource, mp_size: int, mp_rank: int,
                    place: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank mp_rank's part of every tensor of `source` (split as the model splits it)."""
    out = {}
    for key, shape in source.shapes.items():
        dim = split_dim(key) if mp_size > 1 else None
        if dim is None or dim >= len(shape):
            out[key] = source.read(key, None, 0, 0, place).contiguous()
            continue
        if shape[dim] % mp_size:
            raise CheckpointError(f"{key} {tuple(shape)} does not split over {mp_size} ranks along dim {dim}")
        n = shape[dim] // mp_size
        out[key] = source.read(key, dim, mp_rank * n, (mp_rank + 1) * n, place).contiguous()
    return out


def _placer(device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Callable[[torch.Tensor], torch.Tensor]:
    def place(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or t.device, dtype=dtype or t.dtype)
    return place


def load_rank_state(ckpt_dir: str, mp_size: int, mp_rank: int, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """This model-parallel rank's part of the weights of `ckpt_dir` (default: as stored, on the CPU).
    Parts are moved before any merge: the host never holds a merged copy."""
    ckpt = open_checkpoint(ckpt_dir)
    ckpt.check_mp(mp_size)
    source = ckpt.open_weights(ckpt.model_args())
    return read_rank_state(source, mp_size, mp_rank, _placer(device, dtype))


def model_args(ckpt: Checkpoint, tokenizer: TokenizerBase) -> tuple[ModelArgs, bool]:
    """(the architecture with its vocabulary size, whether the tokenizer gave that size)."""
    args = ckpt.model_args()
    if args.vocab_size > 0:
        check_vocab_rows(tokenizer, args.vocab_size, str(ckpt.config_file), str(ckpt.path))
        return args, False
    args.vocab_size = tokenizer.n_words
    return args, True


def check_shapes(model: Transformer, ckpt: Checkpoint, shapes: dict[str, torch.Size], tokenizer: TokenizerBase,
                 vocab_from_tokenizer: bool) -> None:
    """Exactly the model's keys, at the model's full (unsplit) shapes."""
    mp = model.model_parallel_size
    emb = shapes.get("tok_embeddings.weight")
    if vocab_from_tokenizer and emb is not None and emb[0] != tokenizer.n_words:
        raise CheckpointError(f"tokenizer {tokenizer.model_path} has {tokenizer.n_words} pieces but "
                              f"{ckpt.where('tok_embeddings.weight')} has {emb[0]} rows")
    expected = {}
    for key, p in model.state_dict().items():
        shape, dim = list(p.shape), split_dim(key) if mp > 1 else None
        if dim is not None and dim < len(shape):
            shape[dim] *= mp
        expected[key] = torch.Size(shape)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.path} does not match the LLaMA model built from its "
                              f"{ckpt.config_file.name}: missing keys {missing}, unexpected keys {unexpected}")
    bad = [f"{k} {tuple(shapes[k])} (expected {tuple(v)})" for k, v in expected.items() if shapes[k] != v]
    if bad:
        raise CheckpointError(f"{ckpt.path}: shapes disagree with {ckpt.config_file.name}: " + "; ".join(bad))


def _opened(ckpt: str | Checkpoint) -> Checkpoint:
    return open_checkpoint(ckpt) if isinstance(ckpt, str) else ckpt


def load_model(ckpt_dir: str | Checkpoint, tokenizer: TokenizerBase, parallel: ParallelInfo,
               dtype: Optional[torch.dtype] = None) -> Transformer:
    """Validate `ckpt_dir` and build this rank's model in `dtype` on `parallel.device`
    (default: float32 on CPU; on CUDA float16, or bfloat16 for weights saved in it).
    ckpt_dir: the folder, or the checkpoint already opened from it."""
    ckpt = _opened(ckpt_dir)
    ckpt.check_mp(parallel.mp_size)
    args, vocab_from_tokenizer = model_args(ckpt, tokenizer)
    if dtype is None:
        dtype = default_dtype(parallel.device, ckpt.stored_dtype)
    with torch.device("meta"):  # no allocation, no random init: the files supply every weight
        model = Transformer(args, parallel.mp_size)
    source = ckpt.open_weights(args)
    check_shapes(model, ckpt, source.shapes, tokenizer, vocab_from_tokenizer)
    state = read_rank_state(source, parallel.mp_size, parallel.mp_rank, _placer(parallel.device, dtype))
    # assign: the parameters become the loaded tensors, already on the device and in dtype
    model.load_state_dict(state, strict=True, assign=True)
    mask_padded_rows(model, tokenizer.n_words)  # known padded rows are never generated (vocab_checks.py)
    return fuse_projections(model.eval().requires_grad_(False))  # one QKV, one gate/up matmul per layer


def load_generator(ckpt_dir: str | Checkpoint, tokenizer_path: Optional[str], max_seq_len: int, max_batch_size: int,
                   parallel: ParallelInfo, dtype: Optional[torch.dtype] = None,
                   tokenizer: Optional[TokenizerBase] = None, share_prefixes: bool = True,
                   compile: bool = False) -> Generator:
    """Tokenizer + this rank's model, ready to generate. tokenizer_path: tokenizer.model or
    tokenizer.json; None: the one the checkpoint folder comes with (find_tokenizer).
    tokenizer: already loaded (the CLI has it from its prompt checks). share_prefixes, compile: see Generator."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    ckpt = _opened(ckpt_dir)  # folder, config and weight-file errors before the tokenizer's
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_path or _found_tokenizer(str(ckpt.path)), str(ckpt.path))
    model = load_model(ckpt, tokenizer, parallel, dtype)
    return Generator(model, tokenizer, max_seq_len, max_batch_size, parallel, share_prefixes=share_prefixes,
                     compile=compile)


def _found_tokenizer(ckpt_dir: str) -> str:
    path = find_tokenizer(ckpt_dir)
    if path is None:
        raise TokenizerError(f"{ckpt_dir} has no tokenizer.model or tokenizer.json (nor its parent a "
                             "tokenizer.model); give the tokenizer's path")
    return path
