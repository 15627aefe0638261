"""The one zero-shot ImageNet routine, shared by both eval scripts and by train.py.

Protocol (FORMATS.md section 1): per class, L2-normalise each template's text embedding,
average, normalise again; normalise image embeddings; predict the argmax of cosine similarity.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from imagenet_data import collate_skipping_bad, imagenet_val, resolve_templates
from models import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(image_size: int = 224) -> transforms.Compose:
    """Resize the shorter side (bilinear), centre crop, ToTensor, ImageNet mean/std (RGB conversion is the loader's)."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def build_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device, amp: bool = False, text_batch_size: int = 500) -> torch.Tensor:
    """Zero-shot weights [embed_dim, num_classes]: normalised mean of normalised template embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: [C * T]
    feats = []
    for start in range(0, len(texts), text_batch_size):
        tokens = tokenizer(texts[start:start + text_batch_size]).to(device)
        with autocast(device, amp):
            feats.append(model.encode_text(tokens).float())
    emb = F.normalize(torch.cat(feats), dim=-1).view(len(classnames), len(templates), -1)  # [C, T, E]
    return F.normalize(emb.mean(dim=1), dim=-1).t().contiguous()  # [E, C]


@torch.no_grad()
def evaluate(model, classifier: torch.Tensor, loader, device: torch.device, amp: bool = False,
             progress: bool = True) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) over a loader of (images, labels, skipped)."""
    num_classes = classifier.shape[1]
    correct_per_class = torch.zeros(num_classes, dtype=torch.long)
    count_per_class = torch.zeros(num_classes, dtype=torch.long)
    top5_correct, skipped = 0, 0
    k = min(5, num_classes)
    for images, labels, n_skipped in tqdm(loader, desc="zero-shot", disable=not progress, unit="batch"):
        skipped += int(n_skipped)
        if labels.numel() == 0:
            continue
        with autocast(device, amp):
            feats = model.encode_image(images.to(device, non_blocking=True)).float()
        logits = F.normalize(feats, dim=-1) @ classifier  # [B, C]
        topk = logits.topk(k, dim=-1).indices.cpu()  # [B, k]
        hits = topk == labels[:, None]
        correct_per_class += torch.bincount(labels[hits[:, 0]], minlength=num_classes)
        count_per_class += torch.bincount(labels, minlength=num_classes)
        top5_correct += int(hits.any(dim=1).sum())
    total = int(count_per_class.sum())
    if total == 0:
        raise ValueError("no image could be evaluated (all were skipped as unreadable)")
    seen = count_per_class > 0
    per_class = correct_per_class[seen].double() / count_per_class[seen].double()
    return {
        "top1": 100.0 * int(correct_per_class.sum()) / total,
        "top5": 100.0 * top5_correct / total,
        "mean_per_class": 100.0 * float(per_class.mean()),
        "images": total,
        "skipped_images": skipped,
        "classes": num_classes,
    }


def make_loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_skipping_bad,
                      persistent_workers=False)


def evaluate_imagenet(model, tokenizer: Callable, imagenet_root: str, templates: Sequence[str],
                      batch_size: int, workers: int, device: torch.device, amp: bool = False,
                      transform: Callable | None = None, classnames_file: str | None = None,
                      skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` on ``<imagenet_root>/val`` (any subset of WordNet-ID folders)."""
    dataset, classnames = imagenet_val(imagenet_root, transform or eval_transform(), classnames_file,
                                       skip_bad_images)
    was_training = model.training
    model.eval()
    try:
        classifier = build_classifier(model, tokenizer, classnames, templates, device, amp)
        return evaluate(model, classifier, make_loader(dataset, batch_size, workers, device), device,
                        amp, progress)
    finally:
        model.train(was_training)


# ---- command-line pieces shared by eval_zeroshot_imagenet.py and eval_zeroshot_imagenet_laion.py ----

def add_eval_args(parser: argparse.ArgumentParser, default_templates: str) -> argparse.ArgumentParser:
    parser.add_argument("--imagenet-root", required=True, help="ImageNet folder holding val/<class>/...")
    parser.add_argument("--ckpt-path", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("-j", "--workers", type=int, default=8, help="data loading processes")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA (ignored on CPU)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.add_argument("--templates", default=default_templates,
                        help=f"'simple' (7), 'openai' (80) or a file of '{{}}' templates (default {default_templates})")
    parser.add_argument("--classnames", default=None,
                        help="file with one class name per line, in sorted folder order, for folders "
                             "that are not WordNet IDs")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images (counted and reported) instead of failing")
    parser.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    return parser


def check_eval_args(args: argparse.Namespace) -> torch.device:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.output_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.output_json))):
        raise FileNotFoundError(f"--output-json: folder of {args.output_json!r} does not exist")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    return device


def run_eval_cli(args: argparse.Namespace, model, tokenizer: Callable, transform: Callable,
                 device: torch.device) -> dict:
    """Evaluate, print the original script's accuracy line plus top-5, optionally write JSON."""
    templates = resolve_templates(args.templates)
    start = time.time()
    results = evaluate_imagenet(model, tokenizer, args.imagenet_root, templates, args.batch_size,
                                args.workers, device, args.amp, transform, args.classnames,
                                args.skip_bad_images)
    results.update(model=args.model, checkpoint=os.path.abspath(args.ckpt_path),
                   templates=templates, seconds=round(time.time() - start, 2))
    print(f"ImageNet zero-shot accuracy: {results['top1']:.2f}")
    print(f"ImageNet zero-shot top-5: {results['top5']:.2f}  mean per-class: {results['mean_per_class']:.2f}  "
          f"({results['images']} images, {results['classes']} classes)")
    if results["skipped_images"]:
        print(f"Skipped {results['skipped_images']} unreadable images; accuracy is over the "
              f"{results['images']} that were read")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return results
