"""Shard input of the rewriter: a brace pattern of img2dataset parquet files or webdataset
tars (`laion/{00000..41407}.parquet`), checked at the edge, read one shard at a time as keyed
lines, and identified by a fingerprint that finished outputs are checked against.

A parquet shard gives its `key` column and the caption column (--text_key, default
`caption`); rows whose img2dataset `status` is not "success" (images that were never
downloaded, so never trained on) are skipped and counted. A tar shard is read with the
`webdataset` library: the sample key and the `.txt` member (--text_key, default `txt`);
a sample without one, or a tar that ends early, is counted. A key that names two samples (or
two rows of a parquet shard) gets no row and is counted as `duplicate_key` (common/tar_keys.py):
training joins rewrites by key and could not tell such samples apart. Reading is deterministic, so
a resumed shard skips exactly the lines it already committed.

A finished OUT/NNNNN.parquet records in its metadata (rewrite/units_shards.py) the settings that
shaped it and its input shard's fingerprint (name, size, BLAKE2b of the bytes read). Before any
group starts, every finished output of the run's shards is compared with both: a shard of
another data set or a re-downloaded one, or an output written with other settings, is refused
with one line naming the shard and the difference (--overwrite redoes it). Hashing every input
again on each rerun would read the whole data set (terabytes at LAION scale), so each input's
hash is remembered in OUT/input_fingerprints.jsonl under its path, size, modification time,
inode and status-change time (one JSON line appended when a shard is claimed or checked; the
last line of a path wins). Objects (s3:// input) need no memo: their fingerprint is the server's
ETag and size, one HEAD request. An s3:// output keeps no memo either (objects cannot be
appended to): a local input shard is hashed again at each check. --overwrite on some of a
folder's shards with other settings would leave the others with the old ones while
OUT/rewrite.json names the new: refused, so the folder's record describes every shard in it.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional, Union

import braceexpand

from common import rewrite_manifest, storage, survey
from common.tar_keys import duplicated_keys, keyed_samples
from common.tar_stream import is_storage_failure
from common.rewrite_format import METADATA_KEY, decode_line, read_metadata, shard_stem  # noqa: F401
from common.stat_memo import StatMemo
from rewrite.units import Line, ResumeError, describe_changes, same_fingerprint

SHARD_SUFFIXES = (".parquet", ".tar")
DEFAULT_TEXT_KEYS = {".parquet": "caption", ".tar": "txt"}
KEY_COLUMN = "key"  # img2dataset's sample key, also the tar member prefix
STATUS_COLUMN, STATUS_OK = "status", "success"
HASH_CHUNK = 8 << 20
RUN_RECORD = "rewrite.json"  # the settings record of an output folder (rewrite/units_shards.py)
MEMO = "input_fingerprints.jsonl"  # the remembered input hashes of a local output folder


Shard = Union[Path, str]  # a local path, or a URL (s3://, gs://, ...) kept as a string


def as_location(value: str | Path) -> Shard:
    """A URL stays a string (Path would fold its '//'); a local path (or file:// URL) is a Path."""
    text = str(value)
    return text if storage.is_url(text) else Path(storage.local_path(text))


def is_shard_input(value: object) -> bool:
    """A pattern or path naming .parquet or .tar files (not a caption text file)."""
    return isinstance(value, (str, Path)) and str(value).endswith(SHARD_SUFFIXES)


def expand_shards(pattern: str | Path) -> list[Shard]:
    return [as_location(p) for p in braceexpand.braceexpand(str(pattern))]


def base_name(path: Shard) -> str:
    """laion/00012.tar -> 00012.tar: a shard's or an output's file name (its stem: shard_stem)."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def shard_suffix(path: Shard) -> str:
    return next((s for s in SHARD_SUFFIXES if str(path).endswith(s)), "")


def check_shard_flags(pattern: object, output: object, text_key: object) -> tuple[Path, Path, str]:
    """(pattern, output folder, text key) after the checks every flag gets at the edge."""
    if isinstance(pattern, (list, tuple)):
        raise ValueError("--prompt_filename: give one path or brace pattern ('laion/{00000..00099}.parquet'), "
                         "not a list")
    shards = expand_shards(pattern)
    kinds = {shard_suffix(p) for p in shards}
    if len(kinds) > 1:
        raise ValueError(f"--prompt_filename {pattern}: mixes {' and '.join(sorted(kinds))} shards; give one kind")
    try:
        missing = storage.expand(str(pattern))[1]  # one listing per prefix for URLs
    except storage.StorageError as e:
        raise ValueError(f"--prompt_filename: {e}") from None
    if missing:
        raise ValueError(f"--prompt_filename {pattern}: {len(missing)} of {len(shards)} shards not found, "
                         f"e.g. {missing[0]}")
    stems = Counter(shard_stem(p) for p in shards)
    twice = [s for s, n in stems.items() if n > 1]
    if twice:
        raise ValueError(f"--prompt_filename {pattern}: {stems[twice[0]]} shards are named {twice[0]}; each "
                         f"shard's output is OUT/<name>.parquet, so names must differ")
    key = DEFAULT_TEXT_KEYS[shard_suffix(shards[0])] if text_key is None else str(text_key).strip()
    if not key or text_key is True:
        raise ValueError("--text_key needs a field name (caption for parquet, txt for tars)")
    if shard_suffix(shards[0]) == ".parquet":  # a wrong --text_key or a damaged footer fails now, not hours in:
        # every local footer (cheap); of URLs the first only (two requests per shard would add minutes
        # at LAION's 41k shards: a damaged later shard stops the run when it is reached)
        # (local footers read concurrently: a network file system answers each in milliseconds)
        survey.concurrently(lambda shard: ShardLines(shard, key).check_columns(),
                            shards if not storage.is_url(str(shards[0])) else shards[:1])
    if storage.is_url(str(output)):
        return str(pattern), check_output_prefix(str(output), shards), key
    out = Path(storage.local_path(str(output)))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_filename {output}: with shard input this names a folder (one NNNNN.parquet "
                         "per input shard), and it is a file")
    if not out.parent.is_dir():
        raise ValueError(f"--output_filename {output}: folder {out.parent} does not exist")
    if out.resolve() in {p.parent.resolve() for p in shards if isinstance(p, Path)}:
        raise ValueError(f"--output_filename {output} is the folder of the input shards (where img2dataset keeps "
                         "its NNNNN.parquet); give another folder")
    check_not_foreign(str(out), storage.list_names(str(out)))
    return Path(str(pattern)), out, key


def check_not_foreign(output: str, names: list[str]) -> None:
    """An output folder or prefix that holds parquet files but no rewrite.json (the settings
    record every run writes first) holds someone else's data: refused, never mixed into."""
    parquet = [n for n in names if n.endswith(".parquet")]
    if parquet and RUN_RECORD not in names:
        raise ValueError(f"--output_filename {output} already holds {len(parquet)} parquet files (e.g. {parquet[0]}) "
                         f"but no {RUN_RECORD}: they are not this rewriter's output; give an empty or new folder")


def check_output_prefix(output: str, shards: list[Shard]) -> str:
    """An object-storage output prefix: reachable, not the input's own prefix, on a backend
    whose claims are safe (common.claims refuses the others, naming them)."""
    from common import claims
    out = output.rstrip("/")
    if out in {str(p).rsplit("/", 1)[0] for p in shards}:
        raise ValueError(f"--output_filename {output} is the prefix of the input shards (where img2dataset keeps "
                         "its NNNNN.parquet); give another prefix")
    try:
        names = storage.list_names(out)
        claims.check_atomic_create(out)
    except (storage.StorageError, claims.ClaimsUnsupported) as e:
        raise ValueError(f"--output_filename: {e}") from None
    check_not_foreign(out, names)
    return out


def input_fingerprint(path: Shard) -> dict:
    """Name, size and content hash of one input shard: a changed shard refuses to resume. An
    object's hash is the server's ETag (reading a whole tar again only to hash it would double
    the traffic; S3 gives a new ETag to every new content)."""
    if isinstance(path, str):
        fs, inner = storage.filesystem(path)
        info = storage.call("stat", path, lambda: fs.info(inner))
        return {"name": base_name(path), "size": int(info["size"]),
                "etag": str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")}
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "blake2b": h.hexdigest()}


class ShardLines:
    """The keyed lines of one shard, from `start` on; `skipped` counts what was not a line
    (rows never downloaded, tar members without a key or text, a truncated tar)."""

    def __init__(self, path: Shard, text_key: str, where: str = "--prompt_filename") -> None:
        self.path, self.text_key, self.where = path, text_key, where
        self.skipped: Counter = Counter()

    def read(self, start: int = 0) -> Iterator[Line]:
        rows = self._parquet_rows() if shard_suffix(self.path) == ".parquet" else self._tar_rows()
        for k, (key, text, bad) in enumerate(rows):
            if k >= start:
                yield Line(key, text, bad, k + 1)  # end: the position after it, for the commit

    def check_columns(self) -> list[str]:
        """The parquet shard's column names, which must hold the key and the text field."""
        try:
            names = self._parquet().schema_arrow.names
        except storage.StorageError as e:
            raise ValueError(f"{self.where}: {e}") from None
        except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError, ...
            raise ValueError(f"{self.where}: cannot read parquet shard {self.path}: {e}") from None
        for col, flag in ((KEY_COLUMN, self.where), (self.text_key, "--text_key")):
            if col not in names:
                raise ValueError(f"{flag}: {self.path} has no column {col!r}; its columns are {', '.join(names)}")
        return names

    def _parquet(self):
        """The shard as a pyarrow ParquetFile; a URL is read by ranges (footer, then the columns used)."""
        import pyarrow.parquet as pq
        return pq.ParquetFile(storage.open_read(self.path) if isinstance(self.path, str) else self.path)

    def _parquet_rows(self) -> Iterator[tuple[str, str, bool]]:
        names = self.check_columns()
        columns = [KEY_COLUMN, self.text_key] + ([STATUS_COLUMN] if STATUS_COLUMN in names else [])
        table = self._parquet().read(columns=columns).to_pydict()
        status = table.get(STATUS_COLUMN)
        ok = [status is None or s == STATUS_OK for s in (status or table[KEY_COLUMN])]
        counts = Counter(str(k) for k, good in zip(table[KEY_COLUMN], ok) if good and k is not None)
        for k, (key, text) in enumerate(zip(table[KEY_COLUMN], table[self.text_key])):
            if not ok[k]:
                self.skipped["not_downloaded"] += 1
                continue
            if key is None:
                self.skipped["no_key"] += 1
                continue
            if counts[str(key)] > 1:  # a key of two samples: a join by key could not tell them apart
                self.skipped["duplicate_key"] += 1
                continue
            yield str(key), "" if text is None else str(text), False

    def _tar_rows(self) -> Iterator[tuple[str, str, bool]]:
        url = str(self.path)
        twice = duplicated_keys(url)  # even the first of a repeated key is known before it is read

        def count_and_continue(exn: Exception) -> bool:
            if is_storage_failure(url, exn):  # never a skipped shard: the run stops; committed windows stay
                raise storage.StorageError(f"{self.where} shard {url}: reading failed mid-shard ({exn}); rerun to "
                                           "resume from the last committed window") from exn
            # A truncated or corrupt tar (webdataset may report it more than once): the shard
            # counts once, and the samples read before the damage are kept.
            self.skipped["broken_tar"] = 1
            return True

        field = self.text_key.lower()  # webdataset lower-cases member extensions
        for sample in keyed_samples(url, handler=count_and_continue):
            if sample["__key__"] in twice:
                self.skipped["duplicate_key"] += 1  # never a row: training could not tell the samples apart
                continue
            raw: Optional[bytes] = sample.get(field)
            if raw is None:
                self.skipped["no_text"] += 1  # an image without a caption: nothing to rewrite
                continue
            text, bad = decode_line(raw)
            yield sample["__key__"], text, bad


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


def finished_metadata(out_dir: Shard, outputs: list[Shard], listing: dict) -> list[dict]:
    """The recorded metadata (settings, input) of finished outputs: from OUT/manifest.json where its
    entry matches the file's size and version in `listing` (two footers spot-checked), else read
    from the footers, concurrently."""
    try:
        manifest = rewrite_manifest.read(str(out_dir))
    except rewrite_manifest.Damaged:  # the footers are read; the run's end writes it anew
        manifest = None
    names = [base_name(o) for o in outputs]
    trusted, _ = rewrite_manifest.split(manifest, listing, names)
    found = {n: {"settings": rewrite_manifest.settings_of(manifest, e), "input": e.get("input")}
             for n, e in trusted.items()}
    checked = [o for o in outputs if base_name(o) in found]
    for out in checked[:: max(1, len(checked) // 2)][:2]:
        meta = read_output_metadata(out)
        if {k: meta.get(k) for k in ("settings", "input")} != found[base_name(out)]:
            raise ResumeError(f"--output_filename: {storage.join(str(out_dir), rewrite_manifest.MANIFEST)} does not "
                              f"describe {out} as its footer does; {rewrite_manifest.hint(str(out_dir))} anew")
    unread = [o for o in outputs if base_name(o) not in found]
    found.update(zip((base_name(o) for o in unread), survey.concurrently(read_output_metadata, unread)))
    return [found[n] for n in names]


def current_fingerprints(out_dir: Shard, shards: list[Shard], sizes: dict, recorded: list[dict]) -> list[dict]:
    """Each input's fingerprint now, as far as the comparison needs it: name and size when the size
    differs from the recorded one, else the full fingerprint (an object's ETag from the listing, a
    local file's hash from the memo or read again), concurrently."""
    memo = read_memo(out_dir)

    def now(k: int) -> dict:
        shard, meta = shards[k], sizes[str(shards[k])]
        if recorded[k].get("size") != meta.size:
            return {"name": base_name(shard), "size": meta.size}
        if isinstance(shard, str):  # the listing's ETag is what a HEAD request would say
            return {"name": base_name(shard), "size": meta.size, "etag": meta.version}
        return remembered_fingerprint(out_dir, shard, memo)

    return survey.concurrently(now, list(range(len(shards))))


def check_finished(out_dir: Shard, pairs: Iterable[tuple[Shard, Shard]], settings: dict) -> int:
    """(input shard, output) pairs whose output exists must match; returns how many were checked.
    One listing of OUT and of each input folder, the manifest or the footers (concurrently), and
    the local inputs' remembered hashes: no request per shard on object storage with a manifest."""
    listing = survey.list_meta(str(out_dir))
    done = [(shard, out) for shard, out in pairs if base_name(out) in listing]
    if not done:
        return 0
    metas = finished_metadata(out_dir, [out for _, out in done], listing)
    sizes, gone = survey.stat_pattern([str(shard) for shard, _ in done])
    if gone:
        raise ResumeError(f"--prompt_filename: {gone[0]} is gone since the run started")
    recorded = [meta.get("input") or {} for meta in metas]
    nows = current_fingerprints(out_dir, [shard for shard, _ in done], sizes, recorded)
    for (shard, out), meta, rec, now in zip(done, metas, recorded, nows):
        if not same_fingerprint(meta.get("settings"), settings):
            raise ResumeError(f"--output_filename: shard {out} was rewritten with other settings: "
                              f"{describe_changes(meta.get('settings') or {}, settings)}; pass --overwrite to "
                              f"redo it with these")
        name, size = base_name(shard), now["size"]
        if any(rec.get(k) != now[k] for k in now):
            digest = "etag" if "etag" in now else "blake2b"  # an object's ETag, a file's BLAKE2b
            what = (f"size {rec.get('size')} then, {size} now" if rec.get("size") != size
                    else f"content hash {rec.get(digest)} then, {now[digest]} now"
                    if rec.get("name") == name else f"input {rec.get('name')} then, {name} now")
            raise ResumeError(f"--output_filename: shard {out} was rewritten from another {name} ({what}): "
                              "another data set, or a shard downloaded again? Pass --overwrite to redo it")
    return len(done)


def check_overwrite_keeps_one_setting(out_dir: Shard, run_outputs: Iterable[Shard], settings: dict) -> None:
    """--overwrite of a subset with new settings must not leave other shards with the old ones."""
    mine = {base_name(p) for p in run_outputs}  # outputs of one folder: their names tell them apart
    for name in storage.list_names(str(out_dir)):
        if not name.endswith(".parquet") or name in mine:
            continue
        out = storage.join(str(out_dir), name) if isinstance(out_dir, str) else out_dir / name
        held = read_output_metadata(out).get("settings")
        if held is not None and not same_fingerprint(held, settings):
            raise ResumeError(f"--overwrite: {out} is not among this run's shards and keeps other settings "
                              f"({describe_changes(held, settings)}); one folder holds shards of one setting: "
                              f"redo all of its shards, or write to another --output_filename")
