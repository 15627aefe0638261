"""Start-up over many shards (issue 27) and the shards' identity in checkpoints (issue 23, case 4):
the rewrite files' schemas from OUT/manifest.json where it matches the listing (a few footers
spot-checked), footers read for files it does not describe (said in one line), a manifest that lies
refused; the shards looked at once per job, by rank 0 (other processes ask the S3 server nothing);
a shard replaced inside an epoch refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import models
import shard_fixtures as sf
import train
import training.rewrite_join as rj
from common import rewrite_manifest
from conftest import clean_dist_env
from testkit.net import free_port
from testkit.s3server import upload_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
META = {b"laclip_rewrite": json.dumps({"settings": {"seed": 0}}).encode()}


def write_rewrites(folder: Path, n: int, columns=("chatgpt",), meta=META) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        keys = [sf.key_of(s, i) for i in range(3)]
        table = pa.table({"key": keys, "caption": [sf.caption_of(s, i) for i in range(3)],
                          **{c: [f"{c} says {k}" for k in keys] for c in columns}})
        pq.write_table(table.replace_schema_metadata(meta), folder / f"{s:05d}.parquet")
    return str(folder / f"{{00000..{n - 1:05d}}}.parquet")


def counting_footers(monkeypatch) -> list:
    read, real = [], rj._schema
    monkeypatch.setattr(rj, "_schema", lambda p: read.append(p) or real(p))
    return read


def test_a_manifest_spares_the_footers_and_a_replaced_file_is_read_and_named(tmp_path, monkeypatch):
    pattern = write_rewrites(tmp_path / "rw", 6)
    read = counting_footers(monkeypatch)
    without = rj.open_rewrite_source(pattern)
    assert len(read) == 6 and without.columns == ("chatgpt",)
    written = rewrite_manifest.write(str(tmp_path / "rw"))
    assert len(written["files"]) == 6 and written["files"]["00003.parquet"]["rows"] == 3
    assert len(written["schemas"]) == 1 and written["settings"] == [{"seed": 0}]  # one of each, shared
    read.clear()
    source = rj.open_rewrite_source(pattern)
    assert len(read) == rj.SPOT_CHECKS and source.columns == without.columns and source.notes == without.notes
    # a file replaced after the manifest: its footer is read, and one line says which
    write_rewrites(tmp_path / "other", 1, columns=("chatgpt", "bard"))
    os.replace(tmp_path / "other" / "00000.parquet", tmp_path / "rw" / "00004.parquet")
    read.clear()
    with pytest.raises(ValueError, match=r"00004.parquet has rewrite columns chatgpt, bard but .*00000.parquet has "
                                         r"chatgpt"):  # the columns check, as without a manifest
        rj.open_rewrite_source(pattern)
    assert str(tmp_path / "rw" / "00004.parquet") in read
    write_rewrites(tmp_path / "other", 1)
    os.replace(tmp_path / "other" / "00000.parquet", tmp_path / "rw" / "00004.parquet")
    source = rj.open_rewrite_source(pattern)
    assert any(n.startswith("--rewrite-data: manifest.json in ") and "does not describe 1 of 6 files (e.g. "
               "00004.parquet: size:version" in n and "python -m rewrite.manifest" in n for n in source.notes)
    rewrite_manifest.write(str(tmp_path / "rw"))  # refreshed: quiet again
    assert rj.open_rewrite_source(pattern).notes == without.notes


def test_a_manifest_that_lies_about_the_files_is_refused(tmp_path):
    pattern = write_rewrites(tmp_path / "rw", 4)
    manifest = rewrite_manifest.write(str(tmp_path / "rw"))
    other = pa.schema([("key", pa.string()), ("caption", pa.string()), ("human", pa.string())])
    manifest["schemas"][0] = __import__("base64").b64encode(other.serialize().to_pybytes()).decode()
    (tmp_path / "rw" / "manifest.json").write_text(json.dumps(manifest))  # sizes and versions still match
    with pytest.raises(ValueError, match=r"manifest.json says .*00000.parquet has columns key, caption, human, its "
                                         r"footer says key, caption, chatgpt: the manifest does not describe"):
        rj.open_rewrite_source(pattern)
    (tmp_path / "rw" / "manifest.json").write_text("{not json")  # damaged: the footers are read, and said
    source = rj.open_rewrite_source(pattern)
    assert source.columns == ("chatgpt",)
    assert any(n.startswith(f"--rewrite-data: {tmp_path / 'rw' / 'manifest.json'} is not JSON") for n in source.notes)


def test_without_a_manifest_many_footers_are_read_and_the_note_says_how_to_write_one(tmp_path):
    pattern = write_rewrites(tmp_path / "rw", rj.MANIFEST_HINT_AT)
    [note] = [n for n in rj.open_rewrite_source(pattern).notes if "manifest" in n]
    assert note == (f"--rewrite-data: no manifest.json in {tmp_path / 'rw'}: {rj.MANIFEST_HINT_AT} parquet footers "
                    f"were read at start; `python -m rewrite.manifest {tmp_path / 'rw'}` writes "
                    f"{tmp_path / 'rw' / 'manifest.json'}, so that a start reads one object")
    def write_manifest():
        return subprocess.run([sys.executable, "-m", "rewrite.manifest", str(tmp_path / "rw")], capture_output=True,
                              text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    refused = write_manifest()  # a folder without the rewriter's rewrite.json is not its output
    assert refused.returncode == 2 and "no rewrite.json there" in refused.stderr
    (tmp_path / "rw" / "rewrite.json").write_text(json.dumps({"version": 1, "settings": {"seed": 0}}))
    out = write_manifest()
    assert out.returncode == 0, out.stderr
    assert f"{rj.MANIFEST_HINT_AT} files" in out.stdout
    assert not [n for n in rj.open_rewrite_source(pattern).notes if "manifest" in n]


def shard_argv(shards, out, *extra):
    return ["--train-data", shards.tars, "--train-num-samples", "24", "--batch-size", "2", "--workers", "2",
            "--epochs", "1", "--model", "CLIP_TINY", "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3",
            "--save-every-steps", "5", *extra]


def rewrite_tar(path: Path, shard: int, samples: int) -> None:
    """The shard downloaded again under the same name, with fewer samples."""
    import webdataset as wds
    with wds.TarWriter(str(path)) as tar:
        for i in range(samples):
            tar.write({"__key__": sf.key_of(shard, i), "jpg": sf.jpeg(i), "txt": sf.caption_of(shard, i).encode()})


def test_a_shard_replaced_inside_an_epoch_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    """Issue 23 case 4: the positions of a mid-epoch checkpoint count samples of the shards as they were."""
    shards = sf.make_shards(tmp_path / "shards", n_shards=4, per_shard=8, bad=False)
    real, saves = train.save_mid_epoch, []

    def save_then_crash(*args, **kwargs):
        real(*args, **kwargs)
        saves.append(1)
        raise KeyboardInterrupt  # a preemption right after the first mid-epoch checkpoint

    monkeypatch.setattr(train, "save_mid_epoch", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(shard_argv(shards, tmp_path / "out"))
    monkeypatch.undo()
    versions = models.read_checkpoint(str(tmp_path / "out" / "checkpoint.pt"))["data_state"]["versions"]
    assert sorted(versions) == sorted(str(shards.folder / f"{s:05d}.tar") for s in range(4))
    rewrite_tar(shards.folder / "00000.tar", 0, 3)
    with pytest.raises(ValueError, match=r"00000.tar \(size:version \d+:\d+ then, \d+:\d+ now\) changed since the "
                                         r"checkpoint inside epoch 0 was written: .*--resume-override"):
        train.main(shard_argv(shards, tmp_path / "out"))
    capsys.readouterr()
    [record] = train.main(shard_argv(shards, tmp_path / "out", "--resume-override"))
    assert "--resume-override: going on" in capsys.readouterr().out and record["epoch"] == 0


# ---- requests to the S3 server at start: rank 0 reads, the other processes ask nothing

START = (
    "import sys\nfrom datetime import timedelta\nfrom common.distributed import init_distributed_mode, "
    "cleanup_distributed\nfrom training import params\n"
    "cfg = params.parse(sys.argv[1:], read_data=False)\ninfo = init_distributed_mode('cpu', timedelta(minutes=2))\n"
    "cfg = params.with_data(cfg, info.rank)\n"
    "print('shards', len(cfg.stream.urls), 'columns', cfg.stream.rewrites.columns)\n"
    "cleanup_distributed()\n")


def start_processes(n: int, argv: list[str]) -> None:
    """`n` processes through params.with_data, as train.py's start (gloo, one group)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", START, *argv], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**clean_dist_env(), "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": str(n),
                                   "LOCAL_RANK": str(r)}) for r in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("shards 6 columns ('chatgpt',)" in o for o in outs), outs


@pytest.mark.slow
def test_requests_at_start_do_not_grow_with_the_processes(tmp_path, s3_server):
    shards = sf.make_shards(tmp_path / "shards", n_shards=6, per_shard=2, bad=False)
    write_rewrites(tmp_path / "rw", 6)
    bucket = s3_server.new_bucket()
    upload_folder(str(shards.folder), f"s3://{bucket}/laion")
    upload_folder(str(tmp_path / "rw"), f"s3://{bucket}/rw")
    argv = ["--train-data", f"s3://{bucket}/laion/{{00000..00005}}.tar", "--train-num-samples", "8",
            "--aug-text", "--rewrite-data", f"s3://{bucket}/rw/{{00000..00005}}.parquet", "--model", "CLIP_TINY",
            "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    counts = []
    for n in (1, 2, 1):
        mark = len(s3_server.requests)
        start_processes(n, argv)
        counts.append(s3_server.count_since(mark, bucket))
    assert counts[0] == counts[2] > 0  # the same start reads the same objects
    assert counts[1] == counts[0], counts  # a second process asks nothing
