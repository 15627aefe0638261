"""Start-up over many shards (issue 27): time and requests to object storage before the first batch,
local disk against s3://, 1 and 2 processes, with and without the rewriter's manifest.json; and the
rewriter's own start on a folder of finished shards.

    python -m bench.bench_startup [--shards 100 1000 10000] [--procs 1 2] [--where local s3] [--no-rewriter]

Data: N webdataset tars of 2 tiny samples and N rewrite parquet files (the rewriter's metadata), on
local disk and under s3:// on moto's S3 server (127.0.0.1, in this process: every request it answers
is counted). A training start is a child process per rank (gloo, RANK/WORLD_SIZE as torchrun sets
them) running train.py's start: flags, process group, the shards' look (training/params.with_data:
rank 0 reads, the others receive it), the loader, the first batch (--workers 0). Times are after
imports, the slowest rank's; `requests` counts what the server answered during the start, all ranks
together. The rewriter's start is its planning on global rank 0 (rewrite/planning.plan_units's checks:
flags, finished outputs against their inputs, a free shard) over N finished outputs.
The goals (docs/training.md): requests O(1) per process beyond rank 0; s3:// within 3 s of local at
1,000 shards; 10,000 shards on s3:// in under 20 s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = """
import json, sys, time
t0 = time.perf_counter()
from datetime import timedelta
from common.distributed import barrier, cleanup_distributed, init_distributed_mode
from tokenizer import SimpleTokenizer
from training import params
from training.loaders import build_loader
cfg = params.parse(sys.argv[1:], read_data=False)
info = init_distributed_mode("cpu", timedelta(minutes=30))
t1 = time.perf_counter()
cfg = params.with_data(cfg, info.rank)
loader = build_loader(cfg, info, SimpleTokenizer())
t2 = time.perf_counter()
loader.set_epoch(0)
next(iter(loader))
t3 = time.perf_counter()
barrier()
print("RESULT " + json.dumps({"setup_s": t2 - t1, "first_batch_s": t3 - t1, "shards": len(cfg.stream.urls)}))
cleanup_distributed()
"""


def make_data(root: Path, n: int) -> None:
    """N tars of 2 samples (64x64 JPEG, text) and N rewrite files with the rewriter's metadata."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image
    import numpy as np
    buf = io.BytesIO()  # noise: a JPEG of ~12 KB, so a tar is larger than an empty one can be (real ones: 100s of MB)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    (root / "laion").mkdir(parents=True)
    (root / "rw").mkdir()
    meta = {b"laclip_rewrite": json.dumps({"settings": {"seed": 0}, "input": {}}).encode()}
    for s in range(n):
        keys = [f"{s:05d}{i:04d}" for i in range(2)]
        with wds.TarWriter(str(root / "laion" / f"{s:05d}.tar")) as tar:
            for k in keys:
                tar.write({"__key__": k, "jpg": jpeg, "txt": f"a photo {k}".encode()})
        table = pa.table({"key": keys, "caption": [f"a photo {k}" for k in keys],
                          "chatgpt": [f"a picture {k}" for k in keys]})
        pq.write_table(table.replace_schema_metadata(meta), root / "rw" / f"{s:05d}.parquet")
    (root / "rw" / "rewrite.json").write_text(json.dumps({"version": 1, "settings": {"seed": 0}}))


def upload(root: Path, url: str) -> None:
    from common import storage
    from common.survey import concurrently
    files = [(sub, name) for sub in ("laion", "rw") for name in sorted(os.listdir(root / sub))]
    concurrently(lambda f: storage.write_bytes(f"{url}/{f[0]}/{f[1]}", (root / f[0] / f[1]).read_bytes()), files)


