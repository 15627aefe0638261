"""CLIP models of LaCLIP and the helpers that load their checkpoints."""
from .clip_weights import (closest_preset, extract_state_dict, load_checkpoint_state, load_into,
                           mismatch_lines, preset_shapes, read_checkpoint)
from .clip import CLIP, CLIP_TINY, CLIP_VITB16, CLIP_VITL16, CLIP_VITS16, PRESETS, check_preset, get_model

# Evaluation and training normalisation of the released CC3M/CC12M/RedCaps models.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "CLIP", "CLIP_TINY", "CLIP_VITS16", "CLIP_VITB16", "CLIP_VITL16", "PRESETS", "check_preset", "get_model",
    "read_checkpoint", "extract_state_dict", "load_checkpoint_state", "load_into", "preset_shapes",
    "closest_preset", "mismatch_lines", "IMAGENET_MEAN", "IMAGENET_STD",
]
