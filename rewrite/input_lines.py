"""Reading the caption file: one pass that counts lines, hashes the content and keeps
a sparse line index (so a data-parallel group or a resumed run can seek to its first
line without reading the lines before it), then a line reader.

Lines are bytes split on b"\\n" only; the trailing "\\n" and one "\\r" are removed.
Bytes that are not UTF-8 are replaced by U+FFFD and counted (the line keeps its
place: one output line per input line whatever the bytes).
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from common.rewrite_format import decode_line

SCAN_CHUNK = 8 << 20  # bytes read per step of the scan; one index entry per chunk


@dataclass(frozen=True)
class InputInfo:
    size: int
    lines: int
    digest: str  # BLAKE2b of the whole content: a changed file refuses to resume
    # (line number, byte offset) of the first line starting inside each scan chunk
    index: tuple[tuple[int, int], ...] = field(default=((0, 0),), repr=False)

    def fingerprint(self) -> dict:
        return {"size": self.size, "lines": self.lines, "blake2b": self.digest}


def scan_input(path: str | Path, chunk_size: int = SCAN_CHUNK) -> InputInfo:
    """Count lines (a last line without '\\n' counts), hash, and index the file."""
    h = hashlib.blake2b(digest_size=16)
    newlines = offset = 0
    index = [(0, 0)]
    last = b""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            first = chunk.find(b"\n")
            if 0 <= first < len(chunk) - 1:  # a line starts inside this chunk
                index.append((newlines + 1, offset + first + 1))
            newlines += chunk.count(b"\n")
            offset += len(chunk)
            last = chunk[-1:]
    lines = newlines + (1 if offset and last != b"\n" else 0)
    return InputInfo(size=offset, lines=lines, digest=h.hexdigest(), index=tuple(index))


def share_range(n_lines: int, dp_size: int, dp_rank: int) -> tuple[int, int]:
    """Contiguous share [start, end) of data-parallel group dp_rank; sizes differ
    by at most one line."""
    return n_lines * dp_rank // dp_size, n_lines * (dp_rank + 1) // dp_size


def offset_of_line(path: str | Path, info: InputInfo, line: int) -> int:
    """Byte offset where `line` starts: seek to the nearest indexed line at or
    before it and skip forward (at most one scan chunk of lines)."""
    if line >= info.lines:
        return info.size
    k = bisect.bisect_right(info.index, (line, float("inf"))) - 1
    at, offset = info.index[k]
    with open(path, "rb") as f:
        f.seek(offset)
        for _ in range(line - at):
            f.readline()
        return f.tell()


class Line(NamedTuple):
    """One input line as read."""
    index: int | str  # line number, from 0; for shard input (rewrite/shard_input.py) the sample key
    text: str  # without its line ending
    undecodable: bool  # had bytes that are not UTF-8 (replaced by U+FFFD)
    end: int  # byte offset just after the line: where the next one starts


def read_lines(path: str | Path, offset: int, start: int, end: int) -> Iterator[Line]:
    """Lines start..end-1, the first one starting at byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        for i in range(start, end):
            text, bad = decode_line(f.readline())
            if i == 0 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte order mark is not part of the caption
            yield Line(i, text, bad, f.tell())
