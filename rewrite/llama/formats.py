"""Which checkpoint format a folder holds, what every format offers the loader, and which
tokenizer a folder comes with.

Meta's (params.json + consolidated.*.pth; LLaMA-1, 2, 3) is taken when the folder has
params.json and no config.json, or both and consolidated shards; Hugging Face's
(config.json + safetensors or .bin) otherwise. Both give a `Checkpoint`:

    kind            'meta' or 'hf'
    path            the folder
    config_file     params.json / config.json
    weight_files    the weight files, in order
    mp_shards       model-parallel shards on disk (the default model-parallel size)
    model_args()    the architecture (vocab_size -1: the tokenizer decides)
    check_mp(m)     raises ParallelError if m ranks cannot load the files
    open_weights(a) a WeightSource over the tensors, under the model's names
    stored_dtype()  the dtype the weights were saved in, where known
    where(key)      a tensor's place, for error messages
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Protocol, Union

import torch

from .bpe_tokenizer import BPETokenizer
from .errors import CheckpointError, TokenizerError
from .hf import HFCheckpoint
from .meta import MetaCheckpoint
from .specials import configured_specials
from .sentencepiece_tokenizer import Tokenizer, TokenizerBase, is_tiktoken_file
from .vocab_checks import check_tokenizer_pair

Checkpoint = Union[MetaCheckpoint, HFCheckpoint]


class WeightSource(Protocol):
    shapes: dict[str, torch.Size]  # full (unsplit) shape of every tensor, under the model's names

    def read(self, key: str, dim: Optional[int], start: int, stop: int,
             place: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The full tensor (dim None) or its slice [start, stop) along dim, moved by `place`."""


def open_checkpoint(ckpt_dir: str) -> Checkpoint:
    """Detect the format of `ckpt_dir` and read its config (no weights are read)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    has_params, has_config = (d / "params.json").is_file(), (d / "config.json").is_file()
    if has_params and (not has_config or any(d.glob("consolidated.*.pth"))):
        return MetaCheckpoint(ckpt_dir)
    if has_config:
        return HFCheckpoint(ckpt_dir)
    raise CheckpointError(f"{ckpt_dir} has no params.json (Meta's format) or config.json (Hugging Face's)")


def default_dtype(device: torch.device,
                  stored: Union[Optional[torch.dtype], Callable[[], Optional[torch.dtype]]]) -> torch.dtype:
    """float32 on CPU; on CUDA bfloat16 for weights saved in it (LLaMA-3) where the GPU has it,
    else float16 (LLaMA-1's own dtype). stored may be a checkpoint's stored_dtype method: it is
    called only where it decides (a Meta folder answers it from inside its first weight file)."""
    if device.type != "cuda":
        return torch.float32
    if not torch.cuda.is_bf16_supported():
        return torch.float16
    if callable(stored):
        stored = stored()
    return torch.bfloat16 if stored == torch.bfloat16 else torch.float16


def load_tokenizer(path: str, ckpt_dir: Optional[str] = None) -> TokenizerBase:
    """The tokenizer in `path` (tokenizer.model or tokenizer.json), with BOS/EOS from the config
    files of `ckpt_dir` and of the tokenizer's own folder."""
    if not os.path.isfile(path):
        raise TokenizerError(f"no tokenizer at {path} (a tokenizer.model or tokenizer.json file)")
    folders = [Path(ckpt_dir)] if ckpt_dir else []
    specials = configured_specials(folders, Path(path).parent)
    if path.endswith(".json") or is_tiktoken_file(path):
        return BPETokenizer(path, specials)
    return Tokenizer(path, specials)


def find_tokenizer(ckpt_dir: str) -> Optional[str]:
    """The tokenizer a checkpoint folder comes with: its tokenizer.model (SentencePiece for
    LLaMA-1/2, tiktoken ranks for Meta's LLaMA-3), else its tokenizer.json (Hugging Face),
    else, for Meta's LLaMA-1/2 downloads, the tokenizer.model one level up."""
    d = Path(ckpt_dir)
    for p in (d / "tokenizer.model", d / "tokenizer.json"):
        if p.is_file():
            check_tokenizer_pair(ckpt_dir, load_tokenizer)  # both files: only if they agree
            return str(p)
    up = d.parent / "tokenizer.model"
    return str(up) if (d / "params.json").is_file() and up.is_file() else None
