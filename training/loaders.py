"""One training-loader interface for both data paths: a caption CSV with aligned rewrite
files (CsvLoader, over training/data.py) and webdataset shards with rewrites joined by key
(training/wds.py's ShardLoader). train.py builds one with build_loader and never asks which.

The data position, state(), is what was handed out: {"epoch": e, "batches": k} (the loader
handed out k batches of epoch e) plus, for shards, each rank's and worker's read position
after them. It is saved as the checkpoint's `data_state`; restore(state) before the first
set_epoch continues from it. At an epoch end the next epoch starts fresh (CSV: a new
shuffle) or where the shard passes stopped. A state whose epoch is then run again is a
mid-epoch position: its first k batches were trained on already. The checks of the data
flags are here too (errors name the flag and the file).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Optional, Protocol

import braceexpand
import torch
from torch.utils.data import DataLoader

from common.distributed import DistInfo
from training.data import CaptionImageDataset, EpochSampler, check_epoch_end, check_root, train_transform
from training.shard_rewrites import open_rewrite_source
from training.wds import ShardLoader, ShardStream, StreamSpec

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")  # webdataset opens these itself
WDS_ONLY = ("train_num_samples", "dataset_resampled", "rewrite_data", "rewrite_json_keys")


class TrainLoader(Protocol):
    """What train.py and training/engine.py use of a loader."""
    notes: list[str]  # start-up lines for the user: inputs not read as written
    samples: int  # samples per epoch, all processes together

    def __len__(self) -> int: ...  # batches per epoch on this process

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # (images, tokens)

    def set_epoch(self, epoch: int) -> None: ...  # before each epoch

    def report(self) -> dict[str, int]: ...  # inputs skipped or missing in this epoch's batches so far, by kind

    def state(self) -> dict: ...  # the data position (every rank must call it: shards gather)

    def restore(self, state: Optional[dict]) -> Optional[str]: ...  # a note when the position does not apply


class CsvLoader:
    """A DataLoader over the CSV's samples with an EpochSampler; each item carries the
    failed image loads it skipped, counted here as skipped_images."""

    def __init__(self, dataset: CaptionImageDataset, loader: DataLoader, sampler: EpochSampler):
        self.loader, self.sampler, self.notes, self.samples = loader, sampler, dataset.notes, len(dataset)
        self.epoch, self.batches, self.skipped, self.resume_from = 0, 0, 0, None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, failed in self.loader:
            self.batches += 1
            self.skipped += int(failed.sum())
            yield images, tokens

    def set_epoch(self, epoch: int) -> None:
        check_epoch_end(self.resume_from, epoch)
        self.sampler.set_epoch(epoch)
        self.epoch, self.batches, self.skipped = epoch, 0, 0

    def report(self) -> dict[str, int]:
        return {"skipped_images": self.skipped}

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches}

    def restore(self, state: Optional[dict]) -> Optional[str]:
        self.resume_from = state  # the sampler's order is fixed by (seed, epoch): nothing else to set
        return None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def dataset_type(args: argparse.Namespace) -> str:
    """--dataset-type, with auto resolved: webdataset when --train-data names .tar shards."""
    if args.dataset_type != "auto":
        return args.dataset_type
    first = next(iter(braceexpand.braceexpand(args.train_data or "")), "")
    return "webdataset" if first.endswith(".tar") else "csv"


def check_csv_args(args: argparse.Namespace) -> None:
    if not args.train_data or not os.path.isfile(args.train_data):
        raise ValueError(f"--train-data: caption CSV {args.train_data!r} does not exist")
    for name in WDS_ONLY:  # the CSV path refuses the flags it would ignore
        if getattr(args, name):
            raise ValueError(f"{flag(name)} is for --dataset-type webdataset (tar shards); --train-data "
                             f"{args.train_data!r} is a caption CSV")
    if not os.path.isdir(args.root):
        raise ValueError(f"--root: image folder {args.root!r} does not exist")
    if args.aug_text and not args.augmented_caption_filelist:
        raise ValueError("--aug-text needs --augmented_caption_filelist F1 [F2 ...] (the rewrite files)")
    for path in args.augmented_caption_filelist if args.aug_text else []:
        if not os.path.isfile(path):
            raise ValueError(f"--augmented_caption_filelist: file {path!r} does not exist")


def check_webdataset_args(args: argparse.Namespace) -> StreamSpec:
    """The shard list, epoch size and rewrite sources of a webdataset run."""
    urls = list(braceexpand.braceexpand(args.train_data or ""))
    local = [u for u in urls if not u.startswith(REMOTE_PREFIXES)]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or missing:
        raise ValueError(f"--train-data {args.train_data!r}: {len(missing)} of {len(urls)} shards not found, "
                         f"e.g. {missing[0] if missing else '(none given)'}")
    if args.train_num_samples is None or args.train_num_samples < 1:
        raise ValueError("--train-num-samples N is required with --dataset-type webdataset: the samples of one "
                         "epoch over all processes (a shard list does not say how many it holds)")
    if args.augmented_caption_filelist:
        raise ValueError("--augmented_caption_filelist holds rewrites aligned with a CSV; for shards give "
                         "--rewrite-data 'out/{00000..NNNNN}.parquet' (the rewriter's output) or --rewrite-json-keys")
    if args.aug_text and not (args.rewrite_data or args.rewrite_json_keys):
        raise ValueError("--aug-text with shards needs --rewrite-data 'out/{...}.parquet' or --rewrite-json-keys KEY")
    rewrites = open_rewrite_source(args.rewrite_data, tuple(args.rewrite_json_keys)) if args.aug_text else None
    return StreamSpec(tuple(urls), args.train_num_samples, args.dataset_resampled, rewrites, args.multi_text,
                      args.seed)


def check_data_args(args: argparse.Namespace) -> None:
    if dataset_type(args) == "webdataset":
        check_webdataset_args(args)
    else:
        check_csv_args(args)


def _data_loader(dataset, args: argparse.Namespace, info: DistInfo, **kw) -> DataLoader:
    # Forked workers share the caption tables (GBs for CC12M) copy-on-write; a spawned or
    # forkserver worker (Python 3.14's Linux default) would get a pickled copy each.
    context = "fork" if args.workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, multiprocessing_context=context,
                      drop_last=True,  # the gathered loss needs equal batches on every rank
                      pin_memory=info.device.type == "cuda", **kw)


def build_shard_loader(args: argparse.Namespace, info: DistInfo, tokenizer) -> ShardLoader:
    spec = check_webdataset_args(args)
    readers = info.world_size * max(1, args.workers)
    if not spec.resampled and len(spec.urls) < readers:
        raise ValueError(f"--train-data has {len(spec.urls)} shards, fewer than processes x --workers "
                         f"({info.world_size} x {max(1, args.workers)}): some readers would have none. Use fewer "
                         "--workers, more shards, or --dataset-resampled")
    stream = ShardStream(spec, train_transform(), tokenizer, args.batch_size, info.world_size, args.workers)
    loader = ShardLoader(stream, _data_loader(stream, args, info), info.rank, info.world_size)
    missing = spec.rewrites.missing if spec.rewrites else ()
    if missing:
        loader.notes.append(f"{len(missing)} --rewrite-data files do not exist (e.g. {missing[0]}): the samples of "
                            "their shards train on their original captions, counted as missing_rewrites in log.txt")
    return loader


def build_loader(args: argparse.Namespace, info: DistInfo, tokenizer) -> TrainLoader:
    """The loader of --train-data, CSV or shards; bad files fail here, before a model is built."""
    if dataset_type(args) == "webdataset":
        return build_shard_loader(args, info, tokenizer)
    rewrites = args.augmented_caption_filelist if args.aug_text else []
    dataset = CaptionImageDataset(args.train_data, args.root, train_transform(), tokenizer,
                                  rewrites, seed=args.seed, multi_text=args.multi_text)
    check_root(dataset)
    sampler = EpochSampler(dataset, info.world_size, info.rank, args.seed)
    return CsvLoader(dataset, _data_loader(dataset, args, info, sampler=sampler), sampler)
