"""Synthetic training data for the tests of train.py: images, a caption CSV with a header,
two aligned rewrite files, and a tiny ImageNet val folder."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import conftest

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conftest.write_image(str(path), seed, size)


def make_train_data(tmp: Path, n: int = 8, corrupt: tuple[int, ...] = (),
                    missing: tuple[int, ...] = ()) -> dict[str, str]:
    """n samples; indices in `corrupt` get garbage bytes, those in `missing` no file at all.

    Captions hold commas and quotes to exercise CSV quoting; rewrite 2 of sample 0 is
    one word (so it must fall back to the original).
    """
    root = tmp / "images"
    rows = []
    for i in range(n):
        name = f"img_{i}.{'JPG' if i % 3 == 0 else 'png'}"
        path = root / "sub" / name
        if i in corrupt:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image at all")
        elif i not in missing:
            write_image(path, seed=i)
        rows.append((f"sub/{name}", f'original {i}, a "quoted" caption'))
    csv_path = tmp / "train.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "caption"])  # header: not a sample
        writer.writerows(rows)
    rewrites = []
    for k in (1, 2):
        path = tmp / f"rewrite_{k}.txt"
        lines = [f"rewrite {k} of sample {i}" for i in range(n)]
        if k == 2:
            lines[0] = "single"
        path.write_text("\n".join(lines) + "\n")
        rewrites.append(str(path))
    return {"csv": str(csv_path), "root": str(root), "rewrites": rewrites}


def make_imagenet_root(tmp: Path, per_class: int = 2) -> str:
    return conftest.write_imagenet(tmp / "imagenet", WNIDS, per_class)


def train_argv(data: dict[str, str], out: Path, *extra: str, aug: bool = True) -> list[str]:
    """Flags for a few-second CPU run of the tiny preset."""
    argv = ["--train-data", data["csv"], "--root", data["root"], "--output-dir", str(out),
            "--model", "CLIP_TINY", "--batch-size", "4", "--workers", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--lr", "1e-3", "--print-freq", "1", "--device", "cpu"]
    if aug:
        argv += ["--aug-text", "--augmented_caption_filelist", *data["rewrites"]]
    return argv + list(extra)


def read_log(out: Path) -> list[dict]:
    """The JSON lines of <output-dir>/log.txt, one per epoch."""
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]



class Crash(Exception):
    """Stands in for a preemption right after a mid-epoch checkpoint (--save-every-steps)."""


def crash_after_saves(monkeypatch, saves: int = 1) -> None:
    """train.py dies right after writing its `saves`-th mid-epoch checkpoint, before any upload."""
    import train
    real, calls = train.save_mid_epoch, []

    def save_then_crash(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == saves:
            raise Crash

    monkeypatch.setattr(train, "save_mid_epoch", save_then_crash)
