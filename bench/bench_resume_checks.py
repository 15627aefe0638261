"""What the resume-time checks of issue 23 cost, each against the work a resume does anyway.

- Checkpoint checksum: SHA-256 of a checkpoint-sized file (training/checkpoint_sums.py) vs the
  torch.load a resume makes of the same file (baseline); BLAKE2b of it for comparison; and the
  save with the hash taken while writing plus the record vs the atomic save before it (temp file,
  fsync, rename: common/fileio.atomic_write around torch.save(path), baseline).
- Caption files: the data identity of a CSV of --rows rows (training/data_identity.py): first run
  (every byte hashed) and repeat run (remembered by stat: the files are only stat'ed) vs reading
  the CSV into its tables (training/captions.py, baseline: every start does it).

Files go to a temporary folder (--dir) and are removed after. The page cache is warm for every
step (each file is read once before it is timed), so these are CPU costs, not disk reads.

    python -m bench.bench_resume_checks [--checkpoint-mb 1024] [--rows 1000000] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time

import torch

from common.fileio import atomic_write
from common.stat_memo import file_sha256
from training import checkpoint_sums, data_identity
from training.captions import read_caption_csv


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def blake2b_of(path: str) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_costs(folder: str, megabytes: int) -> None:
    # about a third weights, two thirds AdamW moments, as a training checkpoint is
    n = megabytes * (1 << 20) // 4 // 3
    obj = {"epoch": 1, "state_dict": {"w": torch.randn(n)},
           "optimizer": {"state": {0: {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}}}}
    plain, summed = os.path.join(folder, "plain.pt"), os.path.join(folder, "checkpoint.pt")
    save_plain = timed(lambda: atomic_write(plain, lambda tmp: torch.save(obj, tmp)))
    save_summed = timed(lambda: checkpoint_sums.save(obj, summed))
    size = os.path.getsize(summed) / 1e9
    file_sha256(summed)  # warm the page cache
    load = timed(lambda: torch.load(summed, map_location="cpu", weights_only=True))
    sha = timed(lambda: file_sha256(summed))
    verify = timed(lambda: checkpoint_sums.verify(summed))
    blake = timed(lambda: blake2b_of(summed))
    print(f"checkpoint {size:.2f} GB: torch.load {load:.2f} s (baseline); SHA-256 {sha:.2f} s = {sha / load:.2f}x "
          f"of the load ({size / sha:.2f} GB/s); verify {verify:.2f} s; BLAKE2b {blake:.2f} s ({size / blake:.2f} GB/s)")
    print(f"save: atomic torch.save {save_plain:.2f} s (baseline), with the hash taken while writing and its record "
          f"{save_summed:.2f} s = {save_summed / save_plain:.2f}x")


def csv_costs(folder: str, rows: int) -> None:
    path = os.path.join(folder, "train.csv")
    with open(path, "w") as f:
        f.write("image_path,caption\n")
        for i in range(rows):
            f.write(f"images/{i // 10000:05d}/{i:09d}.jpg,a photo of thing number {i} on a table near a window\n")
    rewrite = os.path.join(folder, "rewrite.txt")
    with open(rewrite, "w") as f:
        f.write("".join(f"a picture of item {i} standing on a wooden table by the window\n" for i in range(rows)))
    memo = os.path.join(folder, "memo")
    os.makedirs(memo)
    size = (os.path.getsize(path) + os.path.getsize(rewrite)) / 1e9
    read = timed(lambda: read_caption_csv(path))
    first = timed(lambda: data_identity.csv_identity(path, [rewrite], rows, memo))
    repeat = timed(lambda: data_identity.csv_identity(path, [rewrite], rows, memo))
    print(f"caption files, {rows} rows ({size:.2f} GB: CSV + one rewrite file): reading the CSV {read:.2f} s "
          f"(baseline); identity first run {first:.2f} s = {first / read:.3f}x, repeat run {repeat * 1e3:.2f} ms "
          f"= {repeat / read:.5f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-mb", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: the system's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        checkpoint_costs(folder, args.checkpoint_mb)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        csv_costs(folder, args.rows)


if __name__ == "__main__":
    main()
