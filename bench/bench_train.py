"""Training throughput on this machine: full step vs data loader alone vs model step alone.

    python -m bench.bench_train [--model CLIP_TINY] [--batch-size 32] [--workers 2] [--steps 10]

Builds a synthetic caption CSV with JPEG images (CC3M-like size) and two rewrite files
in a temp folder, then measures, in one run and on the same data:
  data    the DataLoader alone (decode + RandomResizedCrop + tokenise, --workers processes),
          over 4 x --steps batches
  model   forward + backward + AdamW step on one fixed batch (no data loading)
  full    next batch + forward + backward + optimizer, the loop of train_one_epoch
and prints samples/s (model and full: of the median step, because the CPUs of a shared
machine are noisy) and the ratios, so the limiting part is visible.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image


import models
from tokenizer import SimpleTokenizer
from train import precision
from training.loaders import build_loader
from training.params import get_args_parser, resolve
from common.distributed import DistInfo
from training.engine import CosineSchedule, Trainer, micro_step, optimizer_step, build_optimizer


def make_data(folder: str, n: int, size: tuple[int, int]) -> dict[str, str]:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rows = []
    for i in range(n):
        # Smooth random images compress like photos (pure noise would make JPEG decode unusually slow).
        small = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(
            os.path.join(folder, "img", f"{i}.jpg"), quality=90)
        rows.append((f"img/{i}.jpg", f"a photo number {i} of a small brown dog on the grass"))
    csv_path = os.path.join(folder, "train.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    rewrites = []
    for k in range(2):
        path = os.path.join(folder, f"rewrite{k}.txt")
        with open(path, "w") as f:
            f.writelines(f"rewrite {k}: a brown dog number {i} lying in green grass\n" for i in range(n))
        rewrites.append(path)
    return {"csv": csv_path, "root": folder, "rewrites": rewrites}


def median_rate(times: list[float], batch_size: int) -> float:
    """Samples/s of the median step: the CPU is shared, so a mean would mostly measure neighbours."""
    return batch_size / statistics.median(times)


def bench_data(loader, batches: int) -> float:
    """Throughput over many batches: per-batch times would only measure the prefetch queue."""
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start, rows = time.perf_counter(), 0
    for _ in range(batches):
        rows += next(it)[0].shape[0]
    return rows / (time.perf_counter() - start)


def timed_step(tr: Trainer, batch) -> float:
    start = time.perf_counter()
    ms = micro_step(tr, batch, True, 0)
    optimizer_step(tr)
    ms.loss.item()  # waits for the device: the step is done
    return time.perf_counter() - start


def bench_model(tr: Trainer, batch, steps: int) -> float:
    for _ in range(3):  # warm-up: the first calls allocate and pick kernels
        timed_step(tr, batch)
    return median_rate([timed_step(tr, batch) for _ in range(steps)], batch[0].shape[0])


def bench_full(tr: Trainer, steps: int) -> float:
    """Load the next batch, then step on it: train_one_epoch's loop without the progress bar."""
    it = iter(tr.loader)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - start + timed_step(tr, batch))
    return median_rate(times, batch[0].shape[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="CLIP_TINY")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed batches per measurement")
    p.add_argument("--image-size", type=int, nargs=2, default=(400, 300), help="synthetic JPEG width height")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli = p.parse_args()
    device = torch.device(cli.device)
    with tempfile.TemporaryDirectory() as folder:
        n = cli.batch_size * (4 * cli.steps + 2)  # data is timed over 4x more batches
        data = make_data(folder, n, tuple(cli.image_size))
        args = resolve(get_args_parser().parse_args([
            "--train-data", data["csv"], "--root", data["root"], "--aug-text", "--augmented_caption_filelist",
            *data["rewrites"], "--dataset-type", "csv", "--batch-size", str(cli.batch_size),
            "--workers", str(cli.workers), "--output-dir", folder]))
        info = DistInfo(device=device)
        loader = build_loader(args, info, SimpleTokenizer())
        torch.manual_seed(0)
        model = models.get_model(cli.model).to(device)
        amp_dtype, scaler = precision(args.precision, device)
        steps = len(loader) - 1
        tr = Trainer(model=model, raw_model=model, optimizer=build_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-8),
                     scaler=scaler, loader=loader, schedule=CosineSchedule(1e-4, 1e-5, 1e-6, steps, 1),
                     steps_per_epoch=steps, update_freq=1, device=device, amp_dtype=amp_dtype, is_main=False)
        data_rate = bench_data(loader, 4 * cli.steps)
        model_rate = bench_model(tr, next(iter(loader)), cli.steps)
        loader.set_epoch(1)
        full_rate = bench_full(tr, cli.steps)
    limit = "data loading" if data_rate < model_rate else "the model step"
    print(f"device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs "
          f"(1-min load average now {os.getloadavg()[0]:.1f}); "
          f"{cli.model}, batch {cli.batch_size}, {cli.workers} workers, images {cli.image_size[0]}x{cli.image_size[1]} JPEG")
    print(f"data loader alone : {data_rate:8.1f} samples/s")
    print(f"model step alone  : {model_rate:8.1f} samples/s")
    print(f"full training step: {full_rate:8.1f} samples/s")
    print(f"ratio data/model  : {data_rate / model_rate:.2f}  -> {limit} limits")
    print(f"ratio full/slowest: {full_rate / min(data_rate, model_rate):.2f}  "
          f"(1.0: the full step runs as fast as its slowest part; loader workers and the model share the cores)")


if __name__ == "__main__":
    main()
