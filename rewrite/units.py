"""What both kinds of unit share (a caption file's line ranges, rewrite/units_text.py; the shards
of a pattern, rewrite/units_shards.py): the `Units` protocol the run loop (rewrite/runner.py)
walks, the `UnitClaim` a data-parallel group holds, `RunTotals`, and the committing writer.

A commit is (append + flush + fsync of the output), then the JSON progress record beside it
rewritten atomically (common.fileio: temp file + fsync + os.replace). A resumed run first
truncates the output to the recorded byte count, so bytes appended after the last record are
discarded and redone; lines depend only on (seed, mode, line), so the redone bytes are the same
and the final file equals an uninterrupted run's. A finished run keeps OUT.progress.json with
"complete": true, so the same command again reports that it is complete.

Every record holds the size and a BLAKE2b checksum of the committed bytes, and every start
checks the file against them, finished or not: a file cut, edited or appended to since is
refused instead of being resumed or called complete. That reads the committed bytes once per
start, sequentially (a 40 GB LAION-400M output at ~1 GB/s: under a minute, against hours of
rewriting); the same read seeds the running checksum that later commits extend, and counts the
committed lines, which must be the lines the record says are done.

The record itself carries a BLAKE2b checksum of its own content ("checksum"): a record damaged
on disk (a flipped bit that leaves valid JSON, say in its next line or byte offset, which would
resume the unit a line off) is refused naming it. A record without one (written by an earlier
version) is read as before; the line count above still guards its position.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Protocol

from common.rewrite_format import decode_line  # noqa: F401 (one rule for the rewriter and the join)
from common.fileio import write_json_atomic
from common.locking import FileLock

RECORD_SUFFIX = ".progress.json"
RECORD_VERSION = 2  # 2: the committed bytes' checksum
STAT_KEYS = ("lines", "rewritten", "fallbacks", "empty", "truncated", "undecodable")


class ResumeError(ValueError):
    """An existing output or progress record does not fit this run."""


def record_path(out: Path) -> Path:
    return out.with_name(out.name + RECORD_SUFFIX)


def _create_empty(path: Path) -> None:
    with open(path, "wb") as f:
        os.fsync(f.fileno())


def record_checksum(record: dict) -> str:
    """BLAKE2b of the record's content without its own checksum (keys sorted: one text per content)."""
    body = json.dumps({k: v for k, v in record.items() if k != "checksum"}, sort_keys=True)
    return hashlib.blake2b(body.encode("utf-8"), digest_size=16).hexdigest()


def sealed(record: dict) -> dict:
    """The record as it is written: with the checksum of its content."""
    return {**record, "checksum": record_checksum(record)}


def check_seal(record: dict, path: object) -> None:
    """Refuse a record whose content is not what was written (a record without a checksum, from
    an earlier version, passes)."""
    if "checksum" in record and record["checksum"] != record_checksum(record):
        out = str(path)[:-len(RECORD_SUFFIX)]
        raise ResumeError(f"progress record {path} is damaged: its content does not match its checksum (changed on "
                          f"disk or by hand); delete it and {out} to redo that unit, or pass --overwrite to start over")


def read_record(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"progress record {path} is unreadable ({e}); pass --overwrite to start over") from None
    if not isinstance(record, dict) or record.get("version") not in (1, RECORD_VERSION):
        raise ResumeError(f"progress record {path} is not one this version writes; pass --overwrite to start over")
    check_seal(record, path)
    return _from_version_1(record, path.with_name(path.name[:-len(RECORD_SUFFIX)]))


def _from_version_1(record: dict, out: Path) -> dict:
    """A record written before checksums (version 1) keeps its run: the committed bytes
    are taken as they are (size still checked), and checked from then on."""
    state = record.get("state")
    if record.get("version") == 1 and isinstance(state, dict) and out.exists():
        state.setdefault("out_bytes", out.stat().st_size)  # a merged output's record had no size
        size = state["out_bytes"]
        fits = isinstance(size, int) and 0 <= size <= out.stat().st_size
        state.setdefault("out_blake2b", committed_checksum(out, size).hexdigest() if fits else "")
    return record


def new_checksum() -> "hashlib.blake2b":
    return hashlib.blake2b(digest_size=16)


READ_CHUNK = 16 << 20


def committed_checksum(path: Path, size: int, lines: Optional[list] = None) -> "hashlib.blake2b":
    """The running checksum of the first `size` bytes of `path` (read once, in chunks); their
    newlines are counted into `lines[0]` when given."""
    h = new_checksum()
    with open(path, "rb") as f:
        while size > 0 and (chunk := f.read(min(READ_CHUNK, size))):
            h.update(chunk)
            if lines is not None:
                lines[0] += chunk.count(b"\n")
            size -= len(chunk)
    return h


