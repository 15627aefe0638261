"""One training-loader interface (TrainLoader) for both data paths: a caption CSV with aligned
rewrite files (CsvLoader) and webdataset shards with rewrites joined by key (ShardLoader, over
training/wds.py); train.py builds one with build_loader and never asks which. state() is what
was handed out, {"epoch": e, "batches": k}, plus, for shards, each rank's and worker's read
position after those batches: the checkpoint's `data_state`. After restore(state), an epoch
after e starts fresh (CSV) or where the shard passes stopped; running epoch e itself again
would be a mid-epoch resume (its first k batches are done). Also: the data flags' checks, which
training/params.py's resolve runs (the shard list and rewrite sources are built there, once)."""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Iterator, Optional, Protocol, runtime_checkable

import braceexpand
import torch
from torch.utils.data import DataLoader

from common import storage, survey
from common.distributed import DistInfo, on_every_rank
from training.data import CaptionImageDataset, EpochSampler, check_root, train_transform
from training.rewrite_join import DEFAULT_MISMATCH_LIMIT, MISMATCH, MismatchGuard, open_rewrite_source
from training.wds import COUNT_KEYS, ShardStream, StreamSpec, empty_note, start_notes, survey_stream, \
    without_empty_tars

UNCHECKED = ("pipe:", "http://", "https://")  # webdataset opens these itself (s3:// etc. go through fsspec)
WDS_ONLY = ("train_num_samples", "dataset_resampled", "rewrite_data", "rewrite_json_keys", "rewrite_columns",
            "rewrite_mismatch_limit")


@runtime_checkable
class TrainLoader(Protocol):
    """What train.py and training/engine.py use of a loader."""
    notes: list[str]  # start-up lines for the user: inputs not read as written
    samples: int  # samples per epoch, all processes together

    def __len__(self) -> int: ...  # batches per epoch on this process
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # (images, tokens)
    def set_epoch(self, epoch: int) -> None: ...  # before each epoch
    def report(self) -> dict[str, int]: ...  # inputs skipped or missing in this epoch's batches, by kind
    def state(self) -> dict: ...  # the data position (every rank calls it: shards gather)
    def restore(self, state: Optional[dict]) -> Optional[str]: ...  # a note when the position does not apply


class EpochBatches:
    """What both loaders keep: the epoch, the batches handed out in it and their counts."""
    count_keys: tuple[str, ...]

    def __init__(self, loader: DataLoader, notes: list[str], samples: int, batches: int) -> None:
        self.loader, self.notes, self.samples, self.length = loader, notes, samples, batches
        self.epoch, self.batches, self.counts, self.resume_from = 0, 0, Counter(), None

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.counts = epoch, 0, Counter(dict.fromkeys(self.count_keys, 0))

    def resumed_batches(self, epoch: int) -> int:
        """Batches of `epoch` handed out before a mid-epoch checkpoint (--save-every-steps), 0 if none;
        the counts of those batches are taken over. Call after set_epoch; it applies once."""
        state, self.resume_from = self.resume_from, None
        if not state or state.get("epoch") != epoch or not state.get("batches"):
            return 0
        self.batches = int(state["batches"])
        self.counts.update(state.get("counts", {}))
        return self.batches

    def handed_out(self, images: torch.Tensor, tokens: torch.Tensor, counts: dict) -> tuple:
        self.batches += 1
        self.counts.update({k: int(v.sum()) for k, v in counts.items()})
        return images, tokens

    def report(self) -> dict[str, int]:
        return dict(self.counts)

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "counts": dict(self.counts)}

    def restore(self, state: Optional[dict]) -> Optional[str]:
        self.resume_from = state  # the CSV sampler's order is fixed by (seed, epoch): nothing else to set
        return None


class CsvLoader(EpochBatches):
    """A DataLoader over the CSV's samples with an EpochSampler, whose order is fixed by
    (seed, epoch); each item carries the failed image loads it skipped (skipped_images)."""
    count_keys = ("skipped_images",)

    def __init__(self, dataset: CaptionImageDataset, loader: DataLoader, sampler: EpochSampler) -> None:
        super().__init__(loader, dataset.notes, len(dataset), len(loader))
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.handed_out(images, tokens, {"skipped_images": failed}) for images, tokens, failed in self.loader)

    def set_epoch(self, epoch: int) -> None:
        """A mid-epoch resume skips the sampler's indices of the batches already used: the order is
        fixed by (seed, epoch) and every pick by (seed, epoch, index), so the rest is as it was."""
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip=self.resumed_batches(epoch) * self.loader.batch_size)


