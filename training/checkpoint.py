"""Training checkpoints: atomic writes in the released format, and resuming.

`<output-dir>/checkpoint.pt` holds `epoch` (epochs completed), `state_dict` (keys with
the DDP `module.` prefix, as in the released LaCLIP files), `optimizer`, `scaler`,
`best_acc1` (zero-shot top-1 in percent, None when no --imagenet-root) and `args` (a
plain dict, so the file also loads with torch.load(weights_only=True)).
`checkpoint_best.pt` is a copy (a hard link where possible) made when the epoch's zero-shot top-1 is the best so
far; without --imagenet-root every epoch counts as best, so it equals the latest.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import models

LATEST = "checkpoint.pt"
BEST = "checkpoint_best.pt"


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: a crash mid-write
    leaves the previous checkpoint intact instead of a truncated one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


atomic_write = _atomic_write  # also used by evaluation/features.py (to move to common/fileio.py)


def atomic_save(obj: Any, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def make_checkpoint(epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, best_acc1: float | None, args: Any) -> dict:
    """`model` is the bare CLIP (not DDP); its keys get the `module.` prefix here."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {
        "epoch": epoch,
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "best_acc1": best_acc1,
        "args": dict(vars(args)),
    }


def save_checkpoint(ckpt: dict, output_dir: str, is_best: bool) -> str:
    """Write checkpoint.pt (and checkpoint_best.pt if is_best); call on the main process only."""
    latest = os.path.join(output_dir, LATEST)
    atomic_save(ckpt, latest)
    if is_best:
        _atomic_write(os.path.join(output_dir, BEST), lambda tmp: _link_or_copy(latest, tmp))
    return latest


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows it: the same bytes without copying GBs of
    weights and optimizer state each epoch. Safe because checkpoint.pt is only ever
    replaced (os.replace), never written in place, so the best file keeps its contents."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def resume_path(resume: str | None, output_dir: str) -> str | None:
    """--resume PATH if given (it must exist), else <output-dir>/checkpoint.pt if present."""
    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f"--resume: checkpoint {resume!r} does not exist (a wrong path never "
                             f"starts a fresh run; leave --resume out to continue from "
                             f"{os.path.join(output_dir, LATEST)!r} when it exists)")
        return resume
    latest = os.path.join(output_dir, LATEST)
    return latest if os.path.isfile(latest) else None


def load_training_state(path: str, model: nn.Module, model_name: str,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        flag: str = "--resume") -> tuple[int, float | None]:
    """Restore model (strict), optimizer and scaler; returns (epochs completed, best_acc1).

    Also accepts a released checkpoint (args pickled as a Namespace) or a bare state
    dict: missing optimizer/scaler/epoch entries are left at their fresh values.
    """
    ckpt = models.read_checkpoint(path, flag)
    state = models.extract_state_dict(ckpt, path, flag)
    models.load_into(model, state, model_name, path, flag)
    if "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as err:
            raise ValueError(f"{flag}: optimizer state in {path!r} does not fit this model: {err}") from err
        check_optimizer_state(optimizer, path, flag)
    # A disabled scaler (CPU, bf16) saves {}; loading {} into an enabled one would fail,
    # and the fresh scale is the right start in that case anyway.
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    best = ckpt.get("best_acc1")
    # float(): another script may have stored a 0-d tensor, which json.dumps rejects.
    return int(ckpt.get("epoch", 0)), None if best is None else float(best)


def check_optimizer_state(optimizer: torch.optim.Optimizer, path: str, flag: str) -> None:
    """Optimizer state is matched to parameters by position, not name, and load_state_dict
    only checks group sizes: a file saved by a script that registers parameters in another
    order would load, then crash at the first step or silently mix moments. Compare shapes."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if name != "step" and torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(
                        f"{flag}: optimizer state in {path!r} does not match this model's parameter "
                        f"order ({name} of shape {tuple(value.shape)} for a parameter of shape "
                        f"{tuple(p.shape)}); it was saved by another training script. To start "
                        f"from its weights only, save {{'state_dict': ckpt['state_dict']}} to a new "
                        f"file and pass that to {flag}")
