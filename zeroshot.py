"""The one zero-shot ImageNet routine, shared by both eval scripts and by train.py.

Protocol (docs/formats.md, "CLIP checkpoints"): per class, L2-normalise each template's text embedding,
average, normalise again; normalise image embeddings; predict the argmax of cosine similarity.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

from common.distributed import resolve_device
from common.fileio import cannot_write_in, write_json_atomic
from imagenet_data import BadImage, collate_with_bad, imagenet_val, not_evaluated_note, resolve_templates
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
                     device: torch.device, amp: bool = False, text_batch_size: int = 500,
                     progress: bool = False) -> torch.Tensor:
    """Zero-shot weights [embed_dim, num_classes]: normalised mean of normalised template embeddings.

    Each distinct name is encoded once and repeated names share one column, bit for bit.
    ImageNet's list names two pairs of classes alike ('missile', 'sunglasses'); the original
    encoded each class alone, so such pairs tied exactly and argmax took the first. Encoding
    them in different batches would break the tie by rounding noise instead.
    """
    unique = list(dict.fromkeys(classnames))
    texts = [t.format(c) for c in unique for t in templates]  # class-major: [U * T]
    feats = []
    starts = range(0, len(texts), text_batch_size)
    for start in tqdm(starts, desc="classifier", disable=not progress, unit="batch"):
        tokens = tokenizer(texts[start:start + text_batch_size]).to(device)
        with autocast(device, amp):
            feats.append(model.encode_text(tokens).float())
    emb = F.normalize(torch.cat(feats), dim=-1).view(len(unique), len(templates), -1)  # [U, T, E]
    weights = F.normalize(emb.mean(dim=1), dim=-1)  # [U, E]
    column = {name: i for i, name in enumerate(unique)}
    index = torch.tensor([column[c] for c in classnames], device=weights.device)
    return weights[index].t().contiguous()  # [E, C]


def _check_bad(bad: list[BadImage], skip_bad_images: bool) -> None:
    if bad and not skip_bad_images:
        raise OSError(f"cannot read image {bad[0].path!r} ({bad[0].reason}); fix or remove it, "
                      f"or pass --skip-bad-images to skip such files")


@torch.no_grad()
def evaluate(model, classifier: torch.Tensor, loader, device: torch.device, amp: bool = False,
             progress: bool = True, skip_bad_images: bool = False) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) over a loader of (images, labels, bad)."""
    num_classes = classifier.shape[1]
    correct_per_class = torch.zeros(num_classes, dtype=torch.long)
    count_per_class = torch.zeros(num_classes, dtype=torch.long)
    top5_correct, skipped_files = 0, []
    k = min(5, num_classes)
    for images, labels, bad in tqdm(loader, desc="zero-shot", disable=not progress, unit="batch"):
        _check_bad(bad, skip_bad_images)
        skipped_files.extend(b.path for b in bad)
        if labels.numel() == 0:
            continue
        with autocast(device, amp):
            feats = model.encode_image(images.to(device, non_blocking=True)).float()
        logits = F.normalize(feats, dim=-1) @ classifier  # [B, C]
        # Top-1 is argmax, as in the original: on an exact tie it takes the first class, while
        # topk's order among equal values is unspecified (and differs between kernels).
        top1 = logits.argmax(dim=-1).cpu()  # [B]
        top5 = logits.topk(k, dim=-1).indices.cpu()  # [B, k]
        correct_per_class += torch.bincount(labels[top1 == labels], minlength=num_classes)
        count_per_class += torch.bincount(labels, minlength=num_classes)
        # "| top-1 hit": top-5 counts every top-1 hit even when six classes tie at the top.
        top5_correct += int(((top5 == labels[:, None]).any(dim=1) | (top1 == labels)).sum())
    total = int(count_per_class.sum())
    if total == 0:
        raise ValueError("no image could be evaluated (all were skipped as unreadable)")
    seen = count_per_class > 0
    per_class = correct_per_class[seen].double() / count_per_class[seen].double()
    return {
        # 100 * int / int, the original's expression, so its printed value is reproduced exactly.
        "top1": 100 * int(correct_per_class.sum()) / total,
        "top5": 100 * top5_correct / total,
        "mean_per_class": 100.0 * float(per_class.mean()),
        "images": total,
        "skipped_images": len(skipped_files),
        "skipped_files": skipped_files,
        "classes": num_classes,
    }


def make_loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_with_bad,
                      persistent_workers=False)


def evaluate_imagenet(model, tokenizer: Callable, imagenet_root: str, templates: Sequence[str],
                      batch_size: int, workers: int, device: torch.device, amp: bool = False,
                      transform: Callable | None = None, classnames_file: str | None = None,
                      skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` on ``<imagenet_root>/val`` (any subset of WordNet-ID folders)."""
    dataset, classnames = imagenet_val(imagenet_root, transform or eval_transform(), classnames_file)
    was_training = model.training
    model.eval()
    try:
        classifier = build_classifier(model, tokenizer, classnames, templates, device, amp,
                                      progress=progress)
        results = evaluate(model, classifier, make_loader(dataset, batch_size, workers, device), device,
                           amp, progress, skip_bad_images)
        results.update(not_evaluated=len(dataset.not_evaluated), not_evaluated_files=dataset.not_evaluated)
        return results
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
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle --ckpt-path (it can then run code); needed only for files that "
                             "pickle objects beyond tensors, plain values and argparse.Namespace")
    return parser


def check_eval_args(args: argparse.Namespace) -> torch.device:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.output_json:
        check_output_json(args.output_json)
    # Check the folders and files before a checkpoint of several GB is read, not after. Listing
    # the 50,000 validation files takes well under a second, and evaluation lists them again.
    resolve_templates(args.templates)
    dataset, _ = imagenet_val(args.imagenet_root, transform=None, classnames_file=args.classnames)
    note = not_evaluated_note(dataset)
    if note:
        print(note)
    return resolve_device(args.device)


def check_output_json(path: str) -> None:
    """--output-json must be writable now, not after the whole evaluation."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output-json: folder of {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--output-json {path!r} is a folder; give a file name")
    reason = cannot_write_in(folder)
    if reason:
        raise ValueError(f"--output-json {path!r}: cannot write in {folder!r} ({reason})")


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
    print(f"ImageNet zero-shot accuracy: {results['top1']}")  # the original line, value unrounded
    print(f"ImageNet zero-shot top-5: {results['top5']:.2f}  mean per-class: {results['mean_per_class']:.2f}  "
          f"({results['images']} images, {results['classes']} classes)")
    if results["skipped_images"]:
        shown = ", ".join(results["skipped_files"][:5])
        print(f"Skipped {results['skipped_images']} unreadable images ({shown}"
              f"{', ...' if results['skipped_images'] > 5 else ''}); accuracy is over the "
              f"{results['images']} that were read")
    if args.output_json:
        write_json_atomic(args.output_json, results)
    return results
