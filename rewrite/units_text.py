"""A caption text file as units of work: N contiguous line ranges, each written by whoever
claims it (rewrite/runner.py), then concatenated in order into the output.

Reading: one pass counts lines, hashes the content and keeps a sparse line index (so a unit or
a resumed run seeks to its first line without reading the lines before it); lines are decoded
by rewrite/units.py's decode_line (one output line per input line whatever the bytes).

Files for --output_filename OUT, per --sample_mode (OUT itself for one mode, else the mode
before its suffix, target.txt -> target.bard.txt): one unit writes OUT itself (record
OUT.progress.json); N units write OUT.part-UUUUU-of-NNNNN (+ .progress.json each, layout
{"dp_size": N, "share": [start, end]}), merged into OUT when all are complete. These are
the files the data-parallel groups of earlier versions wrote, so their partial runs resume.
A fresh plan has one unit per data-parallel group (at least one per UNIT_LINES lines); once
on disk the units stay, and any number of processes or jobs claim those left (an flock on
the unit's file in every mode). Commits and records: rewrite/units.py.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from common.fileio import atomic_write, write_json_atomic
from common.locking import FileLock
from rewrite.units import (COMMITTED_TYPES, DONE, FREE, HELD, READ_CHUNK, RECORD_VERSION, Line, ResumeError,
                           RunTotals, ShareWriter, UnitClaim, check_committed, check_fits, decode_line,
                           describe_changes, new_checksum, read_record, record_path, same_fingerprint, sealed,
                           sum_stats, typed_state)

SCAN_CHUNK = 8 << 20  # bytes read per step of the scan; one index entry per chunk
UNIT_LINES = 1 << 20  # a fresh plan has at least one unit per this many lines
_PART_RE = re.compile(r"\.part-(\d{5})-of-(\d{5})$")


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


def read_lines(path: str | Path, offset: int, start: int, end: int) -> Iterator[Line]:
    """Lines start..end-1, the first one starting at byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        for i in range(start, end):
            text, bad = decode_line(f.readline())
            if i == 0 and text.startswith("\ufeff"):
                text = text[1:]  # a UTF-8 byte order mark is not part of the caption
            yield Line(i, text, bad, f.tell())


def mode_output(out: Path, mode: str, modes: tuple[str, ...]) -> Path:
    """The output file of one sample mode: OUT itself when there is one mode."""
    return out if len(modes) == 1 else out.with_name(f"{out.stem}.{mode}{out.suffix}")


def unit_file(out: Path, unit: int, n_units: int) -> Path:
    return out if n_units == 1 else out.with_name(f"{out.name}.part-{unit:05d}-of-{n_units:05d}")


def existing_parts(output: Path) -> list[tuple[Path, int]]:
    """Unit files (not their records) left next to `output`, with their N."""
    found = [(p, _PART_RE.search(p.name)) for p in output.parent.glob(f"{output.name}.part-*")]
    return sorted((p, int(m.group(2))) for p, m in found if m)


def _remove(path: Path) -> None:
    for p in (path, record_path(path)):
        p.unlink(missing_ok=True)


def _complete(record_file: Path) -> bool:
    record = read_record(record_file)
    return record is not None and bool(record.get("complete"))


def _finished(output: Path, fingerprint: dict) -> bool:
    """True: OUT is a finished run of this fingerprint (checked against its record)."""
    record = read_record(record_path(output))
    if record is None or not record.get("complete"):
        return False
    if not same_fingerprint(record.get("fingerprint"), fingerprint):
        raise ResumeError(
            f"--output_filename: {output} is a finished run of a different input or settings: "
            f"{describe_changes(record.get('fingerprint', {}), fingerprint)}. "
            "Pass --overwrite to redo it, or choose another --output_filename")
    if not output.exists():
        raise ResumeError(f"--output_filename: {output} is missing although {record_path(output).name} "
                          "says the run finished; pass --overwrite to redo it")
    done = typed_state(record, record_path(output), COMMITTED_TYPES)
    check_committed(output, done["out_bytes"], done["out_blake2b"], f"--output_filename {output} (a finished run)",
                    exact=True)
    for part, _ in existing_parts(output):  # killed after the merge, before the parts went
        _remove(part)
    return True


def units_on_disk(output: Path) -> int:
    """N of a partial run of `output` (0: none)."""
    record = read_record(record_path(output))
    if record is not None:
        return 1  # a partial one-unit run (its layout was checked when it is opened)
    counts = {n for _, n in existing_parts(output)}
    if len(counts) > 1:
        raise ResumeError(f"--output_filename: parts of {output} from runs with {sorted(counts)} units lie beside "
                          "it; pass --overwrite to start over")
    return counts.pop() if counts else 0


