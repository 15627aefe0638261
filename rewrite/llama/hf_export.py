"""Meta-format folders (params.json + consolidated.*.pth; LLaMA-1, 2, 3, 3.1) converted once to a
Hugging Face LLaMA folder (config.json for LlamaForCausalLM + safetensors), for engines that
load only those (vLLM). The inverse of what hf.py does on load: model-parallel shards merged
(meta.MetaWeights knows each tensor's split), names mapped with hf.py's tables read backwards,
q/k rows put in Hugging Face's rotate-half layout (rope.rotate_half_heads). Values are copied,
never cast: the folder holds the stored dtype.

Written once, atomically: into a hidden sibling `.NAME.partial`, every file fsynced, then renamed
into place; a marker (laclip_export.json) written last records the source's identity (params.json
hash, each shard's name, size and mtime, the tokenizer's hash) and the converter version. A rerun
on a folder with a matching marker returns it untouched; a folder with another marker, or none,
is refused and never overwritten. Two processes converting into the same folder take a lock
(`.NAME.lock`, flock) beside it: the second waits and then reuses the first one's folder.
Memory: shards are memory-mapped; one output file's tensors (<= max_file_bytes) are held at a time.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch

from .checkpoint import check_shapes, model_args
from .errors import CheckpointError
from .formats import Checkpoint, find_tokenizer, load_tokenizer, open_checkpoint
from .hf import hf_name
from .meta import MetaCheckpoint
from .model import ModelArgs, Transformer
from .rope import rotate_half_heads
from .sentencepiece_tokenizer import TokenizerBase

CONVERTER_VERSION = 1
MARKER = "laclip_export.json"
MAX_FILE_BYTES = 4 * 10**9  # per safetensors file, as Hugging Face's own shards are sized
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
Log = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class HFExport:
    path: Path
    reused: bool  # True: the folder was already there, converted from the same source

    @property
    def line(self) -> str:
        """The one line a CLI prints."""
        return (f"reusing converted weights in {self.path}" if self.reused
                else f"converted the Meta checkpoint to a Hugging Face folder in {self.path}")


def export_hf(ckpt: Union[str, Checkpoint], out_dir: Union[str, Path], tokenizer_path: Optional[str] = None,
              max_position_embeddings: Optional[int] = None, max_file_bytes: int = MAX_FILE_BYTES,
              log: Log = None) -> HFExport:
    """Convert the Meta folder `ckpt` (a path or open_checkpoint's result) into `out_dir`, or reuse
    out_dir if an earlier call converted the same source there. tokenizer_path: default the one the
    folder comes with (find_tokenizer); it is copied in and gives BOS/EOS. max_position_embeddings:
    default the generation's context (LLaMA-1 2048, 2 4096, 3 8192, 3.1 131072), which params.json
    does not state. log: gets a line when waiting for another process or removing a leftover."""
    ckpt = open_checkpoint(str(ckpt)) if isinstance(ckpt, (str, Path)) else ckpt
    if not isinstance(ckpt, MetaCheckpoint):
        raise CheckpointError(f"{ckpt.path} is already a Hugging Face folder (config.json): nothing to convert")
    found = tokenizer_path or find_tokenizer(str(ckpt.path))
    if found is None:
        raise CheckpointError(f"{ckpt.path} has no tokenizer.model (nor its parent): give the tokenizer's path")
    tok_file = Path(found)
    if not tok_file.is_file():
        raise CheckpointError(f"no tokenizer at {tok_file}")
    max_pos = max_position_embeddings or context_length(ckpt.params)
    identity = source_identity(ckpt, tok_file, max_pos)
    out = Path(out_dir)
    if _reusable(out, identity, ckpt.path):
        return HFExport(out, True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out, log):
        if _reusable(out, identity, ckpt.path):  # another process finished it while we waited
            return HFExport(out, True)
        _write_atomically(ckpt, tok_file, identity, out, max_file_bytes, log)
    return HFExport(out, False)


def context_length(params: dict) -> int:
    """The context each generation was trained with, told apart by what params.json holds."""
    if params.get("use_scaled_rope"):
        return 131072
    if float(params.get("rope_theta", 10000.0)) >= 500000.0:
        return 8192
    return 4096 if float(params.get("norm_eps", 1e-6)) >= 1e-5 else 2048  # LLaMA-2 changed eps to 1e-5


def source_identity(ckpt: MetaCheckpoint, tok_file: Path, max_pos: int) -> dict:
    """What the converted folder was made from, cheap to recompute: the shards by name, size and
    mtime (hashing tens of GB on every run would cost minutes), the small files by content."""
    shards = [{"name": p.name, "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for p in ckpt.weight_files]
    return {"converter_version": CONVERTER_VERSION,
            "params_sha256": hashlib.sha256(ckpt.config_file.read_bytes()).hexdigest(),
            "shards": shards, "tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
            "max_position_embeddings": max_pos}


def _reusable(out: Path, identity: dict, source: Path) -> bool:
    if not out.exists():
        return False
    marker = out / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{out} exists and was not written by this converter (no {MARKER}); it is never "
                              f"overwritten: give another folder for the converted weights of {source}")
    try:
        recorded = json.loads(marker.read_text()).get("identity")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{marker} is not a valid conversion record: {e}; remove {out}") from e
    if recorded != identity:
        raise CheckpointError(f"{out} holds weights converted from another checkpoint or converter version than "
                              f"{source} ({marker} differs): remove {out} or give another folder")
    return True


@contextmanager
def _locked(out: Path, log: Log) -> Iterator[None]:
    """An exclusive flock on .NAME.lock beside out. The lock file stays: deleting it would let a
    third process lock a new file while the second still holds the old one."""
    path = out.parent / f".{out.name}.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting for another process converting into {out} (it holds {path})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomically(ckpt: MetaCheckpoint, tok_file: Path, identity: dict, out: Path, max_file_bytes: int,
                      log: Log) -> None:
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():  # only ever made under the lock: left by a conversion that was killed
        if log:
            log(f"removing {tmp}, left by an interrupted conversion")
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_folder(ckpt, tok_file, identity, tmp, max_file_bytes)
        _fsync(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)


def write_folder(ckpt: MetaCheckpoint, tok_file: Path, identity: dict, dest: Path, max_file_bytes: int) -> None:
    """The Hugging Face folder's files in dest, the marker last."""
    tokenizer = load_tokenizer(str(tok_file), str(ckpt.path))
    args, from_tokenizer = model_args(ckpt, tokenizer)
    with torch.device("meta"):
        model = Transformer(args)
    source = ckpt.open_weights(args)
    check_shapes(model, ckpt, source.shapes, tokenizer, from_tokenizer)  # refuse before writing anything
    dtype = ckpt.stored_dtype()
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"{ckpt.weight_files[0]} holds {dtype} weights; float16, bfloat16 or float32 expected")
    groups = plan_files(source.shapes, dtype.itemsize, max_file_bytes)
    weight_map = {}
    for i, keys in enumerate(groups):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {hf_name(k): _hf_tensor(source, k, args.head_dim) for k in keys}
        _save(tensors, dest / name)
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors  # one file's tensors in memory at a time
    if len(groups) > 1:
        total = sum(s.numel() for s in source.shapes.values()) * dtype.itemsize
        _write_json(dest / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = hf_config(args, dtype, tokenizer, identity["max_position_embeddings"])
    _write_json(dest / "config.json", config)
    _write_json(dest / "generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id")})
    shutil.copyfile(tok_file, dest / tok_file.name)
    _fsync(dest / tok_file.name)
    _write_json(dest / MARKER, {"identity": identity, "source": str(ckpt.path.resolve()),
                                "tokenizer": str(tok_file.resolve())})


