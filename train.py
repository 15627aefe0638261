"""Train CLIP or LaCLIP (CLIP with language-rewrite augmentation) on an image-caption CSV
or on webdataset shards (img2dataset output, training/wds.py).

    # one process (CPU smoke run or one GPU)
    python train.py --train-data cc3m_original.csv --root /data/cc3m --model CLIP_VITB16 \
        --aug-text --augmented_caption_filelist cc3m_chatgpt.txt cc3m_bard.txt cc3m_mscoco.txt cc3m_human.txt
    # one node, 8 GPUs (add --nnodes/--node-rank/--rdzv-endpoint for several nodes)
    torchrun --nproc-per-node 8 train.py ...same flags...
    # LAION-style shards, rewrites joined by sample key
    torchrun --nproc-per-node 8 train.py --train-data 'laion/{00000..41407}.tar' --dataset-type webdataset \
        --train-num-samples 400000000 --aug-text --rewrite-data 'rewrites/{00000..41407}.parquet' ...
    # an open_clip model (LaCLIP's LAION rows), checkpointed every 2000 steps
    ... train.py --model ViT-B-32 --warmup 2000 --save-every-steps 2000 ...

Setup lives here; the pieces are in `training/` (loaders, data, loss, engine, train_state; open_clip
models and open_clip_train's flags in interop; process groups in common/distributed.py). `python train.py --help` lists every flag.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

import models
from common.distributed import (
    DistInfo,
    all_reduce_min_max,
    barrier,
    cleanup_distributed,
    init_distributed_mode,
    launched_as_rank0,
    on_every_rank,
    on_rank0,
)
from common.locking import FileLock
from evaluation.imagenet_folders import imagenet_val, not_evaluated_note
from evaluation.periodic import add_benchmark_args, check_benchmark_args, run_benchmarks
from imagenet_templates import SIMPLE_TEMPLATES
from tokenizer import SimpleTokenizer
from training import interop
from training import train_state as ckpt_io
from training.data import sample_seed
from training.engine import CosineSchedule, EpochProgress, Trainer, train_one_epoch
from training.loaders import TrainLoader, build_loader, check_data_args
from training import remote_sync
from training.output_dir import claim_output_dir
from training.remote_sync import RemoteSync
from training.rewrite_join import NEW_COUNTS
from zeroshot import evaluate_imagenet


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LaCLIP / CLIP training", add_help=True)
    add = p.add_argument
    add("--train-data", required=True, help="caption CSV: rows image_path,caption (header optional); or "
        "webdataset shards as a brace pattern, 'laion/{00000..41407}.tar'")
    add("--root", default="./data/", help="folder the CSV's image paths are relative to")
    add("--aug-text", action="store_true", help="LaCLIP: pick among original + rewritten captions")
    add("--augmented_caption_filelist", "--augmented-caption-filelist", nargs="+", default=[],
        metavar="FILE", help="rewrite files, one caption per line aligned with the CSV's samples")
    # webdataset shards (open_clip's spelling) and LaCLIP-MT
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
    add("--imagenet-root", default=None, help="ImageNet folder with val/<wnid>/: zero-shot top-1 after each epoch")
    add("--output-dir", default="./output", help="checkpoints, log.txt and TensorBoard logs go here")
    add("--remote-sync", default=None, metavar="URL", help="also keep a copy of --output-dir at this object-storage "
        "URL (s3://bucket/runs/name): changed files uploaded whole after each epoch; an --output-dir without "
        "checkpoint.pt is filled from it first, to resume (docs/laion.md)")
    add("--claim-timeout", type=float, default=300.0, help="--remote-sync: seconds without a heartbeat after which "
        "the URL's claim is taken to be a dead run's")
    add("--model", default="CLIP_VITB16", help=f"a LaCLIP preset ({', '.join(models.PRESETS)}), an open_clip "
        "model name (ViT-B-32, ViT-B-16, ViT-L-14, RN50, ...) or an open_clip model config JSON file")
    add("--resume", default="", help="checkpoint to resume from (default: <output-dir>/checkpoint.pt if present)")
    add("--resume-override", action="store_true",
        help="resume although flags that decide the training (batch size, lr schedule, epochs, seed, data, ...) "
             "differ from the checkpoint's; without it such a resume is refused")
    add("--trust-checkpoint", action="store_true",
        help="fully unpickle the --resume file (it can then run code); needed only for files that pickle "
             "objects beyond tensors, plain values and argparse.Namespace")
    add("--epochs", type=int, default=25)
    add("--warmup-epochs", type=int, default=None, help="warmup in epochs (default 1; or --warmup STEPS)")
    add("--start-epoch", type=int, default=0, help="first epoch of a fresh run (a resume uses the checkpoint's)")
    add("--batch-size", type=int, default=64, help="samples per process per micro-batch")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--lr-start", type=float, default=1e-6, help="learning rate at the first warmup step")
    add("--lr-end", type=float, default=1e-5, help="learning rate at the end of the cosine decay")
    add("--update-freq", "--accum-freq", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    add("--wd", type=float, default=0.1, help="AdamW weight decay (not on biases, norms, 1-D tensors)")
    add("--betas", type=float, nargs=2, default=(0.9, 0.98))
    add("--eps", type=float, default=1e-8)
    add("--disable-amp", action="store_true", help="float32 on CUDA too (the CPU always uses float32)")
    add("--amp-dtype", choices=("fp16", "bf16"), default="fp16",
        help="mixed precision on CUDA: fp16 with a GradScaler (as the released models) or bf16")
    add("--save-every-steps", type=int, default=0, metavar="N",
        help="also write checkpoint.pt every N optimizer steps inside an epoch (atomic, with the data "
             "position): rerunning the same command after a crash continues there, exactly")
    add("--print-freq", type=int, default=10, help="progress-bar update interval in optimizer steps")
    add("-j", "--workers", type=int, default=10, help="data-loading processes per training process")
    add("--seed", type=int, default=0)
    add("--device", default=None, help="cpu, cuda or cuda:N (default: this process's GPU, else CPU)")
    add("--eval-batch-size", type=int, default=256, help="images per batch for zero-shot evaluation")
    add("--max-steps-per-epoch", type=int, default=None,
        help="cut every epoch to this many optimizer steps (smoke runs; the lr schedule follows)")
    add("--dist-timeout", type=float, default=60.0, help="minutes a collective may wait (zero-shot eval runs on rank 0 alone)")
    add("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # torch.distributed.launch
    add_benchmark_args(p)  # --eval-benchmark DATASET=ROOT ... --eval-tasks --eval-every
    interop.add_interop_args(p)  # open_clip models and open_clip_train's spellings
    return p


def _positive(args: argparse.Namespace, **minimums: int) -> None:
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def validate_args(args: argparse.Namespace) -> None:
    """Every check that needs no model: errors name the flag and the file."""
    interop.check_interop_args(args)  # first: it resolves --precision and --warmup
    check_data_args(args)
    interop.check_text_weights(args)
    if args.multi_text and not args.aug_text:
        raise ValueError("--multi-text (LaCLIP-MT) pairs each image with its original and rewritten texts: "
                         "it needs --aug-text and the rewrites")
    _positive(args, epochs=1, warmup_epochs=0, start_epoch=0, batch_size=1, update_freq=1, save_every_steps=0,
              workers=0, print_freq=1, seed=0, eval_batch_size=1, max_steps_per_epoch=1)
    if args.warmup_epochs is not None and args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")
    if min(args.lr, args.lr_start, args.lr_end, args.wd, args.eps) < 0:
        raise ValueError("--lr, --lr-start, --lr-end, --wd and --eps must be >= 0")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir!r} exists and is not a folder")
    if args.claim_timeout <= 0:
        raise ValueError(f"--claim-timeout must be > 0 seconds, got {args.claim_timeout:g}")
    if args.imagenet_root:
        note = not_evaluated_note(imagenet_val(args.imagenet_root, transform=None)[0])
        if note and launched_as_rank0():
            print(f"=> {note}")
    check_benchmark_args(args)
    ckpt_io.resume_path(args.resume, args.output_dir)


def steps_per_epoch(args: argparse.Namespace, loader: TrainLoader, info: DistInfo) -> int:
    steps = len(loader) // args.update_freq
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(
            f"--train-data {args.train_data!r} has {loader.samples} samples, too few for one "
            f"optimizer step of --batch-size {args.batch_size} x {info.world_size} processes x "
            f"--update-freq {args.update_freq}")
    return steps


def precision(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """(autocast dtype or None for float32, GradScaler enabled only for fp16 on CUDA)."""
    if device.type != "cuda" or args.disable_amp:
        return None, torch.amp.GradScaler("cuda", enabled=False)
    if args.amp_dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        # Pre-Ampere GPUs (V100) only emulate bf16: many times slower than fp16, not an error.
        raise ValueError(f"--amp-dtype bf16: {torch.cuda.get_device_name(device)} has no native "
                         f"bfloat16; use --amp-dtype fp16 (the default)")
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def open_tensorboard(output_dir: str) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("=> tensorboard is not installed: no TensorBoard logs (log.txt is still written)")
        return None
    return SummaryWriter(log_dir=os.path.join(output_dir, "tb_logs"))


def reseed(seed: int, epoch: int, rank: int) -> None:
    """Global RNGs per (seed, epoch, rank): a resumed epoch starts from the same state."""
    torch.manual_seed(sample_seed(seed, epoch, rank))


def zero_shot(args, raw_model, tokenizer, info: DistInfo, amp: bool, transform=None) -> dict | None:
    """Zero-shot ImageNet on the main process while the other ranks wait.

    A failure here (say, the ImageNet disk went away) is reported and the run goes on:
    the epoch's checkpoint.pt is still written, only checkpoint_best.pt is not updated.
    """
    result = None
    if args.imagenet_root and info.rank == 0:
        try:
            result = evaluate_imagenet(raw_model, tokenizer, args.imagenet_root, SIMPLE_TEMPLATES,
                                       args.eval_batch_size, args.workers, info.device, amp=amp,
                                       transform=transform, skip_bad_images=True)
        except (OSError, ValueError, RuntimeError) as err:
            print(f"=> zero-shot evaluation on --imagenet-root {args.imagenet_root!r} failed: {err}")
    barrier()
    return result


def end_of_epoch(args, epoch: int, stats: dict, zs: dict | None, best_acc1: float | None,
                 tr: Trainer, seconds: float, info: DistInfo, benchmark: dict | None, data_state: dict) -> float | None:
    """Checkpoint and log.txt line (main process); returns the new best_acc1. A failed save
    stops every rank with the main process's one line (none waits for it forever).
    data_state: the loader's position (training/loaders.py), saved in the checkpoint."""
    acc1 = zs["top1"] if zs else None
    if args.imagenet_root:  # best by zero-shot top-1; a failed evaluation is never best
        is_best = acc1 is not None and (best_acc1 is None or acc1 > best_acc1)
        best_acc1 = acc1 if is_best else best_acc1
    else:  # nothing to rank by: the latest is the best
        is_best = True
    record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items() if k != "counts"},
              **{k: v for k, v in stats["counts"].items() if v or k not in NEW_COUNTS},  # skipped inputs by kind
              "zeroshot_top1": acc1, "zeroshot_top5": zs["top5"] if zs else None,
              "best_acc1": best_acc1, "epoch_time_s": round(seconds, 3)}
    if benchmark is not None:  # --eval-benchmark ran this epoch
        record["benchmark"] = benchmark

    def save_and_log() -> None:
        ckpt = ckpt_io.make_checkpoint(epoch + 1, tr.raw_model, tr.optimizer, tr.scaler, best_acc1, args,
                                       info.world_size)
        latest = ckpt_io.save_checkpoint({**ckpt, "data_state": data_state}, args.output_dir, is_best)
        interop.keep_epoch_file(latest, epoch + 1, args.epochs, args.save_frequency, args.delete_previous_checkpoint)
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if tr.writer is not None:
            for key in ("train_loss", "train_clip_acc", *stats["counts"], "zeroshot_top1", "zeroshot_top5"):
                if record.get(key) is not None:
                    tr.writer.add_scalar(f"epoch/{key}", record[key], epoch)
        print("=> " + json.dumps(record))

    on_rank0(save_and_log, info.rank)
    return best_acc1