class ShardLoader(EpochBatches):
    """The DataLoader over a ShardStream plus the read positions of the batches it handed
    out: what the next epoch, or a resumed run, starts from."""
    count_keys = COUNT_KEYS

    def __init__(self, stream: ShardStream, loader: DataLoader, rank: int = 0, world_size: int = 1,
                 override: bool = False) -> None:
        super().__init__(loader, [], stream.batches * stream.batch_size * world_size, stream.batches)
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.override = override  # --resume-override: a changed shard inside an epoch is noted, not refused
        self.seen: dict[int, tuple[int, int, int]] = {}  # worker -> (pass, shard, sample) read so far
        self.drawn: dict[int, tuple[int, int]] = {}  # worker -> (samples drawn from its shuffle buffer, emitted)
        rewrites = stream.spec.rewrites
        per_epoch = stream.batches * stream.batch_size  # this rank's samples
        self.guard = MismatchGuard(rewrites.mismatch_limit, per_epoch) if rewrites is not None else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, info in self.loader:
            for worker, *position in info.pop("position").tolist():
                self.seen[worker] = tuple(position)
            for worker, draws, emitted in info.pop("drawn").tolist():
                self.drawn[worker] = (draws, emitted)
            notes = info.pop("mismatch")
            if self.guard is not None:  # too many rewrites of other captions: stop with one line
                self.guard.add(int(info[MISMATCH].sum()), notes)
            yield self.handed_out(images, tokens, info)

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch: it starts where the batches of the previous one stopped. A mid-epoch
        resume starts the epoch's streams where it started them and replays each worker's draws."""
        super().set_epoch(epoch)
        saved = self.resume_from
        self.stream.starts, self.stream.epoch, self.stream.replay = {**self.stream.starts, **self.seen}, epoch, {}
        self.seen, self.drawn, self.stream.worker_offset = {}, {}, 0
        if self.guard is not None:
            self.guard.new_epoch()  # (a mid-epoch resume counts the epoch's mismatches from there)
        if self.resumed_batches(epoch):
            # batch k comes from stream worker k % workers, and the DataLoader starts with its process 0
            self.stream.worker_offset = self.batches % self.stream.workers
            layout = [self.world_size, self.stream.workers]
            if saved.get("layout") != layout or saved.get("shards") != self.stream.spec.fingerprint():
                raise ValueError(f"the checkpoint is inside epoch {epoch} with data positions for {saved.get('layout')} "
                                 f"processes x --workers (or another shard list); this run has {layout}: rerun with "
                                 f"the checkpoint's --workers, processes and --train-data")
            self._check_same_files(saved, epoch)
            self.stream.starts = {w: tuple(s) for w, s in enumerate(saved["epoch_starts"][self.rank])}
            self.stream.replay = {w: tuple(d) for w, d in enumerate(saved["drawn"][self.rank])}
            self.drawn = dict(self.stream.replay)
            # a worker that had emitted its share before the checkpoint emits nothing more: keep where it was
            self.seen = {w: tuple(s) for w, s in enumerate(saved["starts"][self.rank])}

    def _check_same_files(self, saved: dict, epoch: int) -> None:
        """Inside an epoch the positions count samples of the files as they were: a shard or rewrite
        file replaced since (another size or version) is refused, naming it (--resume-override: noted)."""
        changed = changed_files(saved.get("versions"), self.stream.spec.identity())
        if not changed:
            return
        what = (f"{changed[0]}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''} changed since the "
                f"checkpoint inside epoch {epoch} was written")
        if not self.override:
            raise ValueError(f"{what}: the saved positions count its samples as they were, so resuming would skip or "
                             "repeat samples; put the file back, or pass --resume-override to go on regardless")
        if self.rank == 0:
            print(f"=> note: {what}; --resume-override: going on (samples of it may be skipped or repeated)")

    def state(self) -> dict:
        """Also every rank's next start positions, rank order (a collective); for a mid-epoch
        checkpoint, this epoch's start positions and each worker's draws and emitted samples."""
        gathered = on_every_rank(lambda: ({**self.stream.starts, **self.seen}, self.stream.starts, self.drawn),
                                 self.world_size)
        workers = range(self.stream.workers)
        identity = self.stream.spec.identity()
        return {**super().state(), "layout": [self.world_size, self.stream.workers],
                "shards": self.stream.spec.fingerprint(), **({"versions": identity} if identity else {}),
                "starts": [[list(g[0].get(w, (0, 0, 0))) for w in workers] for g in gathered],
                "epoch_starts": [[list(g[1].get(w, (0, 0, 0))) for w in workers] for g in gathered],
                "drawn": [[list(g[2].get(w, (0, 0))) for w in workers] for g in gathered]}

    def restore(self, state: Optional[dict]) -> Optional[str]:
        """Start positions from a checkpoint's data_state; a note when they do not apply.
        (A data_state without epoch and batches, written before they were, is an epoch end.)"""
        super().restore(state)
        if self.stream.spec.resampled or not state:
            return None
        layout = [self.world_size, self.stream.workers]
        if state.get("layout") != layout or state.get("shards") != self.stream.spec.fingerprint():
            first = min(tuple(s) for rank_starts in state.get("starts", [[[0, 0, 0]]]) for s in rank_starts)
            self.stream.starts = {w: (first[0], 0, 0) for w in range(self.stream.workers)}
            return (f"the checkpoint's data positions are for {state.get('layout')} ranks x workers or another "
                    f"shard list; this run has {layout}: its workers start pass {first[0]} from the beginning")
        self.stream.starts = {w: tuple(s) for w, s in enumerate(state["starts"][self.rank])}
        changed = changed_files(state.get("versions"), self.stream.spec.identity())
        if changed:  # at an epoch end the next pass reads it as it is; inside an epoch set_epoch refuses
            return (f"{changed[0]}{f' and {len(changed) - 1} more' if len(changed) > 1 else ''} changed since the "
                    "checkpoint was written")
        return None


def changed_files(saved: Optional[dict], now: dict) -> list[str]:
    """Files of a checkpoint's `versions` ("size:version" by file) that differ now or are gone, each
    named with both values; none when either side does not know (older checkpoints, pipe: URLs)."""
    if not saved or not now:
        return []
    return [f"{f} (size:version {tag} then, {now.get(f, 'gone')} now)" for f, tag in saved.items() if now.get(f) != tag]


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
            raise ValueError(f"--{name.replace('_', '-')} is for --dataset-type webdataset (tar shards); --train-data "
                             f"{args.train_data!r} is a caption CSV")
    if not os.path.isdir(args.root):
        raise ValueError(f"--root: image folder {args.root!r} does not exist")
    if args.aug_text and not args.augmented_caption_filelist:
        raise ValueError("--aug-text needs --augmented_caption_filelist F1 [F2 ...] (the rewrite files)")
    for path in args.augmented_caption_filelist if args.aug_text else []:
        if not os.path.isfile(path):
            raise ValueError(f"--augmented_caption_filelist: file {path!r} does not exist")


def check_stream_flags(args: argparse.Namespace) -> None:
    """The webdataset flags' checks that read no file (every process runs them, before any group)."""
    if args.train_num_samples is None or args.train_num_samples < 1:
        raise ValueError("--train-num-samples N is required with --dataset-type webdataset: the samples of one "
                         "epoch over all processes (a shard list does not say how many it holds)")
    if args.augmented_caption_filelist:
        raise ValueError("--augmented_caption_filelist holds rewrites aligned with a CSV; for shards give "
                         "--rewrite-data 'out/{00000..NNNNN}.parquet' (the rewriter's output) or --rewrite-json-keys")
    if args.aug_text and not (args.rewrite_data or args.rewrite_json_keys):
        raise ValueError("--aug-text with shards needs --rewrite-data 'out/{...}.parquet' or --rewrite-json-keys KEY")
    limit = DEFAULT_MISMATCH_LIMIT if args.rewrite_mismatch_limit is None else args.rewrite_mismatch_limit
    if not 0 <= limit <= 1:
        raise ValueError(f"--rewrite-mismatch-limit is a share of an epoch's samples, 0 to 1; got {limit}")
    if args.rewrite_columns and not args.rewrite_data:
        raise ValueError("--rewrite-columns names columns of the --rewrite-data files; give --rewrite-data")