def start(base: str, n: int, procs: int, env: dict) -> dict:
    """One training start: `procs` processes; the slowest rank's times."""
    from testkit.net import free_port
    last = f"{n - 1:05d}"
    argv = ["--train-data", f"{base}/laion/{{00000..{last}}}.tar", "--train-num-samples", str(2 * procs),
            "--batch-size", "1", "--workers", "0", "--aug-text",
            "--rewrite-data", f"{base}/rw/{{00000..{last}}}.parquet",
            "--model", "CLIP_TINY", "--output-dir", tempfile.gettempdir() + "/bench-startup-unused", "--device", "cpu"]
    port = free_port()
    clean = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ps = [subprocess.Popen([sys.executable, "-c", START, *argv], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**clean, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                                "WORLD_SIZE": str(procs), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"})
          for r in range(procs)]
    outs = [p.communicate()[0] for p in ps]
    if any(p.returncode for p in ps):
        raise RuntimeError("a start failed:\n" + "\n".join(outs))
    results = [json.loads(line[len("RESULT "):]) for o in outs for line in o.splitlines() if line.startswith("RESULT ")]
    return {k: max(r[k] for r in results) for k in ("setup_s", "first_batch_s")}


SETTINGS = {"seed": 0, "sample_mode": ["chatgpt"], "text_key": "caption"}  # what the outputs record


def make_finished(root: Path, base: str, n: int) -> tuple[str, str]:
    """N img2dataset-style input parquets under base/in and their finished outputs under base/out
    (metadata as the rewriter writes it, rewrite.json; the local inputs' hashes remembered, as after
    a run). Returns (input pattern, output folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from common import storage
    from common.rewrite_format import METADATA_KEY
    from common.survey import concurrently
    from rewrite.shard_input import as_location, remembered_fingerprint
    src = root / "in"
    src.mkdir(exist_ok=True)
    for s in range(n):
        keys = [f"{s:05d}{i:04d}" for i in range(2)]
        pq.write_table(pa.table({"key": keys, "caption": [f"a photo {k}" for k in keys], "status": ["success"] * 2}),
                       src / f"{s:05d}.parquet")
    if storage.is_url(base):
        names = [f"{k:05d}.parquet" for k in range(n)]
        concurrently(lambda name: storage.write_bytes(f"{base}/in/{name}", (src / name).read_bytes()), names)
    out = storage.join(base, "out")
    if not storage.is_url(out):
        os.makedirs(out, exist_ok=True)
    storage.write_json(storage.join(out, "rewrite.json"), {"version": 1, "settings": SETTINGS})

    def finish(k: int) -> None:
        shard = as_location(f"{base}/in/{k:05d}.parquet")
        meta = {"settings": SETTINGS, "input": remembered_fingerprint(as_location(out), shard), "stats": {}}
        table = pa.table({"key": ["a"], "caption": ["a photo"], "chatgpt": ["a picture"]})
        table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)})
        storage.write_atomic(storage.join(out, f"{k:05d}.parquet"), lambda tmp: pq.write_table(table, tmp))

    concurrently(finish, list(range(n)))
    return f"{base}/in/{{00000..{n - 1:05d}}}.parquet", out


def plan_finished(pattern: str, out: str, manifest: bool, requests: list) -> tuple[float, int]:
    """(seconds, requests to the server) of the rewriter's start on global rank 0 over finished outputs:
    the flags' checks, the folder's record, every finished output against its input, the look for a
    free shard (in this process, beside the server)."""
    from common import rewrite_manifest, storage
    from rewrite.shard_input import check_finished, check_shard_flags, expand_shards, shard_stem
    from rewrite.units_shards import ShardUnits, check_run_record, shard_output_path
    if manifest:
        rewrite_manifest.write(out)
    else:
        storage.remove(storage.join(out, rewrite_manifest.MANIFEST))
    mark, t0 = len(requests), time.perf_counter()
    _, folder, key = check_shard_flags(pattern, out, None)
    shards = expand_shards(pattern)
    check_run_record(folder, SETTINGS, False)
    check_finished(folder, [(p, shard_output_path(folder, shard_stem(p))) for p in shards], SETTINGS)
    if ShardUnits(shards, folder, key, ("chatgpt",), SETTINGS).any_free():
        raise RuntimeError("a shard is not finished")
    return time.perf_counter() - t0, len(requests) - mark


def run(cli: argparse.Namespace) -> list[dict]:
    from common import rewrite_manifest, storage
    from testkit.s3server import running_s3_server
    rows = []
    with running_s3_server() as s3, tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for n in cli.shards:
            root = Path(tmp) / f"n{n}"
            make_data(root, n)
            bucket = s3.new_bucket()
            upload(root, f"s3://{bucket}")
            bases = {"local": str(root), "s3": f"s3://{bucket}"}
            for manifest in (False, True):
                for where in cli.where:
                    if manifest:
                        rewrite_manifest.write(storage.join(bases[where], "rw"))
                    for procs in cli.procs:
                        mark = len(s3.requests)
                        got = start(bases[where], n, procs, env)
                        rows.append({"shards": n, "where": where, "manifest": manifest, "procs": procs, **got,
                                     "requests": s3.count_since(mark)})
                        print(json.dumps(rows[-1]), flush=True)
            if cli.rewriter:
                for where in cli.where:
                    pattern, out = make_finished(root, bases[where], n)
                    for manifest in (False, True):
                        seconds, requests = plan_finished(pattern, out, manifest, s3.requests)
                        rows.append({"shards": n, "where": where, "manifest": manifest, "procs": "rewriter",
                                     "setup_s": seconds, "first_batch_s": None, "requests": requests})
                        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    local = {(r["shards"], r["manifest"], r["procs"]): r for r in rows if r["where"] == "local"}
    lines = ["| shards | where | manifest | processes | data set-up s | first batch s | requests | s3 - local s | "
             "s3 / local |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = local.get((r["shards"], r["manifest"], r["procs"]))
        diff = ratio = ""
        if r["where"] == "s3" and base:
            diff = f"{r['setup_s'] - base['setup_s']:+.2f}"
            ratio = f"{r['setup_s'] / max(base['setup_s'], 1e-9):.2f}"
        first = "" if r["first_batch_s"] is None else f"{r['first_batch_s']:.2f}"
        lines.append(f"| {r['shards']} | {r['where']} | {'yes' if r['manifest'] else 'no'} | {r['procs']} | "
                     f"{r['setup_s']:.2f} | {first} | {r['requests']} | {diff} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--where", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    p.add_argument("--no-rewriter", dest="rewriter", action="store_false", help="skip the rewriter's start")
    cli = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(cli)
    print(table(rows))
    print(f"({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
