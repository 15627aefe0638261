"""Load a checkpoint for evaluation: this project's presets (LaCLIP's CC3M/CC12M/RedCaps files and
what train.py writes) or open_clip models (LaCLIP's LAION-400M files). Shared by both ImageNet
scripts and eval_benchmark.py; errors name the caller's flags.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

import models

PRESET, OPEN_CLIP = "preset", "open_clip"


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


def patch_size_hint(model: torch.nn.Module, state: dict) -> str | None:
    key = "visual.conv1.weight"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return None
    return (f"  the checkpoint's patch size is {state[key].shape[-1]}, the model's "
            f"{own.shape[-1]}: try --model ViT-B-{state[key].shape[-1]}")


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
    import open_clip
    check_open_clip_name(name)
    state = models.load_checkpoint_state(ckpt_path, flag, trust=trust)
    # A file trained with open_clip's --siglip carries logit_bias; build the model with one so
    # the file loads strictly (the value is the file's; open_clip itself fails on such a file).
    extra = {"init_logit_bias": 0.0} if "logit_bias" in state else {}
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, force_quick_gelu=quickgelu, **extra)
    state = fit_open_clip_state(model, state)
    lines = models.mismatch_lines(model, state)
    if lines:
        hint = patch_size_hint(model, state)
        if any(k.startswith("visual.blocks.") for k in state):
            hint = f"  it looks like a LaCLIP CC/RedCaps checkpoint: {preset_hint}"
        head = f"{flag}: checkpoint {ckpt_path!r} does not fit open_clip --model {name}"
        raise ValueError("\n".join([head] + lines + ([hint] if hint else [])))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), preprocess_val


def load_for_eval(name: str, ckpt_path: str, quickgelu: bool, device: torch.device,
                  flag: str = "--pretrained", trust: bool = False) -> EvalModel:
    """A preset name loads this project's CLIP, anything else an open_clip model."""
    if name in models.PRESETS:
        from tokenizer import SimpleTokenizer
        from zeroshot import eval_transform
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
