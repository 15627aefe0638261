"""open_clip architectures (LaCLIP's LAION-400M rows: ViT-B-32, ViT-B-16, ViT-L-14 with QuickGELU), built
by open_clip itself: its model factory, tokenizer, mean/std and transforms. Nothing here is a copy.

A model is named as open_clip names it (`ViT-B-32`, `RN50`, ...) or given as a config JSON file in
open_clip's own format (`{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}`); the file is
checked field by field here, because open_clip's registry skips a file it cannot use without a word.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")
# Keys open_clip's create_model reads from a config besides the CLIP constructor's arguments.
FACTORY_KEYS = ("custom_text",)


def is_config_file(name: str) -> bool:
    return name.endswith(".json")


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_config(cfg: object, path: str, flag: str = "--model") -> None:
    """Refuse what open_clip would skip or fail on, naming the file and the field."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    if not isinstance(cfg, dict):
        raise ValueError(f"{flag} {path!r}: a model config is a JSON object, not a {type(cfg).__name__}")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{flag} {path!r}: field {missing[0]!r} is missing (an open_clip model config has "
                         f"{', '.join(REQUIRED)})")
    if "multimodal_cfg" in cfg:
        raise ValueError(f"{flag} {path!r}: field 'multimodal_cfg' makes a CoCa model, which train.py's "
                         "contrastive loss does not train")
    top = set(inspect.signature(CLIP.__init__).parameters) - {"self", "cast_dtype", "output_dict"}
    for key in cfg:
        if key not in top | set(FACTORY_KEYS):
            raise ValueError(f"{flag} {path!r}: field {key!r} is not an open_clip model setting "
                             f"({_closest(key, top)})")
    for section, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(cfg[section], dict):
            raise ValueError(f"{flag} {path!r}: field {section!r} must be a JSON object")
        fields = _field_names(cls)
        for key in cfg[section]:
            if key not in fields:
                raise ValueError(f"{flag} {path!r}: field '{section}.{key}' is not an open_clip "
                                 f"{cls.__name__} setting ({_closest(key, fields)})")


def _closest(name: str, names) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else "see open_clip/model.py"


def register_config(path: str, flag: str = "--model") -> str:
    """Check a config JSON and add it to open_clip's registry; returns the name it has there (the stem)."""
    import open_clip
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: model config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path!r}: not a JSON file: {err}") from None
    check_config(cfg, path, flag)
    name = os.path.splitext(os.path.basename(path))[0]
    known = open_clip.get_model_config(name)
    if known is not None and known != cfg:
        raise ValueError(f"{flag} {path!r}: open_clip already has a model {name!r} with another config; "
                         "rename the file")
    open_clip.add_model_config(path)
    return name


def resolve_name(name: str, flag: str = "--model", others: tuple[str, ...] = ()) -> str:
    """The open_clip registry name of `name` (a config file is registered first); an unknown name is
    refused with the closest open_clip names (and `others`, e.g. this project's presets)."""
    import open_clip
    if is_config_file(name):
        return register_config(name, flag)
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, list(names) + list(others), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (open_clip.list_models() lists {len(names)})"
        raise ValueError(f"{flag} {name!r} is neither an open_clip model nor a config JSON file{hint}")
    return name


class TokenRows:
    """open_clip's tokenizer with this project's convention: a str gives [context_length], a list
    gives [N, context_length] (open_clip gives [1, L] for a str)."""

    def __init__(self, tokenizer: Callable) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts):
        tokens = self.tokenizer(texts)
        return tokens[0] if isinstance(texts, str) else tokens


@dataclass
class OpenClipParts:
    """An open_clip model (random weights) with the pieces that must go with it."""
    model: torch.nn.Module
    name: str  # open_clip's registry name
    tokenizer: TokenRows
    train_transform: Callable  # RandomResizedCrop (open_clip's scale), mean/std of the config
    eval_transform: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]


def create(name: str, quickgelu: bool = False, flag: str = "--model", device: str = "cpu") -> OpenClipParts:
    """open_clip.create_model_and_transforms for a name or config file; dict outputs, float32.
    device "meta": the structure, transforms and tokenizer without memory (the data comes first)."""
    import open_clip
    registered = resolve_name(name, flag)
    with torch.device("meta") if device == "meta" else contextlib.nullcontext():
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            registered, pretrained=None, force_quick_gelu=quickgelu, output_dict=True, device=device)
    pre = model.visual.preprocess_cfg
    return OpenClipParts(model, registered, TokenRows(open_clip.get_tokenizer(registered)), train_tf, eval_tf,
                         tuple(pre["mean"]), tuple(pre["std"]))
