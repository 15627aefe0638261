"""open_clip architectures (LaCLIP's LAION-400M rows: ViT-B-32, ViT-B-16, ViT-L-14 with QuickGELU), built
by open_clip itself: its model factory, tokenizer and transforms. Nothing here is a copy. The one place
that tells a preset from an open_clip name (`kind`), creates an open_clip model (`create`) and loads
weights into one strictly (`load_state`), for training and evaluation alike.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .clip import PRESETS, check_preset
from .clip_weights import closest_preset, mismatch_lines

PRESET, OPEN_CLIP = "preset", "open_clip"

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


def resolve_name(name: str, flag: str = "--model") -> str:
    """The open_clip registry name of `name` (a config file is registered first); an unknown name is
    refused with the closest open_clip names and presets."""
    import open_clip
    if is_config_file(name):
        return register_config(name, flag)
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, list(names) + list(PRESETS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (open_clip.list_models() lists {len(names)})"
        raise ValueError(f"{flag} {name!r} is not an open_clip model nor a config JSON file{hint}")
    return name


def kind(name: str, flag: str = "--model") -> str:
    """PRESET or OPEN_CLIP for --model, checked before any file is read: a mistyped preset is told
    the presets, an unknown name the closest ones (a config file is registered with open_clip)."""
    if name in PRESETS:
        return PRESET
    if name.startswith("CLIP_"):
        check_preset(name)  # raises: the presets' names
    resolve_name(name, flag)
    return OPEN_CLIP


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


def create(name: str, quickgelu: bool = False, flag: str = "--model", device: str = "cpu",
           logit_bias: bool = False) -> OpenClipParts:
    """open_clip.create_model_and_transforms for a name or config file; dict outputs, float32.
    device "meta": the structure, transforms and tokenizer without memory (open_clip builds on the
    CPU and then moves the model, so it is built under torch.device("meta")). logit_bias: a file
    trained with open_clip's --siglip carries one; the model gets one so the file loads strictly."""
    import open_clip
    registered = resolve_name(name, flag)
    extra = {"init_logit_bias": 0.0} if logit_bias else {}
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            registered, pretrained=None, force_quick_gelu=quickgelu, output_dict=True, device=device, **extra)
    return OpenClipParts(model, registered, TokenRows(open_clip.get_tokenizer(registered)), train_tf, eval_tf)


VIT_SIZES = {768: "B", 1024: "L", 1280: "H"}  # open_clip's ViT image widths


def fitting_vit(state: Mapping) -> str | None:
    """The open_clip ViT name a state dict's patch embedding fits ([768, 3, 32, 32] -> ViT-B-32),
    if it is one of open_clip's."""
    import open_clip
    conv = state.get("visual.conv1.weight")
    if conv is None or conv.ndim != 4:
        return None
    name = f"ViT-{VIT_SIZES.get(conv.shape[0], '?')}-{conv.shape[-1]}"
    return name if name in open_clip.list_models() else None


def patch_size_hint(model: torch.nn.Module, state: Mapping) -> str | None:
    """The open_clip model a file's patch embedding fits, e.g. [1024, 3, 14, 14] -> ViT-L-14."""
    key = "visual.conv1.weight"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return None
    width, patch = state[key].shape[0], state[key].shape[-1]
    name = f"ViT-{VIT_SIZES.get(width, '?')}-{patch}"
    fits = fitting_vit(state) or f"a ViT with patch size {patch} and width {width}"
    quick = " --quickgelu" if name == "ViT-L-14" else ""
    return f"  the checkpoint's patch embedding {tuple(state[key].shape)} fits {fits}: try --model {name}{quick}"


def quickgelu_note(name: str, quickgelu: bool) -> str | None:
    """The released LaCLIP ViT-L/14 files were trained with QuickGELU; the weights cannot tell,
    and with GELU they load fine and score lower. Said, not enforced: other L/14 files exist."""
    if "L-14" in name and not quickgelu and "quickgelu" not in name:
        return ("note: LaCLIP's released ViT-L/14 checkpoints were trained with QuickGELU; for them pass "
                "--quickgelu (or --model ViT-L-14-quickgelu)")
    return None


def fit_state(model: torch.nn.Module, state: Mapping) -> dict:
    """The fixes open_clip's own ``load_checkpoint`` applies to files of its training code.

    A scalar stored with another shape (``[]`` vs ``[1]``) is reshaped; a model with a
    ``logit_bias`` (SigLIP-style config) gets 0 when the file has none, as open_clip does. A
    bias is added to every class's logit alike, so it never changes zero-shot predictions.
    """
    from open_clip.model import convert_to_custom_text_state_dict
    state = dict(state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # pre-2.0 text keys, custom-text model
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and state[key].shape != own.shape \
                and state[key].numel() == own.numel():
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by transformers >= 4.31
    if position_ids in state and position_ids not in model.state_dict():
        del state[position_ids]
    return state


def load_state(model: torch.nn.Module, state: Mapping, name: str, path: str, flag: str,
               preset_hint: Callable[[dict], str] = lambda fitted: f"try --model {closest_preset(fitted)}") -> None:
    """Strict load of an open_clip state dict; a mismatch names what the file fits. ``preset_hint(state)``
    says what to do with a LaCLIP CC/RedCaps file; it is called only on that error path."""
    state = fit_state(model, state)
    lines = mismatch_lines(model, state)
    if lines:
        hint = patch_size_hint(model, state)
        if any(k.startswith("visual.blocks.") for k in state):
            hint = f"  it looks like a LaCLIP CC/RedCaps checkpoint: {preset_hint(state)}"
        head = f"{flag}: checkpoint {path!r} does not fit open_clip --model {name}"
        raise ValueError("\n".join([head] + lines + ([hint] if hint else [])))
    model.load_state_dict(state, strict=True)