def plan_files(shapes: dict[str, torch.Size], itemsize: int, max_bytes: int) -> list[list[str]]:
    """Tensors in Hugging Face's order (embedding, layers in order, norm, output) cut into files
    of at most max_bytes each (a larger single tensor gets a file of its own)."""
    def order(key: str) -> tuple:
        parts = key.split(".")
        if parts[0] == "layers":
            return (1, int(parts[1]), key)
        return ({"tok_embeddings": 0, "norm": 2, "output": 3}.get(parts[0], 4), 0, key)
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(shapes, key=order):
        n = shapes[key].numel() * itemsize
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return groups


def _hf_tensor(source, key: str, head_dim: int) -> torch.Tensor:
    t = source.read(key, None, 0, 0, lambda x: x)  # merged over the shards, as stored
    if key.endswith(("attention.wq.weight", "attention.wk.weight")):
        t = rotate_half_heads(t, head_dim)
    return t.contiguous()


def hf_config(args: ModelArgs, dtype: torch.dtype, tokenizer: TokenizerBase, max_pos: int) -> dict:
    """config.json in transformers 4's layout (rope_theta and rope_scaling at the top level),
    which transformers 5 and vLLM read too."""
    eos = [tokenizer.eos_id] + sorted(tokenizer.eos_ids - {tokenizer.eos_id})
    scaling = args.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings},
        "vocab_size": args.vocab_size, "max_position_embeddings": max_pos,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "tie_word_embeddings": False, "torch_dtype": _DTYPE_NAMES[dtype], "use_cache": True,
    }


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
