"""Training from s3:// shards and s3:// rewrites (moto's S3 server on 127.0.0.1): the same
samples, rewrites and weights as from local disk; bad URLs named in one line; a storage
failure mid-shard stops the run instead of counting the shard as broken."""
from __future__ import annotations

import json

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import shard_fixtures as sf
import train
import training.wds as wds_mod
from common import storage
from testkit.s3server import upload_folder
from training.rewrite_join import open_rewrite_source
from training.loaders import ShardLoader
from training.wds import ShardStream, StreamSpec
from torch.utils.data import DataLoader

pytestmark = pytest.mark.usefixtures("one_thread", "single_process")


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3_server):
    """The same shards and rewrites on local disk and under s3://BUCKET/laion, /rewrites."""
    root = tmp_path_factory.mktemp("s3wds")
    info = sf.make_shards(root / "shards")
    (root / "rewrites").mkdir()
    for s in range(info.n_shards):
        keys = [sf.key_of(s, i) for i in range(info.per_shard) if i != 0]  # first key: no row, counted
        captions = [sf.caption_of(s, i) for i in range(info.per_shard) if i != 0]
        table = pa.table({"key": keys, "caption": captions, "chatgpt": [f"chatgpt says {k}" for k in keys]})
        pq.write_table(table.replace_schema_metadata({b"laclip_rewrite": b"{}"}),  # as the rewriter writes it
                       root / "rewrites" / f"{s:05d}.parquet")
    bucket = s3_server.new_bucket()
    upload_folder(str(root / "shards"), f"s3://{bucket}/laion")
    upload_folder(str(root / "rewrites"), f"s3://{bucket}/rewrites")
    last = f"{info.n_shards - 1:05d}"
    local = {"tars": info.tars, "rewrites": str(root / "rewrites" / f"{{00000..{last}}}.parquet")}
    remote = {"tars": f"s3://{bucket}/laion/{{00000..{last}}}.tar",
              "rewrites": f"s3://{bucket}/rewrites/{{00000..{last}}}.parquet"}
    return {"local": local, "s3": remote, "bucket": bucket, "info": info}


def stream(where: dict, num_samples: int = 40) -> ShardLoader:
    spec = StreamSpec(tuple(braceexpand.braceexpand(where["tars"])), num_samples, False,
                      open_rewrite_source(where["rewrites"]), True, 0)
    s = ShardStream(spec, lambda image: image.resize((4, 4)) and torch.zeros(1), lambda t: t, 1, 1, 0)
    return ShardLoader(s, DataLoader(s, batch_size=1, num_workers=0))


def one_epoch(ld: ShardLoader) -> tuple[list, dict]:
    ld.set_epoch(0)
    texts = []
    for _, tokens in ld:
        texts += list(zip(*tokens))
    return texts, ld.report()


def test_s3_stream_equals_local(data):
    """Samples, rewrites, order and the bad-sample counts are the same from s3:// as from disk."""
    local, remote = one_epoch(stream(data["local"])), one_epoch(stream(data["s3"]))
    assert remote == local
    assert remote[1]["shard_errors"] >= 1 and remote[1]["missing_rewrites"] >= 1  # the damaged tar: counted


def argv(where: dict, out, *extra: str) -> list[str]:
    return ["--train-data", where["tars"], "--train-num-samples", "8", "--output-dir", str(out),
            "--model", "CLIP_TINY", "--batch-size", "4", "--workers", "0", "--epochs", "1", "--warmup-epochs", "1",
            "--lr", "1e-3", "--device", "cpu", "--aug-text", "--rewrite-data", where["rewrites"], *extra]


