"""ImageNet zero-shot top-1 of LaCLIP's LAION-400M checkpoints (open_clip ViT-B-32, ViT-B-16, ViT-L-14).

    python eval_zeroshot_imagenet_laion.py --imagenet-root PATH --ckpt-path CKPT --model ViT-B-32 --batch-size 128 --workers 8
    # the released ViT-L/14 models were trained with QuickGELU:
    python eval_zeroshot_imagenet_laion.py --imagenet-root PATH --ckpt-path CKPT --model ViT-L-14 --quickgelu
"""
from __future__ import annotations

import argparse
import sys

import torch

from evaluation.models import load_open_clip
from evaluation.imagenet_eval import add_eval_args, resolve_eval_args, run_eval_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LaCLIP (LAION-400M, open_clip) ImageNet zero-shot evaluation")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, ...)")
    parser.add_argument("--quickgelu", action="store_true",
                        help="use QuickGELU activations (for checkpoints trained with them: LaCLIP's ViT-L-14)")
    return add_eval_args(parser, default_templates="openai")


def load_model(args: argparse.Namespace, device: torch.device):
    """open_clip model + its tokenizer and validation transform, with the checkpoint loaded strictly."""
    return load_open_clip(args.model, args.ckpt_path, args.quickgelu, device, trust=args.trust_checkpoint)


def main(argv: list[str] | argparse.Namespace | None = None) -> dict:
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    device = resolve_eval_args(args)
    parts = load_model(args, device)
    return run_eval_cli(args, parts.model, parts.tokenizer, parts.eval_transform, device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError included
        sys.exit(f"error: {err}")