class TextUnits:
    """The units of one caption file in every mode; claims, commits and the final merge."""

    def __init__(self, prompt: Path, output: Path, info: InputInfo, fingerprints: dict[str, dict]) -> None:
        self.prompt, self.info, self.fingerprints = prompt, info, fingerprints
        modes = tuple(fingerprints)
        self.outputs = {m: mode_output(output, m, modes) for m in modes}
        self.pending: tuple[str, ...] = modes  # modes not yet complete (set by plan)
        self.count = 1
        self.total_lines = info.lines

    def plan_lock(self) -> FileLock:
        first = next(iter(self.outputs.values()))
        return FileLock(first.with_name(first.name + ".plan"), f"--output_filename {first}")

    def plan(self, dp_size: int, overwrite: bool) -> tuple[int, tuple[str, ...]]:
        """On global rank 0, under the plan lock: (N, modes left to do); every missing unit is
        created (record first), so a second job sees this plan."""
        for out in self.outputs.values() if overwrite else ():
            for path in [out, *(p for p, _ in existing_parts(out))]:
                with FileLock(path, f"--overwrite: {path}"):  # a live run's unit is not pulled away
                    _remove(path)
        self.pending = tuple(m for m, out in self.outputs.items() if not _finished(out, self.fingerprints[m]))
        counts = self._unit_counts()
        if len(counts) > 1:
            raise ResumeError(f"--output_filename: the mode files of {self.outputs[self.pending[0]]} hold partial "
                              f"runs with {sorted(counts)} units; pass --overwrite to start over")
        self.count = self._planned_count(counts, dp_size)
        for u in range(self.count if self.pending else 0):
            paths = {m: unit_file(self.outputs[m], u, self.count) for m in self.pending}
            records = {m: read_record(record_path(p)) for m, p in paths.items()}
            for m, record in records.items():  # refused now, before the model is loaded
                if record is not None:
                    check_fits(record, paths[m], self.fingerprints[m], self.layout(u))
            if all(records.values()):
                continue
            claim = self.claim(u)  # held: its holder made it
            if claim is not None:
                claim.close()
        return self.count, self.pending

    def layout(self, unit: int) -> dict:
        return {"dp_size": self.count, "share": list(self.share(unit))}

    def share(self, unit: int) -> tuple[int, int]:
        return share_range(self.info.lines, self.count, unit)

    def claim(self, unit: int) -> Optional[UnitClaim]:
        """The unit's writers (resumed), if no live process holds it and some mode is unfinished."""
        claim = UnitClaim(unit, 0, 0)
        start, end = self.share(unit)
        try:
            for m in self.pending:
                path = unit_file(self.outputs[m], unit, self.count)
                lock = FileLock(path, f"--output_filename {path}")
                if not lock.try_acquire():
                    claim.close()
                    return None
                claim.locks.append(lock)
            offset = offset_of_line(self.prompt, self.info, start)
            for m in self.pending:
                writer = ShareWriter(unit_file(self.outputs[m], unit, self.count), self.fingerprints[m],
                                     self.layout(unit), overwrite=False)
                if not writer.open(start, offset).complete:
                    claim.writers[m] = writer
        except BaseException:
            claim.close()
            raise
        if not claim.writers:
            claim.close()
            return None
        first = min(claim.writers.values(), key=lambda w: w.state.next_line)
        claim.start, claim.offset = first.state.next_line, first.state.in_offset
        return claim

    def look(self, dp_size: int) -> str:
        """Before the weights are read and the plan is made (no fingerprint needed, nothing
        written): FREE, HELD or DONE (rewrite/units.py) for the units the plan would find, and
        pending and count set as it would set them. DONE also where the files on disk do not
        make one plan: plan() refuses them, naming why."""
        self.pending = tuple(m for m, out in self.outputs.items() if not _complete(record_path(out)))
        counts = self._unit_counts()
        if not self.pending or len(counts) > 1:
            return DONE
        self.count = self._planned_count(counts, dp_size)
        return self._look()

    def _unit_counts(self) -> set[int]:
        """N of the partial runs on disk of the pending modes (more than one: they disagree)."""
        return {units_on_disk(self.outputs[m]) for m in self.pending} - {0}

    def _planned_count(self, counts: set[int], dp_size: int) -> int:
        """The units on disk, else a fresh plan's: one per data-parallel group, at least one per UNIT_LINES."""
        return next(iter(counts)) if counts else max(dp_size, math.ceil(self.info.lines / UNIT_LINES))

    def _look(self) -> str:
        """Only locks are tried (no writer opened, no output read), each released at once: a run
        that tries the unit in that instant leaves it, and this one, having found it free, walks
        all units next."""
        held = False
        for u in range(self.count if self.pending else 0):
            paths = [unit_file(self.outputs[m], u, self.count) for m in self.pending]
            if all(_complete(record_path(p)) for p in paths):
                continue
            locks = [FileLock(p, f"--output_filename {p}") for p in paths]
            try:
                if all(lock.try_acquire() for lock in locks):
                    return FREE
                held = True
            finally:
                for lock in locks:
                    lock.release()
        return HELD if held else DONE

    def any_free(self) -> bool:
        """Whether some unit is unfinished and held by no live run; asked before the model is loaded."""
        return self._look() == FREE

    def lines(self, claim: UnitClaim) -> Iterator[Line]:
        return read_lines(self.prompt, claim.offset, claim.start, self.share(claim.unit)[1])

    def commit(self, claim: UnitClaim, window: list[Line], per_mode: dict[str, tuple[list[str], list[dict]]]) -> None:
        """Each mode's writer takes the lines it has not committed yet (after a crash between
        two modes' commits one file can be a window ahead)."""
        first = window[0].index
        for m, writer in claim.writers.items():
            skip = max(0, writer.state.next_line - first)
            if skip < len(window):
                out, per_line = per_mode[m]
                writer.commit(out[skip:], next_line=window[-1].index + 1, in_offset=window[-1].end,
                              stats=sum_stats(per_line[skip:]))

    def finish(self, claim: UnitClaim) -> None:
        for writer in claim.writers.values():
            writer.finish()
        claim.close()

    def progress(self, claim: UnitClaim) -> str:
        m, writer = next(iter(claim.writers.items()))
        start, end = self.share(claim.unit)
        where = self.outputs[m] if self.count == 1 else writer.out_path
        return f"{writer.state.next_line - start} of {end - start} lines of {where} committed"

    def where(self, claim: UnitClaim, line: Line) -> str:
        return f"{self.prompt} line {line.index + 1}"

    def conclude(self, totals: RunTotals, seconds: float) -> str:
        """On global rank 0 when this job's groups are done: merge what is complete; the summary."""
        rate = f"{totals.lines / seconds:.2f} captions/s, {totals.tokens / seconds:.1f} generated tokens/s" \
            if seconds > 0 and totals.lines else "no lines left to do"
        done = []
        for m, stats in self.merge_finished().items():
            if stats is None:
                done.append(f"done: {self.outputs[m]} is not finished: some of its {self.count} units are held by "
                            "another run or unfinished (rerun the same command to complete them).")
                continue
            done.append(f"done: {self.outputs[m]} has {stats['lines']} lines: {stats['rewritten']} rewritten, "
                        f"{stats['fallbacks']} fell back to the original caption, {stats['empty']} empty; "
                        f"{stats['truncated']} prompts truncated, {stats['undecodable']} lines with undecodable "
                        "bytes (replaced by U+FFFD).")
        return "\n".join(done) + f" This run: {totals.lines} lines in {seconds:.1f} s, {rate}"

    def merge_finished(self) -> dict[str, Optional[dict]]:
        """On global rank 0 after this job's groups are done: concatenate every mode whose units
        are all complete. Returns each mode's whole-file stats, None where units are left."""
        result = {}
        with self.plan_lock():
            for m in self.pending:
                out = self.outputs[m]
                record = read_record(record_path(out))
                if self.count > 1 and not (record and record.get("complete")):
                    parts = [unit_file(out, u, self.count) for u in range(self.count)]
                    records = [read_record(record_path(p)) for p in parts]
                    if not all(r and r.get("complete") for r in records) or not self.fingerprints[m]:
                        result[m] = None  # a look's units (no fingerprint) merge nothing: the holder does
                        continue
                    merge_parts(out, parts, records, self.fingerprints[m])
                    record = read_record(record_path(out))
                result[m] = record["state"]["stats"] if record and record.get("complete") else None
        return result


