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

Start-up (`open_rewrite_source`, footers only): every file of --rewrite-data must be the
rewriter's output (its parquet metadata `laclip_rewrite`) unless --rewrite-columns names the
columns to use; every rewrite column must hold strings; all files must have the same rewrite
columns (a file with other columns would leave its shards without rewrites, quietly training
CLIP); the columns used are printed. Shards without a rewrite file are noted.

Join (`read_shard_rewrites`, `join`): a row is used only for the sample it was written for.
Keys alone cannot tell: img2dataset numbers keys the same way in every download, so rewrites of
another data set, or of an earlier download, match by key. The row's `caption` (what the
rewriter read) must equal the sample's text as the rewriter reads it (common/rewrite_format.py
decode_line: UTF-8 with U+FFFD for bad bytes, one trailing "\\n" and "\\r" removed). A
mismatch trains on the original caption and is counted as rewrite_caption_mismatch; above
--rewrite-mismatch-limit (a share of the epoch's samples) the run stops (`MismatchGuard`).
A key that names two samples of a tar or two rows of a file is never joined (duplicate_key).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from common import rewrite_manifest, storage, survey
from common.rewrite_format import METADATA_KEY, decode_line, read_schema, shard_stem

NOT_REWRITES = ("key", "caption")
MISMATCH, DUPLICATE, MISSING = "rewrite_caption_mismatch", "duplicate_key", "missing_rewrites"
NON_UTF8 = "non_utf8_captions"
NEW_COUNTS = (MISMATCH, DUPLICATE, NON_UTF8)  # logged only when not zero (older logs stay as they were)
DEFAULT_MISMATCH_LIMIT = 0.01
MANIFEST_HINT_AT = 100  # footers read at start from which the note suggests writing a manifest
SPOT_CHECKS = 2  # footers read to check a manifest's entries against the files they describe

log = logging.getLogger(__name__)


def _same_text(row_caption: str, raw: bytes) -> bool:
    return decode_line(row_caption.encode("utf-8"))[0] == decode_line(raw)[0]


@dataclass(frozen=True)
class RewriteColumns:
    columns: tuple[str, ...]  # the rewrite columns, in the first file's order
    has_caption: bool  # every file has the `caption` column the join checks
    notes: tuple[str, ...]


def _schema(path: str):
    try:
        return read_schema(path)
    except storage.StorageError as e:
        raise ValueError(f"--rewrite-data: {e}") from None
    except Exception as e:  # pyarrow's own errors
        raise ValueError(f"--rewrite-data: cannot read {path} as parquet: {e}") from None


def _rewrite_columns(path: str, schema, given: Sequence[str]) -> tuple[str, ...]:
    import pyarrow as pa
    names = schema.names
    if "key" not in names:
        raise ValueError(f"--rewrite-data: {path} has no 'key' column (the sample key the rewrites join on); "
                         f"it has {', '.join(names)}")
    if given:
        absent = [c for c in given if c not in names]
        if absent:
            raise ValueError(f"--rewrite-columns: {path} has no column {absent[0]!r}; it has {', '.join(names)}")
        columns = tuple(given)
    else:
        if METADATA_KEY not in (schema.metadata or {}):
            raise ValueError(f"--rewrite-data: {path} is not the rewriter's output (no {METADATA_KEY.decode()} "
                             f"metadata; img2dataset's own parquet has the same names as the tars); if its string "
                             f"columns are rewrites, name them with --rewrite-columns A B ...")
        columns = tuple(c for c in names if c not in NOT_REWRITES)
    for c in columns:
        kind = schema.field(c).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"--rewrite-data: column {c!r} of {path} holds {kind}, not text; rewrites are strings"
                             + ("" if given else " (name the rewrite columns with --rewrite-columns A B ...)"))
    if not columns:
        raise ValueError(f"--rewrite-data: {path} has no rewrite column besides {', '.join(NOT_REWRITES)}")
    return columns


def read_rewrite_columns(paths: Sequence[str], given: Sequence[str] = (), schemas: Optional[Sequence] = None) \
        -> RewriteColumns:
    """Every file's footer (or `schemas`, one per path: from a manifest or read concurrently): the
    rewriter's metadata (or --rewrite-columns), string columns, one column set."""
    first: Optional[tuple[str, tuple[str, ...]]] = None
    captions = True
    for k, path in enumerate(paths):
        schema = _schema(path) if schemas is None else schemas[k]
        columns = _rewrite_columns(path, schema, given)
        captions = captions and "caption" in schema.names
        if first is None:
            first = (path, columns)
        elif set(columns) != set(first[1]):
            raise ValueError(f"--rewrite-data: {path} has rewrite columns {', '.join(columns)} but {first[0]} has "
                             f"{', '.join(first[1])}; one run trains on one set of modes (rewrite the shards with "
                             f"the same --sample_mode, or give --rewrite-columns)")
    notes = [f"rewrites: columns {', '.join(first[1])} of {len(paths)} --rewrite-data files"]
    if not captions:
        notes.append("--rewrite-data files without a 'caption' column: rewrites cannot be checked against their "
                     "samples' text")
    return RewriteColumns(first[1], captions, tuple(notes))


