"""The LAION workflow on object storage, against moto's S3 server on 127.0.0.1, as real
processes: rewrite s3:// parquet shards into an s3:// prefix with 2 data-parallel torchrun
processes in 2 modes, kill -9 mid-shard, rerun (equal to an uninterrupted local run); two
independent runs sharing one output prefix (no shard written twice); then train from s3://
shards with s3:// rewrites, copy the run to s3:// (--remote-sync), and resume from that copy on
an empty output folder (equal to an uninterrupted run; one training process)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import shard_fixtures as sf
from common import storage
from conftest import REWRITE_PAIRS, clean_dist_env, make_tiny_rewrite_setup
from rewrite import llama_rewrite
from common.rewrite_format import read_metadata
from testkit.paused_rewrite import ready_path
from testkit.processes import kill_tree, wait_until_paused
from testkit.s3server import upload_folder
from train_fixtures import read_log

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FLAGS = {"max_seq_len": 256, "max_gen_len": 6, "max_batch_size": 2, "sample_mode": "chatgpt,bard"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
N_SHARDS = 8


def env(s3) -> dict:
    return {**clean_dist_env(), **s3.env(), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def laion(tmp_path_factory, s3_server):
    """8 shards of 12 samples (with bad samples of every kind) on local disk and in a bucket, a
    tiny LLaMA, and the one-process local rewrite of the parquet shards (the reference)."""
    root = tmp_path_factory.mktemp("laion_s3")
    shards = sf.make_shards(root / "shards", n_shards=N_SHARDS, per_shard=12)
    captions = [sf.caption_of(s, i) for s in range(N_SHARDS) for i in range(12)]
    tiny = make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llama_rewrite.main(**tiny, **FLAGS, prompt_filename=shards.parquets, output_filename=str(root / "local"))
    finally:
        torch.set_num_threads(before)
    bucket = s3_server.new_bucket()
    upload_folder(str(shards.folder), f"s3://{bucket}/laion")
    last = f"{N_SHARDS - 1:05d}"
    return {"root": root, "shards": shards, "tiny": tiny, "local": root / "local", "bucket": bucket,
            "parquets": f"s3://{bucket}/laion/{{00000..{last}}}.parquet",
            "tars": f"s3://{bucket}/laion/{{00000..{last}}}.tar"}


def rewrite_cmd(laion, out: str, launcher: list[str], **extra) -> list[str]:
    flags = {**laion["tiny"], **FLAGS, "prompt_filename": laion["parquets"], "output_filename": out, **extra}
    return [*launcher, str(REPO / "rewrite" / "llama_rewrite.py"), *(f"--{k}={v}" for k, v in flags.items())]


def same_as_local(laion, out: str) -> None:
    """Every shard's table equals the local run's; so do its settings, counts and skips (the
    input fingerprint differs by design: an object's ETag, a file's BLAKE2b)."""
    names = sorted(p.name for p in laion["local"].glob("*.parquet"))
    # no part, claim; the run's manifest (common/rewrite_manifest.py)
    assert sorted(n for n in storage.list_names(out)) == sorted(names + ["rewrite.json", "manifest.json"])
    for name in names:
        data = storage.read_bytes(storage.join(out, name))
        table = pq.read_table(pa.BufferReader(data))
        assert table.equals(pq.read_table(laion["local"] / name)), name
        meta = json.loads(table.schema.metadata[b"laclip_rewrite"])
        local = read_metadata(laion["local"] / name)
        assert {k: v for k, v in meta.items() if k != "input"} == {k: v for k, v in local.items() if k != "input"}
        assert meta["input"]["name"] == local["input"]["name"] and meta["input"]["etag"]


def test_two_groups_killed_and_resumed_equal_local(laion, s3_server):
    out = f"s3://{laion['bucket']}/rewrites"
    timeout = 8
    ready = laion["root"] / "paused"  # each rank stops after its first window, mid-shard (testkit/paused_rewrite.py)
    cmd = rewrite_cmd(laion, out, TORCHRUN, claim_timeout=timeout)
    paused = [*TORCHRUN, "-m", "testkit.paused_rewrite", "--pause-before-window=1", f"--ready={ready}", "--",
              *cmd[len(TORCHRUN) + 1:]]
    proc = subprocess.Popen(paused, cwd=REPO, env=env(s3_server), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for rank in ("0", "1"):
            wait_until_paused(ready_path(ready, rank), proc)
    finally:
        kill_tree(proc)  # torchrun and both workers, as a node failure would
    names = storage.list_names(out)
    assert not any(n.endswith(".parquet") for n in names) and sum(n.endswith(".claim") for n in names) == 2
    time.sleep(timeout + 1)  # the killed run's claims go stale
    done = subprocess.run(cmd, env=env(s3_server), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: {N_SHARDS} of {N_SHARDS} shards finished" in done.stdout
    assert "took over a stale claim" in done.stdout
    same_as_local(laion, out)


def test_two_independent_runs_share_one_prefix(laion, s3_server):
    """Two single-process jobs started together on one output prefix: every shard is written
    by exactly one of them, and the result equals the local run."""
    out = f"s3://{laion['bucket']}/shared"
    cmd = rewrite_cmd(laion, out, [sys.executable], claim_timeout=120)
    procs = [subprocess.Popen(cmd, env=env(s3_server), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    written = [re.findall(r"shard \S+/(\d{5})\.parquet -> ", stdout) for stdout, _ in outs]
    assert sorted(written[0] + written[1]) == [f"{s:05d}" for s in range(N_SHARDS)]  # each once, by one run
    same_as_local(laion, out)


def train_cmd(laion, data: dict, out: Path, epochs: int, *extra: str) -> list[str]:
    """One process (the 2-process shard runs are test_laion_pipeline's; here the storage is the point)."""
    return [sys.executable, "train.py", "--train-data", data["tars"], "--dataset-type", "webdataset",
            "--train-num-samples", "32", "--aug-text", "--rewrite-data", data["rewrites"], "--output-dir", str(out),
            "--model", "CLIP_TINY", "--batch-size", "4", "--workers", "1", "--epochs", str(epochs),
            "--warmup-epochs", "1", "--lr", "1e-3", "--device", "cpu", *extra]


def run_train(cmd: list[str], s3) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env(s3), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_from_s3_resume_from_the_remote_copy(laion, s3_server, tmp_path):
    """2 epochs from local files vs 1 epoch from s3:// (shards and rewrites) synced to s3://, the
    local folder lost, and the second epoch resumed from the remote copy: the same weights and log."""
    bucket = laion["bucket"]
    upload_folder(str(laion["local"]), f"s3://{bucket}/rw")
    last = f"{N_SHARDS - 1:05d}"
    local = {"tars": laion["shards"].tars, "rewrites": str(laion["local"] / f"{{00000..{last}}}.parquet")}
    remote = {"tars": laion["tars"], "rewrites": f"s3://{bucket}/rw/{{00000..{last}}}.parquet"}
    sync = f"s3://{bucket}/runs/laion"
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(train_cmd(laion, local, straight, 2), s3_server)
    run_train(train_cmd(laion, remote, split, 1, "--remote-sync", sync), s3_server)
    assert storage.read_bytes(sync + "/checkpoint.pt") == (split / "checkpoint.pt").read_bytes()
    import shutil
    shutil.rmtree(split)  # the node is gone; the copy in the bucket is what is left
    stdout = run_train(train_cmd(laion, remote, split, 2, "--remote-sync", sync, "--resume-override"), s3_server)
    assert ("fetched checkpoint.pt, checkpoint.pt.sum, checkpoint_best.pt, checkpoint_best.pt.sum, log.txt from"
            in stdout)
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]
    assert strip(read_log(straight)) == strip(read_log(split))
    assert storage.read_bytes(sync + "/log.txt") == (split / "log.txt").read_bytes()
