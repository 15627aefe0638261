"""Zero-shot classification and zero-shot retrieval on cached image features, with the metric
definitions of CLIP_benchmark (fractions in [0, 1]):

- ``acc1``/``acc5``: share of images whose class is the argmax / among the 5 largest logits
  (``acc5`` only with at least 5 classes, else null); ``mean_per_class_recall``: recall of each
  class averaged over the classes present (scikit-learn's balanced accuracy).
- ``image_retrieval_recall@k``: share of captions whose image is among the k images most similar
  to it; ``text_retrieval_recall@k``: share of images with at least one of their captions among
  the k captions most similar to it.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from evaluation.captions import CaptionSet
from evaluation.features import FeatureCache, Features, RunOptions, normalized
from evaluation.models import EvalModel
from evaluation.readers import SplitData
from zeroshot import autocast, build_classifier


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "") -> dict:
    """acc1, acc5 and mean_per_class_recall of [N, C] scores; ties go to the first class (argmax)."""
    pred = logits.argmax(dim=1)
    hit1 = pred == labels
    metrics = {f"{prefix}acc1": float(hit1.double().mean())}
    if logits.shape[1] >= 5:
        top5 = logits.topk(5, dim=1).indices
        metrics[f"{prefix}acc5"] = float(((top5 == labels[:, None]).any(dim=1) | hit1).double().mean())
    else:
        metrics[f"{prefix}acc5"] = None  # CLIP_benchmark writes NaN; null keeps the file valid JSON
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those are ignored, as intended
        warnings.simplefilter("ignore", UserWarning)
        metrics[f"{prefix}mean_per_class_recall"] = float(balanced_accuracy_score(labels.numpy(), pred.numpy()))
    return metrics


class ClassifierCache:
    """Zero-shot weights built once per (class names, templates) for one model."""

    def __init__(self, em: EvalModel, opts: RunOptions):
        self.em, self.opts, self._built = em, opts, {}

    def get(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(classnames), tuple(templates))
        if key not in self._built:
            self._built[key] = build_classifier(self.em.model, self.em.tokenizer, classnames, templates,
                                                self.opts.device, self.opts.effective_amp).float().cpu()
        return self._built[key]


def zeroshot_classification(em: EvalModel, split: SplitData, templates: Sequence[str], cache: FeatureCache,
                            classifiers: ClassifierCache, opts: RunOptions) -> tuple[dict, Features]:
    feats = cache.features(em.model, em.identity(), em.transform, split, opts)
    classifier = classifiers.get(split.classnames, templates)  # [E, C]
    logits = normalized(feats.features) @ classifier
    return classification_metrics(logits, feats.labels), feats


@torch.no_grad()
def encode_texts(em: EvalModel, texts: list[str], opts: RunOptions, batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = em.tokenizer(texts[start:start + batch_size]).to(opts.device)
        with autocast(opts.device, opts.effective_amp):
            out.append(em.model.encode_text(tokens).float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      recall_k: Sequence[int], chunk: int = 1024) -> dict:
    """Recall@k both ways from L2-normalised embeddings; ``text_image[t]`` is caption t's image."""
    n_images, n_texts = len(image_emb), len(text_emb)
    metrics = {}
    for k in recall_k:
        kt, ki = min(k, n_images), min(k, n_texts)
        hits = 0
        for start in range(0, n_texts, chunk):  # caption -> images
            top = (text_emb[start:start + chunk] @ image_emb.t()).topk(kt, dim=1).indices
            hits += int((top == text_image[start:start + chunk, None]).any(dim=1).sum())
        metrics[f"image_retrieval_recall@{k}"] = hits / n_texts
        hits = 0
        for start in range(0, n_images, chunk):  # image -> captions
            top = (image_emb[start:start + chunk] @ text_emb.t()).topk(ki, dim=1).indices
            own = torch.arange(start, min(start + chunk, n_images))[:, None]
            hits += int((text_image[top] == own).any(dim=1).sum())
        metrics[f"text_retrieval_recall@{k}"] = hits / n_images
    return metrics


def zeroshot_retrieval(em: EvalModel, data: CaptionSet, cache: FeatureCache, opts: RunOptions,
                       recall_k: Sequence[int]) -> tuple[dict, Features]:
    """Unreadable images skipped with --skip_bad_images take their captions with them."""
    feats = cache.features(em.model, em.identity(), em.transform, data.images(), opts)
    kept = feats.labels.tolist()  # image indices that were read
    position = {image: i for i, image in enumerate(kept)}
    texts, text_image = [], []
    for image in kept:
        texts += data.captions[image]
        text_image += [position[image]] * len(data.captions[image])
    text_emb = encode_texts(em, texts, opts)
    metrics = retrieval_metrics(normalized(feats.features), text_emb, torch.tensor(text_image), recall_k)
    return metrics, feats
