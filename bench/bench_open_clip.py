"""train.py next to open_clip_train on the same tiny open_clip model and the same webdataset shards.

    python -m bench.bench_open_clip [--images 512] [--batch-size 32] [--epochs 3] [--workers 0] [--rounds 3]

1. Throughput: one CPU thread per process (OMP_NUM_THREADS=1), float32, no loader workers (so the
   process's CPU time covers decoding too), no resampling, plain CLIP captions. Each trainer runs as
   its own process, and its epoch function (loader start, data, forward, backward, step) is timed
   inside it: CPU time and wall time. The first epoch is left out (process warm-up); samples/s per
   epoch, median over --rounds alternating rounds, and the ratio train.py / open_clip_train.
2. Loss parity: the project's clip_loss against open_clip.loss.ClipLoss(local_loss=True,
   gather_with_grad=True) on the same features, 1 and 2 gloo processes: largest difference of the
   loss and of its gradients.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.bench_train import make_data
from bench.bench_wds import write_shards

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
# Each trainer runs in its own process under this wrapper, which times its epoch function: wall time and
# the process's CPU time (with --workers 0 the data loading is in that process too; CPU time is what a
# shared machine's load does not change). open_clip_train 3.3.0 under webdataset 1.0: its shard reader
# fails on the end-of-shard marker {} that webdataset 1.0 yields (KeyError 'fname'), so the marker is
# switched off for it.
WRAPPER = """
import functools, json, sys, time
which, config, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
def timed(inner, samples):
    def run(*args, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = inner(*args, **kw)
        print("BENCH " + json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
                                     "samples": samples(args, out)}), flush=True)
        return out
    return run
if which == "open_clip_train":
    import open_clip, open_clip_train.data as d, open_clip_train.main as m, webdataset.tariterators as t
    d.tar_file_expander = functools.partial(t.tar_file_expander, eof_value=None)
    open_clip.add_model_config(config)
    m.train_one_epoch = timed(m.train_one_epoch, lambda a, out: a[1]["train"].dataloader.num_batches * a[8].batch_size)
    m.main(argv)
else:
    import train
    train.train_one_epoch = timed(train.train_one_epoch, lambda a, out: out["samples"])
    train.main(argv)
"""
def run(argv: list[str]) -> str:
    done = subprocess.run(argv, env=env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{argv[1]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def env() -> dict:
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**keep, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def timed_epochs(which: str, config: str, argv: list[str]) -> list[dict]:
    """Per epoch {wall, cpu, samples}, the first (process warm-up) left out."""
    out = run([sys.executable, "-c", WRAPPER, which, config, *argv])
    return [json.loads(line[6:]) for line in out.splitlines() if line.startswith("BENCH ")][1:]


def run_train_py(a, tars: str, config: str, out: Path) -> list[dict]:
    return timed_epochs("train.py", config, [
        "--train-data", tars, "--train-num-samples", str(a.images), "--model", config, "--batch-size",
        str(a.batch_size), "--workers", str(a.workers), "--epochs", str(a.epochs), "--lr", "5e-4", "--wd", "0.2",
        "--warmup", "2", "--precision", "fp32", "--device", "cpu", "--output-dir", str(out), "--print-freq", "1000"])


def run_open_clip_train(a, tars: str, config: str, out: Path) -> list[dict]:
    return timed_epochs("open_clip_train", config, [
        "--train-data", tars, "--dataset-type", "webdataset", "--train-num-samples", str(a.images), "--model",
        Path(config).stem, "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--epochs",
        str(a.epochs), "--lr", "5e-4", "--wd", "0.2", "--warmup", "2", "--precision", "fp32", "--logs", str(out),
        "--name", "bench", "--report-to", "", "--log-every-n-steps", "1000", "--save-frequency", "0"])


def throughput(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(os.path.join(tmp, "data"), a.images, (400, 300))
        tars, _ = write_shards(data, Path(tmp) / "shards", 8)
        config = Path(tmp) / "laclip-bench-tiny.json"
        config.write_text(json.dumps(TINY))
        ours, theirs = [], []
        for r in range(a.rounds):  # alternate, so a change of load hits both
            ours += run_train_py(a, tars, str(config), Path(tmp) / f"ours{r}")
            theirs += run_open_clip_train(a, tars, str(config), Path(tmp) / f"theirs{r}")

    def rate(epochs: list[dict], clock: str) -> float:
        return statistics.median(e["samples"] / e[clock] for e in epochs)

    return {clock: {"train_py": rate(ours, clock), "open_clip_train": rate(theirs, clock),
                    "ratio": rate(ours, clock) / rate(theirs, clock)} for clock in ("cpu", "wall")}


def _parity(rank: int, store: str, out: str) -> None:
    from testkit.loss_parity import parity
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(parity(rank, 2), os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def loss_parity() -> dict:
    from testkit.loss_parity import parity
    one = parity()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_parity, args=(os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
        two = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    return {"1 process": one, "2 processes": {k: max(t[k] for t in two) for k in ("loss", "grad")}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="samples per epoch (8 shards)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is not counted")
    p.add_argument("--workers", type=int, default=0, help="loader processes (0: CPU time covers the data too)")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    parity = loss_parity()
    for name, d in parity.items():
        print(f"loss parity, {name}: |loss - ClipLoss| {d['loss']:.2e}, largest gradient difference {d['grad']:.2e}")
    speed = throughput(a)
    for clock, d in speed.items():
        print(f"samples/s of {clock} time: train.py {d['train_py']:.1f}, open_clip_train {d['open_clip_train']:.1f}: "
              f"ratio {d['ratio']:.2f}x")
    return {"parity": parity, "throughput": speed}


if __name__ == "__main__":
    main()
