"""A finished shard output is kept only if it belongs to this run's input and settings.

OUT/NNNNN.parquet records in its metadata (rewrite/shard_output.py) the settings that shaped
it (modes, seed, example pools, model, sampling) and its input shard's fingerprint (name,
size, BLAKE2b of the bytes read). Before any group starts, every finished output of the run's
shards is compared with both: a shard of another data set or a re-downloaded one, or an output
written with other settings, is refused with one line naming the shard and the difference
(--overwrite redoes it), instead of being counted as finished.

Hashing every input again on each rerun would read the whole data set (terabytes at LAION
scale), so each input's hash is remembered in OUT/input_fingerprints.jsonl under its path,
size, modification time, inode and status-change time (one JSON line appended when a shard
is claimed or checked; the last line of a path wins): an unchanged file is not read again.

Objects (s3:// input) need no memo: their fingerprint is the server's ETag and size, one HEAD
request. An s3:// output keeps no memo either (objects cannot be appended to): a local input
shard is hashed again at each check.

--overwrite on some of a folder's shards with other settings would leave the others with the
old ones while OUT/rewrite.json names the new: refused, so the folder's record always
describes every shard in it.
"""
from __future__ import annotations

from typing import Iterable, Optional

from common import storage
from common.rewrite_format import read_metadata
from common.stat_memo import StatMemo
from rewrite.output import ResumeError, describe_changes
from rewrite.shard_input import Shard, input_fingerprint, shard_name

MEMO = "input_fingerprints.jsonl"


def read_memo(out_dir: Shard, read: bool = True) -> Optional[StatMemo]:
    """The input fingerprints remembered in out_dir; None for object storage (see above)."""
    return None if isinstance(out_dir, str) else StatMemo(out_dir / MEMO, "fingerprint", read)


def remembered_fingerprint(out_dir: Shard, shard: Shard, memo: Optional[StatMemo] = None) -> dict:
    """The shard's fingerprint: from `memo` when its stat matches, else hashed and remembered."""
    if isinstance(shard, str) or isinstance(out_dir, str):
        return input_fingerprint(shard)  # an object's ETag (cheap), or a local shard hashed for an s3:// output
    return (memo or read_memo(out_dir, read=False)).value(shard, lambda: input_fingerprint(shard))


def read_output_metadata(out: Shard) -> dict:
    try:
        return read_metadata(out)
    except Exception as e:  # pyarrow's own errors: a damaged output is not finished work
        raise ResumeError(f"--output_filename: {out} is not a readable parquet file ({e}); pass --overwrite to "
                          "redo that shard") from None


def check_finished(out_dir: Shard, pairs: Iterable[tuple[Shard, Shard]], settings: dict) -> int:
    """(input shard, output) pairs whose output exists must match; returns how many were checked."""
    memo, checked = read_memo(out_dir), 0
    present = set(storage.list_names(str(out_dir)))  # one listing, not a request per shard
    for shard, out in pairs:
        if shard_name(out) not in present:
            continue
        meta = read_output_metadata(out)
        if meta.get("settings") != settings:
            raise ResumeError(f"--output_filename: shard {out} was rewritten with other settings: "
                              f"{describe_changes(meta.get('settings') or {}, settings)}; pass --overwrite to "
                              f"redo it with these")
        recorded, name = meta.get("input") or {}, shard_name(shard)
        size = storage.size(str(shard))
        now = {"name": name, "size": size} if recorded.get("size") != size else \
            remembered_fingerprint(out_dir, shard, memo)
        if any(recorded.get(k) != now[k] for k in now):
            digest = "etag" if "etag" in now else "blake2b"  # an object's ETag, a file's BLAKE2b
            what = (f"size {recorded.get('size')} then, {size} now" if recorded.get("size") != size
                    else f"content hash {recorded.get(digest)} then, {now[digest]} now"
                    if recorded.get("name") == name else f"input {recorded.get('name')} then, {name} now")
            raise ResumeError(f"--output_filename: shard {out} was rewritten from another {name} ({what}): "
                              "another data set, or a shard downloaded again? Pass --overwrite to redo it")
        checked += 1
    return checked


def check_overwrite_keeps_one_setting(out_dir: Shard, run_outputs: Iterable[Shard], settings: dict) -> None:
    """--overwrite of a subset with new settings must not leave other shards with the old ones."""
    mine = {shard_name(p) for p in run_outputs}  # outputs of one folder: their names tell them apart
    for name in storage.list_names(str(out_dir)):
        if not name.endswith(".parquet") or name in mine:
            continue
        out = storage.join(str(out_dir), name) if isinstance(out_dir, str) else out_dir / name
        held = read_output_metadata(out).get("settings")
        if held is not None and held != settings:
            raise ResumeError(f"--overwrite: {out} is not among this run's shards and keeps other settings "
                              f"({describe_changes(held, settings)}); one folder holds shards of one setting: "
                              f"redo all of its shards, or write to another --output_filename")
