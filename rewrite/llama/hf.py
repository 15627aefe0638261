"""Hugging Face checkpoint folders of LLaMA-1/2/3 (`LlamaForCausalLM`): config.json and
model.safetensors, model-0000k-of-0000n.safetensors with model.safetensors.index.json,
or pytorch_model.bin / pytorch_model-0000k-of-0000n.bin with pytorch_model.bin.index.json.

config.json is read as transformers 4 writes it (rope_theta and rope_scaling at the top
level, torch_dtype) and as transformers 5 does (rope_parameters holding rope_theta and
the scaling, dtype). Tensors are renamed to Meta's names (the model's), and the rows of
q_proj / k_proj are put back in Meta's interleaved rotary layout once, on load (Hugging
Face's conversion permuted them for its rotate-half RoPE). Each rank reads only its
slices: safetensors through `safe_open(...).get_slice`, .bin files memory-mapped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import CheckpointError
from .meta import load_shard
from .model import ModelArgs
from .rope import RopeScaling, interleave_heads

Place = Callable[[torch.Tensor], torch.Tensor]
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight"}
_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_HF_LAYER_NAMES = {meta: hf for hf, meta in _LAYER_NAMES.items()}
_HF_NAMES = {meta: hf for hf, meta in _NAMES.items()}
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def meta_name(hf_key: str) -> Optional[str]:
    """The model's name of a tensor; None for buffers old conversions saved (rotary inv_freq);
    an unknown name is kept, so the key check reports it."""
    if hf_key.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER.fullmatch(hf_key)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return _NAMES.get(hf_key, hf_key)


def hf_name(key: str) -> str:
    """The inverse of meta_name: a model (Meta) tensor name under Hugging Face's LlamaForCausalLM
    names; raises CheckpointError for a name LLaMA does not have."""
    m = _META_LAYER.fullmatch(key)
    name = f"model.layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}" if m and m.group(2) in _HF_LAYER_NAMES \
        else _HF_NAMES.get(key)
    if name is None:
        raise CheckpointError(f"tensor {key} has no Hugging Face LLaMA name")
    return name


def read_config(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path} describes a {config.get('model_type')!r} model, not LLaMA (model_type llama)")
    return config


def _rope(config: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, LLaMA-3.1 scaling) from either transformers layout."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise CheckpointError(f"{where}: RoPE type {kind!r} is not supported (only default and llama3)")
    try:
        return float(theta), RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                         float(scaling["high_freq_factor"]),
                                         int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise CheckpointError(f"{where}: llama3 RoPE scaling lacks {e}") from None


def args_from_config(config: dict, where: str) -> ModelArgs:
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, ok) != ok:
            raise CheckpointError(f"{where}: {key} {config[key]!r} is not LLaMA's ({ok!r})")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or dim // heads
        if head_dim * heads != dim:
            raise CheckpointError(f"{where}: head_dim {head_dim} x {heads} heads is not hidden_size {dim}")
        theta, scaling = _rope(config, where)
        return ModelArgs(dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=heads,
                         n_kv_heads=int(config.get("num_key_value_heads") or heads),
                         vocab_size=int(config["vocab_size"]), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                         rope_theta=theta, rope_scaling=scaling, hidden_dim=int(config["intermediate_size"]))
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e}") from None


def weight_files(ckpt_dir: Path) -> tuple[list[Path], dict[str, Path]]:
    """(files, tensor name -> file): from an index if there is one, else the single file.
    safetensors are preferred where a folder has both."""
    for index in WEIGHT_INDEXES:
        path = ckpt_dir / index
        if path.is_file():
            try:
                mapping = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is not a weight index (no weight_map): {e}") from e
            files = {name: ckpt_dir / f for name, f in mapping.items()}
            missing = sorted({p.name for p in files.values() if not p.is_file()})
            if missing:
                raise CheckpointError(f"{path} lists files that {ckpt_dir} lacks: {missing}")
            return sorted(set(files.values())), files
    for name in WEIGHT_FILES:
        if (ckpt_dir / name).is_file():
            return [ckpt_dir / name], {}
    raise CheckpointError(f"{ckpt_dir} has config.json but no weights (model.safetensors, model-*.safetensors "
                          "with model.safetensors.index.json, or pytorch_model*.bin)")


class HFWeights:
    """The tensors of a Hugging Face folder under the model's names, read as (slices of) full
    tensors; q/k rows come out in Meta's rotary layout."""

    def __init__(self, ckpt: "HFCheckpoint", args: ModelArgs):
        self.head_dim = args.head_dim
        self._handles: dict[Path, object] = {}
        self.sources: dict[str, tuple[Path, str]] = {}
        self.shapes: dict[str, torch.Size] = {}
        for path in ckpt.weight_files:
            for name, shape in self._tensor_shapes(path).items():
                key = meta_name(name)
                if key is not None and (not ckpt.weight_map or ckpt.weight_map.get(name) == path):
                    self.sources[key], self.shapes[key] = (path, name), shape
        if "output.weight" not in self.sources and ckpt.config.get("tie_word_embeddings") \
                and "tok_embeddings.weight" in self.sources:  # LLaMA-3.2 1B/3B: the output reuses the embedding
            self.sources["output.weight"] = self.sources["tok_embeddings.weight"]
            self.shapes["output.weight"] = self.shapes["tok_embeddings.weight"]

    def _handle(self, path: Path):
        if path not in self._handles:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                try:
                    self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
                except Exception as err:
                    raise CheckpointError(f"cannot read {path} (not a safetensors file, or truncated): {err}") \
                        from err
            else:
                self._handles[path] = load_shard(path)
        return self._handles[path]

    def _tensor_shapes(self, path: Path) -> dict[str, torch.Size]:
        h = self._handle(path)
        if path.suffix == ".safetensors":
            return {name: torch.Size(h.get_slice(name).get_shape()) for name in h.keys()}
        return {name: t.shape for name, t in h.items() if isinstance(t, torch.Tensor)}

    def read(self, key: str, dim: Optional[int], start: int, stop: int, place: Place) -> torch.Tensor:
        """Full tensor `key` (dim None) or its slice [start, stop) along dim (0 or 1), placed."""
        path, name = self.sources[key]
        h = self._handle(path)
        if path.suffix == ".safetensors":
            part = h.get_slice(name)
            t = part[:] if dim is None else part[start:stop] if dim == 0 else part[:, start:stop]
        else:
            t = h[name] if dim is None else h[name].narrow(dim, start, stop - start)
        t = place(t)
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):  # whole heads: rows split by head
            t = interleave_heads(t, self.head_dim)
        return t


class HFCheckpoint:
    kind = "hf"
    mp_shards = 1  # no model-parallel split on disk: any model-parallel size cuts the full tensors

    def __init__(self, ckpt_dir: str):
        self.path = Path(ckpt_dir)
        self.config = read_config(ckpt_dir)
        self.config_file = self.path / "config.json"
        self.weight_files, self.weight_map = weight_files(self.path)

    def model_args(self) -> ModelArgs:
        return args_from_config(self.config, str(self.config_file))

    def check_mp(self, mp_size: int) -> None:
        pass  # the model checks that its heads divide

    def open_weights(self, args: ModelArgs) -> HFWeights:
        return HFWeights(self, args)

    def stored_dtype(self) -> Optional[torch.dtype]:
        return _DTYPES.get(self.config.get("dtype") or self.config.get("torch_dtype"))

    def where(self, key: str) -> str:
        return f"{key} (Meta's name) in {self.path}"