def check_committed(path: Path, size: int, digest: str, where: str, exact: bool,
                    lines: Optional[int] = None) -> "hashlib.blake2b":
    """Refuse a file whose committed bytes are not those recorded; exact: no bytes may follow
    them; lines: how many lines the record says they hold (one per input line or row)."""
    actual = path.stat().st_size if path.exists() else -1
    if actual < size or (exact and actual != size):
        raise ResumeError(f"{where}: the file has {max(actual, 0)} bytes but {size} were committed; it was "
                          "changed outside this program. Pass --overwrite to start over")
    counted = [0]
    h = committed_checksum(path, size, counted)
    if h.hexdigest() != digest:
        raise ResumeError(f"{where}: the committed bytes differ from the recorded checksum; it was changed "
                          "outside this program. Pass --overwrite to start over")
    if lines is not None and counted[0] != lines:
        raise ResumeError(f"progress record {record_path(path)} is damaged: it says {lines} lines were committed, "
                          f"{path} holds {counted[0]}; delete both to redo that unit, or pass --overwrite to start "
                          "over")
    return h


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


CONTENT = "content"  # a checkpoint identity's content hashes (rewrite/weights_identity.py)


def without_content(value: object) -> object:
    """`value` with the content hashes of every checkpoint identity in it removed."""
    if not isinstance(value, dict):
        return value
    return {k: ({a: b for a, b in v.items() if a != CONTENT} if k == "checkpoint" and isinstance(v, dict)
                else without_content(v)) for k, v in value.items()}


def same_fingerprint(recorded: object, now: object) -> bool:
    """A record fits this run: equal, or written before weight content hashes existed (none in
    it) and equal but for them (the run notes that once: rewrite/weights_identity.py)."""
    return recorded == now or (without_content(recorded) == recorded and without_content(now) == recorded)


def describe_changes(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    for k in a.keys() | b.keys():  # the engine is recorded only when it is not the native one
        if k.rsplit(".", 1)[-1] == "engine":
            a.setdefault(k, "native")
            b.setdefault(k, "native")
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6]) or "(no difference)"


def add_stats(total: dict, delta: dict) -> dict:
    return {k: total.get(k, 0) + delta.get(k, 0) for k in STAT_KEYS}


def sum_stats(items: Iterable[dict]) -> dict:
    total = dict.fromkeys(STAT_KEYS, 0)
    for s in items:
        total = add_stats(total, s)
    return total


@dataclass
class ShareState:
    next_line: int  # first input line not yet committed
    in_offset: int  # its byte offset in the input
    out_bytes: int  # committed size of the output (part) file
    out_blake2b: str = field(default_factory=lambda: new_checksum().hexdigest())  # of those bytes
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    complete: bool = False


def typed_state(record: dict, path: Path, keys: dict[str, type]) -> dict:
    """record['state'] restricted to `keys`; one line naming the first that is missing or mistyped."""
    state = record.get("state")
    state = state if isinstance(state, dict) else {}
    for key, kind in keys.items():
        value = state.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ResumeError(f"progress record {path} is damaged: its state has no valid {key!r}; "
                              "pass --overwrite to start over")
    return {k: state[k] for k in keys}


COMMITTED_TYPES = {"out_bytes": int, "out_blake2b": str}  # in every record, also a merged one
STATE_TYPES = {"next_line": int, "in_offset": int, **COMMITTED_TYPES, "stats": dict, "complete": bool}


def share_state(record: dict, path: Path) -> ShareState:
    return ShareState(**typed_state(record, path, STATE_TYPES))


def check_fits(record: dict, out: Path, fingerprint: dict, layout: dict) -> None:
    """A partial run's record must be of this input, settings and unit layout."""
    where = f"--output_filename: the partial run in {out} ({record_path(out).name})"
    if not same_fingerprint(record.get("fingerprint"), fingerprint):
        raise ResumeError(f"{where} was made from a different input or settings: "
                          f"{describe_changes(record.get('fingerprint', {}), fingerprint)}. "
                          "Rerun with the same input and flags to continue, or pass --overwrite to start over")
    if record.get("layout") != layout:
        raise ResumeError(f"{where} has another layout of units: {describe_changes(record.get('layout', {}), layout)}. "
                          "Pass --overwrite to start over")


