"""The rewriter's output for shard input: a folder OUT with one OUT/NNNNN.parquet per input
shard (columns `key`, `caption`, then one column per sample mode), written so that shards
can be done in any order, by any number of data-parallel groups and runs.

Design (crash safety and claims):
- A shard is *claimed* with an flock on OUT/NNNNN.parquet.lock (common.locking): the
  kernel drops it when its process dies, so a dead run's claim is free at once, and two
  live runs never write the same shard.
- While a shard is in progress its rows go to an append-only part file OUT/NNNNN.parquet.part
  (one JSON object per line), committed window by window with the same writer and progress
  record as the text-file path (rewrite/units.py: append + fsync, then the record replaced
  atomically; a resume truncates to the recorded size and continues from the recorded line).
- When the shard is complete its rows become OUT/NNNNN.parquet in one atomic replace, then
  the part and its record are removed. OUT/NNNNN.parquet exists only complete: a finished
  shard is never redone. A crash between the two steps leaves a part beside a finished
  shard; whoever claims the shard next removes it.
- OUT/rewrite.json holds the settings that shape every rewrite (seed, modes, examples, model,
  sampling); a run with other settings is refused before any shard is touched.
- On object storage (OUT is an s3:// URL), where objects cannot be appended to, the claim is a
  conditional-PUT claim object (common.claims) and the part is one object per committed window,
  OUT/NNNNN.parquet.part/<first line, 9 digits>.jsonl (the rows as the local part file holds
  them), plus the progress object OUT/NNNNN.parquet.part.progress.json (the local record's fields
  and the list of committed windows). A commit checks the claim (a run whose claim was taken
  over stops there), uploads the window, then the record; a window the record does not list (a
  crash between the two) is written again, the same, by the resumed run. A resume checks the
  listed windows against the recorded size and BLAKE2b; the finished OUT/NNNNN.parquet, made
  from the same bytes, is one upload and equals a local run's.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Iterator, Optional, Sequence, Union

from common import claims, rewrite_manifest, storage, survey
from common.locking import FileLock, describe_holder, lock_path
from common.rewrite_format import METADATA_KEY
from rewrite.shard_input import RUN_RECORD, Shard, ShardLines, base_name, remembered_fingerprint, \
    shard_stem
from rewrite.units import (DONE, FREE, HELD, RECORD_SUFFIX, RECORD_VERSION, Line, ResumeError, RunTotals,
                           ShareState, ShareWriter, UnitClaim, add_stats, check_seal, describe_changes, record_path,
                           same_fingerprint, sealed, share_state, sum_stats)

RUN_RECORD_VERSION = 1
PART_SUFFIX = ".part"
WINDOW_DIGITS = 9
ShardLock = Union[FileLock, claims.S3Claim]


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
        check_seal(record, self.record_path)  # damaged on the server: named as such, not as other settings
        for key in ("fingerprint", "layout"):
            if not same_fingerprint(record.get(key), getattr(self, key)):
                raise ResumeError(f"{where} was made from a different input, settings or layout: "
                                  f"{describe_changes(record.get(key) or {}, getattr(self, key))}. Rerun with the "
                                  "same input and flags to continue, or pass --overwrite to start over")
        self.state = share_state(record, self.record_path)  # the path only names it in messages
        self.windows = [int(w) for w in record["windows"]]
        data = self.committed_bytes()
        if len(data) != self.state.out_bytes or self._checksum.hexdigest() != self.state.out_blake2b:
            raise ResumeError(f"{where}: its committed windows differ from the recorded size or checksum; they were "
                              "changed outside this program. Pass --overwrite to start over")
        rows = data.count(b"\n")  # one per committed row: the record's position must agree
        if rows != self.state.next_line:
            raise ResumeError(f"progress record {self.record_path} is damaged: it says {self.state.next_line} rows "
                              f"were committed, its windows hold {rows}; delete it and "
                              f"{self.out_path} to redo that shard, or pass --overwrite to start over")

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
        storage.write_json(self.record_path, sealed({
            "version": RECORD_VERSION, "fingerprint": self.fingerprint, "layout": self.layout,
            "complete": self.state.complete, "state": self.state.__dict__, "windows": self.windows}))

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


def shard_output_path(out_dir: Shard, stem: str) -> Shard:
    return storage.join(out_dir, f"{stem}.parquet") if isinstance(out_dir, str) else out_dir / f"{stem}.parquet"


def shard_part_path(out: Shard) -> Shard:
    return out + PART_SUFFIX if isinstance(out, str) else out.with_name(out.name + PART_SUFFIX)


def claim_shard(out: Shard, timeout: float = claims.DEFAULT_TIMEOUT_S) -> Optional[ShardLock]:
    """The shard's claim if it was free (or stale, on object storage), else None (a live
    process is writing it)."""
    what = f"--output_filename shard {base_name(out)}"
    claim = claims.S3Claim(out + claims.CLAIM_SUFFIX, timeout) if isinstance(out, str) else FileLock(out, what)
    return claim if claim.try_acquire() else None


def shard_free(out: Shard, timeout: float = claims.DEFAULT_TIMEOUT_S) -> bool:
    """Whether no live process holds the shard's claim. On a local disk the flock is taken and
    released at once; on object storage the claim object is only read."""
    if isinstance(out, str):
        return claims.S3Claim(out + claims.CLAIM_SUFFIX, timeout).free()
    lock = FileLock(out, f"--output_filename shard {base_name(out)}")
    free = lock.try_acquire()
    lock.release()
    return free


def shard_holder(out: Shard) -> str:
    if isinstance(out, str):
        return claims.S3Claim(out + claims.CLAIM_SUFFIX, 0).holder()
    return describe_holder(lock_path(out))


def part_exists(out: Shard) -> bool:
    part = shard_part_path(out)
    if isinstance(part, str):  # its progress object, or window objects without one (a crash in between)
        return storage.exists(part + RECORD_SUFFIX) or bool(storage.list_names(part))
    return part.exists()


def remove_part(out: Shard) -> None:
    part = shard_part_path(out)
    if isinstance(part, str):
        remove_partial(part)
        return
    for p in (part, record_path(part)):
        p.unlink(missing_ok=True)


def check_run_record(out_dir: Shard, settings: dict, overwrite: bool) -> None:
    """On global rank 0, before any group starts: the folder's settings must be this run's."""
    path = storage.join(str(out_dir), RUN_RECORD)
    if storage.exists(path) and not overwrite:
        try:
            record = storage.read_json(path)
        except (storage.NotFound, ValueError) as e:
            raise ResumeError(f"--output_filename: {path} is unreadable ({e}); pass --overwrite to start over") \
                from None
        if not same_fingerprint(record.get("settings"), settings):
            raise ResumeError(
                f"--output_filename: the shards in {out_dir} were rewritten with other settings: "
                f"{describe_changes(record.get('settings', {}), settings)}. Rerun with the same flags to "
                "continue, or pass --overwrite to redo these shards")
        if record.get("settings") == settings:
            return  # else written before weight content hashes: recorded from now on
    storage.write_json(path, {"version": RUN_RECORD_VERSION, "settings": settings})


def clear_for_overwrite(out_dir: Shard, stems: Sequence[str]) -> int:
    """--overwrite: remove the outputs and parts of these shards, each under its claim so a
    live run's shard is never pulled away; returns how many outputs were removed."""
    removed = 0
    for stem in stems:
        out = shard_output_path(out_dir, stem)
        lock = claim_shard(out)
        if lock is None:
            raise ResumeError(f"--overwrite: shard {out} is being written by {shard_holder(out)}; "
                              "stop that run first")
        try:
            removed += storage.exists(str(out))
            storage.remove(str(out))
            remove_part(out)
        finally:
            lock.release()
    return removed


