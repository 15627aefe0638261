"""Training checkpoints: atomic writes in the released format, and resuming.

`<output-dir>/checkpoint.pt` holds `epoch` (epochs completed), `state_dict` (keys with
the DDP `module.` prefix, as in the released LaCLIP files), `optimizer`, `scaler`,
`best_acc1` (zero-shot top-1 in percent, None when no --imagenet-root), `args` (a
plain dict, so an epoch-end file also loads with torch.load(weights_only=True)) and `world_size`;
a mid-epoch one also its progress and a MidEpochCheckpoint marker (which open_clip_train's
weights-only load refuses: it would restart the epoch). Each file gets a checksum record
(training/checkpoint_sums.py), verified before a resume unpickles it.

A resume compares this run's flags with the checkpoint's `args`: a difference in what
decides the training trajectory (RESUME_MUST_MATCH) is refused unless --resume-override
is given; other differences (RESUME_FREE: where and how the run is watched) are listed.
`checkpoint_best.pt` is a copy (a hard link where possible) made when the epoch's zero-shot top-1 is the best so
far; without --imagenet-root every epoch counts as best, so it equals the latest.
"""
from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

import models
from training import checkpoint_sums
from training.output_dir import save_failed

LATEST = "checkpoint.pt"
BEST = "checkpoint_best.pt"
# Flags that decide what a run computes: an exact resume needs the checkpoint's values.
RESUME_MUST_MATCH = ("model", "train_data", "root", "aug_text", "augmented_caption_filelist", "dataset_type",
                     "train_num_samples", "dataset_resampled", "rewrite_data", "rewrite_json_keys", "rewrite_columns",
                     "multi_text", "aug_text_weights", "quickgelu", "warmup",
                     "warmup_epochs", "batch_size", "update_freq", "lr", "lr_start", "lr_end", "wd", "betas",
                     "eps", "seed", "disable_amp", "amp_dtype", "max_steps_per_epoch", "world_size")
# Flags that change where and how the run is watched, not the weights it computes.
RESUME_FREE = ("output_dir", "resume", "start_epoch", "imagenet_root", "workers", "print_freq",
               "eval_batch_size", "device", "dist_timeout", "trust_checkpoint", "resume_override",
               "eval_benchmark", "eval_tasks", "eval_every", "rewrite_mismatch_limit", "save_every_steps",
               "save_frequency", "delete_previous_checkpoint", "grad_checkpointing", "precision", "local_loss",
               "gather_with_grad")
LABELS = {"world_size": "processes", "augmented_caption_filelist": "--augmented_caption_filelist"}


def atomic_save(obj: Any, path: str) -> dict:
    """torch.save through a temp file (a crash mid-write leaves the previous checkpoint intact), with
    its checksum record PATH.sum (training/checkpoint_sums.py); returns the recorded version."""
    return checkpoint_sums.save(obj, path)


def make_checkpoint(epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, best_acc1: float | None, settings: Mapping,
                    world_size: int = 1) -> dict:
    """`model` is the bare CLIP (not DDP); its keys get the `module.` prefix here. settings: the flags
    (RunConfig.settings())."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {
        "epoch": epoch,
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "best_acc1": best_acc1,
        "args": dict(settings),
        "world_size": world_size,
    }


def save_checkpoint(ckpt: dict, output_dir: str, is_best: bool) -> str:
    """Write checkpoint.pt (and checkpoint_best.pt if is_best); call on the main process only.
    A failed write (full disk, read-only mount) is one line naming the folder and its free space."""
    latest = os.path.join(output_dir, LATEST)
    try:
        version = atomic_save(ckpt, latest)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        raise save_failed(output_dir, LATEST, err) from None
    if is_best:
        try:
            checkpoint_sums.link(latest, os.path.join(output_dir, BEST), version, _link_or_copy)
        except OSError as err:
            raise save_failed(output_dir, BEST, err) from None
    return latest


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows it: the same bytes without copying GBs of
    weights and optimizer state each epoch. Safe because checkpoint.pt is only ever
    replaced (os.replace), never written in place, so the best file keeps its contents."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def keep_epoch_file(latest: str, epoch: int, epochs: int, save_frequency: int, delete_previous: bool) -> None:
    """--save-frequency: epoch_E.pt beside checkpoint.pt (a hard link where possible, with its own
    checksum record), named as open_clip_train names them; --delete-previous-checkpoint removes epoch_{E-1}.pt afterwards."""
    if not save_frequency:
        return
    folder = os.path.dirname(latest)
    if epoch % save_frequency == 0 or epoch == epochs:
        version = checkpoint_sums.read_versions(latest)[0]  # save_checkpoint has just written it
        checkpoint_sums.link(latest, os.path.join(folder, f"epoch_{epoch}.pt"), version, _link_or_copy)
    previous = os.path.join(folder, f"epoch_{epoch - 1}.pt")
    if delete_previous and os.path.isfile(previous):
        os.remove(previous)
        if os.path.isfile(checkpoint_sums.sum_path(previous)):
            os.remove(checkpoint_sums.sum_path(previous))


def resume_path(resume: str | None, output_dir: str) -> str | None:
    """--resume PATH if given (it must exist), else <output-dir>/checkpoint.pt if present."""
    if resume:
        if os.path.isdir(resume):
            raise ValueError(f"--resume {resume!r} is a folder: did you mean "
                             f"{os.path.join(resume, LATEST)!r}? (--resume takes a checkpoint file)")
        if not os.path.isfile(resume):
            raise ValueError(f"--resume: checkpoint {resume!r} does not exist (a wrong path never "
                             f"starts a fresh run; leave --resume out to continue from "
                             f"{os.path.join(output_dir, LATEST)!r} when it exists)")
        return resume
    latest = os.path.join(output_dir, LATEST)
    return latest if os.path.isfile(latest) else None


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(_comparable(value))


def saved_settings(ckpt: Mapping) -> dict:
    """The checkpoint's flags (a dict here, a Namespace in released files; none in a bare state dict)."""
    saved = ckpt.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    saved = dict(saved) if isinstance(saved, Mapping) else {}
    if "world_size" in ckpt:
        saved["world_size"] = ckpt["world_size"]
    return saved


def resume_differences(saved: Mapping, current: Mapping) -> tuple[list[str], list[str]]:
    """(differences that break an exact resume, harmless ones), as '--flag OLD (now NEW)'.
    A flag the checkpoint does not record (another script's file) cannot be compared."""
    breaking, harmless = [], []
    for key in RESUME_MUST_MATCH + RESUME_FREE:
        if key in saved and key in current and _comparable(saved[key]) != _comparable(current[key]):
            label = LABELS.get(key, "--" + key.replace("_", "-"))
            text = f"{label} {_shown(saved[key])} (now {_shown(current[key])})"
            (breaking if key in RESUME_MUST_MATCH else harmless).append(text)
    return breaking, harmless


def epochs_change(saved: Mapping, epochs: int) -> tuple[list[str], list[str]]:
    """A larger --epochs extends a run (train, then train longer: SLIP's, LaCLIP's and open_clip's
    users do it), said in a note; a smaller one breaks the resume like any other schedule flag."""
    old = saved.get("epochs")
    if old is None or old == epochs:
        return [], []
    if epochs > old:
        return [], [f"extending the run from --epochs {old} to {epochs}: the learning-rate schedule from "
                    f"here on follows the new total of {epochs} epochs"]
    return [f"--epochs {old} (now {epochs})"], []


def check_resume_settings(ckpt: Mapping, settings: Mapping, world_size: int, path: str) -> list[str]:
    """Refuse a resume whose trajectory-deciding flags (`settings`, RunConfig.settings()) differ
    (unless --resume-override); returns the notes to print: overridden and harmless differences,
    a longer --epochs, and what does not carry over from an open_clip_train file."""
    saved = saved_settings(ckpt)
    breaking, harmless = resume_differences(saved, {**settings, "world_size": world_size})
    shorter, longer = epochs_change(saved, settings["epochs"])
    breaking += shorter
    if breaking and not settings["resume_override"]:
        raise ValueError(f"--resume {path!r}: this run's settings differ from the checkpoint's, which breaks an "
                         f"exact resume: {', '.join(breaking)}; rerun with the checkpoint's settings, or pass "
                         "--resume-override to continue with the new ones")
    notes = [f"--resume-override: continuing {path!r} with {', '.join(breaking)}"] if breaking else []
    notes += longer + ([f"resuming {path!r} with {', '.join(harmless)}"] if harmless else [])
    if "name" in ckpt and "epoch" in ckpt and "args" not in ckpt:  # open_clip_train's: epoch, name, state_dict, ...
        notes.append(f"{path!r} was written by open_clip_train: its weights, optimizer state and epoch "
                     f"({int(ckpt['epoch'])}) carry over; its data order and learning-rate schedule do not. From "
                     "here the samples come in train.py's order and the learning rate follows train.py's schedule "
                     "(warmup, cosine to --lr-end) at the step the epoch count gives")
    return notes


class Resumed(NamedTuple):
    """What a checkpoint gives a resumed run besides the weights and optimizer state."""
    epoch: int  # epochs completed
    best_acc1: float | None
    data_state: dict | None  # the loader's position (training/loaders.py), if saved
    # a mid-epoch checkpoint's (--save-every-steps): steps done in epoch `epoch`, every rank's running
    # sums, seconds and torch RNG state (train.py's save_mid_epoch); None at an epoch end
    progress: dict | None = None
    verified: bool = True  # False: no checksum record beside the file (another script's, or older)
    data_identity: dict | None = None  # the caption files it was trained on (training/data_identity.py)


def load_training_state(path: str, model: nn.Module, model_name: str,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        flag: str = "--resume", trust: bool = False,
                        check: Callable[[Mapping], None] | None = None,
                        load: Callable[..., None] | None = None) -> Resumed:
    """Restore model (strict), optimizer and scaler; the file is read once.

    Also accepts a released checkpoint (args pickled as a Namespace) or a bare state
    dict: missing optimizer/scaler/epoch entries are left at their fresh values.
    trust: --trust-checkpoint (full unpickling); check(ckpt) runs before anything is restored.
    load(model, state, path, flag): the strict weight load (default: a preset's, models.load_into).
    """
    verified = checkpoint_sums.verify(path, flag)  # before unpickling: a damaged file is refused here
    ckpt = models.read_checkpoint(path, flag, trust=trust)
    if check is not None:
        check(ckpt)
    state = models.extract_state_dict(ckpt, path, flag)
    if load is None:
        models.load_into(model, state, model_name, path, flag)
    else:
        load(model, state, path, flag)
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
    return Resumed(int(ckpt.get("epoch", 0)), None if best is None else float(best), ckpt.get("data_state"),
                   ckpt.get("epoch_progress"), verified.verified, ckpt.get("data_identity"))


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
