"""What `python -m rewrite.report` reads: the rewriter's outputs (docs/formats.md), streamed in
batches of aligned (caption, one rewrite per mode) rows with bounded memory, local or any
fsspec URL (common/storage.py).

- Text outputs: --source CAPTIONS.txt and one --rewrites file per mode, read line by line in
  lockstep, each line decoded as the rewriter decodes its input (rewrite/units.py). A
  file's mode is --modes, else its progress record's `sample_mode`, else the `.<mode>.` in its
  name (target.bard.txt).
- Shard outputs: --rewrites FOLDER_OR_PREFIX holding NNNNN.parquet (`key`, `caption`, one column
  per mode), read in row batches; modes from --modes, else OUT/rewrite.json, else the shards'
  other string columns.

Every refusal is one line naming the flag and the file (ValueError; the CLI exits with 2).
"""
from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

from common import storage
from rewrite.prompts import MODE_ALIASES, SAMPLE_MODES, Pool, load_pool
from rewrite.shard_input import METADATA_KEY, RUN_RECORD
from common.rewrite_format import decode_line
from rewrite.units import RECORD_SUFFIX, STAT_KEYS

BATCH_LINES = 8192
SHARD_NAME = re.compile(r"^\d+\.parquet$")


@dataclass
class Batch:
    """Aligned rows: ids (text: line numbers; shards: (stem, key)), captions, each mode's rewrites."""
    ids: list
    captions: list[str]
    rewrites: dict[str, list[str]]


@dataclass
class Inputs:
    """The outputs found and checked, before any line is read."""
    kind: str  # "text" or "shards"
    modes: tuple[str, ...]
    files: dict[str, str]  # text: mode -> rewrites file; shards: stem -> NNNNN.parquet
    source: Optional[str] = None
    settings: dict[str, dict] = field(default_factory=dict)  # mode -> the rewriter's recorded settings
    recorded: dict = field(default_factory=dict)  # the rewriter's own counts (see docs/report.md)
    total: Optional[int] = None  # rows, when the files' metadata says (progress bar)


