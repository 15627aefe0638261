"""train.py's flags in one place: the parser (`get_args_parser`) and `resolve(args) -> RunConfig`,
which checks every flag and file in one pass, before any model or process group exists, and never
changes `args`. LaCLIP's README spellings and open_clip_train's are accepted as aliases (listed in
--help); any other open_clip_train flag is refused by name (`refuse_unknown_flags`), never ignored.

The shards' look (listings, empty tars, rewrite schemas, sample counts: `loaders.read_stream`) is
the one part that reads storage per shard, so it is done once per job: train.py resolves with
`read_data=False`, joins the process group, and `with_data` reads it on rank 0 alone and hands the
result (`RunConfig.stream`) to the other processes, which read nothing at start. Called alone,
`resolve(args)` does both in one process.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import models
from common.distributed import get_rank, launched_as_rank0, on_rank0
from evaluation.imagenet_folders import imagenet_val, not_evaluated_note
from evaluation.periodic import plan_jobs
from models import open_clip_arch
from training.loaders import check_csv_args, check_stream_flags, dataset_type, read_stream
from training.train_state import resume_path
from training.wds import StreamSpec

# open_clip_train spellings accepted here (the same meaning), for the README and the refusal message.
OPEN_CLIP_SPELLINGS = ("--precision", "--accum-freq", "--grad-checkpointing", "--warmup", "--local-loss",
                       "--gather-with-grad", "--save-frequency", "--delete-previous-checkpoint", "--quickgelu",
                       "--train-data", "--train-num-samples", "--dataset-type", "--dataset-resampled",
                       "--batch-size", "--epochs", "--lr", "--wd", "--eps", "--workers", "--seed", "--model",
                       "--resume")
# open_clip_train flags whose meaning is here under another name.
RENAMED = {"--beta1": "--betas B1 B2", "--beta2": "--betas B1 B2", "--logs": "--output-dir",
           "--force-quick-gelu": "--quickgelu", "--name": "--output-dir"}
PRECISIONS = ("amp", "amp_bf16", "fp32")  # fp16 autocast + GradScaler, bf16 autocast, float32 (CUDA; the CPU: fp32)


def _data_args(add) -> None:
    add("--train-data", required=True, help="caption CSV: rows image_path,caption (header optional); or "
        "webdataset shards as a brace pattern, 'laion/{00000..41407}.tar'")
    add("--root", default="./data/", help="folder the CSV's image paths are relative to")
    add("--aug-text", action="store_true", help="LaCLIP: pick among original + rewritten captions")
    add("--augmented_caption_filelist", "--augmented-caption-filelist", nargs="+", default=[],
        metavar="FILE", help="rewrite files, one caption per line aligned with the CSV's samples")
    add("--aug-text-weights", type=float, nargs="+", default=None, metavar="W",
        help="--aug-text: probability of the original caption, then of each rewrite source (normalised; "
             "default uniform, as the paper; Recap-style mixes such as 0.8 0.2)")
    add("--dataset-type", choices=("auto", "csv", "webdataset"), default="auto",
        help="auto: webdataset when --train-data names .tar shards, else csv")
    add("--train-num-samples", type=int, default=None, help="webdataset: samples per epoch, all processes together")
    add("--dataset-resampled", action="store_true", help="webdataset: draw shards with replacement")
    add("--rewrite-data", default=None, metavar="PATTERN", help="webdataset + --aug-text: the rewriter's output, "
        "'out/{00000..41407}.parquet', joined by sample key (shard 00012.tar <-> 00012.parquet)")
    add("--rewrite-json-keys", nargs="+", default=[], metavar="KEY",
        help="webdataset + --aug-text: rewrites inside each sample's KEY.json under these keys (e.g. re_caption)")
    add("--rewrite-columns", nargs="+", default=[], metavar="COLUMN",
        help="webdataset + --rewrite-data: the string columns to use as rewrites (needed for files that are not "
             "the rewriter's output)")
    add("--rewrite-mismatch-limit", type=float, default=None, metavar="SHARE",
        help="webdataset + --rewrite-data: stop when more than this share of an epoch's samples have a rewrite "
             "written for another caption (default 0.01)")
    add("--multi-text", action="store_true", help="LaCLIP-MT: each image with all its texts in one step, "
        "the loss averaged over the texts (needs --aug-text)")
    add("-j", "--workers", "--num_workers", dest="workers", type=int, default=10,
        help="data-loading processes per training process")


def _run_args(add) -> None:
    add("--imagenet-root", default=None, help="ImageNet folder with val/<wnid>/: zero-shot top-1 after each epoch")
    add("--eval-benchmark", nargs="+", default=[], metavar="DATASET=ROOT",
        help="downstream datasets to evaluate during training (names and layouts as eval_benchmark.py)")
    add("--eval-tasks", nargs="+", default=["auto"],
        choices=("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "few_shot", "auto"),
        help="tasks run on each --eval-benchmark dataset they apply to")
    add("--eval-every", type=int, default=1, help="run --eval-benchmark after every N epochs and after the last")
    add("--eval-batch-size", type=int, default=256, help="images per batch for zero-shot evaluation")
    add("--output-dir", default="./output", help="checkpoints, log.txt and TensorBoard logs go here")
    add("--remote-sync", default=None, metavar="URL", help="also keep a copy of --output-dir at this object-storage "
        "URL (s3://bucket/runs/name): changed files uploaded whole after each epoch; an --output-dir without "
        "checkpoint.pt is filled from it first, to resume (docs/laion.md)")
    add("--claim-timeout", type=float, default=300.0, help="--remote-sync: seconds without a heartbeat after which "
        "the URL's claim is taken to be a dead run's")
    add("--resume", default="", help="checkpoint to resume from (default: <output-dir>/checkpoint.pt if present)")
    add("--resume-override", action="store_true",
        help="resume although flags that decide the training (batch size, lr schedule, epochs, seed, data, ...) "
             "differ from the checkpoint's; without it such a resume is refused")
    add("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint", action="store_true",
        help="fully unpickle the --resume file (it can then run code); needed only for files that pickle "
             "objects beyond tensors, plain values and argparse.Namespace")
    add("--save-every-steps", type=int, default=0, metavar="N",
        help="also write checkpoint.pt every N optimizer steps inside an epoch (atomic, with the data "
             "position): rerunning the same command after a crash continues there, exactly")
    add("--save-frequency", type=int, default=0, metavar="N", help="also keep epoch_E.pt every N epochs and "
        "at the last (open_clip_train's files; 0: only checkpoint.pt, replaced each epoch)")
    add("--delete-previous-checkpoint", action="store_true",
        help="with --save-frequency: delete epoch_{E-1}.pt once epoch_E.pt is written")
    add("--print-freq", type=int, default=10, help="progress-bar update interval in optimizer steps")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: this process's GPU, else CPU)")
    add("--dist-timeout", type=float, default=60.0, help="minutes a collective may wait (zero-shot eval runs on rank 0 alone)")
    add("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # torch.distributed.launch


def _optim_args(add) -> None:
    add("--model", default="CLIP_VITB16", help=f"a LaCLIP preset ({', '.join(models.PRESETS)}), an open_clip "
        "model name (ViT-B-32, ViT-B-16, ViT-L-14, RN50, ...) or an open_clip model config JSON file")
    add("--quickgelu", action="store_true", help="open_clip models: QuickGELU activations (LaCLIP's released "
        "ViT-L/14 was trained with them); refused for the presets, which always use QuickGELU")
    add("--grad-checkpointing", action="store_true", help="open_clip models: recompute activations in the "
        "backward pass (less memory, ~30%% more compute)")
    add("--epochs", type=int, default=25)
    add("--warmup-epochs", type=int, default=None, help="warmup in epochs (default 1; or --warmup STEPS)")
    add("--warmup", type=int, default=None, metavar="STEPS",
        help="warmup in optimizer steps (open_clip_train's unit), instead of --warmup-epochs")
    add("--start-epoch", type=int, default=0, help="first epoch of a fresh run (a resume uses the checkpoint's)")
    add("--batch-size", type=int, default=64, help="samples per process per micro-batch")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--lr-start", type=float, default=1e-6, help="learning rate at the first warmup step")
    add("--lr-end", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    add("--update-freq", "--accum-freq", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    add("--wd", type=float, default=0.1, help="AdamW weight decay (not on biases, norms, 1-D tensors)")
    add("--betas", type=float, nargs=2, default=(0.9, 0.98))
    add("--eps", type=float, default=1e-8)
    add("--precision", choices=PRECISIONS, default=None, help="mixed precision on CUDA: amp = fp16 autocast with "
        "a GradScaler (the default, as the released models), amp_bf16 = bf16 autocast, fp32 = float32 (the CPU "
        "always uses float32)")
    add("--disable-amp", action="store_true", help="LaCLIP's spelling of --precision fp32")
    add("--amp-dtype", choices=("fp16", "bf16"), default="fp16", help="--amp-dtype bf16 = --precision amp_bf16")
    add("--seed", type=int, default=0)
    add("--max-steps-per-epoch", type=int, default=None,
        help="cut every epoch to this many optimizer steps (smoke runs; the lr schedule follows)")
    add("--local-loss", action="store_true", help="accepted: the loss is always local with gathered features")
    add("--gather-with-grad", action="store_true", help="accepted: gathered features always carry gradients")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LaCLIP / CLIP training", add_help=True)
    for group in (_data_args, _optim_args, _run_args):
        group(p.add_argument)
    return p


@dataclass(frozen=True)
class RunConfig:
    """The parsed flags (unchanged) with what resolve() settled; other attributes read the flags."""
    args: argparse.Namespace
    precision: str  # one of PRECISIONS
    warmup_epochs: Optional[int]  # None when --warmup STEPS is given
    data: str  # "csv" or "webdataset"
    stream: Optional[StreamSpec]  # shards: the shard list and rewrite sources, read once
    open_clip: bool  # --model is an open_clip model (else a LaCLIP preset)

    def __getattr__(self, name: str) -> Any:
        if name == "args":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.args, name)

    def settings(self) -> dict:
        """The flags as checkpoints record them (`args`), the spellings resolved."""
        return {**vars(self.args), "disable_amp": self.precision == "fp32",
                "amp_dtype": "bf16" if self.precision == "amp_bf16" else "fp16", "warmup_epochs": self.warmup_epochs}


def _precision(args: argparse.Namespace) -> str:
    given = "fp32" if args.disable_amp else "amp_bf16" if args.amp_dtype == "bf16" else "amp"
    if args.precision is None:
        return given
    if args.disable_amp and args.precision != "fp32":
        raise ValueError(f"--precision {args.precision} contradicts --disable-amp")
    return args.precision


def _warmup_epochs(args: argparse.Namespace) -> Optional[int]:
    if args.warmup is None:
        return 1 if args.warmup_epochs is None else args.warmup_epochs
    if args.warmup_epochs is not None:
        raise ValueError(f"--warmup {args.warmup} (steps) and --warmup-epochs {args.warmup_epochs}: give one")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    return None


def _check_open_clip_flags(args: argparse.Namespace) -> bool:
    """Whether --model is an open_clip model; refuses flags that do not apply to it or to a preset."""
    if args.local_loss != args.gather_with_grad:
        given = "--local-loss" if args.local_loss else "--gather-with-grad"
        raise ValueError(f"{given} alone is not implemented: train.py always computes the local loss with "
                         "features gathered with gradients (pass both flags, or neither)")
    if args.save_frequency < 0:
        raise ValueError(f"--save-frequency must be >= 0, got {args.save_frequency}")
    if args.delete_previous_checkpoint and not args.save_frequency:
        raise ValueError("--delete-previous-checkpoint deletes the epoch_E.pt files of --save-frequency N; "
                         "without it there are none (checkpoint.pt is always replaced)")
    if open_clip_arch.kind(args.model) == open_clip_arch.OPEN_CLIP:
        if args.eval_benchmark:
            raise ValueError(f"--eval-benchmark during training is implemented for the LaCLIP presets; for "
                             f"--model {args.model} run eval_benchmark.py on the checkpoint")
        return True
    for name in ("quickgelu", "grad_checkpointing"):
        if getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} is for open_clip models; --model {args.model} is a "
                             f"LaCLIP preset{' (always QuickGELU)' if name == 'quickgelu' else ''}")
    return False


def _check_text_weights(args: argparse.Namespace, stream: Optional[StreamSpec]) -> None:
    """--aug-text-weights W0 W1 ...: the original's probability, then each rewrite source's (normalised),
    against the rewrite files, or the shards' rewrite columns + JSON keys."""
    weights = args.aug_text_weights
    if weights is None:
        return
    if not args.aug_text or args.multi_text:
        raise ValueError("--aug-text-weights weighs the caption pick of --aug-text; "
                         + ("--multi-text uses every text" if args.multi_text else "pass --aug-text"))
    if stream is not None:
        sources = stream.rewrites.slots if stream.rewrites else 0
    else:
        sources = len(args.augmented_caption_filelist)
    if len(weights) != sources + 1:
        raise ValueError(f"--aug-text-weights has {len(weights)} values; it needs {sources + 1}: the original "
                         f"caption's, then one per rewrite source ({sources})")
    if min(weights) < 0 or not sum(weights) > 0 or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--aug-text-weights {' '.join(map(str, weights))}: the values must be finite, "
                         ">= 0 and not all 0")


