"""Values remembered per file under the file's stat, so an unchanged file is not read again.

A file is known by its real path, size, modification time, inode and status-change time: the
ctime cannot be set back by a user, so a file rewritten in place with its old size and mtime
restored is computed again. Entries are JSON lines appended to one memo file (one short line per
write, so processes appending at once do not interleave); the last line of a path wins, and a
line cut by a crash is skipped (that file is computed again). Used for the rewriter's input
fingerprints, the evaluation's checkpoint hashes and training's caption-file hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any


HASH_BLOCK = 8 << 20  # bytes read per update: large enough that the hash, not Python, sets the pace


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a whole file: the value most often remembered here (checkpoints, caption files).
    SHA-256 rather than BLAKE2b: on CPUs with SHA instructions OpenSSL's is the faster of the two."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def stat_key(path: str | os.PathLike) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "ctime_ns": st.st_ctime_ns}


class StatMemo:
    """`field` of each entry holds the value. read=False: remember only (every value computed afresh).
    A memo that cannot be read or written only costs time: the values are computed afresh."""

    def __init__(self, memo_path: str | os.PathLike, field: str, read: bool = True) -> None:
        self.memo_path, self.field, self.entries = memo_path, field, {}
        try:
            with open(memo_path, encoding="utf-8") as f:
                for line in f if read else ():
                    try:
                        entry = json.loads(line)
                        self.entries[entry["path"]] = entry
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash: that file is computed again
        except OSError:  # none yet, or unreadable: values are computed again, never trusted
            pass

    def value(self, path: str | os.PathLike, compute: Callable[[], Any]) -> Any:
        """The value remembered for `path` while its stat matches; else compute() (stat taken first,
        so a file changed meanwhile is computed again next time), remembered."""
        where, key = os.path.realpath(path), stat_key(path)
        entry = self.entries.get(where)
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in key.items()):
            return entry[self.field]
        value = compute()
        self.entries[where] = entry = {"path": where, **key, self.field: value}
        try:
            with open(self.memo_path, "a", encoding="utf-8") as f:  # one short line: appends do not interleave
                f.write(json.dumps(entry) + "\n")
        except OSError:  # the memo cannot be written (a read-only home, a full disk): computed again next time
            pass
        return value