def as_list(value: object) -> list[str]:
    """A comma list (or the tuple fire makes of one) -> its items."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else \
        [] if value is None else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def _optional_record(path: str, flag: str) -> Optional[dict]:
    """A progress or run record, None if there is none; unreadable JSON is refused naming `flag`."""
    if not storage.exists(path):
        return None
    try:
        return storage.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag}: {path} is not readable JSON ({e})") from None


def _mode_of_name(path: str) -> Optional[str]:
    parts = storage.local_path(path).rstrip("/").rsplit("/", 1)[-1].split(".")
    found = [MODE_ALIASES.get(p.lower(), p.lower()) for p in parts[1:-1]]
    found = [m for m in found if m in SAMPLE_MODES]
    return found[-1] if found else None


def text_inputs(source: str, rewrites: list[str], modes: list[str]) -> Inputs:
    """--source and --rewrites text files: modes, records and settings, checked."""
    if not storage.exists(source):
        raise ValueError(f"--source {source}: file not found")
    if modes and len(modes) != len(rewrites):
        raise ValueError(f"--modes {','.join(modes)}: {len(modes)} modes for {len(rewrites)} --rewrites files")
    files, settings, recorded = {}, {}, {}
    for k, path in enumerate(rewrites):
        if not storage.exists(path) or (not storage.is_url(path) and os.path.isdir(storage.local_path(path))):
            raise ValueError(f"--rewrites {path}: file not found" + (" (a folder: shard outputs take no --source)"
                                                                       if storage.exists(path) else ""))
        record = _optional_record(path + RECORD_SUFFIX, "--rewrites")
        fingerprint = (record or {}).get("fingerprint", {})
        mode = modes[k] if modes else fingerprint.get("settings", {}).get("sample_mode") or _mode_of_name(path)
        if mode is None:
            raise ValueError(f"--rewrites {path}: its mode is unknown (no progress record {path}{RECORD_SUFFIX}, no "
                             "'.<mode>.' in its name); name the modes with --modes")
        mode = MODE_ALIASES.get(mode.lower(), mode.lower())
        if mode in files:
            raise ValueError(f"--rewrites {path}: a second file of mode {mode}; name the modes with --modes")
        files[mode] = path
        settings[mode] = fingerprint.get("settings", {})
        state = (record or {}).get("state", {})
        if record is not None and record.get("complete") and isinstance(state.get("stats"), dict):
            recorded[mode] = {k: state["stats"].get(k, 0) for k in STAT_KEYS}
    return Inputs("text", tuple(files), files, source=source, settings=settings, recorded=recorded)


def _lines(f, first: bool) -> Iterator[str]:
    for k, raw in enumerate(f):
        text, _ = decode_line(raw)
        if first and k == 0 and text.startswith("\ufeff"):
            text = text[1:]  # a byte order mark is not part of the caption (rewrite/units.py)
        yield text


def text_batches(inputs: Inputs) -> Iterator[Batch]:
    """The source and every rewrites file in lockstep; a file that ends early is refused."""
    handles = {m: storage.open_read(p) for m, p in inputs.files.items()}
    source = storage.open_read(inputs.source)
    try:
        captions = _lines(source, True)
        streams = {m: _lines(h, False) for m, h in handles.items()}
        done = 0
        while True:
            caps = list(itertools.islice(captions, BATCH_LINES))
            rows = {m: list(itertools.islice(s, len(caps) or 1)) for m, s in streams.items()}
            for m, got in rows.items():
                if len(got) != len(caps):  # count both to the end, for the message
                    n_source = done + len(caps) + sum(1 for _ in captions)
                    n_rewrites = done + len(got) + sum(1 for _ in streams[m])
                    raise ValueError(f"--rewrites {inputs.files[m]} has {n_rewrites} lines but --source "
                                     f"{inputs.source} has {n_source}"
                                     + ("; is its rewriting finished?" if n_rewrites < n_source else ""))
            if not caps:
                return
            yield Batch(list(range(done, done + len(caps))), caps, rows)
            done += len(caps)
    finally:
        source.close()
        for h in handles.values():
            h.close()


def _parquet(path: str):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(storage.open_read(path) if storage.is_url(path) else storage.local_path(path))
    except storage.StorageError:
        raise
    except Exception as e:  # pyarrow's own errors
        raise ValueError(f"--rewrites {path}: not a readable parquet file ({e})") from None


def shard_inputs(folder: str, modes: list[str]) -> Inputs:
    """--rewrites FOLDER_OR_PREFIX: its NNNNN.parquet, their columns and recorded counts."""
    names = [n for n in storage.list_names(folder) if SHARD_NAME.match(n)]
    if not names:
        raise ValueError(f"--rewrites {folder}: no NNNNN.parquet shards there (for text outputs give --source)")
    record = _optional_record(storage.join(folder, RUN_RECORD), "--rewrites") or {}
    run_settings = record.get("settings", {})
    files = {n.split(".")[0]: storage.join(folder, n) for n in names}
    columns = [f.name for f in _parquet(next(iter(files.values()))).schema_arrow if str(f.type) in ("string", "large_string")]
    modes = modes or as_list(run_settings.get("sample_mode")) or [c for c in columns if c not in ("key", "caption")]
    if not modes:
        raise ValueError(f"--rewrites {folder}: the shards have no rewrite column besides key and caption")
    recorded, total = dict.fromkeys(STAT_KEYS, 0), 0
    for path, have, stats, rows in _footers(list(files.values())):  # every shard checked before the pass
        for col in ("caption", *modes):
            if col not in have:
                raise ValueError(f"--rewrites {path} has no column {col!r} (its columns: {', '.join(have)})"
                                 + ("" if col == "caption" else "; choose the modes with --modes"))
        recorded = {k: recorded[k] + int(stats.get(k, 0)) for k in STAT_KEYS}
        total += rows
    examples = run_settings.get("examples", {})
    settings = {m: {**run_settings, "examples": examples.get(m) if isinstance(examples, dict) else None}
                for m in modes}
    # a shard's counts sum rewritten/fallbacks over its modes: per mode only when there is one
    per_mode = {modes[0]: recorded} if len(modes) == 1 and recorded["lines"] else {}
    return Inputs("shards", tuple(modes), files, settings=settings, recorded=per_mode, total=total)


def _footer(path: str) -> tuple[str, list[str], dict, int]:
    """(path, column names, the rewriter's recorded stats, rows) from a shard's footer."""
    pf = _parquet(path)
    stats = _json_or_empty((pf.schema_arrow.metadata or {}).get(METADATA_KEY)).get("stats", {})
    return path, pf.schema_arrow.names, stats if isinstance(stats, dict) else {}, pf.metadata.num_rows


def _footers(paths: list[str]) -> Iterator[tuple[str, list[str], dict, int]]:
    """Footers in order; object storage is read 16 at a time (one request's latency each)."""
    if not paths or not storage.is_url(paths[0]):
        return map(_footer, paths)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(16) as pool:
        return iter(list(pool.map(_footer, paths)))


def _json_or_empty(raw: Optional[bytes]) -> dict:
    import json
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def shard_batches(inputs: Inputs) -> Iterator[Batch]:
    for stem, path in inputs.files.items():
        pf = _parquet(path)
        columns = ["caption", *inputs.modes] + (["key"] if "key" in pf.schema_arrow.names else [])
        start = 0
        for record_batch in pf.iter_batches(batch_size=BATCH_LINES, columns=columns):
            data = record_batch.to_pydict()
            n = record_batch.num_rows
            keys = data.get("key") or [str(start + i) for i in range(n)]
            yield Batch([(stem, k) for k in keys], [c or "" for c in data["caption"]],
                        {m: [r or "" for r in data[m]] for m in inputs.modes})
            start += n


def batches(inputs: Inputs) -> Iterator[Batch]:
    return text_batches(inputs) if inputs.kind == "text" else shard_batches(inputs)


def load_pools(inputs: Inputs, examples: Optional[str]) -> dict[str, Pool]:
    """Each mode's example pool: the shipped one or --examples; one the rewriter's record names
    with another content hash is refused (its copies would be counted against the wrong pool)."""
    pools = {}
    for mode in inputs.modes:
        known = MODE_ALIASES.get(mode, mode) in SAMPLE_MODES
        if not known and (examples is None or examples.endswith(".py")):
            where = inputs.files.get(mode) or next(iter(inputs.files.values()))
            raise ValueError(f"--examples: mode {mode!r} of --rewrites {where} has no example pool (the shipped "
                             f"ones: {', '.join(SAMPLE_MODES)}); give its pool as --examples FILE.json")
        pools[mode] = load_pool(mode if known else SAMPLE_MODES[0], examples)  # JSON pools serve any mode
        made_with = inputs.settings.get(mode, {}).get("examples")
        if isinstance(made_with, str) and made_with != pools[mode].digest():
            where = inputs.files.get(mode) or next(iter(inputs.files.values()))
            pool = examples or f"the shipped {mode} pool"
            raise ValueError(f"--examples: --rewrites {where} was rewritten with example pool {made_with}, not "
                             f"{pool} ({pools[mode].digest()}); give the pool it was made with as --examples FILE")
    return pools


def pool_targets(pool: Pool) -> list[str]:
    """What a rewrite could copy: the targets of a pair pool, every caption of a group pool."""
    return [t for _, t in pool.pairs] if pool.pairs else [c for g in pool.groups for c in g]
