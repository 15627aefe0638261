"""common.stat_memo: a value is remembered under the file's stat, computed again when the file
changes, and a memo that cannot be written costs only time (every caller relies on that: the
rewriter's weight hashes in a read-only home, training's caption hashes, evaluation's keys)."""
from __future__ import annotations

from common.stat_memo import StatMemo, file_sha256


def counting(path, calls: list):
    def compute():
        calls.append(path)
        return file_sha256(path)
    return compute


def test_a_value_is_remembered_until_the_file_changes(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("one")
    memo_file, calls = tmp_path / "memo.jsonl", []
    first = StatMemo(memo_file, "sha256").value(f, counting(f, calls))
    assert StatMemo(memo_file, "sha256").value(f, counting(f, calls)) == first and len(calls) == 1
    f.write_text("two")
    assert StatMemo(memo_file, "sha256").value(f, counting(f, calls)) != first and len(calls) == 2


def test_a_memo_that_cannot_be_written_gives_the_value_each_time(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("one")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    memo_file, calls = blocker / "memo.jsonl", []  # its folder is a file: neither read nor written
    for _ in range(2):
        assert StatMemo(memo_file, "sha256").value(f, counting(f, calls)) == file_sha256(f)
    assert len(calls) == 2 and blocker.read_text() == ""