def encode_row(key: str, caption: str, rewrites: dict[str, str]) -> str:
    """One part-file line: JSON keeps keys, captions and rewrites exact (no line breaks in it)."""
    return json.dumps({"key": key, "caption": caption, **rewrites}, ensure_ascii=False)


def part_lines(out: Shard, writer: Union[ShareWriter, ObjectShareWriter]) -> Iterable[str]:
    """The committed rows of a finished part: the local part file, or its window objects."""
    if isinstance(writer, ObjectShareWriter):
        # split at "\n" only, as reading the file does: a caption may hold U+2028 or \x85, which
        # str.splitlines would also split at (json.dumps(ensure_ascii=False) keeps them raw)
        return writer.committed_bytes().decode("utf-8").split("\n")[:-1]
    return open(shard_part_path(out), encoding="utf-8")


def write_shard(out: Shard, modes: Sequence[str], metadata: dict, lines: Iterable[str]) -> int:
    """The finished part's rows -> OUT/NNNNN.parquet (whole: atomic replace, or one upload),
    then the part goes; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = ["key", "caption", *modes]
    values: dict[str, list] = {c: [] for c in columns}
    for line in lines:
        row = json.loads(line)
        for c in columns:
            values[c].append(row[c])
    if hasattr(lines, "close"):
        lines.close()
    table = pa.table({c: pa.array(values[c], type=pa.string()) for c in columns})
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    storage.write_atomic(str(out), lambda tmp: pq.write_table(table, tmp))
    remove_part(out)
    return table.num_rows


def write_manifest(out_dir: Shard, listing: dict) -> str:
    """OUT/manifest.json made anew from the folder's listing (entries still matching kept, other
    footers read): what a training start reads instead of every footer. A run ends with it; a
    failure to write it is said, never fatal (training then reads the footers)."""
    if not any(name.endswith(".parquet") for name in listing):
        return ""
    try:
        rewrite_manifest.write(str(out_dir), listing)
    except (OSError, ValueError) as e:
        return f"; {rewrite_manifest.MANIFEST} not written ({e}): {rewrite_manifest.hint(str(out_dir))}"
    return ""


def combine_mode_stats(per_mode: list[list[dict]]) -> dict:
    """A window's counts over its modes: lines, empty and undecodable once; rewrites per mode."""
    rest = sum_stats(s for per_line in per_mode[1:] for s in per_line)
    return add_stats(sum_stats(per_mode[0]), {k: rest[k] for k in ("rewritten", "fallbacks", "truncated")})


