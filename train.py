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

Setup lives here; the flags in training/params.py, the pieces in `training/` (loaders, data, loss, engine,
train_state, architecture: a preset or an open_clip model), process groups in common/distributed.py.
`python train.py --help` lists every flag.
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

from common.distributed import (
    DistInfo,
    all_reduce_min_max,
    barrier,
    cleanup_distributed,
    init_distributed_mode,
    on_every_rank,
    on_rank0,
)
from common.locking import FileLock
from evaluation.periodic import run_benchmarks
from imagenet_templates import SIMPLE_TEMPLATES
from tokenizer import SimpleTokenizer
from models.clip_weights import MidEpochCheckpoint
from training import data_identity, remote_sync, train_state
from training.architecture import Architecture, architecture
from training.data import sample_seed
from training.engine import CosineSchedule, EpochProgress, Trainer, build_optimizer, train_one_epoch
from training.loaders import TrainLoader, build_loader
from training.params import (RunConfig, get_args_parser, parse, resolve,  # noqa: F401  (get_args_parser: the CLI's)
                             with_data)
from training.output_dir import claim_output_dir
from training.remote_sync import RemoteSync
from training.rewrite_join import NEW_COUNTS
from evaluation.imagenet_eval import evaluate_imagenet


def steps_per_epoch(args: RunConfig, loader: TrainLoader, info: DistInfo) -> int:
    steps = len(loader) // args.update_freq
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    if steps == 0:
        raise ValueError(
            f"--train-data {args.train_data!r} has {loader.samples} samples, too few for one "
            f"optimizer step of --batch-size {args.batch_size} x {info.world_size} processes x "
            f"--update-freq {args.update_freq}")
    return steps


def precision(name: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """(autocast dtype or None for float32, GradScaler enabled only for fp16 on CUDA) of --precision."""
    if device.type != "cuda" or name == "fp32":
        return None, torch.amp.GradScaler("cuda", enabled=False)
    if name == "amp_bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        # Pre-Ampere GPUs (V100) only emulate bf16: many times slower than fp16, not an error.
        raise ValueError(f"--precision amp_bf16: {torch.cuda.get_device_name(device)} has no native "
                         f"bfloat16; use --precision amp (the default)")
    dtype = torch.bfloat16 if name == "amp_bf16" else torch.float16
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
                 tr: Trainer, seconds: float, info: DistInfo, benchmark: dict | None, data: dict) -> float | None:
    """Checkpoint and log.txt line (main process); returns the new best_acc1. A failed save
    stops every rank with the main process's one line (none waits for it forever).
    data: saved in the checkpoint: data_state (the loader's position, training/loaders.py) and
    data_identity (the caption files, training/data_identity.py)."""
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
        ckpt = train_state.make_checkpoint(epoch + 1, tr.raw_model, tr.optimizer, tr.scaler, best_acc1,
                                           args.settings(), info.world_size)
        latest = train_state.save_checkpoint({**ckpt, **data}, args.output_dir, is_best)
        train_state.keep_epoch_file(latest, epoch + 1, args.epochs, args.save_frequency, args.delete_previous_checkpoint)
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
                   best_acc1: float | None, identity: dict | None = None) -> None:
    """--save-every-steps: checkpoint.pt inside `epoch`, with the loader's position, the steps done
    and every rank's running sums and RNG state, so a rerun continues exactly here. Call on every
    rank (the positions are gathered); rank 0 writes, atomically as at epoch ends. The file is marked
    (MidEpochCheckpoint), so open_clip_train, which would restart the epoch, refuses it."""
    data_state = tr.loader.state()
    cuda = info.device.type == "cuda"
    ranks = on_every_rank(lambda: {"sums": progress.sums, "rng": torch.get_rng_state(),
                                   **({"cuda_rng": torch.cuda.get_rng_state(info.device)} if cuda else {})},
                          info.world_size)

    def save() -> None:
        ckpt = train_state.make_checkpoint(epoch, tr.raw_model, tr.optimizer, tr.scaler, best_acc1, args.settings(),
                                           info.world_size)
        ckpt["epoch_progress"] = {"steps": progress.steps, "seconds": progress.seconds,
                                  **{key: [r.get(key) for r in ranks] for key in ranks[0]}}
        ckpt["mid_epoch"] = MidEpochCheckpoint()
        train_state.save_checkpoint({**ckpt, "data_state": data_state, "data_identity": identity}, args.output_dir,
                                    is_best=False)

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
    latest = os.path.join(output_dir, train_state.LATEST)
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
    resumed: train_state.Resumed | None  # None for a fresh run


