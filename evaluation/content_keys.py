"""What the feature cache is keyed on: file contents, not only paths and times.

- A checkpoint is known by the SHA-256 of its bytes. Hashing a large file takes seconds, so the
  digest is remembered in ``<feature root>/checkpoint_sha256.jsonl`` under the file's stat
  (common/stat_memo.py): a cache hit stats the file and reads nothing.
- A split is known by its image list (path, label, size, mtime of each file, or each array
  file's size and mtime) plus the SHA-256 of a sample of the images' bytes (up to
  ``SAMPLE_FILES`` files spread over the list, or ``SAMPLE_BYTES`` from the start, middle and
  end of each array file), so images overwritten in place with their old times are caught
  where the sample reaches them.
"""
from __future__ import annotations

import hashlib
import json
import os

from common.stat_memo import StatMemo, file_sha256

MEMO_NAME = "checkpoint_sha256.jsonl"
SAMPLE_FILES = 64
SAMPLE_BYTES = 1 << 16


def checkpoint_sha256(path: str, memo_dir: str | None) -> str:
    """The file's SHA-256, from the memo in ``memo_dir`` when the file's stat matches it."""
    if not memo_dir:
        return file_sha256(path)
    os.makedirs(memo_dir, exist_ok=True)
    return StatMemo(os.path.join(memo_dir, MEMO_NAME), "sha256").value(path, lambda: file_sha256(path))


def _sampled(n: int) -> list[int]:
    if n <= SAMPLE_FILES:
        return list(range(n))
    return sorted({round(i * (n - 1) / (SAMPLE_FILES - 1)) for i in range(SAMPLE_FILES)})


def _array_sample(path: str, h) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(start)
            h.update(f.read(SAMPLE_BYTES))


def split_digest(listing) -> str:
    """Image list with sizes and mtimes, plus a sample of the contents (see the module note)."""
    h = hashlib.sha256()
    if listing.paths is not None:
        for path, label in zip(listing.paths, listing.labels):
            try:
                st = os.stat(path)
                h.update(f"{os.path.abspath(path)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except OSError:  # an unreadable entry (reported when read) still has a place in the list
                h.update(f"{os.path.abspath(path)}\t{label}\tmissing\n".encode())
        for i in _sampled(len(listing.paths)):
            try:
                h.update(bytes.fromhex(file_sha256(listing.paths[i])))
            except OSError:
                h.update(b"unreadable")
    else:
        h.update(json.dumps(list(map(int, listing.labels))).encode())
        for path in listing.sources:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            _array_sample(path, h)
    return h.hexdigest()


def expected_labels(listing, skipped: list[str]) -> list[int]:
    """The labels the features of this listing must carry, unreadable (skipped) images left out."""
    if listing.paths is None or not skipped:
        return [int(y) for y in listing.labels]
    gone = set(skipped)
    return [int(y) for p, y in zip(listing.paths, listing.labels) if p not in gone]
