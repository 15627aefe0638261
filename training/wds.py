"""Training from webdataset shards (img2dataset output: KEY.jpg, KEY.txt, KEY.json per sample),
streamed with the `webdataset` library, with LaCLIP's rewrites joined by key.

Epochs, as open_clip defines them: `--train-num-samples` N per epoch over all ranks. Each
rank runs ceil(N / (batch x world)) batches rounded up to its loader workers, and each
worker yields exactly its share of samples, so every rank takes the same number of steps.

Shards. Without `--dataset-resampled` the shards are read in *passes*: pass p is the shard
list shuffled with (seed, p), split across ranks (webdataset's split_by_node) and loader
workers (split_by_worker). A worker reads its shards of a pass one after the other and goes
on to the next pass when they run out, and an epoch continues where the previous one stopped,
so a pass reads every shard once whatever N is. Each batch carries its worker's read position
(pass, shard, sample); the position after the last batch an epoch used is kept and saved in
the checkpoint, so a resumed run starts exactly there: finished shards are not read again.
The approximation (as with open_clip, exact mid-stream resume is not possible): samples that
sat in a worker's shuffle buffer when an epoch ended (at most SHUFFLE_BUFFER per worker) are
not trained on in that pass. With `--dataset-resampled`, each worker draws shards with
replacement (webdataset's ResampledShards, seeded by seed, epoch, rank and worker) and an
epoch needs no position.

Samples. Raw samples (bytes) are shuffled in a buffer, then decoded. A sample with an
unreadable or missing image, or without text, is skipped; a tar that cannot be read (to its
end) is counted; a sample whose rewrites are missing trains on its original caption. All four
are counted, travel with the batches and are reported per epoch in log.txt. Crop and caption
pick are keyed by (seed, epoch, sample key), as the CSV path keys them by index.

Start-up (the end of this file), before any shard streams: empty tars left out (a loader worker
whose shards hold no sample would fail with a worker traceback), rewrite sources not found or
partial, and a --train-num-samples above the samples the shards hold when their counts are known
(img2dataset's NNNNN_stats.json, or a sizes.json as open_clip reads).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from common.images import IMAGE_EXTENSIONS
from common import storage, survey
from common.storage import StorageError
from common.tar_keys import duplicated_keys, holds_no_member, keyed_samples
from common.tar_stream import is_storage_failure
from training.captions import ESCAPED, as_windows_1252
from training.data import MAX_LOGGED_FAILURES, all_captions, keyed_transform, pick_caption, sample_seed
from training.rewrite_join import (MISMATCH, NEW_COUNTS, NON_UTF8, RewriteSource, load_shard_rewrites, mismatch_note,
                                   sample_rewrites)

log = logging.getLogger(__name__)
# Shuffle buffer of raw samples per worker (open_clip: 5000 / 1000), at most a quarter of a
# worker's epoch: what sits in it when an epoch ends is not trained on in that pass.
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 2000, 500
COUNT_KEYS = ("skipped_images", "skipped_no_text", "shard_errors", "missing_rewrites", *NEW_COUNTS)
IMAGE_FIELDS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # webdataset's lower-cased member extensions


def stream_seed(*parts: int) -> int:
    """One 63-bit seed from a few ints (shard order of a pass, shuffle buffer of a worker)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]) >> 1


