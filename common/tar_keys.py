"""Samples of a webdataset tar grouped by key, with repeated keys found instead of merged.

webdataset groups consecutive members by key (`KEY.jpg`, `KEY.txt`, `KEY.json`). A key that
comes back later in the tar gives a second sample with the same key, and a key repeated in
consecutive members (`K.jpg K.txt K.jpg K.txt`) makes webdataset raise "duplicate file name",
which a reader's error handler counts as a damaged tar. Both are the same fault, a repeated
key, and a join by key cannot tell such samples apart: readers here count them as
``duplicate_key`` and never join them.

- `duplicated_keys(path)` lists a local tar's member names (headers only, the data seeked over)
  and returns the keys that name more than one sample, so even the first one is known before it
  is read;
- `keyed_samples(url, handler)` yields samples as webdataset does, except that a member whose
  field the current sample already has starts a new sample with the same key.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

from common import storage
from common.tar_stream import url_streams

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


def member_names(path: str) -> Iterator[str]:
    """Names of a local tar's regular files, read from the headers alone (the data is seeked
    over): ustar, GNU long names and pax `path` records, which is what tarfile and webdataset's
    TarWriter write; tarfile's own listing parses every header field and is much slower."""
    with storage.open_read(path) as f:  # a URL: ranged reads, the data seeked over as on disk
        long_name = None
        while True:
            header = f.read(512)
            if len(header) < 512 or not header.strip(b"\0"):
                return  # end of archive (or a cut tar: the reader counts it)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            kind = header[156:157]
            if kind in (b"L", b"x"):  # the next member's name, in this record's data
                data = f.read(size)
                f.seek(-size % 512, 1)
                long_name = (data.split(b"\0", 1)[0] if kind == b"L" else _pax_path(data)) or long_name
                continue
            name = header[0:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0" and header[345]:  # POSIX prefix (GNU's magic differs: atime there)
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            name = long_name or name
            long_name = None
            if kind in (b"0", b"\0"):
                yield name.decode("utf-8", errors="surrogateescape")
            f.seek(size + (-size % 512), 1)


def _pax_path(data: bytes):
    for record in data.split(b"\n"):
        length, _, rest = record.partition(b" ")
        if rest.startswith(b"path="):
            return rest[5:]
    return None


def duplicated_keys(path: str) -> set[str]:
    """Keys of a local tar that name two samples or more (an unreadable tar: none found here,
    the reader counts it)."""
    seen, twice = set(), set()
    try:
        for key in _groups(n for n in member_names(path) if not _meta(n)):
            (twice if key in seen else seen).add(key)
    except (OSError, ValueError) as err:
        if storage.is_url(path) and isinstance(err, storage.StorageError):
            raise  # a storage failure is not an unreadable tar: it must not pass as "no repeated key"
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
    from webdataset.tariterators import tar_file_expander
    current: dict | None = None
    for member in tar_file_expander(url_streams(url, handler), handler=handler, eof_value=None):
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
