"""rewrite/units.py and rewrite/units_text.py without a model: line index, shares,
decoding policy, the commit protocol, layout refusals and the final merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewrite.units import STAT_KEYS, ResumeError, ShareWriter, Units, read_record, record_path
from rewrite.units_shards import ShardUnits
from rewrite.units_text import TextUnits, offset_of_line, read_lines, scan_input, share_range, unit_file
from common.rewrite_format import decode_line

FP = {"input": {"size": 1}, "settings": {"seed": 1}}


def test_scan_index_and_seek_every_line(tmp_path):
    lines = [f"caption {i}" + "x" * (i % 7) for i in range(200)] + ["", "no newline at the end"]
    path = tmp_path / "in.txt"
    path.write_bytes("\n".join(lines).encode())
    info = scan_input(path, chunk_size=64)  # small chunks: many index entries
    assert info.lines == len(lines) and info.size == path.stat().st_size and len(info.index) > 20
    for k in (0, 1, 63, 100, 200, len(lines) - 1, len(lines)):
        offset = offset_of_line(path, info, k)
        got = [line.text for line in read_lines(path, offset, k, info.lines)]
        assert got == lines[k:]
    assert scan_input(path).digest == info.digest
    path.write_bytes(path.read_bytes() + b"\n")
    assert scan_input(path).lines == len(lines)  # a final newline adds no line
    assert scan_input(path).digest != info.digest


def test_shares_cover_all_lines_in_order():
    for n, d in ((0, 2), (1, 3), (10, 3), (31, 2), (1000, 7)):
        ranges = [share_range(n, d, r) for r in range(d)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def test_decoding_policy():
    assert decode_line(b"caf\xc3\xa9\r\n") == ("caf\u00e9", False)
    assert decode_line(b"bad \xff byte\n") == ("bad \ufffd byte", True)
    assert decode_line(b"keeps inner \r returns") == ("keeps inner \r returns", False)


def test_bom_is_not_part_of_the_first_caption(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    assert [line.text for line in read_lines(path, 0, 0, 2)] == ["first", "second"]


def writer(out: Path, **kw) -> ShareWriter:
    args = dict(fingerprint=FP, layout={"dp_size": 1, "share": [0, 10]}, overwrite=False)
    args.update(kw)
    return ShareWriter(out, **args)


def test_commit_protocol_and_resume(tmp_path):
    out = tmp_path / "out.txt"
    w = writer(out)
    assert w.open(0, 0).next_line == 0 and out.read_bytes() == b""
    w.commit(["a", "", "caf\u00e9"], next_line=3, in_offset=17, stats={"lines": 3, "empty": 1})
    w.close()
    with open(out, "ab") as f:
        f.write(b"uncommitted")  # a crash after the append, before the record
    state = writer(out).open(0, 0)
    assert (state.next_line, state.in_offset, state.out_bytes) == (3, 17, len("a\n\ncaf\u00e9\n".encode()))
    assert out.read_bytes() == "a\n\ncaf\u00e9\n".encode() and state.stats["empty"] == 1
    with pytest.raises(ResumeError, match=r"different input or settings: settings.seed: 1 -> 2.*--overwrite"):
        writer(out, fingerprint={"input": {"size": 1}, "settings": {"seed": 2}}).open(0, 0)
    with pytest.raises(ResumeError, match="another layout of units"):
        writer(out, layout={"dp_size": 2, "share": [0, 5]}).open(0, 0)
    out.write_bytes(b"a\n")
    with pytest.raises(ResumeError, match="changed outside this program"):
        writer(out).open(0, 0)
    assert writer(out, overwrite=True).open(0, 0).next_line == 0 and out.read_bytes() == b""


def test_killed_between_first_record_and_output_file(tmp_path):
    """A fresh share writes its record, then creates the file: a kill in between resumes from line 0."""
    out = tmp_path / "out.txt"
    writer(out).open(5, 40)
    out.unlink()
    state = writer(out).open(5, 40)
    assert (state.next_line, state.in_offset, state.out_bytes) == (5, 40, 0) and out.read_bytes() == b""
    w = writer(out)
    w.open(5, 40)
    w.commit(["x"], next_line=6, in_offset=50, stats={"lines": 1})
    w.close()
    out.unlink()  # committed lines lost: that is not a crash of ours
    with pytest.raises(ResumeError, match="the file has 0 bytes but 2 were committed"):
        writer(out).open(5, 40)


def test_unreadable_record_is_refused(tmp_path):
    out = tmp_path / "out.txt"
    record_path(out).write_text("{half")
    with pytest.raises(ResumeError, match="out.txt.progress.json is unreadable.*--overwrite"):
        read_record(record_path(out))


def finished_part(output: Path, r: int, d: int, text: str) -> None:
    w = writer(unit_file(output, r, d), layout={"dp_size": d, "share": [r, r + 1]})
    w.open(r, 0)
    w.commit([text], next_line=r + 1, in_offset=0, stats={"lines": 1})
    w.finish()


def text_units(output: Path) -> TextUnits:
    src = output.with_name("src.txt")
    src.write_text("a\nb\nc\n")
    return TextUnits(src, output, scan_input(src), {"chatgpt": FP})


def plan(output: Path, dp_size: int, overwrite: bool = False) -> tuple[int, tuple]:
    units = text_units(output)
    with units.plan_lock():
        return units.plan(dp_size, overwrite)


def test_units_on_disk_are_kept_and_merged(tmp_path):
    """A partial run keeps its units whatever the process count now; parts of two
    plans are refused; the finished units are merged once, and leftovers go."""
    output = tmp_path / "out.txt"
    w = writer(output, layout={"dp_size": 1, "share": [0, 3]})
    w.open(0, 0)
    w.close()  # a partial one-unit run
    assert plan(output, 2) == (1, ("chatgpt",))
    assert plan(output, 3, overwrite=True) == (3, ("chatgpt",)) and not record_path(output).exists()
    for r in range(3):
        finished_part(output, r, 3, f"line {r}")
    finished_part(output, 0, 2, "x")
    with pytest.raises(ResumeError, match=r"from runs with \[2, 3\] units"):
        plan(output, 2)
    unit_file(output, 0, 2).unlink()
    record_path(unit_file(output, 0, 2)).unlink()
    units = text_units(output)
    with units.plan_lock():
        units.plan(1, False)
    assert units.merge_finished() == {"chatgpt": {**dict.fromkeys(STAT_KEYS, 0), "lines": 3}}
    assert output.read_text() == "line 0\nline 1\nline 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "out.txt.progress.json", "src.txt"]
    assert plan(output, 2)[1] == ()  # complete, whatever the process count now
    finished_part(output, 1, 3, "line 1")  # as left by a kill after the merge, before the parts were removed
    assert plan(output, 3)[1] == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "out.txt.progress.json", "src.txt"]
    other = text_units(output)
    other.fingerprints = {"chatgpt": {"input": {"size": 2}, "settings": {"seed": 1}}}
    with pytest.raises(ResumeError, match="finished run of a different input or settings: input.size: 1 -> 2"):
        other.plan(1, False)
    assert json.loads(record_path(output).read_text())["complete"] is True


def test_merge_waits_for_every_part(tmp_path):
    output = tmp_path / "out.txt"
    units = text_units(output)
    with units.plan_lock():
        units.plan(2, False)
    finished_part(output, 0, 2, "x")
    assert units.merge_finished() == {"chatgpt": None}  # part 1 is unfinished: another run may hold it
    assert not output.exists()


def test_record_written_before_checksums_still_resumes(tmp_path):
    """A version-1 record (no checksum): its committed bytes are taken as they are, once,
    and checked from then on; nothing is redone."""
    out = tmp_path / "out.txt"
    w = writer(out)
    w.open(0, 0)
    w.commit(["a", "b"], next_line=2, in_offset=4, stats={"lines": 2})
    w.close()
    record = json.loads(record_path(out).read_text())
    del record["state"]["out_blake2b"], record["checksum"]  # as version 1 wrote it
    record["version"] = 1
    record_path(out).write_text(json.dumps(record))
    w = writer(out)
    assert w.open(0, 0).next_line == 2
    w.commit(["c"], next_line=3, in_offset=6, stats={"lines": 1})
    w.close()
    assert out.read_text() == "a\nb\nc\n" and json.loads(record_path(out).read_text())["version"] == 2
    out.write_text("x\nb\nc\n")
    with pytest.raises(ResumeError, match="checksum"):
        writer(out).open(0, 0)


def test_both_unit_kinds_have_what_the_run_walks(tmp_path):
    """The run loop knows units only through rewrite.units.Units: each kind has all of it."""
    members = [n for n, v in vars(Units).items() if callable(v) and not n.startswith("_")] + ["count", "total_lines"]
    assert {"claim", "lines", "commit", "finish", "progress", "where", "conclude"} <= set(members)
    text = text_units(tmp_path / "out.txt")
    shards = ShardUnits([Path("00000.tar")], Path("out"), "txt", ("chatgpt",), {})
    for units in (text, shards):
        assert [m for m in members if not hasattr(units, m)] == []
