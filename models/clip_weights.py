"""Reading released LaCLIP checkpoints and fitting them to a preset, with errors a user can act on."""
from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping

import torch
from torch import nn
from torch.torch_version import TorchVersion

from .clip import PRESETS


def _torch_load(path: str, weights_only: bool, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except RuntimeError as err:
        # mmap needs the zip format (torch >= 1.6); a file in the older format is read whole.
        if mmap and "mmap" in str(err):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
        raise


class MidEpochCheckpoint:
    """Marks a train.py checkpoint saved inside an epoch (--save-every-steps). open_clip_train reads a
    checkpoint's `epoch` as the epoch to start and would redo the steps already done in it; its
    torch.load (weights_only) refuses this class by name, so such a file stops it instead. Holds
    nothing; this project's readers allow it (SAFE_GLOBALS)."""


# What released files pickle besides tensors and plain values: LaCLIP's and SLIP's training
# scripts save their argparse.Namespace as 'args' (open_clip's save only plain values);
# torch.__version__ (a str subclass) is a common extra. None of them can run code when loaded.
SAFE_GLOBALS = (argparse.Namespace, TorchVersion, MidEpochCheckpoint)
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # a zip (torch >= 1.6), a pickle (the older format)
TRUST_FLAG = "--trust-checkpoint"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def refused_globals(path: str, err: Exception) -> list[str]:
    """The pickled globals a safe load refused: from the file's pickle (zip format), else
    from torch's message (the older format)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError):
        found = re.findall(r"GLOBAL (\S+)", str(err))
    return sorted({g for g in found if g not in allowed})


def read_checkpoint(path: str, flag: str = "--ckpt-path", mmap: bool = False, trust: bool = False) -> dict:
    """torch.load a checkpoint onto the CPU; errors name the flag and the file.

    Only tensors, plain values and SAFE_GLOBALS are unpickled (weights_only), unless the
    user passed --trust-checkpoint (trust=True): a pickle can call any function while it
    loads, and a checkpoint is often a download. ``mmap=True`` maps the file instead of
    reading it: a training checkpoint is about two thirds optimizer state, which a
    caller that only wants the weights then never reads.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: checkpoint file {path!r} does not exist")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{flag}: checkpoint file {path!r} is not readable")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = _torch_load(path, weights_only=not trust, mmap=mmap)
    except Exception as err:
        what = not_a_torch_file(path)
        if what:
            raise ValueError(f"{flag} {path!r} {what}") from None
        _explain(err, path, flag)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{flag}: {path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)


def not_a_torch_file(path: str) -> str | None:
    """Why the file is no torch.save output (empty, text, another format), from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(40)
    if not head:
        return "is an empty file (0 bytes), not a torch checkpoint"
    if head.startswith(TORCH_MAGIC):
        return None
    shown = head.decode("utf-8", errors="replace")[:24]
    return f"is not a torch checkpoint (it starts with {shown!r}, not a torch.save file's first bytes)"


def _explain(err: Exception, path: str, flag: str) -> None:
    """Raise the one-line error of a torch.load that failed on a torch file."""
    if isinstance(err, pickle.UnpicklingError):
        found = refused_globals(path, err)
        if not found and "weights only" not in str(err).lower():
            raise ValueError(f"{flag}: cannot read checkpoint {path!r}: {err}") from None
        raise ValueError(f"{flag}: {path!r} pickles objects other than tensors and plain values "
                         f"({', '.join(found) or 'see torch.load(weights_only=True)'}); unpickling them can run "
                         f"code, so they are refused. If you trust where the file came from, pass {TRUST_FLAG}") from None
    raise ValueError(f"{flag}: cannot read checkpoint {path!r} (truncated by an interrupted download or "
                     f"copy?): {' '.join(str(err).split()) or type(err).__name__}") from err


def strip_wrappers(key: str) -> str:
    """'module._orig_mod.visual...' -> 'visual...': any run of wrapper prefixes, in any order."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def extract_state_dict(ckpt: Mapping, path: str = "", flag: str = "--ckpt-path") -> dict[str, torch.Tensor]:
    """``ckpt['state_dict']`` or the bare dict, with wrapper prefixes (DDP ``module.``,
    torch.compile ``_orig_mod.``, repeated) stripped."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{flag}: {path!r} has no state dict of tensors (keys: {sorted(ckpt)[:8]})")
    return {strip_wrappers(k): v for k, v in state.items()}


def load_checkpoint_state(path: str, flag: str = "--ckpt-path", trust: bool = False) -> dict[str, torch.Tensor]:
    """The weights only, memory-mapped: ``load_state_dict`` copies them (casting an fp16 file
    to the model's dtype), so the optimizer state in the same file is never read."""
    return extract_state_dict(read_checkpoint(path, flag, mmap=True, trust=trust), path, flag)


def preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a preset, built on the meta device so even ViT-L costs no memory."""
    with torch.device("meta"):
        model = PRESETS[name]()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def closest_preset(state: Mapping[str, torch.Tensor]) -> str | None:
    """The preset whose keys and shapes match the most entries of ``state`` (None if none fits well)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    best, best_score = None, 0.0
    for name in PRESETS:
        ref = preset_shapes(name)
        same = sum(1 for k, s in shapes.items() if ref.get(k) == s)
        score = same / max(len(ref), len(shapes))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def mismatch_lines(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a model's keys/shapes and a state dict (empty if it fits)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(state[k].shape) != own[k])
    lines = []
    if missing:
        lines.append(f"  missing keys: {_describe(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_describe(unexpected)}")
    if wrong_shape:
        lines.append("  wrong shapes: " + _describe(
            [f"{k} {tuple(state[k].shape)} vs {own[k]}" for k in wrong_shape]))
    return lines


def common_prefix(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str | None:
    """A first name component that every key of the file has and no key of the model has."""
    firsts = {k.split(".", 1)[0] + "." for k in state if "." in k}
    if len(firsts) != 1 or len(state) == 0 or any("." not in k for k in state):
        return None
    (prefix,) = firsts
    return None if any(k.startswith(prefix) for k in own) else prefix


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], model_name: str, path: str,
              flag: str = "--ckpt-path") -> None:
    """Strict load; on mismatch say which keys are missing/unexpected and which preset the file fits."""
    lines = mismatch_lines(model, state)
    if lines:
        lines.insert(0, f"{flag}: checkpoint {path!r} does not fit --model {model_name}")
        guess = closest_preset(state)
        if guess and guess != model_name:
            lines.append(f"  it looks like a {guess} checkpoint: try --model {guess}")
        elif any(k.startswith(("visual.conv1", "visual.transformer.")) for k in state):
            lines.append("  it looks like an open_clip model: use eval_zeroshot_imagenet_laion.py")
        prefix = common_prefix(state, model.state_dict())
        if prefix:
            lines.append(f"  every key of the file starts with {prefix!r}, which the model's keys do not have")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)
