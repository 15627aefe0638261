"""Webdataset shards vs the caption CSV: loader throughput on the same images, and memory per
process against the number of shards.

    python -m bench.bench_wds [--samples 1024] [--batch-size 32] [--workers 2] [--rss-samples 4000]

1. Throughput: the same JPEGs (bench_train's synthetic CC3M-like images) and two rewrites as
   a CSV + image folder + rewrite files, and as 8 tar shards + rewrite parquet files; both
   loaders as train.py builds them (decode, RandomResizedCrop, caption pick, tokenise, with
   --workers processes), samples/s over the same number of batches, median of --rounds
   alternating rounds, and the ratio.
2. Memory: 10 and 1000 shards of small samples with one rewrite parquet each; a fresh process
   per case reads --rss-samples samples through the loader (one process, no workers) and
   reports its peak RSS; printed as the ratio 1000/10 and the growth in MB.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import bench_data, make_data
from common.distributed import DistInfo
from common.rewrite_format import METADATA_KEY
from tokenizer import SimpleTokenizer


def write_shards(data: dict, folder: Path, n_shards: int) -> tuple[str, str]:
    """The CSV's images and rewrites as n_shards tars (KEY.jpg, KEY.txt) + NNNNN.parquet rewrites."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    rows = [line.rstrip("\n").split(",", 1) for line in open(data["csv"])][1:]
    rewrites = [open(p).read().splitlines() for p in data["rewrites"]]
    folder.mkdir()
    for s in range(n_shards):
        mine = range(s, len(rows), n_shards)
        keys = [f"{s:05d}{i:06d}" for i in mine]
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tar:
            for key, i in zip(keys, mine):
                tar.write({"__key__": key, "jpg": Path(data["root"], rows[i][0]).read_bytes(),
                           "txt": rows[i][1].encode()})
        table = pa.table({"key": keys, "caption": [rows[i][1] for i in mine],
                          **{f"mode{k}": [r[i] for i in mine] for k, r in enumerate(rewrites)}})
        # the rewriter's metadata key: train.py reads only its output without --rewrite-columns
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: b"{}"}), folder / f"{s:05d}.parquet")
    last = f"{n_shards - 1:05d}"
    return str(folder / f"{{00000..{last}}}.tar"), str(folder / f"{{00000..{last}}}.parquet")


def loader_args(**kw):
    """train.py's resolved flags (training.params.RunConfig) with these values."""
    from training.params import get_args_parser, resolve
    args = get_args_parser().parse_args(["--train-data", "x", "--aug-text"])
    for k, v in kw.items():
        setattr(args, k.replace("-", "_"), v)
    return resolve(args)


def throughput(cli: argparse.Namespace, folder: str) -> tuple[float, float]:
    from training.loaders import build_loader
    n = cli.samples
    data = make_data(folder, n, (400, 300))
    tars, parquets = write_shards(data, Path(folder, "shards"), 8)
    batches = n // cli.batch_size - 2
    csv_args = loader_args(train_data=data["csv"], root=data["root"],
                           augmented_caption_filelist=data["rewrites"], batch_size=cli.batch_size, workers=cli.workers)
    wds_args = loader_args(train_data=tars, rewrite_data=parquets, train_num_samples=n,
                           batch_size=cli.batch_size, workers=cli.workers)
    loaders = [build_loader(args, DistInfo(), SimpleTokenizer()) for args in (csv_args, wds_args)]
    rates: list[list[float]] = [[], []]
    for epoch in range(cli.rounds):  # alternate, so both see the same load of a shared machine
        for k, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            rates[k].append(bench_data(loader, batches))
    return statistics.median(rates[0]), statistics.median(rates[1])


def rss_child(folder: str, samples: int) -> None:
    """In a fresh process: read `samples` samples from the shards in `folder`, print peak RSS (KB)."""
    from training.loaders import build_loader
    args = loader_args(train_data=str(Path(folder, "shards.txt").read_text().strip()),
                       rewrite_data=Path(folder, "rewrites.txt").read_text().strip(),
                       train_num_samples=samples, batch_size=16, workers=0)
    loader = build_loader(args, DistInfo(), SimpleTokenizer())
    loader.set_epoch(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in loader:
        pass
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss(folder: Path, n_shards: int, samples: int) -> tuple[int, int]:
    """(peak RSS in KB before reading, after reading `samples` samples) of a fresh process."""
    import numpy as np
    from PIL import Image
    image = folder / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    root = folder / f"n{n_shards}"
    root.mkdir()
    per_shard = max(1, samples // n_shards)
    data = {"csv": str(root / "t.csv"), "root": str(folder), "rewrites": [str(root / "r.txt")]}
    with open(data["csv"], "w") as f:
        f.write("filepath,title\n" + "".join(f"img.jpg,a small photo number {i}\n"
                                             for i in range(per_shard * n_shards)))
    Path(data["rewrites"][0]).write_text("".join(f"a rewritten caption {i}\n" for i in range(per_shard * n_shards)))
    tars, parquets = write_shards(data, root / "shards", n_shards)
    (root / "shards.txt").write_text(tars)
    (root / "rewrites.txt").write_text(parquets)
    out = subprocess.run([sys.executable, "-m", "bench.bench_wds", "--rss-child", str(root), str(samples)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    before, after = out.stdout.split()[-2:]
    return int(before), int(after)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024, help="images for the throughput comparison")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds per loader (median)")
    p.add_argument("--rss-samples", type=int, default=4000, help="samples read in each memory case")
    p.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    cli = p.parse_args()
    torch.set_num_threads(1)
    if cli.rss_child:
        return rss_child(cli.rss_child[0], int(cli.rss_child[1]))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        csv_rate, wds_rate = throughput(cli, folder)
        few = peak_rss(Path(folder), 10, cli.rss_samples)
        many = peak_rss(Path(folder), 1000, cli.rss_samples)
    print(f"{os.cpu_count()} CPUs (1-min load average {os.getloadavg()[0]:.1f}); batch {cli.batch_size}, "
          f"{cli.workers} workers, {cli.samples} JPEGs 400x300; {time.perf_counter() - start:.0f} s")
    print(f"loader, CSV + image folder : {csv_rate:8.1f} samples/s")
    print(f"loader, 8 tar shards       : {wds_rate:8.1f} samples/s")
    print(f"ratio shards/CSV           : {wds_rate / csv_rate:.2f}")
    print(f"peak RSS after reading {cli.rss_samples} samples: 10 shards {few[1] / 1024:.1f} MB, 1000 shards "
          f"{many[1] / 1024:.1f} MB; ratio 1000/10 {many[1] / few[1]:.3f} ({(many[1] - few[1]) / 1024:+.1f} MB)")
    print(f"growth while reading (peak after - peak before): 10 shards {(few[1] - few[0]) / 1024:.1f} MB, "
          f"1000 shards {(many[1] - many[0]) / 1024:.1f} MB (imports and the loader: {few[0] / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
