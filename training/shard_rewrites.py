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
fixed at start-up from the first rewrite file's columns, then the JSON keys.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

from common import storage

log = logging.getLogger(__name__)
NOT_REWRITES = ("key", "caption")  # the rewriter's own columns; every other one is a sample mode


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

    @property
    def slots(self) -> int:
        """Rewrites per sample: the candidates besides the original caption."""
        return len(self.columns) + len(self.json_keys)


def open_rewrite_source(pattern: Optional[str], json_keys: tuple[str, ...] = ()) -> RewriteSource:
    """Check --rewrite-data at start-up: some files exist (a few missing ones, say shards the
    rewriter has not finished, are reported and their samples counted), names are unique, the
    first has rewrite columns."""
    if not pattern:
        return RewriteSource({}, (), tuple(json_keys))
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
    try:
        names = parquet_file(paths[0]).schema_arrow.names
    except storage.StorageError as e:
        raise ValueError(f"--rewrite-data: {e}") from None
    except Exception as e:  # pyarrow's own errors
        raise ValueError(f"--rewrite-data: cannot read {paths[0]} as parquet: {e}") from None
    columns = tuple(c for c in names if c not in NOT_REWRITES)
    if "key" not in names or not columns:
        raise ValueError(f"--rewrite-data: {paths[0]} needs a 'key' column and at least one rewrite column "
                         f"(the rewriter's output: key, caption, chatgpt, ...); it has {', '.join(names)}")
    return RewriteSource(files, columns, tuple(json_keys), missing)


def parquet_file(location: str):
    """A rewrite file as a pyarrow ParquetFile: a local path directly, a URL (s3://...) fetched
    whole first through common.storage (a shard's rewrites are a few MB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pq.ParquetFile(pa.BufferReader(storage.read_bytes(location)) if storage.is_url(location) else location)


def load_shard_rewrites(source: RewriteSource, url: str) -> Optional[dict[str, tuple[str, ...]]]:
    """key -> rewrites (in source.columns order) for the tar at `url`; None when the shard has no
    rewrite file or it cannot be read (its samples then train on their originals, counted)."""
    path = source.files.get(shard_name(url))
    if path is None:  # reported once at start-up (train.py), counted per sample
        return None
    try:
        pf = parquet_file(path)
        present = [c for c in source.columns if c in pf.schema_arrow.names]
        table = pf.read(columns=["key", *present]).to_pydict()
    except storage.StorageError:
        raise  # a storage failure (after retries) stops the run: it is not a damaged file
    except Exception as e:  # a damaged file must not stop a long run: counted per sample instead
        log.warning("cannot read rewrites %s (%s): its samples train on their original captions", path, e)
        return None
    values = [table[c] if c in table else [""] * len(table["key"]) for c in source.columns]
    return {str(k): tuple("" if v[i] is None else v[i] for v in values) for i, k in enumerate(table["key"])}


def sample_rewrites(source: RewriteSource, table: Optional[dict], key: str,
                    json_bytes: Optional[bytes]) -> Optional[tuple[str, ...]]:
    """The sample's rewrites (source.slots strings), or None when any source has nothing for it."""
    found: list[str] = []
    if source.columns:
        row = None if table is None else table.get(key)
        if row is None:
            return None
        found.extend(row)
    if source.json_keys:
        try:
            meta = json.loads(json_bytes) if json_bytes is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or not any(isinstance(meta.get(k), str) for k in source.json_keys):
            return None
        found.extend(meta.get(k) if isinstance(meta.get(k), str) else "" for k in source.json_keys)
    return tuple(found)