def list_shards(pattern: str, urls: list[str], listings: Optional[dict] = None) -> dict:
    """url -> FileMeta (size, version) of the shards of --train-data (local files stat-ed, fsspec URLs
    from one listing per prefix); a missing one stops the run. pipe: and http(s):// are webdataset's
    to open: {} (not known)."""
    if any(u.startswith(UNCHECKED) for u in urls):
        return {}
    try:
        found, missing = survey.stat_pattern(urls, listings)
    except storage.StorageError as e:
        raise ValueError(f"--train-data: {e}") from None
    if not urls or missing:
        raise ValueError(f"--train-data {pattern!r}: {len(missing)} of {len(urls)} shards not found, "
                         f"e.g. {missing[0] if missing else '(none given)'}")
    return found


def read_stream(args: argparse.Namespace) -> StreamSpec:
    """The shard list, epoch size and rewrite sources of a webdataset run, with what start-up learns of
    every file (listings, empty tars, rewrite schemas, sample counts; concurrent reads): run once per
    job, on rank 0 (training/params.py hands the result to the other processes)."""
    urls = list(braceexpand.braceexpand(args.train_data or ""))
    if not urls:
        raise ValueError(f"--train-data {args.train_data!r}: 0 of 0 shards not found, e.g. (none given)")
    limit = DEFAULT_MISMATCH_LIMIT if args.rewrite_mismatch_limit is None else args.rewrite_mismatch_limit
    listings: dict = {}  # the tars' folder listings, which also tell the sample-count files apart
    # the two folders are looked at side by side: on object storage each is a paged listing
    found, rewrites = survey.concurrently(lambda task: task(), [
        lambda: list_shards(args.train_data, urls, listings),
        lambda: open_rewrite_source(args.rewrite_data, tuple(args.rewrite_json_keys), tuple(args.rewrite_columns),
                                    tuple(urls), limit) if args.aug_text else None])
    weights = args.aug_text_weights
    spec = StreamSpec(tuple(urls), args.train_num_samples, args.dataset_resampled, rewrites, args.multi_text,
                      args.seed, tuple(weights) if weights else None)
    return survey_stream(spec, found, listings)


