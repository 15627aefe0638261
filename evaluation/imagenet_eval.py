"""ImageNet zero-shot evaluation, shared by both eval scripts and by train.py: the folder-to-accuracy
wrapper around evaluation/'s zero-shot routine (image features, classifier, top-1/top-5 rule), and
the scripts' flags and printed lines.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import torch

from common.distributed import resolve_device
from common.fileio import cannot_write_in, write_json_atomic
from evaluation.features import Features, RunOptions, encode_images, normalized
from evaluation.imagenet_folders import imagenet_val, not_evaluated_note, resolve_templates
from evaluation.models import eval_transform
from evaluation.tasks import build_classifier, top_hits


def percent_metrics(logits: torch.Tensor, feats: Features) -> dict:
    """Top-1, top-5 and mean per-class accuracy in percent, and what was read and skipped."""
    labels, num_classes = feats.labels, logits.shape[1]
    hit1, hit5 = top_hits(logits, labels)
    count = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[hit1], minlength=num_classes)
    seen = count > 0
    return {
        # 100 * int / int, the original's expression, so its printed value is reproduced exactly.
        "top1": 100 * int(hit1.sum()) / len(labels),
        "top5": 100 * int(hit5.sum()) / len(labels),
        "mean_per_class": 100.0 * float((correct[seen].double() / count[seen].double()).mean()),
        "images": len(labels),
        "skipped_images": len(feats.skipped),
        "skipped_files": feats.skipped,
        "classes": num_classes,
    }


def evaluate_imagenet(model, tokenizer: Callable, imagenet_root: str, templates: Sequence[str],
                      batch_size: int, workers: int, device: torch.device, amp: bool = False,
                      transform: Callable | None = None, classnames_file: str | None = None,
                      skip_bad_images: bool = False, progress: bool = True) -> dict:
    """Zero-shot accuracy of ``model`` on ``<imagenet_root>/val`` (any subset of WordNet-ID folders)."""
    dataset, classnames = imagenet_val(imagenet_root, transform or eval_transform(), classnames_file)
    opts = RunOptions(batch_size, workers, device, amp, skip_bad_images, progress, skip_flag="--skip-bad-images")
    was_training = model.training
    model.eval()
    try:
        classifier = build_classifier(model, tokenizer, classnames, templates, device, amp, progress=progress)
        feats = encode_images(model, dataset, opts, desc="zero-shot")
    finally:
        model.train(was_training)
    # Scored on the CPU, as eval_benchmark.py's zero-shot task scores its (cached) features.
    results = percent_metrics(normalized(feats.features) @ classifier.cpu(), feats)
    results.update(not_evaluated=len(dataset.not_evaluated), not_evaluated_files=dataset.not_evaluated)
    return results


# ---- command-line pieces shared by eval_zeroshot_imagenet.py and eval_zeroshot_imagenet_laion.py ----

def add_eval_args(parser: argparse.ArgumentParser, default_templates: str) -> argparse.ArgumentParser:
    parser.add_argument("--imagenet-root", required=True, help="ImageNet folder holding val/<class>/...")
    parser.add_argument("--ckpt-path", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("-j", "--workers", "--num_workers", dest="workers", type=int, default=8,
                        help="data loading processes")
    parser.add_argument("--precision", choices=("amp", "fp32"), default="fp32",
                        help="amp: fp16 autocast on CUDA; fp32: float32, the original script's (the default; the "
                             "CPU always uses float32)")
    parser.add_argument("--amp", dest="precision", action="store_const", const="amp",
                        help="= --precision amp (the original's spelling)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    parser.add_argument("--templates", default=default_templates,
                        help=f"'simple' (7), 'openai' (80) or a file of '{{}}' templates (default {default_templates})")
    parser.add_argument("--classnames", default=None,
                        help="file with one class name per line, in sorted folder order, for folders "
                             "that are not WordNet IDs")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images (counted and reported) instead of failing")
    parser.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint", action="store_true",
                        help="fully unpickle --ckpt-path (it can then run code); needed only for files that "
                             "pickle objects beyond tensors, plain values and argparse.Namespace")
    return parser


def resolve_eval_args(args: argparse.Namespace) -> torch.device:
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
                                args.workers, device, args.precision == "amp", transform, args.classnames,
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