class ShardUnits:
    """The shards of a run as units of work: shard i is claimed with the claim of its output
    (flock on a local disk, a claim object on S3; claim_timeout: when an object claim is stale)."""

    def __init__(self, shards: list[Shard], out_dir: Shard, text_key: str, modes: tuple[str, ...], settings: dict,
                 claim_timeout: float = claims.DEFAULT_TIMEOUT_S):
        self.shards, self.out_dir, self.text_key, self.modes, self.settings = shards, out_dir, text_key, modes, settings
        self.count, self.total_lines = len(shards), None  # lines are counted as shards are read
        self.claim_timeout = claim_timeout

    def output(self, unit: int) -> Shard:
        return shard_output_path(self.out_dir, shard_stem(self.shards[unit]))

    def claim(self, unit: int) -> Optional[UnitClaim]:
        """The shard's writer, if it is neither finished nor held."""
        out = self.output(unit)
        if storage.exists(str(out)) and not part_exists(out):
            return None  # finished
        lock = claim_shard(out, self.claim_timeout)
        if lock is None:
            return None  # a live process holds it: it will finish it
        claim = UnitClaim(unit, 0, 0, locks=[lock])
        if storage.exists(str(out)):  # finished by another run after all, or a part left by a crash after the finish
            remove_part(out)
            claim.close()
            return None
        try:
            fingerprint = {"input": remembered_fingerprint(self.out_dir, self.shards[unit]), "settings": self.settings}
            layout, part = {"shard": shard_stem(self.shards[unit])}, shard_part_path(out)
            writer = ObjectShareWriter(part, fingerprint, layout, overwrite=False, claim=lock) \
                if isinstance(part, str) else ShareWriter(part, fingerprint, layout, overwrite=False)
            claim.writers[""] = writer
            claim.start = writer.open(0, 0).next_line
        except BaseException:
            claim.close()
            raise
        return claim

    def look(self) -> str:
        """FREE (some shard is unfinished and held by no live run), HELD (none is, and a live run
        holds one) or DONE (every shard is finished). Needs no settings and writes nothing, so it
        is asked before the weights are read. A shard whose output exists is never claimed (a part
        beside it is a crash's leftover), so one listing of OUT tells the finished ones."""
        names, held = set(storage.list_names(str(self.out_dir))), False
        for u in range(self.count):
            if base_name(self.output(u)) in names:
                continue
            if shard_free(self.output(u), self.claim_timeout):
                return FREE
            held = True
        return HELD if held else DONE

    def any_free(self) -> bool:
        return self.look() == FREE

    def lines(self, claim: UnitClaim) -> Iterator[Line]:
        reader = ShardLines(self.shards[claim.unit], self.text_key)
        claim.skipped = reader.skipped  # counted as it reads
        return reader.read(claim.start)

    def commit(self, claim: UnitClaim, window: list[Line], per_mode: dict[str, tuple[list[str], list[dict]]]) -> None:
        rows = [encode_row(line.index, line.text, {m: per_mode[m][0][k] for m in per_mode})
                for k, line in enumerate(window)]
        claim.writers[""].commit(rows, next_line=window[-1].end, in_offset=window[-1].end,
                                 stats=combine_mode_stats([per_line for _, per_line in per_mode.values()]))

    def finish(self, claim: UnitClaim) -> None:
        """The finished part -> OUT/NNNNN.parquet, with what shaped it in its metadata."""
        writer, path, out = claim.writers[""], self.shards[claim.unit], self.output(claim.unit)
        writer.finish()
        metadata = {"settings": self.settings, "input": writer.fingerprint["input"], "stats": writer.state.stats,
                    "skipped": dict(claim.skipped)}
        rows = write_shard(out, list(self.modes), metadata, part_lines(out, writer))
        claim.close()
        print(f"shard {path} -> {out}: {rows} rows" + (f", skipped {dict(claim.skipped)}" if claim.skipped
                                                         else ""), flush=True)

    def progress(self, claim: UnitClaim) -> str:
        return f"{claim.writers[''].state.next_line} rows of shard {self.shards[claim.unit]} committed"

    def where(self, claim: UnitClaim, line: Line) -> str:
        return f"{self.shards[claim.unit]} sample {line.index}"

    def conclude(self, totals: RunTotals, seconds: float) -> str:
        """The shards this run finished, counted whole (as their metadata counts them: a resumed
        shard's rows committed before count too), and the rate of the samples this run did."""
        lines, stats, skipped = totals.lines, totals.stats, totals.skipped
        rate = f"{lines / seconds:.2f} samples/s, {totals.tokens / seconds:.1f} generated tokens/s" \
            if lines and seconds else ""
        listing = survey.list_meta(str(self.out_dir))  # one listing, not a request per shard
        finished = sum(base_name(self.output(u)) in listing for u in range(self.count))
        manifest = write_manifest(self.out_dir, listing)
        left = self.count - finished
        return (f"done: {finished} of {self.count} shards finished in {self.out_dir}"
                + (f" ({left} still held by another run or unfinished: rerun the same command to complete them)"
                   if left else "")
                + f". This run: {totals.units} shards, {stats['lines']} samples x {len(self.modes)} modes: "
                  f"{stats['rewritten']} rewritten, {stats['fallbacks']} fell back to the caption, {stats['empty']} "
                  f"empty captions, {stats['truncated']} prompts truncated, {stats['undecodable']} with undecodable "
                  f"bytes; skipped {dict(skipped) or 'none'}; {seconds:.1f} s"
                + (f" for {lines} of those samples (the others were committed before a resume)"
                   if lines != stats["lines"] else "") + (", " + rate if rate else "") + manifest)