def _check_numbers(args: argparse.Namespace, warmup_epochs: Optional[int]) -> None:
    minimums = dict(epochs=1, warmup_epochs=0, start_epoch=0, batch_size=1, update_freq=1, save_every_steps=0,
                    workers=0, print_freq=1, seed=0, eval_batch_size=1, max_steps_per_epoch=1, eval_every=1)
    for name, low in minimums.items():
        value = warmup_epochs if name == "warmup_epochs" else getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if warmup_epochs is not None and warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {warmup_epochs} exceeds --epochs {args.epochs}")
    if min(args.lr, args.lr_start, args.lr_end, args.wd, args.eps) < 0:
        raise ValueError("--lr, --lr-start, --lr-end, --wd and --eps must be >= 0")
    if args.claim_timeout <= 0:
        raise ValueError(f"--claim-timeout must be > 0 seconds, got {args.claim_timeout:g}")


def resolve(args: argparse.Namespace, read_data: bool = True) -> RunConfig:
    """Every check that needs no model, in one pass: errors name the flag and the file.
    read_data=False: the shards are not looked at yet (`with_data` does it once per job)."""
    precision, warmup_epochs = _precision(args), _warmup_epochs(args)
    open_clip = _check_open_clip_flags(args)
    data = dataset_type(args)
    if data == "webdataset":
        check_stream_flags(args)  # (the shards themselves: with_data; --aug-text-weights against them there)
    else:
        check_csv_args(args)
        _check_text_weights(args, None)
    if args.multi_text and not args.aug_text:
        raise ValueError("--multi-text (LaCLIP-MT) pairs each image with its original and rewritten texts: "
                         "it needs --aug-text and the rewrites")
    _check_numbers(args, warmup_epochs)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} exists and is not a folder")
    if args.imagenet_root:
        note = not_evaluated_note(imagenet_val(args.imagenet_root, transform=None)[0])
        if note and launched_as_rank0():
            print(f"=> {note}")
    if args.eval_benchmark:
        plan_jobs(args)  # a bad folder fails now, not after the first epoch
    # An explicit --resume must exist; which file a run resumes from is settled at set-up, after
    # --remote-sync may have filled --output-dir.
    resume_path(args.resume, args.output_dir)
    config = RunConfig(args, precision, warmup_epochs, data, None, open_clip)
    return with_data(config, get_rank()) if read_data else config


def with_data(config: RunConfig, rank: int) -> RunConfig:
    """The config with the shards' look (`RunConfig.stream`), read by global rank 0 and sent to every
    process of the group (its error, too: every rank stops with the same line); one process without
    a group reads it itself. A CSV run, or a config that has it, is returned as it is."""
    if config.data != "webdataset" or config.stream is not None:
        return config
    stream = on_rank0(lambda: read_stream(config.args), rank)
    _check_text_weights(config.args, stream)
    return dataclasses.replace(config, stream=stream)


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


def parse(argv: list[str] | None = None, read_data: bool = True) -> RunConfig:
    args, unknown = get_args_parser().parse_known_args(argv)
    refuse_unknown_flags(unknown)  # open_clip_train's flags are named as such
    return resolve(args, read_data)
