"""Meta's checkpoint folders (LLaMA-1, 2 and 3): params.json and consolidated.00.pth ...
consolidated.{N-1}.pth, N model-parallel shards split with fairscale's conventions
(docs/formats.md, "Meta LLaMA weights"; docs/llama_weights.md).

params.json: LLaMA-1 has dim, n_layers, n_heads, multiple_of, norm_eps, vocab_size -1;
LLaMA-2 70B adds n_kv_heads and ffn_dim_multiplier; LLaMA-3 adds rope_theta and an
explicit vocab_size, LLaMA-3.1 use_scaled_rope. The shards split every projection like
the model does (rewrite.llama.model.split_dim), except that LLaMA-3 splits the token
embedding along the vocabulary (fairscale's VocabParallelEmbedding), which the shapes tell.
A run with model-parallel size M loads N shards when M divides N or N divides M.
"""
from __future__ import annotations

import json
import pickletools
import re
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import CheckpointError
from .model import ModelArgs, split_dim
from .parallel import check_mapping
from .rope import RopeScaling

IGNORED = {"rope.freqs"}  # LLaMA-1's files carry it; inference recomputes it
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
Place = Callable[[torch.Tensor], torch.Tensor]


def read_params(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no params.json")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return params


def args_from_params(params: dict, where: str) -> ModelArgs:
    """ModelArgs from params.json; vocab_size stays -1 where the tokenizer decides."""
    known = {f.name for f in fields(ModelArgs)} - {"rope_scaling", "hidden_dim"} | {"use_scaled_rope"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{where} has keys a LLaMA model does not use: {unknown}")
    params = dict(params)
    scaled = params.pop("use_scaled_rope", False)
    return ModelArgs(**params, rope_scaling=RopeScaling() if scaled else None)


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


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save file of weights (a Meta shard, a pytorch_model*.bin): tensors only
    (weights_only, so a file is never allowed to run code), memory-mapped so only the pages this
    rank touches are read. A file in torch's pre-1.6 format cannot be mapped and is read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001  (the legacy format cannot be memory-mapped: read it whole)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot read shard {path} (not a torch.save file of tensors, or "
                                  f"truncated by an interrupted copy): {err}") from err


_STORAGE_DTYPES = {"torch HalfStorage": torch.float16, "torch BFloat16Storage": torch.bfloat16,
                   "torch FloatStorage": torch.float32}


def _pickled_dtype(path: Path) -> Optional[torch.dtype]:
    """The dtype of the first storage a torch.save zip file's pickle names (None: not found)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            ops = pickletools.genops(z.read(name)) if name else ()
            storage = next((arg for op, arg, _ in ops if op.name == "GLOBAL" and str(arg).endswith("Storage")), None)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return None
    return _STORAGE_DTYPES.get(storage)


class MetaWeights:
    """The tensors of N shards, read as slices of the full tensors (memory-mapped; a shard is
    opened only when a slice needs it)."""

    def __init__(self, paths: list[Path], args: ModelArgs):
        self.paths = paths
        self._open: dict[int, dict[str, torch.Tensor]] = {}
        n = len(paths)
        self.file_dims: dict[str, Optional[int]] = {}
        self.shapes: dict[str, torch.Size] = {}
        for key, t in self._shard(0).items():
            if key in IGNORED:
                continue
            fdim = split_dim(key) if n > 1 else None
            if key == "tok_embeddings.weight" and n > 1 and t.dim() == 2 and t.shape[1] == args.dim:
                fdim = 0  # LLaMA-3: split by vocabulary rows
            shape = list(t.shape)
            if fdim is not None and fdim < len(shape):
                shape[fdim] *= n
            self.file_dims[key], self.shapes[key] = fdim, torch.Size(shape)

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._open:
            self._open[i] = load_shard(self.paths[i])
        return self._open[i]

    def read(self, key: str, dim: Optional[int], start: int, stop: int, place: Place) -> torch.Tensor:
        """Full tensor `key` (dim None) or its slice [start, stop) along dim, each part placed
        (moved to the device, cast) before the parts are joined."""
        fdim = self.file_dims[key]
        if fdim is None:
            t = self._shard(0)[key]
            return place(t if dim is None else t.narrow(dim, start, stop - start))
        size = self._shard(0)[key].shape[fdim]
        if dim == fdim:  # the shards this slice overlaps, each cut to the overlap
            parts = [self._shard(i)[key].narrow(fdim, max(start - i * size, 0),
                                                min(stop, (i + 1) * size) - max(start, i * size))
                     for i in range(start // size, -(-stop // size))]
        else:
            parts = [self._shard(i)[key] for i in range(len(self.paths))]
            if dim is not None:
                parts = [p.narrow(dim, start, stop - start) for p in parts]
        placed = [place(p) for p in parts]
        return placed[0] if len(placed) == 1 else torch.cat(placed, dim=fdim)


class MetaCheckpoint:
    kind = "meta"

    def __init__(self, ckpt_dir: str):
        self.path = Path(ckpt_dir)
        self.params = read_params(ckpt_dir)
        self.config_file = self.path / "params.json"
        self.weight_files = shard_paths(ckpt_dir)
        self.mp_shards = len(self.weight_files)  # the default model-parallel size

    def model_args(self) -> ModelArgs:
        return args_from_params(self.params, str(self.config_file))

    def check_mp(self, mp_size: int) -> None:
        check_mapping(self.mp_shards, mp_size, str(self.path))

    def open_weights(self, args: ModelArgs) -> MetaWeights:
        return MetaWeights(self.weight_files, args)

    def stored_dtype(self) -> Optional[torch.dtype]:
        """The first tensor's dtype in consolidated.00.pth, from the storage type its pickle names
        (the zip member data.pkl, a few KB, scanned, never unpickled); a file in another layout
        is loaded (memory-mapped) to ask."""
        stored = _pickled_dtype(self.weight_files[0])
        if stored is not None:
            return stored
        first = next(iter(load_shard(self.weight_files[0]).values()), None)
        return None if first is None else first.dtype

    def where(self, key: str) -> str:
        return f"{key} in {self.path}/consolidated.*.pth"


def split_state_dict(state: dict[str, torch.Tensor], n: int, vocab_parallel: bool = False
                     ) -> list[dict[str, torch.Tensor]]:
    """Cut a full state dict into n Meta shards (clones, so torch.save writes only each part).
    vocab_parallel: split the token embedding by rows, as LLaMA-3's files do."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in state.items():
        dim = 0 if vocab_parallel and key == "tok_embeddings.weight" else split_dim(key)
        if dim is not None and t.shape[dim] % n:
            raise CheckpointError(f"{key} {tuple(t.shape)} does not split into {n} shards along dim {dim}")
        parts = [t] * n if dim is None else list(t.chunk(n, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards
