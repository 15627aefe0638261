"""train.py next to open_clip_train (v3.3.0): open_clip models, the flag spellings LAION users pass,
open_clip_train's weight-decay rule, its checkpoints, and its epoch_N.pt files.

Flags that mean the same here as in open_clip_train are accepted under its spelling
(OPEN_CLIP_SPELLINGS); any other open_clip_train flag is refused by name (refuse_unknown_flags), never
ignored. docs/laion.md lists both.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

import models
from common.fileio import atomic_write
from models import open_clip_arch
from training.data import train_transform
from training.engine import param_groups as engine_param_groups
from training.loaders import check_webdataset_args, dataset_type
from training.loss import LOGIT_SCALE_MAX as LOSS_SCALE_MAX

# open_clip_train spellings accepted here (the same meaning), for the README and the refusal message.
OPEN_CLIP_SPELLINGS = ("--precision", "--accum-freq", "--grad-checkpointing", "--warmup", "--local-loss",
                       "--gather-with-grad", "--save-frequency", "--delete-previous-checkpoint", "--quickgelu",
                       "--train-data", "--train-num-samples", "--dataset-type", "--dataset-resampled",
                       "--batch-size", "--epochs", "--lr", "--wd", "--eps", "--workers", "--seed", "--model",
                       "--resume")
# open_clip_train flags whose meaning is here under another name.
RENAMED = {"--beta1": "--betas B1 B2", "--beta2": "--betas B1 B2", "--logs": "--output-dir",
           "--force-quick-gelu": "--quickgelu", "--name": "--output-dir"}
PRECISIONS = {"amp": (False, "fp16"), "amp_bf16": (False, "bf16"), "fp32": (True, "fp16")}
LOGIT_SCALE_MAX = math.log(100)  # open_clip_train's clamp (the project's presets: training.loss's 4.6052)


def add_interop_args(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--aug-text-weights", type=float, nargs="+", default=None, metavar="W",
        help="--aug-text: probability of the original caption, then of each rewrite source (normalised; "
             "default uniform, as the paper; Recap-style mixes such as 0.8 0.2)")
    add("--quickgelu", action="store_true", help="open_clip models: QuickGELU activations (LaCLIP's released "
        "ViT-L/14 was trained with them); refused for the presets, which always use QuickGELU")
    add("--grad-checkpointing", action="store_true", help="open_clip models: recompute activations in the "
        "backward pass (less memory, ~30%% more compute)")
    add("--precision", choices=tuple(PRECISIONS), default=None, help="open_clip_train's spelling: amp = "
        "fp16 autocast with a GradScaler (the default on CUDA), amp_bf16 = --amp-dtype bf16, fp32 = --disable-amp")
    add("--warmup", type=int, default=None, metavar="STEPS",
        help="warmup in optimizer steps (open_clip_train's unit), instead of --warmup-epochs")
    add("--local-loss", action="store_true", help="accepted: the loss is always local with gathered features")
    add("--gather-with-grad", action="store_true", help="accepted: gathered features always carry gradients")
    add("--save-frequency", type=int, default=0, metavar="N", help="also keep epoch_E.pt every N epochs and "
        "at the last (open_clip_train's files; 0: only checkpoint.pt, replaced each epoch)")
    add("--delete-previous-checkpoint", action="store_true",
        help="with --save-frequency: delete epoch_{E-1}.pt once epoch_E.pt is written")


def check_interop_args(args: argparse.Namespace) -> None:
    """Resolve open_clip_train's spellings into this script's settings; refuse what is not the same."""
    if args.precision is not None:
        disable, dtype = PRECISIONS[args.precision]
        if args.disable_amp and not disable:
            raise ValueError(f"--precision {args.precision} contradicts --disable-amp")
        args.disable_amp, args.amp_dtype = disable, dtype
    if args.warmup is not None:
        if args.warmup_epochs is not None:
            raise ValueError(f"--warmup {args.warmup} (steps) and --warmup-epochs {args.warmup_epochs}: give one")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    elif args.warmup_epochs is None:
        args.warmup_epochs = 1
    if args.local_loss != args.gather_with_grad:
        given = "--local-loss" if args.local_loss else "--gather-with-grad"
        raise ValueError(f"{given} alone is not implemented: train.py always computes the local loss with "
                         "features gathered with gradients (pass both flags, or neither)")
    if args.save_frequency < 0:
        raise ValueError(f"--save-frequency must be >= 0, got {args.save_frequency}")
    if args.delete_previous_checkpoint and not args.save_frequency:
        raise ValueError("--delete-previous-checkpoint deletes the epoch_E.pt files of --save-frequency N; "
                         "without it there are none (checkpoint.pt is always replaced)")
    if is_open_clip(args.model):
        open_clip_arch.resolve_name(args.model, "--model", tuple(models.PRESETS))
        if getattr(args, "eval_benchmark", None):
            raise ValueError(f"--eval-benchmark during training is implemented for the LaCLIP presets; for "
                             f"--model {args.model} run eval_benchmark.py on the checkpoint")
        return
    if args.model.startswith("CLIP_"):
        models.check_preset(args.model)
    if args.model not in models.PRESETS:
        open_clip_arch.resolve_name(args.model, "--model", tuple(models.PRESETS))  # raises: closest names
    for name in ("quickgelu", "grad_checkpointing"):
        if getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} is for open_clip models; --model {args.model} is a "
                             f"LaCLIP preset{' (always QuickGELU)' if name == 'quickgelu' else ''}")


def is_open_clip(name: str) -> bool:
    return name not in models.PRESETS and not name.startswith("CLIP_") and (
        open_clip_arch.is_config_file(name) or _known_open_clip(name))


def _known_open_clip(name: str) -> bool:
    import open_clip
    return name in open_clip.list_models()


def open_clip_train_flags() -> set[str]:
    """Every flag open_clip_train's parser defines, read from its source (the parser is built inside
    parse_args, so it cannot be asked)."""
    import open_clip_train.params as params
    with open(params.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {arg.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}


def refuse_unknown_flags(unknown: list[str]) -> None:
    """One line for flags train.py does not have: open_clip_train's are named as such."""
    flags = [u.split("=", 1)[0] for u in unknown if u.startswith("--")] or unknown
    if not flags:
        return
    theirs = open_clip_train_flags()
    lines = []
    for f in flags:
        if f in RENAMED:
            lines.append(f"{f} (open_clip_train's; here {RENAMED[f]})")
        elif f in theirs:
            lines.append(f"{f} (an open_clip_train flag whose meaning train.py does not implement)")
        else:
            lines.append(f"{f} (unknown)")
    raise ValueError(f"refused: {', '.join(lines)}; `python train.py --help` lists the flags")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip_train's rule and group order: no decay for tensors under 2-D (biases, norm gains, the
    class embedding) and names holding 'bn', 'ln', 'bias' or 'logit_scale'; the positional and token
    embeddings are 2-D and decayed. The same order makes the optimizer states interchangeable."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


def is_open_clip_train_checkpoint(ckpt: Mapping) -> bool:
    """open_clip_train saves epoch, name, state_dict, optimizer (and scaler); never our `args`."""
    return "name" in ckpt and "epoch" in ckpt and "args" not in ckpt


def open_clip_train_resume_note(path: str, ckpt: Mapping) -> str:
    return (f"{path!r} was written by open_clip_train: its weights, optimizer state and epoch "
            f"({int(ckpt['epoch'])}) carry over; its data order and learning-rate schedule do not. From here the "
            "samples come in train.py's order and the learning rate follows train.py's schedule (warmup, "
            "cosine to --lr-end) at the step the epoch count gives")


def load_open_clip_weights(model: nn.Module, state: Mapping, name: str, path: str, flag: str) -> None:
    """Strict load of an open_clip state dict; a mismatch names the model the file fits."""
    from evaluation.models import load_open_clip_state
    load_open_clip_state(model, dict(state), name, path, flag,
                         lambda fitted: f"try --model {models.closest_preset(fitted)}")


VIT_SIZES = {768: "B", 1024: "L", 1280: "H"}  # open_clip's ViT image widths


def open_clip_fit(state: Mapping) -> str | None:
    """The open_clip ViT name a state dict's patch embedding fits ([768, 3, 32, 32] -> ViT-B-32), if any."""
    import open_clip
    conv = state.get("visual.conv1.weight")
    if conv is None or conv.ndim != 4:
        return None
    name = f"ViT-{VIT_SIZES.get(conv.shape[0], '?')}-{conv.shape[-1]}"
    return name if name in open_clip.list_models() else None


