"""Rewrites for webdataset training, joined to samples by key, one shard at a time.

Two sources, usable together:
- the rewriter's shard output (`--rewrite-data 'out/{00000..41407}.parquet'`): the file whose
  name matches the tar's (`laion/00012.tar` <-> `out/00012.parquet`) is read when the tar is
  opened, inside the loader worker, and dropped with it; every column other than `key` and
  `caption` is a rewrite (one per sample mode). Only one shard's table is in memory at a
  time, so memory does not grow with the number of shards (bench/bench_wds.py measures it);
- keys of each sample's `KEY.json` (`--rewrite-json-keys re_caption`), for datasets that
  ship their rewrites inside the shards.
The candidate list (its order is what the uniform pick and LaCLIP-MT's text slots use) is
fixed at start-up from the first rewrite file's columns, then the JSON keys. Every file is
checked at start-up and every row against its sample when joined (training/rewrite_join.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

from common import storage

from training.rewrite_join import (DEFAULT_MISMATCH_LIMIT, ShardRewrites, check_rewrite_files, coverage_note, join,
                                   read_shard_rewrites)

log = logging.getLogger(__name__)


def shard_name(url: str) -> str:
    """laion/00012.tar, out/00012.parquet -> 00012: how a tar finds its rewrite file."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class RewriteSource:
    files: dict  # shard name -> rewrite parquet path
    columns: tuple[str, ...]  # rewrite columns of the parquet files
    json_keys: tuple[str, ...]  # keys of KEY.json
    missing: tuple[str, ...] = ()  # files of the pattern that do not exist (yet): their shards train on originals
    notes: tuple[str, ...] = ()  # printed at start-up: the columns used, what the files do not cover
    mismatch_limit: float = DEFAULT_MISMATCH_LIMIT  # share of an epoch's samples with a foreign rewrite that stops

    @property
    def slots(self) -> int:
        """Rewrites per sample: the candidates besides the original caption."""
        return len(self.columns) + len(self.json_keys)


def open_rewrite_source(pattern: Optional[str], json_keys: tuple[str, ...] = (), columns: tuple[str, ...] = (),
                        tar_urls: tuple[str, ...] = (),
                        mismatch_limit: float = DEFAULT_MISMATCH_LIMIT) -> RewriteSource:
    """Check --rewrite-data at start-up: some files exist (a few missing ones, say shards the
    rewriter has not finished, are reported and their samples counted), names are unique, every
    file's footer passes check_rewrite_files (--rewrite-columns: the columns to use)."""
    if not pattern:
        return RewriteSource({}, (), tuple(json_keys), mismatch_limit=mismatch_limit)
    try:
        paths, missing_list = storage.expand(pattern)  # local files, or one listing per s3:// prefix
    except storage.StorageError as e:
        raise ValueError(f"--rewrite-data: {e}") from None
    missing = tuple(missing_list)
    if not paths:
        raise ValueError(f"--rewrite-data {pattern}: {len(missing)} of {len(missing)} files not found, e.g. "
                         f"{missing[0]}")
    files = {shard_name(p): p for p in paths}
    if len(files) != len(paths):
        raise ValueError(f"--rewrite-data {pattern}: two files share a shard name; each tar finds its rewrites "
                         "by name (laion/00012.tar <-> out/00012.parquet)")
    check = check_rewrite_files(paths, columns)
    named = set(files) | {shard_name(m) for m in missing}  # missing files of the pattern are noted apart
    cover = coverage_note(len(tar_urls), [u for u in tar_urls if shard_name(u) not in named])
    notes = check.notes + ((cover,) if cover else ())
    return RewriteSource(files, check.columns, tuple(json_keys), missing, notes, mismatch_limit)


def load_shard_rewrites(source: RewriteSource, url: str) -> Optional[ShardRewrites]:
    """The rows of the rewrite file of the tar at `url`; None when the shard has no rewrite file or
    it cannot be read (its samples then train on their originals, counted)."""
    path = source.files.get(shard_name(url))
    if path is None:  # reported once at start-up (train.py), counted per sample
        return None
    try:
        return read_shard_rewrites(path, source.columns)
    except storage.StorageError:
        raise  # a storage failure (after retries) stops the run: it is not a damaged file
    except Exception as e:  # a damaged file must not stop a long run: counted per sample instead
        log.warning("cannot read rewrites %s (%s): its samples train on their original captions", path, e)
        return None


def sample_rewrites(source: RewriteSource, table: Optional[ShardRewrites], sample: dict,
                    duplicate: bool) -> tuple[Optional[tuple[str, ...]], Optional[str]]:
    """(the sample's rewrites (source.slots strings) or None when a source has nothing for it, and
    the count that says why: missing_rewrites, duplicate_key, rewrite_caption_mismatch)."""
    found: list[str] = []
    if source.columns:
        row, why = join(table, sample["__key__"], sample.get("txt"), duplicate)
        if row is None:
            return None, why
        found.extend(row)
    if source.json_keys:
        json_bytes = sample.get("json")
        try:
            meta = json.loads(json_bytes) if json_bytes is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not any(isinstance(meta.get(k), str) for k in source.json_keys):
            return None, "missing_rewrites"
        found.extend(meta.get(k) if isinstance(meta.get(k), str) else "" for k in source.json_keys)
    return tuple(found), None
