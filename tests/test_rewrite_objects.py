"""The rewriter's shards on object storage (moto's S3 server on 127.0.0.1): a shard in
progress as window objects plus a progress record (rewrite/object_parts.py)."""
from __future__ import annotations

import pytest

from common import claims, storage
from rewrite.object_parts import ObjectShareWriter, remove_partial
from rewrite.output import ResumeError

FINGERPRINT = {"input": {"name": "00000.parquet", "size": 10, "etag": "x"}, "settings": {"seed": 0}}
LAYOUT = {"shard": "00000"}


def rows(a: int, b: int) -> list[str]:
    return [f'{{"key": "{k:09d}", "caption": "c {k}", "chatgpt": "r {k}"}}' for k in range(a, b)]


def test_windows_commit_resume_and_refuse_changes(s3_bucket):
    part = f"s3://{s3_bucket}/out/00000.parquet.part"
    w = ObjectShareWriter(part, FINGERPRINT, LAYOUT, overwrite=False)
    assert w.open(0, 0).next_line == 0
    w.commit(rows(0, 4), 4, 4, {"lines": 4, "rewritten": 4})
    w.commit(rows(4, 8), 8, 8, {"lines": 4, "rewritten": 3, "fallbacks": 1})
    storage.write_bytes(w.window_url(8), b"an orphan: uploaded, but the record was not")  # crash between the two
    again = ObjectShareWriter(part, FINGERPRINT, LAYOUT, overwrite=False)
    state = again.open(0, 0)
    assert state.next_line == 8 and state.stats["rewritten"] == 7 and state.stats["fallbacks"] == 1
    again.commit(rows(8, 10), 10, 10, {"lines": 2})  # the orphan's name is redone with the right rows
    expected = "".join(f"{r}\n" for r in rows(0, 10)).encode()
    assert ObjectShareWriter(part, FINGERPRINT, LAYOUT, False).open(0, 0).out_bytes == len(expected)
    assert again.committed_bytes() == expected
    with pytest.raises(ResumeError, match="different input, settings or layout: input.size: 10 -> 11"):
        ObjectShareWriter(part, {**FINGERPRINT, "input": {**FINGERPRINT["input"], "size": 11}}, LAYOUT, False).open(0, 0)
    storage.write_bytes(again.window_url(4), b"edited\n")
    with pytest.raises(ResumeError, match="differ from the recorded size or checksum"):
        ObjectShareWriter(part, FINGERPRINT, LAYOUT, False).open(0, 0)
    remove_partial(part)
    assert storage.list_names(f"s3://{s3_bucket}/out") == []


def test_commit_after_the_claim_was_taken_over_writes_nothing(s3_bucket):
    import time
    out = f"s3://{s3_bucket}/out/00001.parquet"
    mine = claims.claim_for(out, "shard", timeout=1.0)
    assert mine.try_acquire()
    w = ObjectShareWriter(out + ".part", FINGERPRINT, LAYOUT, False, claim=mine)
    w.open(0, 0)
    w.commit(rows(0, 2), 2, 2, {"lines": 2})
    mine._stop.set()  # this run stalls past the timeout
    time.sleep(1.5)
    taker = claims.claim_for(out, "shard", timeout=1.0)
    assert taker.try_acquire()
    with pytest.raises(claims.ClaimLost):
        w.commit(rows(2, 4), 4, 4, {"lines": 2})
    assert storage.list_names(out + ".part") == ["000000000.jsonl"]
    assert ObjectShareWriter(out + ".part", FINGERPRINT, LAYOUT, False).open(0, 0).next_line == 2
    taker.release()