def keep_epoch_file(latest: str, epoch: int, epochs: int, save_frequency: int, delete_previous: bool) -> None:
    """--save-frequency: epoch_E.pt beside checkpoint.pt (a hard link where possible), named as
    open_clip_train names them; --delete-previous-checkpoint removes epoch_{E-1}.pt afterwards."""
    if not save_frequency:
        return
    folder = os.path.dirname(latest)
    if epoch % save_frequency == 0 or epoch == epochs:
        atomic_write(os.path.join(folder, f"epoch_{epoch}.pt"), lambda tmp: _link_or_copy(latest, tmp))
    previous = os.path.join(folder, f"epoch_{epoch - 1}.pt")
    if delete_previous and os.path.isfile(previous):
        os.remove(previous)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class Architecture:
    """What differs between a LaCLIP preset and an open_clip model in training: the model, its
    tokenizer and training transform, the weight-decay rule, the logit-scale clamp, the weight loader."""
    name: str  # --model as given (a preset, an open_clip name or a config file)
    open_clip: bool
    quickgelu: bool
    tokenizer: Callable
    train_transform: Callable
    eval_transform: Callable | None  # None: the presets' (zeroshot.eval_transform)
    logit_scale_max: float

    def build(self, grad_checkpointing: bool = False) -> nn.Module:
        """Random weights on the CPU, from the global RNG (seed it first)."""
        if not self.open_clip:
            return models.get_model(self.name)
        model = open_clip_arch.create(self.name, self.quickgelu).model
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        return param_groups(model, weight_decay) if self.open_clip else engine_param_groups(model, weight_decay)

    def load(self, model: nn.Module, state: Mapping, path: str, flag: str) -> None:
        if self.open_clip:
            load_open_clip_weights(model, state, self.name, path, flag)
        else:
            try:
                models.load_into(model, state, self.name, path, flag)
            except ValueError as err:
                fits = open_clip_fit(state)
                raise ValueError(f"{err}\n  it looks like an open_clip {fits} checkpoint: try --model {fits}"
                                 if fits else str(err)) from None


def architecture(args: argparse.Namespace, preset_tokenizer: Callable) -> Architecture:
    """preset_tokenizer: the presets' tokenizer (train.py passes the root module's). The data pieces
    come without building the model (open_clip's on the meta device): a bad data flag fails in
    seconds, before a large model is built."""
    if not is_open_clip(args.model):
        return Architecture(args.model, False, False, preset_tokenizer, train_transform(), None, LOSS_SCALE_MAX)
    parts = open_clip_arch.create(args.model, args.quickgelu, device="meta")
    return Architecture(args.model, True, args.quickgelu, parts.tokenizer, parts.train_transform,
                        parts.eval_transform, LOGIT_SCALE_MAX)


def rewrite_sources(args: argparse.Namespace) -> int:
    """The caption pick's rewrite sources: the rewrite files, or the shards' columns + JSON keys."""
    if not args.aug_text:
        return 0
    if dataset_type(args) == "webdataset":
        spec = check_webdataset_args(args)
        return spec.rewrites.slots if spec.rewrites else 0
    return len(args.augmented_caption_filelist)


def check_text_weights(args: argparse.Namespace) -> None:
    """--aug-text-weights W0 W1 ...: the original's probability, then each rewrite source's (normalised);
    checked before any work against the rewrite files, or the shards' rewrite columns + JSON keys (counted
    only when the flag is given: for shards that lists them and reads the rewrite footers)."""
    weights = args.aug_text_weights
    if weights is None:
        return
    if not args.aug_text or args.multi_text:
        raise ValueError("--aug-text-weights weighs the caption pick of --aug-text; "
                         + ("--multi-text uses every text" if args.multi_text else "pass --aug-text"))
    sources = rewrite_sources(args)
    if len(weights) != sources + 1:
        raise ValueError(f"--aug-text-weights has {len(weights)} values; it needs {sources + 1}: the original "
                         f"caption's, then one per rewrite source ({sources})")
    if min(weights) < 0 or not sum(weights) > 0 or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--aug-text-weights {' '.join(map(str, weights))}: the values must be finite, "
                         ">= 0 and not all 0")