def setup(args: RunConfig, info: DistInfo, arch: Architecture) -> Setup:
    """Model, optimizer, scaler and (if any) the resumed state."""
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = arch.build(args.grad_checkpointing).to(info.device)
    optimizer = build_optimizer(model, args.lr, args.wd, args.betas, args.eps, no_decay_first=arch.open_clip)
    amp_dtype, scaler = precision(args.precision, info.device)
    start_epoch, best_acc1, resumed = args.start_epoch, None, None
    path = train_state.resume_path(args.resume, args.output_dir)  # after --remote-sync filled --output-dir
    if info.rank == 0:
        warn_resume_over_latest(args.resume, args.output_dir)

    def check(ckpt) -> None:  # every rank reads the same file, so every rank refuses alike
        for note in train_state.check_resume_settings(ckpt, args.settings(), info.world_size, path):
            if info.rank == 0:
                print(f"=> note: {note}")

    if path:
        resumed = train_state.load_training_state(path, model, args.model, optimizer, scaler,
                                              trust=args.trust_checkpoint, check=check, load=arch.load)
        start_epoch, best_acc1 = resumed.epoch, resumed.best_acc1
        if not resumed.verified and info.rank == 0:
            print(f"=> note: {path!r} has no checksum beside it (another script's file, or an older train.py's): "
                  "loaded, not verified")
        print(f"=> rank {info.rank}: resumed from {path!r} after epoch {start_epoch} (best_acc1 {best_acc1})")
    low, high = all_reduce_min_max(start_epoch, info.device)
    if low != high:
        raise RuntimeError(f"ranks disagree on the start epoch ({low:g} vs {high:g}): --output-dir "
                           f"{args.output_dir!r} must be on a filesystem every node can read")
    return Setup(model, optimizer, amp_dtype, scaler, start_epoch, best_acc1, resumed)


def run_data_identity(args: RunConfig, loader: TrainLoader) -> dict | None:
    """The caption files' identity of a CSV run (hashes remembered in --output-dir); None for shards."""
    if args.data == "webdataset":
        return None
    rewrites = args.augmented_caption_filelist if args.aug_text else []
    return data_identity.csv_identity(args.train_data, rewrites, loader.samples, args.output_dir)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def run(args: RunConfig, info: DistInfo, sync: RemoteSync | None = None) -> list[dict]:
    is_main = info.rank == 0
    torch.backends.cudnn.benchmark = True  # fixed 224x224 inputs: pick the fastest conv once
    arch = architecture(args.model, args.open_clip, args.quickgelu, SimpleTokenizer())
    tokenizer = arch.tokenizer
    # Data first: a bad CSV, rewrite file or --root fails in seconds, before a large model
    # is built and a checkpoint read. (Neither touches the global RNG, so order is free.)
    loader = build_loader(args, info, tokenizer, arch.train_transform)
    identity = on_rank0(lambda: run_data_identity(args, loader), info.rank)  # the files hashed once per job
    st = setup(args, info, arch)
    notes = loader.notes + [loader.restore(st.resumed.data_state) if st.resumed else None]
    if st.resumed:  # a changed caption file: refused inside an epoch, noted at an epoch end
        inside = st.resumed.epoch if st.resumed.progress else None
        notes += data_identity.compare_on_resume(st.resumed.data_identity, identity, inside, args.resume_override)
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
        # best_acc1: the best so far (late binding)
        save_mid_epoch(args, tr, info, epoch, progress, best_acc1, identity)
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
                                 {"data_state": loader.state(), "data_identity": identity})
        if args.remote_sync:  # the main process uploads this epoch's checkpoint and log line
            on_rank0(sync.push, info.rank)
        records.append({"epoch": epoch, **stats, "zeroshot": zs, "benchmark": bench})
    if tr.writer is not None:
        tr.writer.close()
    return records


def main(argv: list[str] | argparse.Namespace | None = None) -> list[dict]:
    """Train; returns one stats dict per epoch run. Raises ValueError on bad flags or files."""
    # the shards are looked at once per job, by rank 0 once the group exists (params.with_data)
    args = resolve(argv, read_data=False) if isinstance(argv, argparse.Namespace) else parse(argv, read_data=False)
    info = init_distributed_mode(args.device, timedelta(minutes=args.dist_timeout))
    locks: list[FileLock] = []
    syncs: list[RemoteSync] = []

    def claim() -> None:
        locks.append(claim_output_dir(args.output_dir))
        if args.remote_sync:  # claims the URL; fills an output folder without checkpoint.pt from it
            syncs.append(remote_sync.start(args.remote_sync, args.output_dir, args.claim_timeout))

    try:
        args = with_data(args, info.rank)
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
