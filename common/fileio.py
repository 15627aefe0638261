"""Crash-safe file writes: a file is replaced whole or not at all.

Every write goes to a temporary file beside the target (named after this process,
so two writers never share one), is fsynced, then renamed over the target with
os.replace, and the folder is fsynced so the rename survives a power cut. A crash
leaves the previous file intact; the temporary file is removed on the way out.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable; skipped where the platform cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike) -> str:
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file, which then replaces `path` atomically."""
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(Path(path).parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    atomic_write(path, write)


def cannot_write_in(folder: str | os.PathLike) -> str | None:
    """Why no file can be created in `folder` (None if one can), found by creating and
    removing one: os.access passes root on a read-only folder and misses full quotas."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.remove(probe)
    return None
