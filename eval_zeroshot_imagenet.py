"""ImageNet zero-shot top-1 of LaCLIP's ViT checkpoints (CC3M, CC12M, RedCaps).

    python eval_zeroshot_imagenet.py --imagenet-root PATH --ckpt-path CKPT --model CLIP_VITB16 --batch-size 128 --workers 8
"""
from __future__ import annotations

import argparse
import sys

import torch

import models
from evaluation.models import eval_transform, load_preset
from tokenizer import SimpleTokenizer
from evaluation.imagenet_eval import add_eval_args, resolve_eval_args, run_eval_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LaCLIP ImageNet zero-shot evaluation", add_help=True)
    parser.add_argument("--model", default="CLIP_VITB16", help=f"one of {', '.join(models.PRESETS)}")
    return add_eval_args(parser, default_templates="simple")


def load_model(name: str, ckpt_path: str, device: torch.device, trust: bool = False) -> torch.nn.Module:
    return load_preset(name, ckpt_path, device, trust=trust)


def main(argv: list[str] | argparse.Namespace | None = None) -> dict:
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    device = resolve_eval_args(args)
    model = load_model(args.model, args.ckpt_path, device, args.trust_checkpoint)
    return run_eval_cli(args, model, SimpleTokenizer(), eval_transform(), device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError included
        sys.exit(f"error: {err}")
