"""Shards read from an S3 server vs the same shards on local disk.

    python -m bench.bench_storage [--samples 1024] [--batch-size 32] [--workers 2] [--rows 10000]

The S3 server is moto's (a real HTTP S3 API) in its own process on 127.0.0.1, reached through
s3fs exactly as AWS would be: the ratio therefore measures the cost of this project's object
path (HTTP requests, ranged reads, signing, s3fs's buffers) without network latency or
bandwidth limits. A remote bucket adds those on top; the ratio is an upper bound for it.

1. Training loader: bench_train's synthetic 400x300 JPEGs as 8 tar shards with rewrite
   parquet files (bench_wds's layout), read by the loader train.py builds (decode, crop,
   caption pick, tokenise, --workers processes); samples/s over the same batches, median of
   --rounds alternating rounds, local and s3://.
2. Rewriter's reader (rewrite/shard_input.ShardLines): lines/s reading 4 img2dataset-style
   parquet shards of --rows rows (key, caption, url, status), and the 8 tars above (key and
   .txt of every sample; the JPEG bytes are read past), local and s3://.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_train import bench_data, make_data
from bench.bench_wds import loader_args, write_shards
from common.distributed import DistInfo
from testkit.s3server import running_s3_server, upload_folder
from tokenizer import SimpleTokenizer


def write_caption_parquets(folder: Path, shards: int, rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir()
    for s in range(shards):
        keys = [f"{s:05d}{i:04d}" for i in range(rows)]
        pq.write_table(pa.table({"key": keys, "caption": [f"a photo of thing {i} in shard {s}, outdoors" for i in
                                                          range(rows)],
                                 "url": [f"http://example.com/{k}.jpg" for k in keys],
                                 "status": ["success" if i % 10 else "failed_to_download" for i in range(rows)]}),
                       folder / f"{s:05d}.parquet")
    return str(folder / f"{{00000..{shards - 1:05d}}}.parquet")


def loader_rate(train_data: str, rewrite_data: str, cli: argparse.Namespace, epoch: int) -> float:
    from training.loaders import build_loader
    args = loader_args(train_data=train_data, rewrite_data=rewrite_data, train_num_samples=cli.samples,
                       batch_size=cli.batch_size, workers=cli.workers)
    loader = build_loader(args, DistInfo(), SimpleTokenizer())
    loader.set_epoch(epoch)
    return bench_data(loader, cli.samples // cli.batch_size - 2)


def reader_rate(pattern: str, text_key: str) -> float:
    from rewrite.shard_input import ShardLines, expand_shards
    start, lines = time.perf_counter(), 0
    for shard in expand_shards(pattern):
        lines += sum(1 for _ in ShardLines(shard, text_key).read())
    return lines / (time.perf_counter() - start)


def s3_form(pattern: str, local_folder: str, url: str) -> str:
    return pattern.replace(local_folder, url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1024, help="images for the training loader comparison")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rows", type=int, default=10000, help="rows per parquet shard for the reader comparison")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per case (median)")
    cli = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder, running_s3_server(own_process=True) as s3:
        start = time.perf_counter()
        bucket = s3.new_bucket("bench")
        data = make_data(folder, cli.samples, (400, 300))
        shards = str(Path(folder, "shards"))
        tars, rewrites = write_shards(data, Path(shards), 8)
        parquets = write_caption_parquets(Path(folder, "captions"), 4, cli.rows)
        upload_folder(shards, f"s3://{bucket}/shards")
        upload_folder(str(Path(folder, "captions")), f"s3://{bucket}/captions")
        cases = {
            "training loader, samples/s": lambda where, r: loader_rate(
                *(s3_form(x, shards, f"s3://{bucket}/shards") if where else x for x in (tars, rewrites)), cli, r),
            f"rewriter reader, 4 parquet x {cli.rows} rows, lines/s": lambda where, r: reader_rate(
                s3_form(parquets, str(Path(folder, "captions")), f"s3://{bucket}/captions") if where else parquets,
                "caption"),
            "rewriter reader, 8 tars, lines/s": lambda where, r: reader_rate(
                s3_form(tars, shards, f"s3://{bucket}/shards") if where else tars, "txt"),
        }
        results = {}
        for name, run in cases.items():
            rates: list[list[float]] = [[], []]
            for r in range(cli.rounds):  # alternate, so both see the same load of a shared machine
                for where in (0, 1):
                    rates[where].append(run(where, r))
            results[name] = (statistics.median(rates[0]), statistics.median(rates[1]))
    print(f"{os.cpu_count()} CPUs (1-min load average {os.getloadavg()[0]:.1f}); batch {cli.batch_size}, "
          f"{cli.workers} workers, {cli.samples} JPEGs 400x300; moto S3 server on 127.0.0.1 in its own process; "
          f"median of {cli.rounds} rounds; {time.perf_counter() - start:.0f} s")
    for name, (local, remote) in results.items():
        print(f"{name:55s} local {local:10.1f}  s3:// {remote:10.1f}  ratio s3/local {remote / local:.2f}")


if __name__ == "__main__":
    main()
