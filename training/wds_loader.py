"""train.py's webdataset path at the edge: which data path a run takes, the checks of its
flags (errors name the flag and the file), the loader, and the data positions that go into
and come out of checkpoints. The stream itself is training/wds.py."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import braceexpand
from torch.utils.data import DataLoader

from common import storage
from common.distributed import DistInfo, on_every_rank
from training.checkpoint import Resumed
from training.data import train_transform
from training.shard_rewrites import open_rewrite_source
from training.wds import ShardLoader, ShardStream, StreamSpec

UNCHECKED = ("pipe:", "http://", "https://")  # webdataset opens these itself (s3:// etc. go through fsspec)
WDS_ONLY = ("train_num_samples", "dataset_resampled", "rewrite_data", "rewrite_json_keys")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def dataset_type(args: argparse.Namespace) -> str:
    """--dataset-type, with auto resolved: webdataset when --train-data names .tar shards."""
    if args.dataset_type != "auto":
        return args.dataset_type
    first = next(iter(braceexpand.braceexpand(args.train_data or "")), "")
    return "webdataset" if first.endswith(".tar") else "csv"


def check_not_webdataset_flags(args: argparse.Namespace) -> None:
    """The CSV path refuses the flags it would ignore."""
    for name in WDS_ONLY:
        if getattr(args, name):
            raise ValueError(f"{flag(name)} is for --dataset-type webdataset (tar shards); --train-data "
                             f"{args.train_data!r} is a caption CSV")


def check_webdataset_args(args: argparse.Namespace) -> StreamSpec:
    """The shard list, epoch size and rewrite sources of a webdataset run."""
    urls = list(braceexpand.braceexpand(args.train_data or ""))
    missing = missing_shards(args.train_data, urls)
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


def missing_shards(pattern: str, urls: list[str]) -> list[str]:
    """Shards of --train-data that do not exist: local files and fsspec URLs (s3://, gs://: one
    listing per prefix) are checked; pipe: and http(s):// are webdataset's to open."""
    if any(u.startswith(UNCHECKED) for u in urls):
        return []
    try:
        return storage.expand(pattern)[1]
    except storage.StorageError as e:
        raise ValueError(f"--train-data: {e}") from None


def check_shard_count(spec: StreamSpec, info: DistInfo, workers: int) -> None:
    readers = info.world_size * max(1, workers)
    if not spec.resampled and len(spec.urls) < readers:
        raise ValueError(f"--train-data has {len(spec.urls)} shards, fewer than processes x --workers "
                         f"({info.world_size} x {max(1, workers)}): some readers would have none. Use fewer "
                         "--workers, more shards, or --dataset-resampled")


def build_webdataset_loader(args: argparse.Namespace, info: DistInfo, tokenizer) -> ShardLoader:
    spec = check_webdataset_args(args)
    check_shard_count(spec, info, args.workers)
    missing = spec.rewrites.missing if spec.rewrites else ()
    if missing and info.rank == 0:
        print(f"=> note: {len(missing)} --rewrite-data files do not exist (e.g. {missing[0]}): the samples of "
              "their shards train on their original captions, counted as missing_rewrites in log.txt")
    stream = ShardStream(spec, train_transform(), tokenizer, args.batch_size, info.world_size, args.workers)
    context = "fork" if args.workers > 0 and sys.platform.startswith("linux") else None
    loader = DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
                        pin_memory=info.device.type == "cuda", multiprocessing_context=context)
    return ShardLoader(stream, loader)


def data_state(loader: ShardLoader, info: DistInfo) -> dict:
    """Every rank's next start positions, for the checkpoint (a collective: call on all ranks)."""
    return loader.state(info.world_size, on_every_rank(loader.next_starts, info.world_size))


def restore_positions(loader: ShardLoader, resumed: Optional[Resumed], info: DistInfo) -> None:
    """Continue the shard passes where the resumed checkpoint stopped (nothing for a fresh run)."""
    if resumed is None:
        return
    note = loader.restore(resumed.data_state, info.rank, info.world_size)
    if note and info.rank == 0:
        print(f"=> note: {note}")
