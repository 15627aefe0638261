"""Load a checkpoint for evaluation: this project's presets (LaCLIP's CC3M/CC12M/RedCaps files and
what train.py writes) or open_clip models (LaCLIP's LAION-400M files). Shared by both ImageNet
scripts and eval_benchmark.py; errors name the caller's flags.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchvision import transforms

import models
from models import open_clip_arch
from models.clip_tokenizer import SimpleTokenizer
from models.open_clip_arch import OPEN_CLIP, PRESET


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


def load_open_clip(name: str, ckpt_path: str, quickgelu: bool, device: torch.device, flag: str = "--ckpt-path",
                   preset_hint: str = "use eval_zeroshot_imagenet.py", trust: bool = False):
    """open_clip model + its pieces (OpenClipParts), with the checkpoint loaded strictly."""
    open_clip_arch.resolve_name(name)
    note = open_clip_arch.quickgelu_note(name, quickgelu)
    if note:
        print(note)
    state = models.load_checkpoint_state(ckpt_path, flag, trust=trust)
    parts = open_clip_arch.create(name, quickgelu, logit_bias="logit_bias" in state)
    open_clip_arch.load_state(parts.model, state, name, ckpt_path, flag, lambda _state: preset_hint)
    parts.model.to(device).eval()
    return parts


def load_for_eval(name: str, ckpt_path: str, quickgelu: bool, device: torch.device,
                  flag: str = "--pretrained", trust: bool = False) -> EvalModel:
    """A preset name loads this project's CLIP, anything else an open_clip model."""
    if name in models.PRESETS:
        if quickgelu:
            raise ValueError(f"--quickgelu is for open_clip models; {name} always uses QuickGELU")
        model = load_preset(name, ckpt_path, device, flag, trust)
        return EvalModel(model, SimpleTokenizer(), eval_transform(), name, ckpt_path, PRESET)
    parts = load_open_clip(name, ckpt_path, quickgelu, device, flag,
                           preset_hint=f"pass one of {', '.join(models.PRESETS)} as --model", trust=trust)
    return EvalModel(parts.model, parts.tokenizer, parts.eval_transform, name, ckpt_path, OPEN_CLIP, quickgelu)
