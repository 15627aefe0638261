"""Samples of a webdataset tar grouped by key, with repeated keys found instead of merged.

webdataset groups consecutive members by key (`KEY.jpg`, `KEY.txt`, `KEY.json`). A key that
comes back later in the tar gives a second sample with the same key, and a key repeated in
consecutive members (`K.jpg K.txt K.jpg K.txt`) makes webdataset raise "duplicate file name",
which a reader's error handler counts as a damaged tar. Both are the same fault, a repeated
key, and a join by key cannot tell such samples apart: readers here count them as
``duplicate_key`` and never join them.

- `duplicated_keys(path)` lists a local tar's member names (headers only: tarfile seeks over
  the data) and returns the keys that name more than one sample, so even the first one is known
  before it is read;
- `keyed_samples(url, handler)` yields samples as webdataset does, except that a member whose
  field the current sample already has starts a new sample with the same key.
"""
from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/field split (base_plus_ext)


def split_name(name: str) -> tuple[str | None, str | None]:
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _groups(names: Iterator[str]) -> Iterator[str]:
    """The key of each sample the member names make (a repeated field starts another sample)."""
    key, fields = None, set()
    for name in names:
        prefix, field = split_name(name)
        if prefix is None:
            continue
        if prefix != key or field in fields:
            if key is not None:
                yield key
            key, fields = prefix, set()
        fields.add(field)
    if key is not None:
        yield key


def _meta(name: str) -> bool:
    """webdataset skips top-level ``__name__`` members (its metadata files)."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def duplicated_keys(path: str) -> set[str]:
    """Keys of a local tar that name two samples or more (an unreadable tar: none found here,
    the reader counts it)."""
    seen, twice = set(), set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            names = (m.name for m in tar if m.isreg() and not _meta(m.name))
            for key in _groups(names):
                (twice if key in seen else seen).add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return twice


def holds_no_member(path: str) -> bool:
    """An empty tar (no bytes, or the end-of-archive blocks alone): its first header is zeros."""
    if os.path.getsize(path) == 0:
        return True
    with open(path, "rb") as f:
        return not f.read(512).strip(b"\0")


def keyed_samples(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's samples of one tar (``__key__``, ``__url__``, a field per member), a repeated
    field starting a new sample of the same key instead of an error."""
    from webdataset.tariterators import tar_file_expander, url_opener
    current: dict | None = None
    for member in tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler, eof_value=None):
        prefix, field = split_name(member["fname"])
        if prefix is None:
            continue
        if current is None or prefix != current["__key__"] or field in current:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url}
        current[field] = member["data"]
    if current is not None:
        yield current
