"""What start-up needs to know of thousands of files, in few requests: sizes and versions from
one listing per folder (an S3 listing carries every object's size and ETag, 1,000 per request),
and the reads that remain (tar headers, parquet footers, small JSON files) run concurrently on a
bounded thread pool. At LAION scale (41k shards) a start that asks per shard, one request after
the other, waits minutes on object storage; S3 serves parallel GETs well, so THREADS requests
are in flight at once.

A file's *version* tells a replaced file from the one a record was made of: an object's ETag
(S3 gives every new content a new one), a local file's modification time in nanoseconds (a file
copied elsewhere gets a new one, so a record of it is not trusted there: safe, not silent).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

import braceexpand

from common import storage

THREADS = 32  # requests in flight at start-up (a bounded pool: the server and the client's sockets)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class FileMeta:
    size: int
    version: str  # an object's ETag, a local file's mtime_ns ("" when the backend gives neither)

    def tag(self) -> str:
        """One string for records and checkpoints: size and version."""
        return f"{self.size}:{self.version}"


def concurrently(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> list[R]:
    """[fn(x) for x in items], THREADS at a time; the first failure (in item order) is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads or THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _object_version(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation")
               or info.get("mtime") or info.get("LastModified") or "")


def list_meta(folder: str) -> dict[str, FileMeta]:
    """Name -> FileMeta of the files directly inside a folder or prefix ({} when it does not
    exist): one listing (paged by the server, 1,000 objects a page on S3)."""
    if not storage.is_url(folder):
        path = storage.local_path(folder)
        if not os.path.isdir(path):
            return {}
        found = {}
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_file():
                    st = e.stat()
                    found[e.name] = FileMeta(st.st_size, str(st.st_mtime_ns))
        return found
    return {d["name"].rstrip("/").rsplit("/", 1)[-1]: FileMeta(int(d.get("size") or 0), _object_version(d))
            for d in storage.list_details(folder) if d.get("type", "file") != "directory"}


def local_meta(path: str) -> FileMeta | None:
    try:
        st = os.stat(storage.local_path(path))
    except FileNotFoundError:
        return None
    return FileMeta(st.st_size, str(st.st_mtime_ns)) if os.path.isfile(storage.local_path(path)) else None


def stat_pattern(pattern: str | Iterable[str], listings: dict | None = None) \
        -> tuple[dict[str, FileMeta], list[str]]:
    """(found: location -> FileMeta in pattern order, missing) of a brace pattern (or a list of
    locations): local files stat-ed concurrently, URLs from one listing per prefix (kept in
    `listings`, folder -> name -> FileMeta, when given: other files of the folder are known too)."""
    names = list(braceexpand.braceexpand(pattern)) if isinstance(pattern, str) else list(pattern)
    metas: list[FileMeta | None]
    if names and not storage.is_url(names[0]):
        metas = concurrently(local_meta, names)
    else:
        listed: dict[str, dict[str, FileMeta]] = {} if listings is None else listings
        metas = []
        for name in names:
            folder, _, base = name.rpartition("/")
            if folder not in listed:
                listed[folder] = list_meta(folder)
            metas.append(listed[folder].get(base))
    found = {n: m for n, m in zip(names, metas) if m is not None}
    return found, [n for n, m in zip(names, metas) if m is None]


def read_head(location: str, n: int) -> bytes:
    """The first n bytes of a file or object (one ranged GET)."""
    if not storage.is_url(location):
        with open(storage.local_path(location), "rb") as f:
            return f.read(n)
    fs, inner = storage.filesystem(location)
    return storage.call("read", location, lambda: fs.cat_file(inner, start=0, end=n))
