"""Zero-shot classification and zero-shot retrieval on cached image features, with the metric
definitions of CLIP_benchmark (fractions in [0, 1]); the zero-shot routine evaluation/imagenet_eval.py's ImageNet
evaluation shares (text encoding, the classifier, the top-1/top-5 rule):

- ``acc1``/``acc5``: share of images whose class is the argmax / among the 5 largest logits
  (``acc5`` only with at least 5 classes, else null); ``mean_per_class_recall``: recall of each
  class averaged over the classes present (scikit-learn's balanced accuracy).
- ``image_retrieval_recall@k``: share of captions whose image is among the k images most similar
  to it; ``text_retrieval_recall@k``: share of images with at least one of their captions among
  the k captions most similar to it.

Zero-shot weights (docs/formats.md, "CLIP checkpoints"): per class, L2-normalise each template's
text embedding, average, normalise again; a prediction is the argmax of cosine similarity.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from tqdm import tqdm

from evaluation.features import FeatureCache, Features, RunOptions, autocast, normalized
from evaluation.models import EvalModel
from evaluation.readers import SplitData
from evaluation.retrieval_captions import CaptionSet


@torch.no_grad()
def encode_texts(model, tokenizer: Callable, texts: Sequence[str], device: torch.device, amp: bool = False,
                 batch_size: int = 256, progress: bool = False, desc: str = "texts") -> torch.Tensor:
    """Text-tower embeddings [T, E], float32 and not normalised, on ``device``."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, unit="batch"):
        tokens = tokenizer(texts[start:start + batch_size]).to(device)
        with autocast(device, amp):
            out.append(model.encode_text(tokens).float())
    return torch.cat(out)


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
    feats = encode_texts(model, tokenizer, texts, device, amp, text_batch_size, progress, "classifier")
    emb = F.normalize(feats, dim=-1).view(len(unique), len(templates), -1)  # [U, T, E]
    weights = F.normalize(emb.mean(dim=1), dim=-1)  # [U, E]
    column = {name: i for i, name in enumerate(unique)}
    index = torch.tensor([column[c] for c in classnames], device=weights.device)
    return weights[index].t().contiguous()  # [E, C]


def top_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [N, C] scores: (top-1 hit, top-5 hit); with fewer than 5 classes, top-C.

    Top-1 is argmax, as in the original: on an exact tie it takes the first class, while topk's
    order among equal values is unspecified (and differs between kernels). So top-5 also counts
    every top-1 hit, even when six classes tie at the top."""
    hit1 = logits.argmax(dim=1) == labels
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return hit1, (top5 == labels[:, None]).any(dim=1) | hit1


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str = "") -> dict:
    """acc1, acc5 and mean_per_class_recall of [N, C] scores; ties go to the first class (argmax)."""
    hit1, hit5 = top_hits(logits, labels)
    metrics = {f"{prefix}acc1": float(hit1.double().mean()),
               # CLIP_benchmark writes NaN below 5 classes; null keeps the file valid JSON
               f"{prefix}acc5": float(hit5.double().mean()) if logits.shape[1] >= 5 else None}
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those are ignored, as intended
        warnings.simplefilter("ignore", UserWarning)
        metrics[f"{prefix}mean_per_class_recall"] = float(balanced_accuracy_score(labels.numpy(),
                                                                                  logits.argmax(dim=1).numpy()))
    return metrics


class ClassifierCache:
    """Zero-shot weights built once per (class names, templates) for one model."""

    def __init__(self, em: EvalModel, opts: RunOptions):
        self.em, self.opts, self._built = em, opts, {}

    def get(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        key = (tuple(classnames), tuple(templates))
        if key not in self._built:
            self._built[key] = build_classifier(self.em.model, self.em.tokenizer, classnames, templates,
                                                self.opts.device, self.opts.effective_amp).cpu()
        return self._built[key]


def zeroshot_classification(em: EvalModel, split: SplitData, templates: Sequence[str], cache: FeatureCache,
                            classifiers: ClassifierCache, opts: RunOptions) -> tuple[dict, Features]:
    feats = cache.features(em.model, em.identity(), em.transform, split, opts)
    classifier = classifiers.get(split.classnames, templates)  # [E, C]
    logits = normalized(feats.features) @ classifier
    return classification_metrics(logits, feats.labels), feats


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
    text_emb = F.normalize(encode_texts(em.model, em.tokenizer, texts, opts.device, opts.effective_amp).cpu(), dim=-1)
    metrics = retrieval_metrics(normalized(feats.features), text_emb, torch.tensor(text_image), recall_k)
    return metrics, feats
