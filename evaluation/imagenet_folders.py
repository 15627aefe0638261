"""ImageNet validation folders for zero-shot evaluation: class names by WordNet ID, robust image loading.

Class folders are mapped to class names through their WordNet IDs, so any subset of
ImageNet classes (say 100 of them) gets the right names; the original scripts assumed all
1000 folders and silently mislabelled subsets.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, default_collate

from common.images import IMAGE_EXTENSIONS, is_image_file, open_rgb
from evaluation.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_WNIDS, OPENAI_TEMPLATES, SIMPLE_TEMPLATES

_WNID_TO_NAME = dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES))


def read_list_file(path: str, flag: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file; errors name the flag and the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{flag}: file {path!r} is empty")
    return lines


def resolve_templates(spec: str) -> list[str]:
    """'simple' (the 7 LaCLIP templates), 'openai' (the 80), or a file with one '{}' template a line."""
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    if spec == "openai":
        return list(OPENAI_TEMPLATES)
    templates = read_list_file(spec, "--templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"--templates: each line of {spec!r} needs exactly one '{{}}'; got {bad[0]!r}")
    return templates


def list_class_folders(val_dir: str, flag: str = "--imagenet-root") -> list[str]:
    entries = list(os.scandir(val_dir))
    folders = sorted(e.name for e in entries if e.is_dir())
    if not folders:
        # ILSVRC2012_img_val.tar unpacks to 50,000 files in one folder: say so, not just "empty".
        images = sum(1 for e in entries if is_image_file(e.name))
        hint = (f"; it holds {images} images directly: move them into one folder per WordNet ID "
                f"(e.g. with ImageNet's valprep.sh)") if images else ""
        raise ValueError(f"{flag}: {val_dir!r} has no class folders{hint}")
    return folders


def class_names_for(folders: list[str], val_dir: str, classnames_file: str | None) -> list[str]:
    """Names for the sorted class folders: from ``--classnames`` if given, else by WordNet ID."""
    if classnames_file is not None:
        names = read_list_file(classnames_file, "--classnames")
        if len(names) != len(folders):
            raise ValueError(f"--classnames: {classnames_file!r} has {len(names)} names but {val_dir!r} "
                             f"has {len(folders)} class folders (one name per folder, sorted folder order)")
        return names
    unknown = [f for f in folders if f not in _WNID_TO_NAME]
    if unknown:
        raise ValueError(f"--imagenet-root: class folders in {val_dir!r} are not ImageNet WordNet IDs "
                         f"(e.g. {unknown[0]!r}); pass --classnames FILE with one class name per line "
                         f"in sorted folder order")
    return [_WNID_TO_NAME[f] for f in folders]


def list_samples(val_dir: str, folders: list[str], flag: str = "--imagenet-root") -> tuple[list[tuple[str, int]], list[str]]:
    """((image, label) pairs, entries not evaluated). An entry named like an image is a sample
    even when it cannot be read (a broken link): reading it fails, which is refused or
    skipped and counted. Other files and subfolders are returned to be reported."""
    samples, left_out = [], []
    for label, folder in enumerate(folders):
        files = []
        for entry in os.scandir(os.path.join(val_dir, folder)):
            (files if is_image_file(entry.name) and not entry.is_dir() else left_out).append(entry.path)
        if not files:
            raise ValueError(f"{flag}: class folder {os.path.join(val_dir, folder)!r} has no images")
        samples.extend((path, label) for path in sorted(files))
    return samples, sorted(left_out)


def not_evaluated_note(dataset: "ImageList", shown: int = 5) -> str | None:
    """One line listing the class-folder entries the evaluation leaves out, or None."""
    paths = dataset.not_evaluated
    if not paths:
        return None
    root = os.path.dirname(os.path.dirname(paths[0]))
    names = ", ".join(os.path.relpath(p, root) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
    return (f"note: {len(paths)} files in the class folders of {root!r} are not evaluated (folders, or names "
            f"not ending in {' '.join(IMAGE_EXTENSIONS)}): {names}")


class BadImage(NamedTuple):
    """An image that could not be read: the consumer fails naming it, or skips and counts it."""
    path: str
    reason: str


class ImageList(Dataset):
    """(image, label) pairs; an unreadable image gives a ``BadImage`` instead of raising.

    Raising inside a DataLoader worker would reach the user as a worker traceback; a marker
    lets the main process stop with one line naming the file, or skip it and count it.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, not_evaluated: list[str] = ()):
        self.samples = samples
        self.transform = transform
        self.not_evaluated = list(not_evaluated)  # class-folder entries that are not samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = open_rgb(path)
        except Exception as err:  # truncated, corrupt, not an image at all, ...
            return BadImage(path, f"{type(err).__name__}: {err}")
        return self.transform(image), label


def collate_with_bad(batch: list):
    """(images, labels, bad): default collate over the readable items, and the BadImages apart."""
    bad = [item for item in batch if isinstance(item, BadImage)]
    good = [item for item in batch if not isinstance(item, BadImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = default_collate(good)
    return images, labels, bad


def imagenet_val(root: str, transform: Callable,
                 classnames_file: str | None = None) -> tuple[ImageList, list[str]]:
    """The dataset over ``<root>/val`` and the class name of each label."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--imagenet-root: folder {root!r} does not exist")
    val_dir = os.path.join(root, "val")
    if not os.path.isdir(val_dir):
        # A common slip is to pass the val folder itself.
        inside = any(e.is_dir() and e.name in _WNID_TO_NAME for e in os.scandir(root))
        hint = "; it holds WordNet-ID folders itself: pass the folder above it" if inside else ""
        raise FileNotFoundError(f"--imagenet-root: {root!r} has no 'val' folder (expected {val_dir!r}){hint}")
    folders = list_class_folders(val_dir)
    names = class_names_for(folders, val_dir, classnames_file)
    samples, left_out = list_samples(val_dir, folders)
    return ImageList(samples, transform, left_out), names
