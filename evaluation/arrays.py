"""Datasets shipped as arrays, not image files: CIFAR-10/100 (pickled batches) and STL-10 (raw bytes).

torchvision's CIFAR classes unpickle the batch files with the full unpickler, so a crafted file
in a dataset folder could run code. The official batches hold only dicts, lists, strings, ints and
numpy arrays, so they are read here with an unpickler that resolves nothing else; any other
global in a file is refused with a line naming the file. Layouts and label order are torchvision's.
"""
from __future__ import annotations

import codecs
import os
import pickle
from typing import NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

# ndarray.__reduce__ names the reconstruct function of the numpy that wrote the file:
# numpy.core.multiarray in the official (numpy 1.x era) batches, numpy._core.multiarray today.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in a protocol-2 pickle written by Python 3
}


class ArrayBatchUnpickler(pickle.Unpickler):
    """Resolves only the globals an official CIFAR batch uses."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only "
                                         f"dicts, lists, strings, numbers and numpy arrays") from None


class ArrayFileError(ValueError):
    pass


def load_batch(path: str) -> dict:
    """One CIFAR batch file as a dict with str keys; a bad or foreign file is one line naming it."""
    if not os.path.isfile(path):
        raise ArrayFileError(f"missing file {path!r}")
    try:
        with open(path, "rb") as f:
            obj = ArrayBatchUnpickler(f, encoding="latin1").load()
    except Exception as err:  # UnpicklingError, EOFError, ValueError from numpy, ...
        raise ArrayFileError(f"cannot read {path!r} as a CIFAR batch: {err}") from err
    if not isinstance(obj, dict):
        raise ArrayFileError(f"{path!r} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict, key: str, path: str):
    if key not in batch:
        raise ArrayFileError(f"{path!r} has no {key!r} entry (keys: {sorted(batch)[:6]})")
    return batch[key]


class ArraySplit(NamedTuple):
    """A split whose images are arrays in the release's files (CIFAR, STL-10)."""
    images: np.ndarray  # [N, H, W, 3] uint8
    labels: list[int]
    classes: list[str]  # the release's class keys, in label order
    sources: list[str]  # the files read (the feature cache's key)


def _names(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def read_cifar(root: str, split: str, classes: int) -> ArraySplit:
    """The split as torchvision's CIFAR10/100 reads it (images [N,32,32,3])."""
    if classes == 10:
        folder, meta, names_key, labels_key = "cifar-10-batches-py", "batches.meta", "label_names", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        folder, meta, names_key, labels_key = "cifar-100-python", "meta", "fine_label_names", "fine_labels"
        files = ["train"] if split == "train" else ["test"]
    paths = [os.path.join(root, folder, f) for f in files]
    data, labels = [], []
    for path in paths:
        batch = load_batch(path)
        data.append(np.asarray(_field(batch, "data", path), dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(int(v) for v in _field(batch, labels_key, path))
    meta_path = os.path.join(root, folder, meta)
    names = _names(_field(load_batch(meta_path), names_key, meta_path))
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    if len(images) != len(labels):
        raise ArrayFileError(f"{paths[0]!r}: {len(images)} images but {len(labels)} labels")
    return ArraySplit(images, labels, names, paths + [meta_path])


def read_stl10(root: str, split: str) -> ArraySplit:
    """STL-10's binary release as torchvision reads it: 96x96 images stored column-major, labels 1..10."""
    folder = os.path.join(root, "stl10_binary")
    x_path, y_path = os.path.join(folder, f"{split}_X.bin"), os.path.join(folder, f"{split}_y.bin")
    names_path = os.path.join(folder, "class_names.txt")
    for path in (x_path, y_path, names_path):
        if not os.path.isfile(path):
            raise ArrayFileError(f"missing file {path!r}")
    raw = np.fromfile(x_path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ArrayFileError(f"{x_path!r} is {raw.size} bytes, not a whole number of 3x96x96 images")
    images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))
    labels = [int(v) - 1 for v in np.fromfile(y_path, dtype=np.uint8)]
    if len(labels) != len(images):
        raise ArrayFileError(f"{y_path!r} has {len(labels)} labels for {len(images)} images in {x_path!r}")
    with open(names_path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    return ArraySplit(images, labels, names, [x_path, y_path, names_path])


class ArrayImages(Dataset):
    """(transform(image), label) over an [N,H,W,3] uint8 array."""

    def __init__(self, images: np.ndarray, labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]
