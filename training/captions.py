"""The caption CSV and its aligned rewrite files, read into compact tables, with a report
of everything that was not read as written (nothing is dropped or altered silently).

CSV (docs/formats.md, "Caption files"): rows `image_path,caption`. A row is a sample when its first
field names an image file (common.images: the released .jpg/.jpeg/.png and .webp, .bmp,
.tif, ...); other rows (a header, say) are skipped and counted. Rewrite files hold one
caption per line, line k belonging to sample k.

Decoding: UTF-8 (a byte-order mark is skipped). A caption with bytes that are not UTF-8
is read as Windows-1252 (the superset of Latin-1 that Windows exports use), byte by
byte, keeping its valid UTF-8 characters, and counted; an image path keeps its bytes
exactly (surrogate escapes), so a file named in Latin-1 is still found on disk.
"""
from __future__ import annotations

import csv
import re
from array import array
from dataclasses import dataclass, field

from common.images import is_image_file

ESCAPED = re.compile("[\udc80-\udcff]+")  # bytes that were not UTF-8, as errors="surrogateescape" keeps them
EXAMPLES = 3  # lines quoted per kind of report


class StringTable:
    """Many strings in one utf-8 byte buffer plus end offsets, filled by `append`.

    CC12M has 12M rows x (1 + 4 rewrites) captions; as Python str objects that is
    several GB per process, and DataLoader workers would copy it page by page as
    reference counts change. A bytearray and an int64 array are compact, are filled
    without an intermediate list, and stay shared after fork. Surrogate escapes (the
    bytes of a path that is not UTF-8) are stored as those bytes and given back as such.
    """

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, s: str) -> None:
        self._data += s.encode("utf-8", errors="surrogateescape")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._data[start:self._ends[i]].decode("utf-8", errors="surrogateescape")


@dataclass
class Tally:
    """How many lines of one kind, and the first few, for the report."""
    what: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def describe(self, singular: str, plural: str) -> str | None:
        if not self.count:
            return None
        more = ", ..." if self.count > len(self.examples) else ""
        shown = f" ({', '.join(self.examples)}{more})" if self.examples else ""
        return f"{self.count} {singular if self.count == 1 else plural}{self.what}{shown}"


def as_windows_1252(text: str) -> str:
    """Escaped bytes read as Windows-1252 (Latin-1 for its 5 undefined bytes), the rest kept."""
    def decode(m: re.Match) -> str:
        raw = bytes(ord(c) - 0xDC00 for c in m.group())
        return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in raw)

    return ESCAPED.sub(decode, text)


@dataclass
class CaptionTable:
    """The samples of a caption CSV, and one line per kind of row not read as written."""
    paths: StringTable
    captions: StringTable
    notes: list[str]


@dataclass
class CsvTallies:
    header: Tally = field(default_factory=lambda: Tally(" skipped"))
    not_image: Tally = field(default_factory=lambda: Tally(" skipped: the first field is not an image file name"))
    blank: Tally = field(default_factory=lambda: Tally(" skipped"))
    spaces: Tally = field(default_factory=lambda: Tally(" with surrounding spaces, removed"))
    latin: Tally = field(default_factory=lambda: Tally(" not UTF-8, read as Windows-1252"))

    def notes(self) -> list[str]:
        lines = [self.header.describe("header row", "header rows"), self.not_image.describe("row", "rows"),
                 self.blank.describe("blank line", "blank lines"),
                 self.spaces.describe("image path", "image paths"), self.latin.describe("caption", "captions")]
        return [line for line in lines if line]


def _check_span(path: str, first: int, last: int) -> None:
    if last > first:
        raise ValueError(f"--train-data {path!r}: the row at line {first} runs over {last - first + 1} lines "
                         f"(to line {last}): a caption opens a quote it never closes? A quoted caption ends "
                         'with a quote; a quote inside it is written "".')


def _not_utf8(text: str) -> bool:
    return not text.isascii() and ESCAPED.search(text) is not None  # isascii: O(1), the common case


def _add_row(row: list[str], line: int, table: CaptionTable, tally: CsvTallies, path: str) -> None:
    image = row[0].strip()
    if not is_image_file(image):
        kind = tally.header if line == 1 else tally.not_image
        kind.add(f"line {line}: {row[0][:40]!r}")
        return
    if len(row) < 2:
        raise ValueError(f"--train-data {path!r}: line {line} has an image path but no caption: {row!r}")
    if len(image) != len(row[0]):
        tally.spaces.add(f"line {line}")
    caption = row[1] if len(row) == 2 else ",".join(row[1:])  # an unquoted comma splits a caption: rejoin
    if _not_utf8(caption):
        caption = as_windows_1252(caption)
        tally.latin.add(f"line {line}")
    table.paths.append(image)
    table.captions.append(caption)


def read_caption_csv(path: str) -> CaptionTable:
    """The sample rows of a caption CSV; rows that span lines (an unclosed quote) are refused."""
    table, tally = CaptionTable(StringTable(), StringTable(), []), CsvTallies()
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader, last = csv.reader(f), 0
        try:
            for row in reader:
                if reader.line_num != last + 1:
                    _check_span(path, last + 1, reader.line_num)
                last = reader.line_num
                if row:
                    _add_row(row, last, table, tally, path)
                else:
                    tally.blank.add(f"line {last}")
        except csv.Error as err:
            raise ValueError(f"--train-data {path!r}: line {reader.line_num}: {err}") from err
    if not len(table.paths):
        raise ValueError(f"--train-data {path!r}: no rows whose first field is an image file name "
                         f"(.jpg, .png, .webp, ...)")
    table.notes = tally.notes()
    return table


def read_rewrites(path: str, expected: int, csv_path: str) -> tuple[StringTable, list[str]]:
    """One rewrite per line, aligned with the CSV's samples (a count mismatch is an error);
    and the report of lines read as Windows-1252."""
    table, latin = StringTable(), Tally(" not UTF-8, read as Windows-1252")
    # newline="\n": only a line feed ends a line, so a stray carriage return inside a
    # rewrite cannot shift every later line out of alignment.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n") as f:
        for k, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if _not_utf8(line):
                line = as_windows_1252(line)
                latin.add(f"line {k}")
            table.append(line)
    if len(table) != expected:
        raise ValueError(
            f"--augmented_caption_filelist: {path!r} has {len(table)} lines but "
            f"--train-data {csv_path!r} has {expected} samples; line k must be the rewrite of sample k")
    note = latin.describe("line", "lines")
    return table, [f"--augmented_caption_filelist {path!r}: {note}"] if note else []
