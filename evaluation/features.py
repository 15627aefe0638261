"""Image features of a split, computed once and cached on disk, so zero-shot classification,
the linear probe and every few-shot k of a sweep read the same features.

The cache key is the model (name and the checkpoint's content hash), the preprocessing, the
precision, and the split's samples (paths, labels, sizes and times, plus a content hash of a
sample of the images; see evaluation/content_keys.py). Labels read back are checked against the
dataset's. Files are safetensors (tensors and a JSON header, nothing unpickled) written
atomically, so an interrupted run never leaves a half file that a later run would trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.fileio import atomic_write
from evaluation import content_keys
from evaluation.imagenet_folders import collate_with_bad
from evaluation.readers import SplitData

CACHE_VERSION = 2  # 2: keyed on contents (checkpoint hash, image sizes, times and sampled bytes)


@dataclass
class RunOptions:
    """How images are read and encoded (the flags shared by every task)."""
    batch_size: int = 64
    workers: int = 4
    device: torch.device = torch.device("cpu")
    amp: bool = True  # fp16 autocast on CUDA; the CPU always computes in float32
    skip_bad_images: bool = False
    progress: bool = True
    skip_flag: str = "--skip_bad_images"  # as the caller's CLI spells it, for the refusal

    @property
    def effective_amp(self) -> bool:
        return self.amp and self.device.type == "cuda"


@dataclass
class Features:
    features: torch.Tensor  # [N, E] float32, as the image tower returns them (not normalised)
    labels: torch.Tensor    # [N] int64
    skipped: list[str]      # unreadable images left out (only with --skip_bad_images)
    cached: bool = False    # read from the cache instead of computed


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when enabled; the CPU always computes in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def make_loader(dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_with_bad, persistent_workers=False)


@torch.no_grad()
def encode_images(model: torch.nn.Module, dataset, opts: RunOptions, desc: str = "features") -> Features:
    """Run the image tower over a dataset of (image, label) or BadImage items."""
    loader = make_loader(dataset, opts.batch_size, opts.workers, opts.device)
    feats, labels, skipped = [], [], []
    for images, batch_labels, bad in tqdm(loader, desc=desc, disable=not opts.progress, unit="batch"):
        if bad and not opts.skip_bad_images:
            raise OSError(f"cannot read image {bad[0].path!r} ({bad[0].reason}); fix or remove it, "
                          f"or pass {opts.skip_flag} to leave such files out (they are counted)")
        skipped.extend(b.path for b in bad)
        if batch_labels.numel() == 0:
            continue
        with autocast(opts.device, opts.effective_amp):
            feats.append(model.encode_image(images.to(opts.device, non_blocking=True)).float().cpu())
        labels.append(batch_labels)
    if not feats:
        raise ValueError("no image could be read (all were skipped as unreadable)")
    return Features(torch.cat(feats), torch.cat(labels).long(), skipped)


def normalized(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)


class FeatureCache:
    """``<root>/<dataset>_<split>_<key>.safetensors``; ``root=None`` keeps nothing on disk."""

    def __init__(self, root: str | None):
        self.root = root or None
        self.notes: list[str] = []
        self._memory: dict[str, Features] = {}  # this run's features, whether or not on disk
        self._memory_dataset: str | None = None
        self._split_digests: dict[int, tuple[SplitData, str]] = {}  # one listing's digest per run

    def checkpoint_sha256(self, path: str) -> str:
        """The checkpoint's content hash, remembered under the cache root (a hit reads nothing)."""
        return content_keys.checkpoint_sha256(path, self.root)

    def content_identity(self, model_identity: dict) -> dict:
        """The model part of the key: a checkpoint by its bytes, not its path and times."""
        if "checkpoint" not in model_identity:  # weights in memory (train.py): valid for this run only
            return model_identity
        kept = {k: v for k, v in model_identity.items() if k not in ("checkpoint", "size", "mtime_ns")}
        return {**kept, "checkpoint_sha256": self.checkpoint_sha256(model_identity["checkpoint"])}

    def split_digest(self, split: SplitData) -> str:
        held = self._split_digests.get(id(split))
        if held is None or held[0] is not split:
            held = (split, content_keys.split_digest(split.listing))
            self._split_digests[id(split)] = held
        return held[1]

    def key(self, model_identity: dict, split: SplitData, transform, opts: RunOptions) -> str:
        # repr() of open_clip's transform names functions with their address; drop it (it moves every run)
        transform_text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
        spec = {"version": CACHE_VERSION, "model": self.content_identity(model_identity), "transform": transform_text,
                "amp": opts.effective_amp, "device": opts.device.type, "dataset": split.dataset,
                "split": split.split, "samples": self.split_digest(split)}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, split: SplitData, key: str) -> str:
        return os.path.join(self.root, f"{split.dataset}_{split.split}_{key}.safetensors")

    def load(self, path: str) -> Features | None:
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                skipped = json.loads(f.metadata()["skipped"])
                return Features(f.get_tensor("features"), f.get_tensor("labels"), skipped, cached=True)
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            self.notes.append(f"feature cache {path!r} was unreadable ({err}); recomputed")
            return None

    def labels_match(self, path: str, feats: Features, split: SplitData) -> bool:
        """Cached labels must be the dataset's (an edited or foreign file is said and recomputed)."""
        expected = content_keys.expected_labels(split.listing, feats.skipped)
        if feats.labels.tolist() == expected and len(feats.features) == len(expected):
            return True
        self.notes.append(f"feature cache {path!r} holds labels or a sample count that differ from "
                          f"{split.dataset} {split.split}'s; recomputed")
        return False

    def save(self, path: str, feats: Features) -> None:
        os.makedirs(self.root, exist_ok=True)
        tensors = {"features": feats.features.contiguous(), "labels": feats.labels.contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"skipped": json.dumps(feats.skipped)}))

    def features(self, model, model_identity: dict, transform, split: SplitData, opts: RunOptions) -> Features:
        """The split's features from the cache, or computed (and cached)."""
        if split.dataset != self._memory_dataset:  # hold one dataset's splits at a time (ImageNet's train is GBs)
            self._memory, self._memory_dataset, self._split_digests = {}, split.dataset, {}
        key = self.key(model_identity, split, transform, opts)
        if key in self._memory:
            return self._memory[key]
        path = self.path(split, key) if self.root else None
        feats = self.load(path) if path else None
        if feats is not None and not self.labels_match(path, feats, split):
            feats = None
        if feats is None:
            feats = encode_images(model, split.torch_dataset(transform), opts, desc=f"{split.dataset} {split.split}")
            if path:
                self.save(path, feats)
        self._memory[key] = feats
        return feats