def resolve_stream(args: argparse.Namespace) -> StreamSpec:
    """check_stream_flags, then read_stream: one process's whole look at the shards."""
    check_stream_flags(args)
    return read_stream(args)


def _data_loader(dataset, args: argparse.Namespace, info: DistInfo, **kw) -> DataLoader:
    # Forked workers share the caption tables (GBs for CC12M) copy-on-write; a spawned or
    # forkserver worker (Python 3.14's Linux default) would get a pickled copy each.
    context = "fork" if args.workers > 0 and sys.platform.startswith("linux") else None
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, multiprocessing_context=context,
                      drop_last=True,  # the gathered loss needs equal batches on every rank
                      pin_memory=info.device.type == "cuda", **kw)


def build_shard_loader(args, info: DistInfo, tokenizer, transform=None) -> ShardLoader:
    spec, empty = without_empty_tars(args.stream)
    readers = info.world_size * max(1, args.workers)
    if not spec.resampled and len(spec.urls) < readers:
        left = f" once {len(empty)} empty tars are left out (e.g. {empty[0]})" if empty else ""
        raise ValueError(f"--train-data has {len(spec.urls)} shards{left}, fewer than processes x --workers "
                         f"({info.world_size} x {max(1, args.workers)}): some readers would have none. Use fewer "
                         "--workers, more shards, or --dataset-resampled")
    stream = ShardStream(spec, transform or train_transform(), tokenizer, args.batch_size, info.world_size, args.workers)
    loader = ShardLoader(stream, _data_loader(stream, args, info), info.rank, info.world_size,
                         override=args.resume_override)
    loader.notes += empty_note(empty) + start_notes(spec)  # empty tars, rewrite coverage, passes per epoch
    return loader


def build_csv_loader(args, info: DistInfo, tokenizer, transform=None) -> CsvLoader:
    rewrites = args.augmented_caption_filelist if args.aug_text else []
    dataset = CaptionImageDataset(args.train_data, args.root, transform or train_transform(), tokenizer, rewrites,
                                  seed=args.seed, multi_text=args.multi_text,
                                  text_weights=args.aug_text_weights)
    check_root(dataset)
    sampler = EpochSampler(dataset, info.world_size, info.rank, args.seed)
    return CsvLoader(dataset, _data_loader(dataset, args, info, sampler=sampler), sampler)


def build_loader(args, info: DistInfo, tokenizer, transform=None) -> TrainLoader:
    """The loader of --train-data, CSV or shards; bad files fail here, before a model is built.
    args: training.params.RunConfig (its `stream`: the shards, read once by resolve).
    transform: the model's training transform (default: the presets', training.data.train_transform)."""
    loader = build_shard_loader(args, info, tokenizer, transform) if args.data == "webdataset" \
        else build_csv_loader(args, info, tokenizer, transform)
    given = [f for f in ("augmented_caption_filelist", "rewrite_data", "rewrite_json_keys") if getattr(args, f)]
    if given and not args.aug_text:
        loader.notes.append(f"--{given[0].replace('_', '-')} without --aug-text: the rewrites are not used (CLIP)")
    return loader