def save_mid_epoch(args, tr: Trainer, info: DistInfo, epoch: int, progress: EpochProgress,
                   best_acc1: float | None) -> None:
    """--save-every-steps: checkpoint.pt inside `epoch`, with the loader's position, the steps done
    and every rank's running sums and RNG state, so a rerun continues exactly here. Call on every
    rank (the positions are gathered); rank 0 writes, atomically as at epoch ends."""
    data_state = tr.loader.state()
    cuda = info.device.type == "cuda"
    ranks = on_every_rank(lambda: {"sums": progress.sums, "rng": torch.get_rng_state(),
                                   **({"cuda_rng": torch.cuda.get_rng_state(info.device)} if cuda else {})},
                          info.world_size)

    def save() -> None:
        ckpt = ckpt_io.make_checkpoint(epoch, tr.raw_model, tr.optimizer, tr.scaler, best_acc1, args, info.world_size)
        ckpt["epoch_progress"] = {"steps": progress.steps, "seconds": progress.seconds,
                                  **{key: [r.get(key) for r in ranks] for key in ranks[0]}}
        ckpt_io.save_checkpoint({**ckpt, "data_state": data_state}, args.output_dir, is_best=False)

    on_rank0(save, info.rank)


def resume_inside_epoch(progress: dict, epoch: int, steps: int, info: DistInfo) -> EpochProgress:
    """The resumed epoch's progress and this rank's RNG state, from a mid-epoch checkpoint."""
    torch.set_rng_state(progress["rng"][info.rank])
    if progress.get("cuda_rng") and info.device.type == "cuda":
        torch.cuda.set_rng_state(progress["cuda_rng"][info.rank], info.device)
    if info.rank == 0:
        print(f"=> resuming inside epoch {epoch} after {progress['steps']} of {steps} steps")
    return EpochProgress(progress["steps"], dict(progress["sums"][info.rank]), progress["seconds"])


