"""Read a classification split from the folder a user downloaded: torchvision's dataset classes
where torchvision has one (never downloading), our own readers of the same layouts otherwise.

A reader only lists (file or array row, label); images are read later by the loader. Every
failure is one line naming --dataset_root (or the split flag) and the layout expected there.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torchvision import datasets as tvd

from evaluation import arrays
from evaluation.catalog import DatasetSpec, get_spec, published_classnames
from evaluation.imagenet_classes import IMAGENET_WNIDS
from evaluation.imagenet_folders import ImageList, list_class_folders, list_samples

SPLIT_SEED = 0  # fixed: the seeded splits below must not move with --seed


class LayoutError(ValueError):
    """--dataset_root does not hold the dataset as expected."""


@dataclass
class Listing:
    """What one split holds, before any image is read."""
    labels: list[int]
    paths: list[str] | None = None      # image files ...
    images: np.ndarray | None = None    # ... or an [N,H,W,3] uint8 array (CIFAR, STL-10)
    classes: list[str] | None = None    # the release's own class keys, in label order
    sources: list[str] = field(default_factory=list)  # files behind `images` (for the cache key)
    unlisted: int = 0                    # files in class folders that are not images (reported)


@dataclass
class SplitData:
    """A split ready to load: samples, CLIP class names, and what the user should be told."""
    dataset: str
    split: str
    listing: Listing
    classnames: list[str]
    notes: list[str]

    def __len__(self) -> int:
        return len(self.listing.labels)

    def fingerprint(self) -> str:
        """Identifies the samples: file paths and labels, or the array files' size and mtime."""
        h = hashlib.sha256()
        if self.listing.paths is not None:
            for path, label in zip(self.listing.paths, self.listing.labels):
                h.update(f"{os.path.abspath(path)}\t{label}\n".encode())
        else:
            for path in self.listing.sources:
                st = os.stat(path)
                h.update(f"{os.path.abspath(path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def torch_dataset(self, transform: Callable):
        if self.listing.paths is not None:
            return ImageList(list(zip(self.listing.paths, self.listing.labels)), transform)
        return arrays.ArrayImages(self.listing.images, self.listing.labels, transform)


def _pairs(ds) -> tuple[list[str], list[int]]:
    """(paths, labels) of a torchvision dataset built with loader=str (so no image is opened)."""
    pairs = [ds[i] for i in range(len(ds))]
    return [str(p) for p, _ in pairs], [int(y) for _, y in pairs]


def _tv_listing(ds) -> Listing:
    paths, labels = _pairs(ds)
    return Listing(labels, paths, classes=list(ds.classes))


def _count_unlisted(folder: str, listed: list[str], ignore: tuple[str, ...] = ()) -> int:
    listed_set = {os.path.abspath(p) for p in listed}
    return sum(1 for d, _, files in os.walk(folder) for f in files
               if os.path.abspath(os.path.join(d, f)) not in listed_set and not f.lower().endswith(ignore))


def _seeded_split(listing: Listing, split: str, train_per_class: int | None = None,
                  fractions: tuple[float, float] = (0.6, 0.2)) -> Listing:
    """A fixed per-class split for releases without one: ``train_per_class`` images per class for
    train and the rest for test (Caltech-101: 30, as CLIP and VTAB), or train/val/test fractions."""
    if split == "all":
        return listing
    rng = np.random.default_rng(SPLIT_SEED)
    labels = np.asarray(listing.labels)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)[rng.permutation(int((labels == c).sum()))]
        if train_per_class is not None:
            n_train = min(train_per_class, len(idx) - 1)
            cuts = {"train": idx[:n_train], "test": idx[n_train:]}
        else:
            n_train, n_val = round(fractions[0] * len(idx)), round(fractions[1] * len(idx))
            cuts = {"train": idx[:n_train], "val": idx[n_train:n_train + n_val], "test": idx[n_train + n_val:]}
        keep.extend(cuts[split].tolist())
    keep.sort()
    return Listing([listing.labels[i] for i in keep], [listing.paths[i] for i in keep], classes=listing.classes,
                   unlisted=listing.unlisted)


def _class_folders(base: str, pattern_ext: tuple[str, ...]) -> Listing:
    if not os.path.isdir(base):
        raise FileNotFoundError(f"no folder {base!r}")
    classes = sorted(e.name for e in os.scandir(base) if e.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.path for e in os.scandir(os.path.join(base, name))
                       if e.is_file() and e.name.lower().endswith(pattern_ext))
        paths += files
        labels += [label] * len(files)
    return Listing(labels, paths, classes=classes, unlisted=_count_unlisted(base, paths))


