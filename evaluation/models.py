"""Load a checkpoint for evaluation: this project's presets (LaCLIP's CC3M/CC12M/RedCaps files and
what train.py writes) or open_clip models (LaCLIP's LAION-400M files). Shared by both ImageNet
scripts and eval_benchmark.py; errors name the caller's flags.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision import transforms

import models
from models.clip_tokenizer import SimpleTokenizer

PRESET, OPEN_CLIP = "preset", "open_clip"


def eval_transform(image_size: int = 224) -> transforms.Compose:
    """The presets' evaluation preprocessing: resize the shorter side (bilinear), centre crop,
    ToTensor, ImageNet mean/std (RGB conversion is the loader's)."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(models.IMAGENET_MEAN, models.IMAGENET_STD),
    ])


@dataclass
class EvalModel:
    """A model ready to evaluate, with what identifies its features (the feature cache key)."""
    model: torch.nn.Module
    tokenizer: Callable
    transform: Callable
    name: str
    checkpoint: str | None  # None: weights in memory (train.py), so nothing is cached on disk
    kind: str  # PRESET or OPEN_CLIP
    quickgelu: bool = False

    def identity(self) -> dict:
        """Model name and checkpoint file (path, size, modification time): replacing or touching
        the file gives new features, reading it again does not."""
        if self.checkpoint is None:  # weights in memory: valid for this object's lifetime only
            return {"model": self.name, "kind": self.kind, "in_memory": id(self.model)}
        st = os.stat(self.checkpoint)
        return {"model": self.name, "kind": self.kind, "quickgelu": self.quickgelu,
                "checkpoint": os.path.abspath(self.checkpoint), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_preset(name: str, ckpt_path: str, device: torch.device, flag: str = "--ckpt-path",
                trust: bool = False) -> torch.nn.Module:
    """trust: the user's --trust-checkpoint, allowing a file that pickles more than weights."""
    models.check_preset(name)
    state = models.load_checkpoint_state(ckpt_path, flag, trust=trust)  # checks the file before building the model
    model = models.get_model(name, rand_embed=False)
    models.load_into(model, state, name, ckpt_path, flag)
    return model.to(device).eval()


def check_open_clip_name(name: str, flag: str = "--model") -> None:
    import open_clip
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{flag} {name!r} is not an open_clip model{hint}")


VIT_SIZES = {768: "B", 1024: "L", 1280: "H"}  # open_clip's ViT image widths


def quickgelu_note(name: str, quickgelu: bool) -> str | None:
    """The released LaCLIP ViT-L/14 files were trained with QuickGELU; the weights cannot tell,
    and with GELU they load fine and score lower. Said, not enforced: other L/14 files exist."""
    if "L-14" in name and not quickgelu and "quickgelu" not in name:
        return ("note: LaCLIP's released ViT-L/14 checkpoints were trained with QuickGELU; for them pass "
                "--quickgelu (or --model ViT-L-14-quickgelu)")
    return None


def patch_size_hint(model: torch.nn.Module, state: dict) -> str | None:
    """The open_clip model a file's patch embedding fits, e.g. [1024, 3, 14, 14] -> ViT-L-14."""
    import open_clip
    key = "visual.conv1.weight"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return None
    width, patch = state[key].shape[0], state[key].shape[-1]
    name = f"ViT-{VIT_SIZES.get(width, '?')}-{patch}"
    fits = name if name in open_clip.list_models() else f"a ViT with patch size {patch} and width {width}"
    quick = " --quickgelu" if name == "ViT-L-14" else ""
    return f"  the checkpoint's patch embedding {tuple(state[key].shape)} fits {fits}: try --model {name}{quick}"


def create_open_clip(name: str, quickgelu: bool, logit_bias: bool = False, device: str | torch.device = "cpu"):
    """(model, validation transform) of an open_clip architecture, random weights. Device "meta"
    builds the structure without memory (the tests check ViT-L-14's keys that way): open_clip
    builds on the CPU and then moves the model, so it is built under torch.device("meta")."""
    import open_clip
    # A file trained with open_clip's --siglip carries logit_bias; build the model with one so
    # the file loads strictly (the value is the file's; open_clip itself fails on such a file).
    extra = {"init_logit_bias": 0.0} if logit_bias else {}
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        model, _, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, force_quick_gelu=quickgelu, device=device, **extra)
    return model, preprocess_val


def fit_open_clip_state(model: torch.nn.Module, state: dict) -> dict:
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


def load_open_clip(name: str, ckpt_path: str, quickgelu: bool, device: torch.device, flag: str = "--ckpt-path",
                   preset_hint: str = "use eval_zeroshot_imagenet.py", trust: bool = False):
    """open_clip model + its validation transform, with the checkpoint loaded strictly."""
    check_open_clip_name(name)
    note = quickgelu_note(name, quickgelu)
    if note:
        print(note)
    state = models.load_checkpoint_state(ckpt_path, flag, trust=trust)
    model, preprocess_val = create_open_clip(name, quickgelu, logit_bias="logit_bias" in state)
    load_open_clip_state(model, state, name, ckpt_path, flag, lambda _state: preset_hint)
    return model.to(device).eval(), preprocess_val


def load_open_clip_state(model: torch.nn.Module, state: dict, name: str, path: str, flag: str,
                         preset_hint: Callable[[dict], str]) -> None:
    """Strict load of an open_clip state dict; a mismatch names what the file fits. ``preset_hint(state)``
    says what to do with a LaCLIP CC/RedCaps file; it is called only on that error path."""
    state = fit_open_clip_state(model, dict(state))
    lines = models.mismatch_lines(model, state)
    if lines:
        hint = patch_size_hint(model, state)
        if any(k.startswith("visual.blocks.") for k in state):
            hint = f"  it looks like a LaCLIP CC/RedCaps checkpoint: {preset_hint(state)}"
        head = f"{flag}: checkpoint {path!r} does not fit open_clip --model {name}"
        raise ValueError("\n".join([head] + lines + ([hint] if hint else [])))
    model.load_state_dict(state, strict=True)


def load_for_eval(name: str, ckpt_path: str, quickgelu: bool, device: torch.device,
                  flag: str = "--pretrained", trust: bool = False) -> EvalModel:
    """A preset name loads this project's CLIP, anything else an open_clip model."""
    if name in models.PRESETS:
        if quickgelu:
            raise ValueError(f"--quickgelu is for open_clip models; {name} always uses QuickGELU")
        model = load_preset(name, ckpt_path, device, flag, trust)
        return EvalModel(model, SimpleTokenizer(), eval_transform(), name, ckpt_path, PRESET)
    import open_clip
    model, transform = load_open_clip(name, ckpt_path, quickgelu, device, flag,
                                      preset_hint=f"pass one of {', '.join(models.PRESETS)} as --model", trust=trust)
    return EvalModel(model, open_clip.get_tokenizer(name), transform, name, ckpt_path, OPEN_CLIP, quickgelu)


def check_model_name(name: str) -> str:
    """PRESET or OPEN_CLIP for --model, before any file is read."""
    if name in models.PRESETS:
        return PRESET
    if name.startswith("CLIP_"):
        models.check_preset(name)  # a mistyped preset: say which presets exist
    check_open_clip_name(name)
    return OPEN_CLIP
