"""What differs between a LaCLIP preset and an open_clip model in training: the model, its tokenizer
and transforms, the weight-decay group order, the logit-scale clamp and the weight loader."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

import models
from models import open_clip_arch
from training.data import train_transform
from training.loss import LOGIT_SCALE_MAX, OPEN_CLIP_LOGIT_SCALE_MAX


@dataclass(frozen=True)
class Architecture:
    name: str  # --model as given (a preset, an open_clip name or a config file)
    open_clip: bool
    quickgelu: bool
    tokenizer: Callable
    train_transform: Callable
    eval_transform: Callable | None  # None: the presets' (evaluation.models.eval_transform)
    logit_scale_max: float

    def build(self, grad_checkpointing: bool = False) -> nn.Module:
        """Random weights on the CPU, from the global RNG (seed it first)."""
        if not self.open_clip:
            return models.get_model(self.name)
        model = open_clip_arch.create(self.name, self.quickgelu).model
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def load(self, model: nn.Module, state: Mapping, path: str, flag: str) -> None:
        if self.open_clip:
            open_clip_arch.load_state(model, state, self.name, path, flag)
            return
        try:
            models.load_into(model, state, self.name, path, flag)
        except ValueError as err:
            fits = open_clip_arch.fitting_vit(state)
            raise ValueError(f"{err}\n  it looks like an open_clip {fits} checkpoint: try --model {fits}"
                             if fits else str(err)) from None


def architecture(name: str, open_clip: bool, quickgelu: bool, preset_tokenizer: Callable) -> Architecture:
    """preset_tokenizer: the presets' tokenizer (train.py passes the root module's). The data pieces
    come without building the model (open_clip's on the meta device): a bad data flag fails in
    seconds, before a large model is built."""
    if not open_clip:
        return Architecture(name, False, False, preset_tokenizer, train_transform(), None, LOGIT_SCALE_MAX)
    parts = open_clip_arch.create(name, quickgelu, device="meta")
    return Architecture(name, True, quickgelu, parts.tokenizer, parts.train_transform, parts.eval_transform,
                        OPEN_CLIP_LOGIT_SCALE_MAX)