def _sun397(root: str, split: str) -> Listing:
    listing = _tv_listing(tvd.SUN397(root, loader=str))
    order = sorted(range(len(listing.paths)), key=listing.paths.__getitem__)  # rglob's order is the filesystem's
    listing.paths, listing.labels = [listing.paths[i] for i in order], [listing.labels[i] for i in order]
    if split == "all":
        return listing
    name = {"train": "Training_01.txt", "test": "Testing_01.txt"}[split]
    candidates = [os.path.join(root, "Partitions", name), os.path.join(root, "SUN397", "Partitions", name)]
    part = next((p for p in candidates if os.path.isfile(p)), None)
    if part is None:
        raise LayoutError(f"--dataset_root: the {split} split of sun397 needs the official partition file "
                          f"{candidates[0]!r} (Partitions.zip of the SUN397 release); --split all needs none")
    base = os.path.join(root, "SUN397")
    index = {os.path.normpath(p): i for i, p in enumerate(listing.paths)}
    with open(part, encoding="utf-8") as f:
        wanted = [os.path.normpath(os.path.join(base, line.strip().lstrip("/"))) for line in f if line.strip()]
    missing = [p for p in wanted if p not in index]
    if missing:
        raise LayoutError(f"--dataset_root: {len(missing)} images listed in {part!r} are not under {base!r} "
                          f"(first: {missing[0]!r})")
    keep = [index[p] for p in wanted]
    return Listing([listing.labels[i] for i in keep], [listing.paths[i] for i in keep], classes=listing.classes)


def _flowers(root: str, split: str) -> Listing:
    # torchvision's Flowers102 refuses files whose md5 differs from the release; read the same layout.
    from scipy.io import loadmat
    base = os.path.join(root, "flowers-102")
    for name in ("imagelabels.mat", "setid.mat", "jpg"):
        if not os.path.exists(os.path.join(base, name)):
            raise FileNotFoundError(f"missing {os.path.join(base, name)!r}")
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    ids = np.atleast_1d(loadmat(os.path.join(base, "setid.mat"), squeeze_me=True)[key]).tolist()
    all_labels = np.atleast_1d(loadmat(os.path.join(base, "imagelabels.mat"), squeeze_me=True)["labels"]) - 1
    return Listing([int(all_labels[i - 1]) for i in ids],
                   [os.path.join(base, "jpg", f"image_{i:05d}.jpg") for i in ids])


def _arrays(read: Callable, root: str, split: str) -> Listing:
    try:
        got = read(root, split)
    except arrays.ArrayFileError as err:
        raise LayoutError(f"--dataset_root: {err}") from err
    return Listing(got.labels, images=got.images, classes=got.classes, sources=got.sources)


def _pets(root: str, split: str) -> Listing:
    ds = tvd.OxfordIIITPet(root, split=split, target_types="category")  # no loader argument: private lists
    raw = {int(y): os.path.basename(str(p)).rsplit("_", 1)[0] for p, y in zip(ds._images, ds._labels)}
    return Listing([int(y) for y in ds._labels], [str(p) for p in ds._images], classes=[raw[i] for i in sorted(raw)])


def _gtsrb(root: str, split: str) -> Listing:
    ds = tvd.GTSRB(root, split=split)  # no loader argument: its private sample list
    paths = [str(p) for p, _ in ds._samples]
    training = os.path.join(root, "gtsrb", "GTSRB", "Training")  # each class folder also holds its GT-*.csv
    unlisted = _count_unlisted(training, paths, ignore=(".csv",)) if split == "train" else 0
    return Listing([int(y) for _, y in ds._samples], paths, unlisted=unlisted)


def _image_folder(ds, folder: str) -> Listing:
    paths = [p for p, _ in ds.samples]
    return Listing([int(y) for _, y in ds.samples], paths, classes=list(ds.classes),
                   unlisted=_count_unlisted(folder, paths))


def _imagenet(root: str, split: str) -> Listing:
    folder = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder!r}")
    wnids = list_class_folders(folder, "--dataset_root")
    samples, left_out = list_samples(folder, wnids, "--dataset_root")
    return Listing([y for _, y in samples], [p for p, _ in samples], classes=wnids, unlisted=len(left_out))


