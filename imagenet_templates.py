"""ImageNet class names and prompt templates where the original LaCLIP layout has them; the data
is evaluation/imagenet_classes.py."""
from evaluation.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_WNIDS, OPENAI_TEMPLATES, SIMPLE_TEMPLATES

__all__ = ["IMAGENET_CLASSNAMES", "IMAGENET_WNIDS", "OPENAI_TEMPLATES", "SIMPLE_TEMPLATES"]
