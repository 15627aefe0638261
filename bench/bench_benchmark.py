"""eval_benchmark.py's two savings, each against its baseline measured in the same run:

1. image features: computing a split (a cache miss: encode + write) vs reading it back from the
   on-disk cache (a hit), as every later task and every few-shot k on that split does;
2. the zero-shot text classifier: CLIP_benchmark's schedule (one forward pass per class, all its
   templates) vs ours (all class x template texts batched), and reusing it for a second task.

    python -m bench.bench_benchmark [--model CLIP_TINY] [--images 256] [--classes 100]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import models
from evaluation.catalog import published_classnames, templates_for
from evaluation.features import FeatureCache, RunOptions
from evaluation.models import PRESET, EvalModel, eval_transform
from evaluation.readers import read_split
from evaluation.tasks import ClassifierCache, build_classifier
from tokenizer import SimpleTokenizer


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def make_resisc45(root: str, images: int, size: int = 256) -> str:
    """RESISC45's layout, 3 classes, random JPEGs of the release's 256x256."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = os.path.join(root, "NWPU-RESISC45", ("airplane", "beach", "harbor")[i % 3])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.jpg"))
    return root


@torch.no_grad()
def per_class_classifier(model, tokenizer, classnames, templates) -> torch.Tensor:
    """CLIP_benchmark's zero_shot_classifier schedule: one batch of templates per class."""
    columns = []
    for name in classnames:
        emb = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1).mean(0)
        columns.append(emb / emb.norm())
    return torch.stack(columns, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="CLIP_TINY", help="a preset; CLIP_VITB16 for the released size")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100, help="CIFAR-100's names and its 18 templates")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one thread, the same for both sides
    torch.manual_seed(0)
    model = models.get_model(args.model).eval()
    em = EvalModel(model, SimpleTokenizer(), eval_transform(), args.model, None, PRESET)
    opts = RunOptions(args.batch_size, 0, torch.device("cpu"), progress=False)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPU threads, "
          f"torch {torch.__version__}, 1 intra-op thread; model {args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        split = read_split("resisc45", make_resisc45(os.path.join(tmp, "data"), args.images), "all")
        identity = {"model": args.model, "bench": True}
        miss, t_miss = timed(lambda: FeatureCache(os.path.join(tmp, "f")).features(
            model, identity, em.transform, split, opts))
        hit, t_hit = timed(lambda: FeatureCache(os.path.join(tmp, "f")).features(
            model, identity, em.transform, split, opts))
        assert hit.cached and torch.equal(hit.features, miss.features)
    print(f"features, {len(split)} images 256x256: computed and cached {t_miss:7.3f} s, "
          f"read from the cache {t_hit:7.4f} s: {t_miss / t_hit:,.0f}x")
    names, templates = published_classnames("cifar100")[:args.classes], templates_for("cifar100", PRESET)
    texts = len(names) * len(templates)
    base, t_base = timed(lambda: per_class_classifier(model, em.tokenizer, names, templates))
    ours, t_ours = timed(lambda: build_classifier(model, em.tokenizer, names, templates, opts.device))
    cache = ClassifierCache(em, opts)
    cache.get(names, templates)
    _, t_reuse = timed(lambda: cache.get(names, templates))
    print(f"classifier, {len(names)} classes x {len(templates)} templates = {texts} texts:")
    print(f"  one pass per class (CLIP_benchmark): {t_base:7.3f} s")
    print(f"  batched (ours):                      {t_ours:7.3f} s   {t_base / t_ours:.2f}x   "
          f"max |difference| {(ours - base).abs().max():.1e}")
    print(f"  reused for another task:             {t_reuse * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
