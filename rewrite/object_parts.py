"""A shard in progress on object storage (s3://...), where files cannot be appended to.

The local part file (rewrite/output.py's ShareWriter: append + fsync, then the progress
record replaced) becomes, for an output URL OUT/NNNNN.parquet:
- one object per committed window, OUT/NNNNN.parquet.part/<first line, 9 digits>.jsonl,
  holding the window's rows exactly as the local part file would (one JSON object a line);
- the progress record OUT/NNNNN.parquet.part.progress.json, the local record's fields plus
  the list of committed windows.
A commit first checks the shard's claim (a run whose claim was taken over stops here), then
uploads the window object whole, then the record whole. A window object that the record does
not list (a crash between the two uploads) is simply written again by the resumed run: its
name is its first line, and its rows are a function of the input, so the retry is the same.
A resume reads the listed windows once and checks them against the recorded size and
BLAKE2b of the committed rows, as the local writer checks its part file; the finished
shard's parquet is made from the same bytes, so it equals a local run's.
"""
from __future__ import annotations

import hashlib
from typing import Optional

from common import storage
from rewrite.output import RECORD_SUFFIX, RECORD_VERSION, ResumeError, ShareState, add_stats, describe_changes, \
    share_state

WINDOW_DIGITS = 9


def window_name(first_line: int) -> str:
    return f"{first_line:0{WINDOW_DIGITS}d}.jsonl"


class ObjectShareWriter:
    """ShareWriter's interface (open, commit, finish, close, state, fingerprint) over objects."""

    def __init__(self, out_url: str, fingerprint: dict, layout: dict, overwrite: bool, claim=None) -> None:
        self.out_path, self.record_path = out_url, out_url + RECORD_SUFFIX
        self.fingerprint, self.layout, self.overwrite, self.claim = fingerprint, layout, overwrite, claim
        self.state: Optional[ShareState] = None
        self.windows: list[int] = []  # first line of every committed window, in order
        self._checksum = hashlib.blake2b(digest_size=16)

    def window_url(self, first_line: int) -> str:
        return storage.join(self.out_path, window_name(first_line))

    def open(self, start_line: int, start_offset: int) -> ShareState:
        record = None
        if not self.overwrite and storage.exists(self.record_path):
            try:
                record = storage.read_json(self.record_path)
            except ValueError as e:
                raise ResumeError(f"progress record {self.record_path} is unreadable ({e}); pass --overwrite to "
                                  "start over") from None
        if record is None:
            self.state = ShareState(next_line=start_line, in_offset=start_offset, out_bytes=0)
            self._write_record()
        else:
            self._resume(record)
        return self.state

    def _resume(self, record: dict) -> None:
        where = f"--output_filename: the partial shard {self.out_path} ({self.record_path.rsplit('/', 1)[-1]})"
        if record.get("version") != RECORD_VERSION or not isinstance(record.get("windows"), list):
            raise ResumeError(f"{where} is not one this version writes; pass --overwrite to start over")
        for key in ("fingerprint", "layout"):
            if record.get(key) != getattr(self, key):
                raise ResumeError(f"{where} was made from a different input, settings or layout: "
                                  f"{describe_changes(record.get(key) or {}, getattr(self, key))}. Rerun with the "
                                  "same input and flags to continue, or pass --overwrite to start over")
        self.state = share_state(record, self.record_path)  # the path only names it in messages
        self.windows = [int(w) for w in record["windows"]]
        data = self.committed_bytes()
        if len(data) != self.state.out_bytes or self._checksum.hexdigest() != self.state.out_blake2b:
            raise ResumeError(f"{where}: its committed windows differ from the recorded size or checksum; they were "
                              "changed outside this program. Pass --overwrite to start over")

    def committed_bytes(self) -> bytes:
        """The committed rows, window after window: the bytes of the local part file (read once)."""
        self._checksum = hashlib.blake2b(digest_size=16)
        chunks = []
        for first in self.windows:
            chunk = storage.read_bytes(self.window_url(first))
            self._checksum.update(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def _write_record(self) -> None:
        storage.write_json(self.record_path, {
            "version": RECORD_VERSION, "fingerprint": self.fingerprint, "layout": self.layout,
            "complete": self.state.complete, "state": self.state.__dict__, "windows": self.windows})

    def commit(self, lines: list[str], next_line: int, in_offset: int, stats: dict) -> None:
        """Upload the window's rows as one object, then the record that lists it."""
        if self.claim is not None:
            self.claim.check()  # ClaimLost: another run took the shard over; write nothing more
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        s = self.state
        storage.write_bytes(self.window_url(s.next_line), data)
        self._checksum.update(data)
        self.windows.append(s.next_line)
        s.next_line, s.in_offset, s.out_bytes = next_line, in_offset, s.out_bytes + len(data)
        s.out_blake2b = self._checksum.hexdigest()
        s.stats = add_stats(s.stats, stats)
        self._write_record()

    def finish(self) -> None:
        self.state.complete = True

    def remove(self) -> None:
        """After the finished parquet is uploaded: the windows and the record go."""
        remove_partial(self.out_path)

    def close(self) -> None:
        """Nothing is held open between commits."""


def remove_partial(out_url: str) -> None:
    """Every window object and the progress record of OUT (listed ones and orphans alike)."""
    part = out_url
    for name in storage.list_names(part):
        storage.remove(storage.join(part, name))
    storage.remove(part + RECORD_SUFFIX)
