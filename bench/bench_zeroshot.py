"""Zero-shot throughput on the CPU: building the classifier, and images/s.

Classifier: ours (all class x template texts batched, text tower run only up to the longest
<|endoftext|>) against the original schedule (one class at a time, all 77 positions), same model,
same run; the two classifiers are checked to agree.

    python -m bench.bench_zeroshot [--model CLIP_TINY] [--classes 100] [--images 32]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import models
from evaluation.tasks import build_classifier
from imagenet_templates import IMAGENET_CLASSNAMES, SIMPLE_TEMPLATES
from tokenizer import SimpleTokenizer


def encode_text_all_positions(model, tokens: torch.Tensor) -> torch.Tensor:
    """The original text path: every one of the 77 positions goes through the transformer."""
    x = model.token_embedding(tokens) + model.positional_embedding
    mask = torch.full((tokens.shape[1],) * 2, float("-inf")).triu_(1)
    x = model.ln_final(model.transformer(x, mask))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ model.text_projection


@torch.no_grad()
def baseline_classifier(model, tokenizer, classnames, templates) -> torch.Tensor:
    weights = []
    for name in classnames:
        emb = F.normalize(encode_text_all_positions(model, tokenizer([t.format(name) for t in templates])), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights, dim=1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="CLIP_TINY", help="a preset; CLIP_VITB16 for the released size")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = models.get_model(args.model).eval()
    tokenizer = SimpleTokenizer()
    names = IMAGENET_CLASSNAMES[: args.classes]
    device = torch.device("cpu")
    ours, t_ours = timed(lambda: build_classifier(model, tokenizer, names, SIMPLE_TEMPLATES, device))
    base, t_base = timed(lambda: baseline_classifier(model, tokenizer, names, SIMPLE_TEMPLATES))
    texts = len(names) * len(SIMPLE_TEMPLATES)
    print(f"machine: {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    print(f"classifier, {args.model}, {len(names)} classes x {len(SIMPLE_TEMPLATES)} templates = {texts} texts")
    print(f"  original schedule (per class, 77 positions): {t_base:7.2f} s  {texts / t_base:8.1f} texts/s")
    print(f"  ours (batched, up to <|endoftext|>):        {t_ours:7.2f} s  {texts / t_ours:8.1f} texts/s")
    print(f"  speed-up: {t_base / t_ours:.2f}x   max |difference|: {(ours - base).abs().max():.2e}")
    images = torch.randn(args.batch_size, 3, 224, 224)
    with torch.no_grad():
        model.encode_image(images[:2])  # warm-up
        n_batches = max(1, args.images // args.batch_size)
        _, t_img = timed(lambda: [model.encode_image(images) for _ in range(n_batches)])
    n = n_batches * args.batch_size
    print(f"image tower, {args.model}: {n / t_img:.1f} images/s ({n} images, batch {args.batch_size})")


if __name__ == "__main__":
    main()