def coverage_note(n_tars: int, bare: Sequence[str]) -> Optional[str]:
    """A note when the rewrite files cover only some of the tars (`bare`: those without one)."""
    if not bare:
        return None
    return (f"--rewrite-data covers {n_tars - len(bare)} of {n_tars} --train-data shards (e.g. {bare[0]} has no "
            f"rewrite file): their samples train on their original captions, counted as {MISSING} in log.txt")


@dataclass(frozen=True)
class ShardRewrites:
    path: str
    rows: dict  # key -> (caption or None, rewrites in the source's column order)
    duplicates: frozenset  # keys of two rows or more: never joined


def read_shard_rewrites(path: str, columns: Sequence[str]) -> ShardRewrites:
    """One rewrite file's rows (key -> (caption, rewrites)); raises what pyarrow raises."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    # a URL is fetched whole through common.storage (a shard's rewrites are a few MB): one request
    pf = pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)) if storage.is_url(path) else path)
    names = set(pf.schema_arrow.names)
    wanted = ["key"] + (["caption"] if "caption" in names else []) + [c for c in columns if c in names]
    table = pf.read(columns=wanted).to_pydict()
    values = [table.get(c, [""] * len(table["key"])) for c in columns]
    captions = table.get("caption", [None] * len(table["key"]))
    rows, twice = {}, set()
    for i, k in enumerate(table["key"]):
        key = str(k)
        if key in rows:
            twice.add(key)
        rows[key] = (captions[i], tuple("" if v[i] is None else v[i] for v in values))
    for key in twice:
        del rows[key]
    return ShardRewrites(path, rows, frozenset(twice))


def join(table: Optional[ShardRewrites], key: str, raw_text: Optional[bytes],
         duplicate_in_tar: bool) -> tuple[Optional[tuple[str, ...]], Optional[str]]:
    """(the sample's rewrites or None, the count it falls under or None)."""
    if duplicate_in_tar or (table is not None and key in table.duplicates):
        return None, DUPLICATE
    row = None if table is None else table.rows.get(key)
    if row is None:
        return None, MISSING
    caption, rewrites = row
    if caption is not None and raw_text is not None and not _same_text(caption, raw_text):
        return None, MISMATCH
    return rewrites, None


def mismatch_note(table: ShardRewrites, key: str) -> str:
    return json.dumps([table.path, key])


class MismatchGuard:
    """Stops the run when rewrite_caption_mismatch passes `limit` of an epoch's samples (this rank's
    share), with one line naming the rewrite file and the first mismatching key."""

    def __init__(self, limit: float, samples_per_epoch: int) -> None:
        self.allowed = limit * samples_per_epoch
        self.count, self.first = 0, ""

    def new_epoch(self) -> None:
        self.count, self.first = 0, ""

    def add(self, count: int, notes: Sequence[str]) -> None:
        self.count += count
        self.first = self.first or next((n for n in notes if n), "")
        if self.count > self.allowed:
            path, key = json.loads(self.first) if self.first else ("?", "?")
            raise ValueError(f"--rewrite-data: {self.count} samples this epoch have rewrites written for another "
                             f"caption (above --rewrite-mismatch-limit, {self.allowed:g} samples); first: key {key} "
                             f"in {path}. Are these rewrites of another data set or an earlier download?")


def _folder_schemas(folder: str, paths: list[str], listing: dict) -> tuple[dict, Optional[str]]:
    """path -> schema for the files of one folder: from its manifest where an entry matches the
    file's size and version (a few spot-checked against their footers), else read from the footer
    (concurrently); and the note to print about the manifest (stale or absent), if any."""
    damaged = None
    try:
        manifest = rewrite_manifest.read(folder)
    except storage.StorageError as e:
        raise ValueError(f"--rewrite-data: {e}") from None
    except rewrite_manifest.Damaged as e:
        manifest, damaged = None, str(e)
    names = {p: p.rstrip("/").rsplit("/", 1)[-1] for p in paths}
    trusted, stale = rewrite_manifest.split(manifest, listing, list(names.values()))
    schemas = {p: rewrite_manifest.entry_schema(manifest, trusted[n]) for p, n in names.items() if n in trusted}
    checked = [p for p in paths if p in schemas]
    for path in checked[:: max(1, len(checked) // SPOT_CHECKS)][:SPOT_CHECKS]:
        footer = _schema(path)
        if footer.remove_metadata() != schemas[path].remove_metadata() or \
                (METADATA_KEY in (footer.metadata or {})) != (METADATA_KEY in (schemas[path].metadata or {})):
            raise ValueError(f"--rewrite-data: {storage.join(folder, rewrite_manifest.MANIFEST)} says {path} has "
                             f"columns {', '.join(schemas[path].names)}, its footer says {', '.join(footer.names)}: "
                             f"the manifest does not describe these files; {rewrite_manifest.hint(folder)} anew")
    unread = [p for p in paths if p not in schemas]
    schemas.update(zip(unread, survey.concurrently(_schema, unread)))
    note = None
    if damaged:
        note = f"--rewrite-data: {damaged}: the footers were read; {rewrite_manifest.hint(folder)} anew"
    elif manifest is not None and stale:
        note = (f"--rewrite-data: {rewrite_manifest.MANIFEST} in {folder} does not describe {len(stale)} of "
                f"{len(paths)} files (e.g. {stale[0][0]}: {stale[0][1]}): their footers were read; "
                f"{rewrite_manifest.hint(folder)} anew")
    elif manifest is None and len(unread) >= MANIFEST_HINT_AT:
        note = (f"--rewrite-data: no {rewrite_manifest.MANIFEST} in {folder}: {len(unread)} parquet footers were read "
                f"at start; {rewrite_manifest.hint(folder)}, so that a start reads one object")
    return schemas, note


def rewrite_schemas(paths: list[str], found: dict) -> tuple[list, tuple[str, ...]]:
    """The schema of every path (in order) and the manifest notes, folder by folder."""
    folders: dict[str, list[str]] = {}
    for p in paths:
        folders.setdefault(p.rstrip("/").rsplit("/", 1)[0] if "/" in p else ".", []).append(p)
    schemas, notes = {}, []
    for folder, inside in folders.items():
        listing = {p.rstrip("/").rsplit("/", 1)[-1]: found[p] for p in inside}
        got, note = _folder_schemas(folder, inside, listing)
        schemas.update(got)
        notes += [note] if note else []
    return [schemas[p] for p in paths], tuple(notes)


@dataclass(frozen=True)
class RewriteSource:
    files: dict  # shard name -> rewrite parquet path
    columns: tuple[str, ...]  # rewrite columns of the parquet files
    json_keys: tuple[str, ...]  # keys of KEY.json
    missing: tuple[str, ...] = ()  # files of the pattern that do not exist (yet): their shards train on originals
    notes: tuple[str, ...] = ()  # printed at start-up: the columns used, what the files do not cover
    mismatch_limit: float = DEFAULT_MISMATCH_LIMIT  # share of an epoch's samples with a foreign rewrite that stops
    versions: Optional[dict] = None  # rewrite file -> "size:version" at start (common/survey.py), for resumes

    @property
    def slots(self) -> int:
        """Rewrites per sample: the candidates besides the original caption."""
        return len(self.columns) + len(self.json_keys)


def open_rewrite_source(pattern: Optional[str], json_keys: tuple[str, ...] = (), columns: tuple[str, ...] = (),
                        tar_urls: tuple[str, ...] = (),
                        mismatch_limit: float = DEFAULT_MISMATCH_LIMIT) -> RewriteSource:
    """Check --rewrite-data at start-up: some files exist (a few missing ones, say shards the
    rewriter has not finished, are reported and their samples counted), names are unique, every
    file's schema passes read_rewrite_columns (--rewrite-columns: the columns to use). The schemas
    come from the folder's manifest.json where it matches the listing, else from the footers, read
    concurrently (common/survey.py)."""
    if not pattern:
        return RewriteSource({}, (), tuple(json_keys), mismatch_limit=mismatch_limit)
    try:
        found, missing_list = survey.stat_pattern(pattern)  # local files, or one listing per s3:// prefix
    except storage.StorageError as e:
        raise ValueError(f"--rewrite-data: {e}") from None
    paths, missing = list(found), tuple(missing_list)
    if not paths:
        raise ValueError(f"--rewrite-data {pattern}: {len(missing)} of {len(missing)} files not found, e.g. "
                         f"{missing[0]}")
    files = {shard_stem(p): p for p in paths}
    if len(files) != len(paths):
        raise ValueError(f"--rewrite-data {pattern}: two files share a shard name; each tar finds its rewrites "
                         "by name (laion/00012.tar <-> out/00012.parquet)")
    schemas, manifest_notes = rewrite_schemas(paths, found)
    check = read_rewrite_columns(paths, columns, schemas)
    named = set(files) | {shard_stem(m) for m in missing}  # missing files of the pattern are noted apart
    cover = coverage_note(len(tar_urls), [u for u in tar_urls if shard_stem(u) not in named])
    notes = check.notes + ((cover,) if cover else ()) + manifest_notes
    return RewriteSource(files, check.columns, tuple(json_keys), missing, notes, mismatch_limit,
                         {p: found[p].tag() for p in paths})


def load_shard_rewrites(source: RewriteSource, url: str) -> Optional[ShardRewrites]:
    """The rows of the rewrite file of the tar at `url`; None when the shard has no rewrite file or
    it cannot be read (its samples then train on their originals, counted)."""
    path = source.files.get(shard_stem(url))
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