def _copy_checked(parts: list[Path], records: list[dict], out) -> "hashlib.blake2b":
    """Append the parts to `out`, checking each against its record; the checksum of the whole."""
    whole = new_checksum()
    for part, record in zip(parts, records):
        done, h, size = typed_state(record, record_path(part), COMMITTED_TYPES), new_checksum(), 0
        with open(part, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                out.write(chunk)
                h.update(chunk)
                whole.update(chunk)
                size += len(chunk)
        if (size, h.hexdigest()) != (done["out_bytes"], done["out_blake2b"]):
            raise ResumeError(f"--output_filename: part {part} differs from its record (size or checksum); it "
                              "was changed outside this program. Pass --overwrite to start over")
    return whole


def merge_parts(output: Path, parts: list[Path], records: list[dict], fingerprint: dict) -> None:
    """Concatenate the finished parts in order into OUT (atomically), mark OUT complete,
    then remove the parts. A crash anywhere here is redone by rerunning: the parts stay
    until OUT and its record are in place."""
    checksum: list = []
    stats = sum_stats(record["state"].get("stats", {}) for record in records)

    def concatenate(tmp: str) -> None:
        with open(tmp, "wb") as out:
            checksum.append(_copy_checked(parts, records, out))

    atomic_write(output, concatenate)
    write_json_atomic(record_path(output), sealed({
        "version": RECORD_VERSION, "fingerprint": fingerprint, "layout": {"dp_size": len(parts)}, "complete": True,
        "state": {"stats": stats, "out_bytes": output.stat().st_size, "out_blake2b": checksum[0].hexdigest()}}))
    for p in parts:
        _remove(p)
