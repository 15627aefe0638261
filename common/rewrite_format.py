"""The rewriter's output as both of its readers see it: the rewriter itself (resuming, checking
finished shards) and training (joining rewrites to samples). One rule each, so the two never drift:
- a caption is the sample's text as `decode_line` reads it (UTF-8 with U+FFFD for bad bytes, one
  trailing "\\n" and one "\\r" removed), which the join checks each rewrite row against;
- a shard output NNNNN.parquet records its settings, input and counts as JSON in its parquet
  schema metadata under METADATA_KEY; `read_metadata` reads them from the footer alone.
"""
from __future__ import annotations

import json
import os

from common import storage

METADATA_KEY = b"laclip_rewrite"  # parquet schema metadata: settings, input fingerprint, counts


def decode_line(raw: bytes) -> tuple[str, bool]:
    """(text without its line ending, had undecodable bytes?)."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def shard_stem(path: str | os.PathLike) -> str:
    """laion/00012.tar, out/00012.parquet -> 00012: a shard's name without its suffix, which names its
    rewrites (OUT/00012.parquet) and is how a training tar finds them."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_footer(location: str | os.PathLike) -> tuple[int, object]:
    """(rows, schema with its metadata) of a parquet file from its footer alone: a URL by ranged
    reads (common.storage), not the whole object. Raises storage.StorageError for storage
    failures, pyarrow's errors for a damaged file."""
    import pyarrow.parquet as pq
    meta = pq.read_metadata(storage.open_read(location) if storage.is_url(location) else storage.local_path(location))
    return meta.num_rows, meta.schema.to_arrow_schema()


def read_schema(location: str | os.PathLike):
    """A parquet file's schema (with the rewriter's metadata) from its footer."""
    return read_footer(location)[1]


def read_metadata(location: str | os.PathLike) -> dict:
    """What the rewriter stored about a finished shard ({} for a parquet file without it)."""
    return json.loads((read_schema(location).metadata or {}).get(METADATA_KEY, b"{}"))