class ShareWriter:
    """Appends the lines of one share [start, end) to `out_path`."""

    def __init__(self, out_path: Path, fingerprint: dict, layout: dict, overwrite: bool) -> None:
        self.out_path = out_path
        self.record_path = record_path(out_path)
        self.fingerprint = fingerprint
        self.layout = layout
        self.overwrite = overwrite
        self.state: ShareState | None = None
        self._fh = None
        self._checksum = new_checksum()  # of the committed bytes, extended by every commit

    def open(self, start_line: int, start_offset: int) -> ShareState:
        """Resume from the record, or start the share afresh."""
        record = None if self.overwrite else read_record(self.record_path)
        if record is not None:
            self.state = self._resume(record, start_line)
        else:
            if self.out_path.exists() and not self.overwrite:
                raise ResumeError(
                    f"--output_filename: {self.out_path} exists and has no progress record "
                    f"{self.record_path.name}; pass --overwrite to replace it, or choose another file")
            self.state = ShareState(next_line=start_line, in_offset=start_offset, out_bytes=0)
            self._write_record()  # record first: a crash right after leaves a resumable state
            _create_empty(self.out_path)
        if not self.state.complete:
            self._fh = open(self.out_path, "ab")
        return self.state

    def _resume(self, record: dict, start_line: int) -> ShareState:
        check_fits(record, self.out_path, self.fingerprint, self.layout)
        state = share_state(record, self.record_path)
        if not self.out_path.exists() and state.out_bytes == 0:
            # killed between the first record and the output's creation: nothing was committed
            _create_empty(self.out_path)
        self._checksum = check_committed(self.out_path, state.out_bytes, state.out_blake2b,
                                         f"--output_filename {self.out_path}", exact=False,
                                         lines=state.next_line - start_line)
        if self.out_path.stat().st_size > state.out_bytes:
            with open(self.out_path, "r+b") as f:  # drop what was written after the last commit
                f.truncate(state.out_bytes)
                os.fsync(f.fileno())
        return state

    def _write_record(self) -> None:
        write_json_atomic(self.record_path, sealed({
            "version": RECORD_VERSION, "fingerprint": self.fingerprint, "layout": self.layout,
            "complete": self.state.complete, "state": self.state.__dict__}))

    def commit(self, lines: list[str], next_line: int, in_offset: int, stats: dict) -> None:
        """Append the window's lines (without newlines), make them durable, then
        record the new committed position."""
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        try:
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._checksum.update(data)
            s = self.state
            s.next_line, s.in_offset, s.out_bytes = next_line, in_offset, s.out_bytes + len(data)
            s.out_blake2b = self._checksum.hexdigest()
            s.stats = add_stats(s.stats, stats)
            self._write_record()
        except OSError as e:  # a full disk, a file system gone read-only
            raise OSError(f"--output_filename: writing {self.out_path} failed ({e.strerror or e}); the lines "
                          "committed before are kept: rerun the same command to resume") from None

    def finish(self) -> None:
        self.close()
        self.state.complete = True
        self._write_record()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class UnitClaim:
    """A unit of work (a range of caption lines, or a shard) held by a data-parallel group: where
    its lines resume; on the group's writer, its writers (per mode, or one) and locks."""
    unit: int
    start: int  # first line (shards: row) not yet committed
    offset: int  # its byte offset in a caption file
    writers: dict[str, ShareWriter] = field(default_factory=dict)
    locks: list[FileLock] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # shard samples that are not lines

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        while self.locks:
            self.locks.pop().release()


@dataclass
class RunTotals:
    """What one data-parallel group did in this run (summed over groups for the summary)."""
    units: int = 0
    lines: int = 0
    stats: dict = field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))  # of the units it finished
    skipped: Counter = field(default_factory=Counter)
    tokens: int = 0

    def add(self, lines: int, claim: UnitClaim) -> None:
        self.units += 1
        self.lines += lines
        if claim.writers:
            self.stats = add_stats(self.stats, next(iter(claim.writers.values())).state.stats)
        self.skipped.update(claim.skipped)

    @staticmethod
    def sum(everyone: list["RunTotals"]) -> "RunTotals":
        return RunTotals(sum(t.units for t in everyone), sum(t.lines for t in everyone),
                         sum_stats(t.stats for t in everyone), sum((t.skipped for t in everyone), Counter()),
                         sum(t.tokens for t in everyone))


class Line(NamedTuple):
    """One input line as read."""
    index: int | str  # line number, from 0; for shard input the sample key
    text: str  # without its line ending
    undecodable: bool  # had bytes that are not UTF-8 (replaced by U+FFFD)
    end: int  # byte offset just after the line (a shard: its row position): where the next one starts


# What a look at the units finds before the weights are read (TextUnits.look, ShardUnits.look):
# some unit can be claimed; none can, and another live run holds one; none is left unfinished.
FREE, HELD, DONE = "free", "held", "done"


class Units(Protocol):
    """The units of a run as rewrite/runner.py walks them; made on global rank 0 (TextUnits, ShardUnits)."""
    count: int  # units, numbered 0..count-1
    total_lines: Optional[int]  # for the progress bar; None when only known as units are read

    def claim(self, unit: int) -> Optional[UnitClaim]:
        """The unit's writers (resumed) if it is unfinished and no live process holds it."""

    def any_free(self) -> bool:
        """On global rank 0 before the model is loaded: whether some unit can be claimed."""

    def lines(self, claim: UnitClaim) -> Iterator[Line]:
        """The claimed unit's lines from its resume point."""

    def commit(self, claim: UnitClaim, window: list[Line],
               per_mode: dict[str, tuple[list[str], list[dict]]]) -> None:
        """On the writer: the window's rewrites (and per-line counts) in every mode, made durable."""

    def finish(self, claim: UnitClaim) -> None:
        """On the writer: the unit is complete; its claim is released."""

    def progress(self, claim: UnitClaim) -> str:
        """What is committed of the claimed unit (for the message of an interrupted run)."""

    def where(self, claim: UnitClaim, line: Line) -> str:
        """A line's place in the input, for a warning."""

    def conclude(self, totals: RunTotals, seconds: float) -> str:
        """On global rank 0 when the groups are done: the run's summary (a caption file's modes merged)."""
