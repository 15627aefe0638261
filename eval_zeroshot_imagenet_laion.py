"""ImageNet zero-shot top-1 of LaCLIP's LAION-400M checkpoints (open_clip ViT-B-32 / ViT-B-16).

    python eval_zeroshot_imagenet_laion.py --imagenet-root PATH --ckpt-path CKPT --model ViT-B-32 --batch-size 128 --workers 8
"""
from __future__ import annotations

import argparse
import difflib
import sys

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict

import models
from zeroshot import add_eval_args, check_eval_args, run_eval_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LaCLIP (LAION-400M, open_clip) ImageNet zero-shot evaluation")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (ViT-B-32, ViT-B-16, ...)")
    parser.add_argument("--quickgelu", action="store_true",
                        help="use QuickGELU activations (for checkpoints trained with them)")
    return add_eval_args(parser, default_templates="openai")


def check_model_name(name: str) -> None:
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"--model {name!r} is not an open_clip model{hint}")


def patch_size_hint(model: torch.nn.Module, state: dict) -> str | None:
    key = "visual.conv1.weight"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return None
    return (f"  the checkpoint's patch size is {state[key].shape[-1]}, the model's "
            f"{own.shape[-1]}: try --model ViT-B-{state[key].shape[-1]}")


def fit_open_clip_state(model: torch.nn.Module, state: dict) -> dict:
    """The fixes open_clip's own ``load_checkpoint`` applies to files of its training code.

    A scalar stored with another shape (``[]`` vs ``[1]``) is reshaped; a model with a
    ``logit_bias`` (SigLIP-style config) gets 0 when the file has none, as open_clip does. A
    bias is added to every class's logit alike, so it never changes zero-shot predictions.
    """
    state = dict(state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # pre-2.0 text keys, custom-text model
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and state[key].shape != own.shape \
                and state[key].numel() == own.numel():
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    position_ids = "text.transformer.embeddings.position_ids"  # dropped by transformers >= 4.31
    if position_ids in state and position_ids not in model.state_dict():
        del state[position_ids]
    return state


def mismatch_error(args: argparse.Namespace, model: torch.nn.Module, state: dict,
                   lines: list[str]) -> ValueError:
    hint = patch_size_hint(model, state)
    if any(k.startswith("visual.blocks.") for k in state):
        hint = "  it looks like a LaCLIP CC/RedCaps checkpoint: use eval_zeroshot_imagenet.py"
    head = f"--ckpt-path: checkpoint {args.ckpt_path!r} does not fit open_clip --model {args.model}"
    return ValueError("\n".join([head] + lines + ([hint] if hint else [])))


def load_model(args: argparse.Namespace, device: torch.device):
    """open_clip model + its validation transform, with the checkpoint loaded strictly."""
    check_model_name(args.model)
    state = models.load_checkpoint_state(args.ckpt_path, trust=args.trust_checkpoint)
    # A file trained with open_clip's --siglip carries logit_bias; build the model with one so
    # the file loads strictly (the value is the file's; open_clip itself fails on such a file).
    extra = {"init_logit_bias": 0.0} if "logit_bias" in state else {}
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        args.model, pretrained=None, force_quick_gelu=args.quickgelu, **extra)
    state = fit_open_clip_state(model, state)
    lines = models.mismatch_lines(model, state)
    if lines:
        raise mismatch_error(args, model, state, lines)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), preprocess_val


def main(argv: list[str] | argparse.Namespace | None = None) -> dict:
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    device = check_eval_args(args)
    model, preprocess_val = load_model(args, device)
    tokenizer = open_clip.get_tokenizer(args.model)
    return run_eval_cli(args, model, tokenizer, preprocess_val, device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError included
        sys.exit(f"error: {err}")
