"""Linear probe and few-shot classification on frozen image features, by CLIP's protocol
(Radford et al. 2021, appendix A.3): scikit-learn's L-BFGS logistic regression (at most 1000
iterations), with the L2 strength lambda (C = 1 / lambda) chosen on a validation split among 97
values from 1e-6 to 1e6 (8 per decade) by CLIP's parametric binary search: try every 2 decades,
then halve the step around the best value down to one step (ties go to the larger lambda, the
simpler model). The chosen lambda is then refit on
train + validation (full probe) or on the k examples per class alone (few-shot).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from evaluation.features import Features, normalized
from evaluation.tasks import classification_metrics

LAMBDAS = np.logspace(-6, 6, 97)
MAX_ITER = 1000


@dataclass
class ProbeData:
    x: np.ndarray  # [N, E] float32
    y: np.ndarray  # [N] int64


def probe_data(feats: Features, normalize: bool) -> ProbeData:
    x = normalized(feats.features) if normalize else feats.features
    return ProbeData(x.numpy().astype(np.float32), feats.labels.numpy())


def take(data: ProbeData, index: np.ndarray) -> ProbeData:
    return ProbeData(data.x[index], data.y[index])


def holdout(data: ProbeData, proportion: float, seed: int, split: str = "train") -> tuple[ProbeData, ProbeData]:
    """(train, val): ``proportion`` of each class held out, at least one image per class kept in train."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(data.y):
        idx = rng.permutation(np.flatnonzero(data.y == c))
        val.extend(idx[:min(round(proportion * len(idx)), len(idx) - 1)].tolist())
    if not val:
        raise ValueError(_too_small(data, proportion, split))
    mask = np.zeros(len(data.y), dtype=bool)
    mask[val] = True
    return take(data, np.flatnonzero(~mask)), take(data, np.flatnonzero(mask))


def _too_small(data: ProbeData, proportion: float, split: str) -> str:
    """Why no image was held out, with the per-class counts, instead of scikit-learn's empty-array error."""
    counts = np.bincount(np.unique(data.y, return_inverse=True)[1])
    sizes = ", ".join(f"{n} images in {k} {'class' if k == 1 else 'classes'}"
                      for n, k in zip(*np.unique(counts, return_counts=True)))
    largest = int(counts.max())
    # round(p * n) >= 1 needs p * n > 0.5, and a class of one image keeps it for training
    fix = (f"pass --val_proportion above {0.5 / largest:g} or a --val_split" if largest > 1
           else "every class needs 2 images or more, or pass a --val_split")
    return (f"--val_proportion {proportion:g}: no image of {split} is held out for validation "
            f"(per class: {sizes}); {fix}")


def few_shot(data: ProbeData, k: int, seed: int) -> ProbeData:
    """k examples of every class, drawn with ``seed`` (the same draw for every model)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(data.y):
        idx = np.flatnonzero(data.y == c)
        if len(idx) < k:
            raise ValueError(f"--fewshot_k {k}: class {int(c)} has only {len(idx)} training images")
        chosen.extend(rng.permutation(idx)[:k].tolist())
    return take(data, np.sort(np.asarray(chosen)))


class Probe:
    """Fits at one lambda, remembered, with every L-BFGS stop at the iteration limit counted."""

    def __init__(self, train: ProbeData, val: ProbeData, metric: str):
        self.train, self.val, self.metric = train, val, metric
        self.scores: dict[int, float] = {}
        self.unconverged = 0

    def fit(self, lam: float, data: ProbeData) -> LogisticRegression:
        clf = LogisticRegression(C=1.0 / lam, max_iter=MAX_ITER)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(data.x, data.y)
        self.unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        return clf

    def score(self, i: int) -> float:
        if i not in self.scores:
            clf = self.fit(LAMBDAS[i], self.train)
            self.scores[i] = probe_metrics(clf, self.val)[self.metric]
        return self.scores[i]

    def search(self) -> int:
        """Index of the chosen lambda: the best of every 16th, then steps of 8, 4, 2, 1 around it."""
        best = max(range(0, len(LAMBDAS), 16), key=lambda i: (self.score(i), i))
        step = 8
        while step:
            around = [i for i in (best - step, best, best + step) if 0 <= i < len(LAMBDAS)]
            best = max(around, key=lambda i: (self.score(i), i))
            step //= 2
        return best


def probe_metrics(clf: LogisticRegression, data: ProbeData, prefix: str = "") -> dict:
    """Metrics of a fitted classifier; its columns are mapped back to the dataset's labels."""
    scores = torch.from_numpy(clf.decision_function(data.x)).double()
    if scores.dim() == 1:  # two classes: one score column
        scores = torch.stack([-scores, scores], dim=1)
    n_labels = int(max(data.y.max(), clf.classes_.max())) + 1
    full = torch.full((len(data.y), n_labels), float("-inf"), dtype=torch.float64)
    full[:, torch.from_numpy(clf.classes_)] = scores
    return classification_metrics(full, torch.from_numpy(data.y), prefix)


def linear_probe(train: ProbeData, val: ProbeData, test: ProbeData, metric: str, refit_on_val: bool,
                 prefix: str = "lp_") -> dict:
    """Choose lambda on ``val``, refit (on train + val if ``refit_on_val``), score ``test``."""
    probe = Probe(train, val, metric)
    best = probe.search()
    final = ProbeData(np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y])) if refit_on_val else train
    clf = probe.fit(LAMBDAS[best], final)
    metrics = probe_metrics(clf, test, prefix=prefix)
    metrics.update({f"{prefix}lambda": float(LAMBDAS[best]), f"{prefix}C": float(1.0 / LAMBDAS[best]),
                    f"{prefix}fits": len(probe.scores) + 1, f"{prefix}unconverged_fits": probe.unconverged})
    return metrics