def warn_resume_over_latest(resume: str, output_dir: str) -> None:
    """An explicit --resume wins over <output-dir>/checkpoint.pt (SLIP's rule, and the way
    to roll back); say so, since rerunning such a command after a preemption would
    otherwise silently drop the progress saved since PATH."""
    latest = os.path.join(output_dir, ckpt_io.LATEST)
    if resume and os.path.isfile(latest) and not os.path.samefile(resume, latest):
        print(f"=> note: resuming from --resume {resume!r}, not from {latest!r}, which will be "
              f"overwritten after this epoch; leave --resume out to continue from {latest!r}")


@dataclass
class Setup:
    """The model and optimizer state a run starts from (fresh, or resumed)."""
    model: torch.nn.Module  # the bare CLIP, on the device
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None  # autocast dtype, None for float32
    scaler: torch.amp.GradScaler
    start_epoch: int
    best_acc1: float | None
    resumed: ckpt_io.Resumed | None  # None for a fresh run


def setup(args: argparse.Namespace, info: DistInfo, arch: interop.Architecture) -> Setup:
    """Model, optimizer, scaler and (if any) the resumed state."""
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = arch.build(args.grad_checkpointing).to(info.device)
    optimizer = torch.optim.AdamW(arch.param_groups(model, args.wd), lr=args.lr, betas=tuple(args.betas),
                                  eps=args.eps)
    amp_dtype, scaler = precision(args, info.device)
    start_epoch, best_acc1, resumed = args.start_epoch, None, None
    path = ckpt_io.resume_path(args.resume, args.output_dir)
    if info.rank == 0:
        warn_resume_over_latest(args.resume, args.output_dir)

    def check(ckpt) -> None:  # every rank reads the same file, so every rank refuses alike
        notes = ckpt_io.check_resume_settings(ckpt, args, info.world_size, path)
        if interop.is_open_clip_train_checkpoint(ckpt):
            notes.append(interop.open_clip_train_resume_note(path, ckpt))
        for note in notes:
            if info.rank == 0:
                print(f"=> note: {note}")

    if path:
        resumed = ckpt_io.load_training_state(path, model, args.model, optimizer, scaler,
                                              trust=args.trust_checkpoint, check=check, load=arch.load)
        start_epoch, best_acc1 = resumed.epoch, resumed.best_acc1
        print(f"=> rank {info.rank}: resumed from {path!r} after epoch {start_epoch} (best_acc1 {best_acc1})")
    low, high = all_reduce_min_max(start_epoch, info.device)
    if low != high:
        raise RuntimeError(f"ranks disagree on the start epoch ({low:g} vs {high:g}): --output-dir "
                           f"{args.output_dir!r} must be on a filesystem every node can read")
    return Setup(model, optimizer, amp_dtype, scaler, start_epoch, best_acc1, resumed)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def run(args: argparse.Namespace, info: DistInfo, sync: RemoteSync | None = None) -> list[dict]:
    is_main = info.rank == 0
    torch.backends.cudnn.benchmark = True  # fixed 224x224 inputs: pick the fastest conv once
    arch = interop.architecture(args, SimpleTokenizer())
    tokenizer = arch.tokenizer
    # Data first: a bad CSV, rewrite file or --root fails in seconds, before a large model
    # is built and a checkpoint read. (Neither touches the global RNG, so order is free.)
    loader = build_loader(args, info, tokenizer, arch.train_transform)
    st = setup(args, info, arch)
    notes = loader.notes + [loader.restore(st.resumed.data_state) if st.resumed else None]
    for note in filter(None, notes) if is_main else []:
        print(f"=> note: {note}")
    steps = steps_per_epoch(args, loader, info)
    warmup = args.warmup if args.warmup is not None else args.warmup_epochs * steps  # --warmup: steps
    schedule = CosineSchedule(args.lr, args.lr_end, args.lr_start, args.epochs * steps, warmup)
    tr = Trainer(model=wrap_ddp(st.model, info), raw_model=st.model, optimizer=st.optimizer, scaler=st.scaler,
                 loader=loader, schedule=schedule, steps_per_epoch=steps, update_freq=args.update_freq,
                 device=info.device, amp_dtype=st.amp_dtype, print_freq=args.print_freq, is_main=is_main,
                 world_size=info.world_size, writer=open_tensorboard(args.output_dir) if is_main else None,
                 logit_scale_max=arch.logit_scale_max, save_every=args.save_every_steps)
    start_epoch, best_acc1 = st.start_epoch, st.best_acc1

    def on_save(epoch: int, progress: EpochProgress) -> None:  # --save-every-steps, on every rank
        save_mid_epoch(args, tr, info, epoch, progress, best_acc1)  # best_acc1: the best so far (late binding)
        if args.remote_sync:
            on_rank0(sync.push, info.rank)

    tr.on_save = on_save
    inside = st.resumed.progress if st.resumed else None
    if is_main:
        print(f"=> {args.model}: {loader.samples} samples, {steps} steps/epoch of "
              f"{args.batch_size}x{info.world_size}x{args.update_freq}, epochs {start_epoch}..{args.epochs - 1}")
    if is_main and start_epoch >= args.epochs:
        print(f"=> nothing to train: {start_epoch} epochs done, --epochs is {args.epochs}")
    records = []
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        loader.set_epoch(epoch)
        reseed(args.seed, epoch, info.rank)
        resumed = resume_inside_epoch(inside, epoch, steps, info) if inside and epoch == start_epoch else None
        stats = train_one_epoch(tr, epoch, resumed)
        zs = zero_shot(args, st.model, tokenizer, info, amp=st.amp_dtype is not None, transform=arch.eval_transform)
        bench = run_benchmarks(args, st.model, tokenizer, info.rank, info.device, epoch, amp=st.amp_dtype is not None)
        best_acc1 = end_of_epoch(args, epoch, stats, zs, best_acc1, tr, time.time() - start, info, bench,
                                 loader.state())
        if args.remote_sync:  # the main process uploads this epoch's checkpoint and log line
            on_rank0(sync.push, info.rank)
        records.append({"epoch": epoch, **stats, "zeroshot": zs, "benchmark": bench})
    if tr.writer is not None:
        tr.writer.close()
    return records


def main(argv: list[str] | argparse.Namespace | None = None) -> list[dict]:
    """Train; returns one stats dict per epoch run. Raises ValueError on bad flags or files."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args, unknown = get_args_parser().parse_known_args(argv)
        interop.refuse_unknown_flags(unknown)  # open_clip_train's flags are named as such
    validate_args(args)
    info = init_distributed_mode(args.device, timedelta(minutes=args.dist_timeout))
    locks: list[FileLock] = []
    syncs: list[RemoteSync] = []

    def claim() -> None:
        locks.append(claim_output_dir(args.output_dir))
        if args.remote_sync:  # claims the URL; fills an output folder without checkpoint.pt from it
            syncs.append(remote_sync.start(args.remote_sync, args.output_dir, args.claim_timeout))

    try:
        # The main process claims --output-dir before any other work; every rank learns of a refusal.
        on_rank0(claim, info.rank)
        records = run(args, info, syncs[0] if syncs else None)
        for sync in syncs:
            sync.push()  # what the end of the run wrote (TensorBoard's last events)
        return records
    finally:
        for sync in syncs:
            sync.release()
        for lock in locks:
            lock.release()
        if info.distributed:
            cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
