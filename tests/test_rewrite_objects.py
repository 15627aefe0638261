"""The rewriter's shards on object storage (moto's S3 server on 127.0.0.1): a shard in
progress as window objects plus a progress record (rewrite/units_shards.py)."""
from __future__ import annotations

import pytest

from common import claims, storage
from rewrite.units_shards import ObjectShareWriter, remove_partial
from rewrite.units import ResumeError

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
    mine = claims.claim_for(out, "shard", timeout=600.0)  # its first refresh would come after 150 s
    assert mine.try_acquire()
    w = ObjectShareWriter(out + ".part", FINGERPRINT, LAYOUT, False, claim=mine)
    w.open(0, 0)
    w.commit(rows(0, 2), 2, 2, {"lines": 2})  # refreshes the heartbeat
    mine._stop.set()  # this run stalls
    time.sleep(0.2)
    taker = claims.claim_for(out, "shard", timeout=0.1)  # past the taker's timeout: stale to it
    assert taker.try_acquire()
    with pytest.raises(claims.ClaimLost):
        w.commit(rows(2, 4), 4, 4, {"lines": 2})
    assert storage.list_names(out + ".part") == ["000000000.jsonl"]
    assert ObjectShareWriter(out + ".part", FINGERPRINT, LAYOUT, False).open(0, 0).next_line == 2
    taker.release()


@pytest.fixture
def s3_shards(s3_bucket, tmp_path):
    """Two img2dataset-style parquet shards under s3://BUCKET/laion."""
    import shard_fixtures as sf
    from testkit.s3server import upload_folder
    info = sf.make_shards(tmp_path / "shards", n_shards=2, per_shard=3, bad=False)
    upload_folder(str(info.folder), f"s3://{s3_bucket}/laion")
    return f"s3://{s3_bucket}/laion/{{00000..00001}}.parquet"


@pytest.mark.parametrize("prompt, output, message", [
    ("s3://{b}/laion/{{00000..00003}}.parquet", "s3://{b}/out",
     r"--prompt_filename s3://{b}/laion/\{{00000..00003\}}.parquet: 2 of 4 shards not found, e.g. "
     r"s3://{b}/laion/00002.parquet"),
    ("s3://no-such-bucket-zz/{{00000..00001}}.parquet", "s3://{b}/out",
     r"--prompt_filename: list: s3://no-such-bucket-zz: the bucket 'no-such-bucket-zz' does not exist"),
    ("s3://{b}/laion/{{00000..00001}}.parquet", "s3://{b}/laion",
     r"--output_filename s3://{b}/laion is the prefix of the input shards"),
    ("s3://{b}/laion/{{00000..00001}}.parquet", "s3://{b}/foreign",
     r"--output_filename s3://{b}/foreign already holds 1 parquet files \(e.g. 00000.parquet\) but no rewrite.json"),
    ("s3://{b}/laion/{{00000..00001}}.parquet", "memory://scratch/out",
     r"--output_filename: memory://scratch/out: memory:// has no atomic create-if-absent"),
])
def test_bad_object_storage_flags_name_the_url(s3_shards, s3_bucket, prompt, output, message):
    from rewrite.shard_input import check_shard_flags
    storage.write_bytes(f"s3://{s3_bucket}/foreign/00000.parquet", b"someone else's")
    with pytest.raises(ValueError, match=message.format(b=s3_bucket)) as e:
        check_shard_flags(prompt.format(b=s3_bucket), output.format(b=s3_bucket), None)
    assert "\n" not in str(e.value)


def test_object_shards_read_like_local_ones(s3_shards, s3_bucket, tmp_path):
    """Parquet and tar shards from s3:// give the lines the local files give; the pattern,
    output prefix and text key pass the checks."""
    from rewrite.shard_input import ShardLines, check_shard_flags, expand_shards, input_fingerprint
    prompt, out, key = check_shard_flags(s3_shards, f"s3://{s3_bucket}/rewrites", None)
    assert out == f"s3://{s3_bucket}/rewrites" and key == "caption"
    for kind, text_key in (("parquet", "caption"), ("tar", "txt")):
        for s in range(2):
            local = tmp_path / "shards" / f"{s:05d}.{kind}"
            remote = f"s3://{s3_bucket}/laion/{s:05d}.{kind}"
            assert list(ShardLines(remote, text_key).read(1)) == list(ShardLines(local, text_key).read(1))
    fp = input_fingerprint(expand_shards(s3_shards)[0])
    assert fp["name"] == "00000.parquet" and fp["size"] == (tmp_path / "shards" / "00000.parquet").stat().st_size
    assert fp["etag"]


def test_storage_failure_mid_tar_stops_not_skips(s3_shards, s3_server, s3_bucket, monkeypatch):
    """The object goes away while its tar is streamed: the reader stops with the shard's URL
    instead of counting a broken tar and going on with a shard cut short."""
    from rewrite.shard_input import ShardLines
    monkeypatch.setattr(storage, "READ_BLOCK", 1024)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    client = s3_server.client()
    client.copy_object(Bucket=s3_bucket, Key="doomed/00000.tar", CopySource={"Bucket": s3_bucket,
                                                                             "Key": "laion/00000.tar"})
    reader = ShardLines(f"s3://{s3_bucket}/doomed/00000.tar", "txt")
    lines = reader.read()
    next(lines)
    client.delete_object(Bucket=s3_bucket, Key="doomed/00000.tar")
    with pytest.raises(storage.StorageError, match=f"--prompt_filename shard s3://{s3_bucket}/doomed/00000.tar: "
                                                   "reading failed mid-shard"):
        list(lines)
    assert "broken_tar" not in reader.skipped


def test_finished_rows_keep_unicode_line_separators(s3_bucket):
    """Rows are split at newlines only (json.dumps keeps U+2028 and \\x85 raw in a caption)."""
    from rewrite.units_shards import encode_row, part_lines
    part = f"s3://{s3_bucket}/out/00002.parquet.part"
    w = ObjectShareWriter(part, FINGERPRINT, LAYOUT, overwrite=False)
    w.open(0, 0)
    rows = [encode_row("k1", "a\u2028b\x85c", {"chatgpt": "d\u2029e"}), encode_row("k2", "plain", {"chatgpt": "x"})]
    w.commit(rows, 2, 2, {"lines": 2})
    assert list(part_lines(f"s3://{s3_bucket}/out/00002.parquet", w)) == rows


def test_claim_timeout_must_be_positive():
    from rewrite.cli_args import _claim_timeout
    assert _claim_timeout(30) == 30.0
    with pytest.raises(ValueError, match="--claim_timeout must be > 0 seconds, got 0"):
        _claim_timeout(0)
    with pytest.raises(ValueError, match="--claim_timeout must be a number"):
        _claim_timeout("soon")