_JPG = (".jpg", ".jpeg")
READERS: dict[str, Callable[[str, str], Listing]] = {
    "food101": lambda root, split: _tv_listing(tvd.Food101(root, split=split, loader=str)),
    "cifar10": lambda root, split: _arrays(lambda r, s: arrays.read_cifar(r, s, 10), root, split),
    "cifar100": lambda root, split: _arrays(lambda r, s: arrays.read_cifar(r, s, 100), root, split),
    "sun397": _sun397,
    "cars": lambda root, split: _tv_listing(tvd.StanfordCars(root, split=split, loader=str)),
    "fgvc_aircraft": lambda root, split: _tv_listing(
        tvd.FGVCAircraft(root, split=split, annotation_level="variant", loader=str)),
    "dtd": lambda root, split: _tv_listing(tvd.DTD(root, split=split, partition=1, loader=str)),
    "pets": _pets,
    "caltech101": lambda root, split: _seeded_split(
        _class_folders(os.path.join(root, "caltech101", "101_ObjectCategories"), (".jpg",)), split, train_per_class=30),
    "flowers": _flowers,
    "stl10": lambda root, split: _arrays(arrays.read_stl10, root, split),
    "eurosat": lambda root, split: _seeded_split(
        _image_folder(tvd.EuroSAT(root, loader=str), os.path.join(root, "eurosat", "2750")), split),
    "resisc45": lambda root, split: _seeded_split(_class_folders(os.path.join(root, "NWPU-RESISC45"), _JPG), split),
    "gtsrb": _gtsrb,
    "country211": lambda root, split: _image_folder(tvd.Country211(root, split=split, loader=str),
                                                    os.path.join(root, "country211", split)),
    "imagenet1k": _imagenet,
}

# Releases whose files name the classes: the name is the key cleaned as CLIP cleaned it, spelled
# as CLIP published it (Pets: 'american bulldog', not torchvision's 'American Bulldog').
_CLEAN: dict[str, Callable[[str], str]] = {
    **{name: (lambda s: s) for name in ("cifar10", "cars", "fgvc_aircraft", "dtd", "stl10")},
    **{name: (lambda s: s.replace("_", " ")) for name in ("cifar100", "food101", "pets", "resisc45")},
    "sun397": lambda s: s.replace("_", " ").replace("/", " "),
}


def class_names(spec: DatasetSpec, listing: Listing) -> tuple[list[str], list[str]]:
    """(CLIP class name of each label, notes for the user)."""
    published = published_classnames(spec.name)
    if spec.name == "imagenet1k":  # any subset of WordNet-ID folders, named by ID
        by_wnid = dict(zip(IMAGENET_WNIDS, published))
        unknown = [c for c in listing.classes if c not in by_wnid]
        if unknown:
            raise LayoutError(f"--dataset_root: class folders such as {unknown[0]!r} are not ImageNet WordNet IDs; "
                              f"expected {spec.layout}")
        return [by_wnid[c] for c in listing.classes], []
    if spec.name in _CLEAN:
        by_lower = {n.lower(): n for n in published}
        cleaned = [_CLEAN[spec.name](c) for c in listing.classes]
        unknown = [c for c in cleaned if c.lower() not in by_lower]
        notes = [f"{len(unknown)} class names of the release are not in CLIP's published list and are used as "
                 f"they are: {', '.join(map(repr, unknown[:5]))}"] if unknown else []
        return [by_lower.get(c.lower(), c) for c in cleaned], notes
    found = len(listing.classes) if listing.classes is not None else max(listing.labels, default=-1) + 1
    if found != len(published) and (listing.classes is not None or found > len(published)):
        raise LayoutError(f"--dataset_root: {spec.name} has {found} classes here but CLIP's list names "
                          f"{len(published)}; expected {spec.layout}")
    return published, []


def check_split(spec: DatasetSpec, split: str, flag: str = "--split") -> None:
    if split not in spec.splits:
        raise ValueError(f"{flag} {split!r}: {spec.name} has the splits {', '.join(spec.splits)}")


def read_split(name: str, root: str, split: str, flag: str = "--split") -> SplitData:
    """List ``split`` of dataset ``name`` under ``root``; raises one line on any mismatch."""
    spec = get_spec(name)
    check_split(spec, split, flag)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset_root: folder {root!r} does not exist (expected {spec.layout})")
    try:
        listing = READERS[name](root, split)
    except LayoutError:
        raise
    except (RuntimeError, OSError, KeyError, ValueError, IndexError, TypeError) as err:
        detail = str(err).replace(" You can use download=True to download it", "")  # we never download
        raise LayoutError(f"--dataset_root: {root!r} does not hold {spec.title} split {split!r} as expected "
                          f"({type(err).__name__}: {detail}); expected {spec.layout}") from err
    if not listing.labels:
        raise LayoutError(f"--dataset_root: {spec.title} split {split!r} under {root!r} holds no images; "
                          f"expected {spec.layout}")
    names, notes = class_names(spec, listing)
    if listing.unlisted:
        notes.append(f"{listing.unlisted} files in the class folders are not images this reader takes "
                     f"and were left out")
    return SplitData(name, split, listing, names, notes)