def key_number(key: str) -> int:
    """A sample key as an int for sample_seed: stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class StreamSpec:
    """What the shard stream needs, checked by train.py."""
    urls: tuple[str, ...]
    num_samples: int  # per epoch, all ranks together (--train-num-samples)
    resampled: bool
    rewrites: Optional[RewriteSource]  # None: plain CLIP (no --aug-text)
    multi_text: bool
    seed: int
    text_weights: Optional[tuple[float, ...]] = None  # --aug-text-weights; None: uniform pick
    # What the start-up survey (survey_stream, once per job) found; `surveyed` False: not run (a spec
    # made by hand), and the loader asks the files itself.
    versions: Optional[dict] = None  # shard -> "size:version" (common/survey.py); None: not known
    empty: tuple[str, ...] = ()  # empty tars, already left out of `urls`
    known_samples: Optional[tuple[int, str]] = None  # (samples the shards hold, where from) when every count is known
    surveyed: bool = False

    def fingerprint(self) -> str:
        """Identifies the shard list, so saved positions are only reused for the same one."""
        return hashlib.blake2b("\n".join(self.urls).encode(), digest_size=8).hexdigest()

    def identity(self) -> dict:
        """Every shard's and rewrite file's "size:version" at start: a file replaced under the same
        name inside an epoch is told apart ({} when not known)."""
        rewrites = (self.rewrites.versions if self.rewrites else None) or {}
        return {**(self.versions or {}), **rewrites}


class ShardStream(IterableDataset):
    """Items (image [3,H,W], tokens [77] or [texts,77], info) for one rank; info holds the
    COUNT_KEYS counts and the worker's read position (worker, pass, shard, sample)."""

    def __init__(self, spec: StreamSpec, transform: Callable, tokenizer: Callable, batch_size: int,
                 world_size: int, workers: int) -> None:
        self.spec, self.transform, self.tokenizer, self.batch_size = spec, transform, tokenizer, batch_size
        self.workers = max(1, workers)
        batches = math.ceil(spec.num_samples / (batch_size * world_size))
        self.worker_batches = math.ceil(batches / self.workers)
        self.batches = self.worker_batches * self.workers  # per rank and epoch
        self.worker_samples = self.worker_batches * batch_size
        self.epoch = 0
        self.starts: dict[int, tuple[int, int, int]] = {}  # worker -> (pass, shard, sample) to start from
        # worker -> (draws, emitted): a mid-epoch resume replays the epoch's stream from `starts` up to
        # `draws` samples out of the shuffle buffer, without decoding them (they were trained on)
        self.replay: dict[int, tuple[int, int]] = {}
        self.worker_offset = 0  # the stream worker of loader process 0 (not 0 after a mid-epoch resume)
        self._logged = 0  # bad samples and shards logged by this worker (each worker has its own copy)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        # The stream's worker: the loader process's id, rotated after a mid-epoch resume so that the
        # DataLoader's round robin (batch i from process i % workers) continues with the right stream.
        worker = ((0 if info is None else info.id) + self.worker_offset) % self.workers
        rank = wds.utils.pytorch_worker_info()[0]
        pending: Counter = Counter()  # counts waiting to travel with the next good sample
        cursor = [self.starts.get(worker, (0, 0, 0))]
        raw = self._resampled(rank, worker, pending) if self.spec.resampled else self._passes(worker, cursor, pending)
        rng = random.Random(stream_seed(self.spec.seed, self.epoch, rank, worker))
        size = max(1, min(SHUFFLE_BUFFER, self.worker_samples // 4))
        shuffled = wds.filters.shuffle(size, min(SHUFFLE_INITIAL, size), rng=rng)(raw)
        replayed, emitted = self.replay.get(worker, (0, 0))
        for draws, sample in enumerate(shuffled, 1):
            if draws <= replayed:  # a mid-epoch resume: drawn, decoded and trained on before the checkpoint
                if draws == replayed:
                    pending.clear()  # what the reads so far counted travelled with those samples
                continue
            if emitted >= self.worker_samples:  # the worker had emitted its share before the checkpoint
                return
            item = self._decode(sample, pending)
            if item is None:
                continue
            emitted += 1
            counts = {k: pending.pop(k, 0) for k in COUNT_KEYS}
            yield (*item, {**counts, "position": torch.tensor([worker, *cursor[0]]),
                           "drawn": torch.tensor([worker, draws, emitted]), "mismatch": sample.get("__note__", "")})
            if emitted == self.worker_samples:
                return

    # ------------------------------------------------------------ raw samples of shards
    def _read_shard(self, url: str, pending: Counter) -> Iterator[dict]:
        table, twice, seen = None, set(), set()
        if self.spec.rewrites is not None and self.spec.rewrites.columns:
            table = load_shard_rewrites(self.spec.rewrites, url)
            # keys of two samples are never joined, the first one included: a local tar is listed first
            twice = duplicated_keys(url) if table is not None and os.path.isfile(url) else set()
        broken = []

        def count_and_continue(exn: Exception) -> bool:
            if is_storage_failure(url, exn):  # never a skipped shard: the run stops, naming it
                raise StorageError(f"--train-data shard {url}: reading failed mid-shard ({exn}); stopping rather "
                                   "than skipping the shard (rerun to resume from the last checkpoint)") from exn
            if not broken:  # webdataset may report one damaged tar more than once
                pending["shard_errors"] += 1
                self._logged += 1
                if self._logged <= MAX_LOGGED_FAILURES:
                    log.warning("shard %s cannot be read to its end (%s); its samples before that are used",
                                url, exn)
            broken.append(exn)
            return True

        for sample in keyed_samples(url, handler=count_and_continue):
            if self.spec.rewrites is not None:
                key = sample["__key__"]
                duplicate = key in twice or key in seen
                seen.add(key)
                sample["__rewrites__"], sample["__why__"] = sample_rewrites(self.spec.rewrites, table, sample,
                                                                            duplicate)
                if sample["__why__"] == MISMATCH:
                    sample["__note__"] = mismatch_note(table, key)
            yield sample

    def _pass_shards(self, p: int, worker: int) -> list[str]:
        """Pass p's shards of this rank (webdataset's split_by_node) and stream worker (as its
        split_by_worker, by the stream's worker id)."""
        order = [d["url"] for d in wds.SimpleShardList(list(self.spec.urls), seed=stream_seed(self.spec.seed, p))]
        return list(itertools.islice(wds.split_by_node(order), worker, None, self.workers))

    def _passes(self, worker: int, cursor: list, pending: Counter) -> Iterator[dict]:
        """This worker's shards, pass after pass, from cursor[0]; cursor[0] follows the reading."""
        p, first_shard, skip = cursor[0]
        while True:
            shards, read = self._pass_shards(p, worker), 0
            for s in range(first_shard, len(shards)):
                for j, sample in enumerate(self._read_shard(shards[s], pending)):
                    if j < skip:
                        continue  # read before the saved position: already trained on
                    cursor[0] = (p, s, j + 1)
                    read += 1
                    yield sample
                skip = 0
                cursor[0] = (p, s + 1, 0)
            if read == 0 and first_shard == 0:
                raise RuntimeError(f"loader worker {worker}: none of its {len(shards)} shards holds a readable "
                                   f"sample (e.g. {shards[0] if shards else '-'})")
            p, first_shard = p + 1, 0

    def _resampled(self, rank: int, worker: int, pending: Counter) -> Iterator[dict]:
        # worker_seed: webdataset's default (rank * 1000 + worker), by the stream's worker id
        for shard in wds.ResampledShards(list(self.spec.urls), seed=stream_seed(self.spec.seed, self.epoch),
                                         deterministic=True, worker_seed=lambda: rank * 1000 + worker):
            yield from self._read_shard(shard["url"], pending)

    # ------------------------------------------------------------ one sample
    def _decode(self, sample: dict, pending: Counter) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        key = sample["__key__"]
        caption = self._caption(sample.get("txt"), pending)
        if not caption.strip():
            pending["skipped_no_text"] += 1
            return None
        data = next((sample[f] for f in IMAGE_FIELDS if f in sample), None)
        rng = random.Random(sample_seed(self.spec.seed, self.epoch, key_number(key)))
        try:
            if data is None:
                raise ValueError("no image member")
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            pending["skipped_images"] += 1
            self._logged += 1
            if self._logged <= MAX_LOGGED_FAILURES:
                log.warning("skipping sample %s of %s: unreadable image (%s)", key, sample.get("__url__"), err)
            return None
        pixels = keyed_transform(self.transform, image, rng.getrandbits(63))
        rewrites: tuple[str, ...] = ()
        if self.spec.rewrites is not None:
            rewrites = sample.get("__rewrites__")
            if rewrites is None:  # trains on the original; the empty slots fall back to it
                pending[sample.get("__why__") or "missing_rewrites"] += 1
                rewrites = ("",) * self.spec.rewrites.slots
        if self.spec.multi_text:
            return pixels, self.tokenizer(all_captions(caption, rewrites))
        return pixels, self.tokenizer(pick_caption(caption, rewrites, rng, self.spec.text_weights))

    @staticmethod
    def _caption(text: Optional[bytes], pending: Counter) -> str:
        """UTF-8; bytes that are not are read as Windows-1252 and counted, as the CSV path reads them."""
        if text is None:
            return ""
        caption = text.decode("utf-8", errors="surrogateescape")
        if not caption.isascii() and ESCAPED.search(caption):
            pending[NON_UTF8] += 1
            caption = as_windows_1252(caption)
        return caption


# ---- start-up ----

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")  # webdataset opens these itself
UNCOUNTED = ("pipe:", "http://", "https://")  # no listing: sample counts unknown


EMPTY_TAR_MAX = 10240  # an object this small may be an empty tar (tar pads archives to 10240 bytes)


def _holds_no_member(url: str, meta) -> bool:
    """An empty tar: no bytes, or a first header of zeros (the end-of-archive blocks alone)."""
    if meta.size == 0:
        return True
    if not storage.is_url(url):
        return holds_no_member(storage.local_path(url))
    return not survey.read_head(url, 512).strip(b"\0")


def find_empty_tars(found: dict) -> list[str]:
    """The tars (of `found`: url -> FileMeta) that hold no member, their first 512 bytes read
    concurrently: every local tar, and objects of at most EMPTY_TAR_MAX bytes (a larger one holds a
    member unless written with an unusual blocking factor)."""
    candidates = [u for u, m in found.items() if not storage.is_url(u) or m.size <= EMPTY_TAR_MAX]
    empty = survey.concurrently(lambda u: _holds_no_member(u, found[u]), candidates)
    return [u for u, e in zip(candidates, empty) if e]


def survey_stream(spec: StreamSpec, found: dict, listings: Optional[dict] = None) -> StreamSpec:
    """The spec with what start-up learns of every shard, once per job (rank 0, training/params.py):
    the shards' sizes and versions (`found`, from the listing), empty tars left out, the sample
    counts when known. Reads run concurrently (common/survey.py)."""
    empty = find_empty_tars(found) if found else []
    if len(empty) == len(spec.urls):
        raise ValueError(f"--train-data: all {len(empty)} shards are empty tars (e.g. {empty[0]})")
    gone = set(empty)
    urls = tuple(u for u in spec.urls if u not in gone)
    versions = {u: found[u].tag() for u in urls} if found else None
    return dataclasses.replace(spec, urls=urls, versions=versions, empty=tuple(empty),
                               known_samples=known_sample_count(urls, listings), surveyed=True)


def without_empty_tars(spec: StreamSpec) -> tuple[StreamSpec, list[str]]:
    """(the spec without the local tars that hold no member, those tars): a loader worker with
    only empty shards would fail with a worker traceback. A surveyed spec has them out already."""
    if spec.surveyed:
        return spec, list(spec.empty)
    empty = [u for u in spec.urls if not u.startswith(REMOTE_PREFIXES) and holds_no_member(u)]
    if not empty:
        return spec, []
    if len(empty) == len(spec.urls):
        raise ValueError(f"--train-data: all {len(empty)} shards are empty tars (e.g. {empty[0]})")
    kept = tuple(u for u in spec.urls if u not in set(empty))
    return dataclasses.replace(spec, urls=kept), empty


def empty_note(empty: list[str]) -> list[str]:
    return [f"{len(empty)} --train-data shards are empty tars (e.g. {empty[0]}): left out"] if empty else []


def known_sample_count(urls: tuple[str, ...], listings: Optional[dict] = None) -> tuple[int, str] | None:
    """(samples, where from) when every shard's count is known: img2dataset's NNNNN_stats.json
    ("successes") beside each tar, or a sizes.json ({"NNNNN.tar": n}) in its folder. One listing
    per folder tells which exist (`listings`: folder -> names, already listed); those read are read
    concurrently."""
    if any(u.startswith(UNCOUNTED) for u in urls):
        return None
    listed: dict[str, set] = {}
    sizes: dict[str, dict] = {}
    stats: list[str] = []
    try:
        for url in urls:
            folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
            if folder not in listed:
                listed[folder] = set((listings or {}).get(folder) or storage.list_names(folder))
                sizes[folder] = storage.read_json(storage.join(folder, "sizes.json")) \
                    if "sizes.json" in listed[folder] else {}
            stat = name[: -len(".tar")] + "_stats.json"
            if stat in listed[folder]:
                stats.append(storage.join(folder, stat))
            elif name not in sizes[folder]:
                return None
        counts = dict(zip(stats, survey.concurrently(lambda p: int(storage.read_json(p)["successes"]), stats)))
        total = 0
        for url in urls:
            folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
            stat = storage.join(folder, name[: -len(".tar")] + "_stats.json")
            total += counts[stat] if stat in counts else int(sizes[folder][name])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sources = {"_stats.json"} if stats else set()
    sources |= {"sizes.json"} if len(stats) < len(urls) else set()
    return total, " and ".join(sorted(sources))


def start_notes(spec: StreamSpec) -> list[str]:
    notes = []
    missing = spec.rewrites.missing if spec.rewrites else ()
    if missing:
        notes.append(f"{len(missing)} --rewrite-data files do not exist (e.g. {missing[0]}): the samples of "
                     "their shards train on their original captions, counted as missing_rewrites in log.txt")
    notes += spec.rewrites.notes if spec.rewrites else ()
    known = spec.known_samples if spec.surveyed else known_sample_count(spec.urls)
    if known and not spec.resampled and spec.num_samples > known[0]:
        notes.append(f"--train-num-samples {spec.num_samples} is above the {known[0]} samples the shards hold "
                     f"({known[1]}): each epoch reads them {spec.num_samples / max(known[0], 1):.1f} times")
    return notes
