"""Shard input of the rewriter: a brace pattern of img2dataset parquet files or webdataset
tars (`laion/{00000..41407}.parquet`), checked at the edge, and read one shard at a time
as keyed lines.

A parquet shard gives its `key` column and the caption column (--text_key, default
`caption`); rows whose img2dataset `status` is not "success" (images that were never
downloaded, so never trained on) are skipped and counted. A tar shard is read with the
`webdataset` library: the sample key and the `.txt` member (--text_key, default `txt`);
a sample without one, or a tar that ends early, is counted. A key that names two samples (or
two rows of a parquet shard) gets no row and is counted as `duplicate_key` (common/tar_keys.py):
training joins rewrites by key and could not tell such samples apart. Reading is deterministic, so
a resumed shard skips exactly the lines it already committed.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import braceexpand

from common.tar_keys import duplicated_keys, keyed_samples
from rewrite.input_lines import Line, decode_line

SHARD_SUFFIXES = (".parquet", ".tar")
DEFAULT_TEXT_KEYS = {".parquet": "caption", ".tar": "txt"}
KEY_COLUMN = "key"  # img2dataset's sample key, also the tar member prefix
STATUS_COLUMN, STATUS_OK = "status", "success"
HASH_CHUNK = 8 << 20


def is_shard_input(value: object) -> bool:
    """A pattern or path naming .parquet or .tar files (not a caption text file)."""
    return isinstance(value, (str, Path)) and str(value).endswith(SHARD_SUFFIXES)


def expand_shards(pattern: str | Path) -> list[Path]:
    return [Path(p) for p in braceexpand.braceexpand(str(pattern))]


def shard_stem(path: Path) -> str:
    """00012.parquet / 00012.tar -> 00012: the name of its output OUT/00012.parquet."""
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def check_shard_flags(pattern: object, output: object, text_key: object) -> tuple[Path, Path, str]:
    """(pattern, output folder, text key) after the checks every flag gets at the edge."""
    if isinstance(pattern, (list, tuple)):
        raise ValueError("--prompt_filename: give one path or brace pattern ('laion/{00000..00099}.parquet'), "
                         "not a list")
    shards = expand_shards(pattern)
    kinds = {p.suffix for p in shards}
    if len(kinds) > 1:
        raise ValueError(f"--prompt_filename {pattern}: mixes {' and '.join(sorted(kinds))} shards; give one kind")
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise ValueError(f"--prompt_filename {pattern}: {len(missing)} of {len(shards)} shards not found, "
                         f"e.g. {missing[0]}")
    stems = Counter(shard_stem(p) for p in shards)
    twice = [s for s, n in stems.items() if n > 1]
    if twice:
        raise ValueError(f"--prompt_filename {pattern}: {stems[twice[0]]} shards are named {twice[0]}; each "
                         f"shard's output is OUT/<name>.parquet, so names must differ")
    out = Path(str(output))
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_filename {output}: with shard input this names a folder (one NNNNN.parquet "
                         "per input shard), and it is a file")
    if not out.parent.is_dir():
        raise ValueError(f"--output_filename {output}: folder {out.parent} does not exist")
    if out.resolve() in {p.parent.resolve() for p in shards}:
        raise ValueError(f"--output_filename {output} is the folder of the input shards (where img2dataset keeps "
                         "its NNNNN.parquet); give another folder")
    key = DEFAULT_TEXT_KEYS[shards[0].suffix] if text_key is None else str(text_key).strip()
    if not key or text_key is True:
        raise ValueError("--text_key needs a field name (caption for parquet, txt for tars)")
    for shard in shards if shards[0].suffix == ".parquet" else ():
        ShardLines(shard, key).check_columns()  # every footer (cheap): a wrong --text_key fails now, not hours in
    return Path(str(pattern)), out, key


def input_fingerprint(path: Path) -> dict:
    """Name, size and content hash of one input shard: a changed shard refuses to resume."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return {"name": path.name, "size": path.stat().st_size, "blake2b": h.hexdigest()}


class ShardLines:
    """The keyed lines of one shard, from `start` on; `skipped` counts what was not a line
    (rows never downloaded, tar members without a key or text, a truncated tar)."""

    def __init__(self, path: Path, text_key: str, where: str = "--prompt_filename") -> None:
        self.path, self.text_key, self.where = path, text_key, where
        self.skipped: Counter = Counter()

    def read(self, start: int = 0) -> Iterator[Line]:
        rows = self._parquet_rows() if self.path.suffix == ".parquet" else self._tar_rows()
        for k, (key, text, bad) in enumerate(rows):
            if k >= start:
                yield Line(key, text, bad, k + 1)  # end: the position after it, for the commit

    def check_columns(self) -> list[str]:
        """The parquet shard's column names, which must hold the key and the text field."""
        import pyarrow.parquet as pq
        try:
            names = pq.read_schema(self.path).names
        except Exception as e:  # pyarrow raises its own ArrowInvalid, OSError, ...
            raise ValueError(f"{self.where}: cannot read parquet shard {self.path}: {e}") from None
        for col, flag in ((KEY_COLUMN, self.where), (self.text_key, "--text_key")):
            if col not in names:
                raise ValueError(f"{flag}: {self.path} has no column {col!r}; its columns are {', '.join(names)}")
        return names

    def _parquet_rows(self) -> Iterator[tuple[str, str, bool]]:
        import pyarrow.parquet as pq
        names = self.check_columns()
        columns = [KEY_COLUMN, self.text_key] + ([STATUS_COLUMN] if STATUS_COLUMN in names else [])
        table = pq.read_table(self.path, columns=columns).to_pydict()
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
        twice = duplicated_keys(str(self.path))  # even the first of a repeated key is known before it is read

        def count_and_continue(exn: Exception) -> bool:
            # A truncated or corrupt tar (webdataset may report it more than once): the shard
            # counts once, and the samples read before the damage are kept.
            self.skipped["broken_tar"] = 1
            return True

        field = self.text_key.lower()  # webdataset lower-cases member extensions
        for sample in keyed_samples(str(self.path), handler=count_and_continue):
            if sample["__key__"] in twice:
                self.skipped["duplicate_key"] += 1  # never a row: training could not tell the samples apart
                continue
            raw: Optional[bytes] = sample.get(field)
            if raw is None:
                self.skipped["no_text"] += 1  # an image without a caption: nothing to rewrite
                continue
            text, bad = decode_line(raw)
            yield sample["__key__"], text, bad