def test_train_from_s3_equals_local(data, tmp_path):
    """train.py over s3:// shards and rewrites gives the local run's weights and log."""
    train.main(argv(data["local"], tmp_path / "local"))
    train.main(argv(data["s3"], tmp_path / "s3"))
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("local", "s3"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    logs = [json.loads((tmp_path / d / "log.txt").read_text()) for d in ("local", "s3")]
    timing = ("epoch_time_s", "train_samples_per_s")
    assert {k: v for k, v in logs[0].items() if k not in timing} == {k: v for k, v in logs[1].items()
                                                                     if k not in timing}


@pytest.mark.parametrize("flag, value, message", [
    ("--train-data", "s3://{bucket}/nothing/{{00000..00003}}.tar", r"--train-data .*4 of 4 shards not found, e\.g\. "
                                                                   r"s3://.*/nothing/00000\.tar"),
    ("--train-data", "s3://no-such-bucket-zz/{{00000..00003}}.tar", r"--train-data: list: s3://no-such-bucket-zz: "
                                                                    r"the bucket 'no-such-bucket-zz' does not exist"),
    ("--rewrite-data", "s3://{bucket}/none/{{00000..00007}}.parquet", r"--rewrite-data s3://.*: 8 of 8 files not "
                                                                      r"found"),
])
def test_bad_urls_named_in_one_line(data, tmp_path, flag, value, message):
    args = argv(data["s3"], tmp_path / "out")
    args[args.index(flag) + 1] = value.format(bucket=data["bucket"])
    with pytest.raises(ValueError, match=message) as e:
        train.main(args)
    assert "\n" not in str(e.value)


def test_storage_failure_mid_shard_stops_not_skips(data, s3_server, monkeypatch):
    """The object goes away while its tar is being streamed (small ranged reads): the run stops
    with the shard's URL; the shard is not counted as broken and skipped."""
    monkeypatch.setattr(storage, "READ_BLOCK", 1024)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    bucket = data["bucket"]
    client = s3_server.client()
    client.copy_object(Bucket=bucket, Key="doomed/00000.tar", CopySource={"Bucket": bucket, "Key": "laion/00000.tar"})
    ld = stream({"tars": f"s3://{bucket}/doomed/00000.tar", "rewrites": data["s3"]["rewrites"]}, num_samples=6)
    samples = ld.stream._read_shard(f"s3://{bucket}/doomed/00000.tar", pending := __import__("collections").Counter())
    next(samples)
    client.delete_object(Bucket=bucket, Key="doomed/00000.tar")
    with pytest.raises(storage.StorageError, match=f"--train-data shard s3://{bucket}/doomed/00000.tar: reading "
                                                   "failed mid-shard"):
        list(samples)
    assert pending["shard_errors"] == 0


def test_remote_sync_uploads_changes_claims_the_url_and_restores(s3_bucket, tmp_path):
    from training import remote_sync
    url = f"s3://{s3_bucket}/runs/laclip"
    out = tmp_path / "out"
    (out / "tb_logs").mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"epoch 0 weights")
    (out / "log.txt").write_text('{"epoch": 0}\n')
    (out / "tb_logs" / "events.1").write_bytes(b"tb")
    (out / "train.lock").write_text("local only")
    (out / "checkpoint.pt.tmp-123").write_bytes(b"unfinished")
    sync = remote_sync.start(url, str(out), claim_timeout=60)
    assert sync.push() == ["checkpoint.pt", "tb_logs/events.1", "log.txt"]  # checkpoint before the log line
    assert storage.list_names(url) == ["checkpoint.pt", "log.txt", "tb_logs", "train.claim"]
    with pytest.raises(ValueError, match=f"--remote-sync {url} is in use by process {__import__('os').getpid()}"):
        remote_sync.start(url, str(tmp_path / "other"), claim_timeout=60)
    assert sync.push() == []  # nothing changed
    (out / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    sync.close()  # uploads the changed log, releases the claim
    assert storage.read_bytes(url + "/log.txt") == (out / "log.txt").read_bytes()
    fresh = tmp_path / "fresh"  # a new node: empty local folder, resumes from the remote copy
    fresh.mkdir()
    again = remote_sync.start(url, str(fresh), claim_timeout=60)
    assert (fresh / "checkpoint.pt").read_bytes() == b"epoch 0 weights"
    assert (fresh / "log.txt").read_text() == (out / "log.txt").read_text()
    assert again.push() == []  # what was fetched is not sent back
    again.close()
    with pytest.raises(ValueError, match="--remote-sync '/tmp/x': needs an object-storage URL"):
        remote_sync.start("/tmp/x", str(fresh), claim_timeout=60)
