"""Every dataset of eval_benchmark.py in miniature, in the exact on-disk layout its reader (mostly
torchvision's dataset classes) expects: a few tiny images per class, class c tinted its own colour
so that frozen features of even a random model separate the classes a little."""
from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

from evaluation.catalog import published_classnames
from imagenet_templates import IMAGENET_WNIDS

SIZE = 12


def pixels(label: int, seed: int, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([(37 * label) % 256, (91 * label + 60) % 256, (53 * label + 120) % 256])
    return np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)


def image(path, label: int, seed: int) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(label, seed)).save(path)
    return str(path)


def _lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def food101(root: Path, per_split: int = 2) -> None:
    classes = ["apple_pie", "baby_back_ribs", "cheese_plate"]
    base = root / "food-101"
    for split, offset in (("train", 0), ("test", 100)):
        meta = {c: [f"{c}/{offset + i}" for i in range(per_split)] for c in classes}
        _lines(base / "meta" / f"{split}.json", [json.dumps(meta)])
        for label, c in enumerate(classes):
            for i in range(per_split):
                image(base / "images" / c / f"{offset + i}.jpg", label, offset + 10 * label + i)


def cifar(root: Path, classes: int, per_class: int = 2) -> None:
    names = [n.replace(" ", "_") for n in published_classnames(f"cifar{classes}")]
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    used = range(3) if classes == 100 else range(10)  # CIFAR-100: 3 of the classes have images

    def batch(path: Path, seed: int) -> None:
        labels = [c for c in used for _ in range(per_class)]
        data = np.stack([pixels(c, seed + i, 32).transpose(2, 0, 1).reshape(-1) for i, c in enumerate(labels)])
        key = "labels" if classes == 10 else "fine_labels"
        with open(path, "wb") as f:  # protocol 2, as the official Python-2 era files
            pickle.dump({"batch_label": "x", key: labels, "data": data, "filenames": ["f"] * len(labels)}, f, 2)

    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for i, name in enumerate(files):
        batch(folder / name, 1000 * i)
    meta_key = "label_names" if classes == 10 else "fine_label_names"
    with open(folder / ("batches.meta" if classes == 10 else "meta"), "wb") as f:
        pickle.dump({meta_key: names, "num_cases_per_batch": 10}, f, 2)


def sun397(root: Path) -> None:
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    base = root / "SUN397"
    _lines(base / "ClassName.txt", classes)
    train, test = [], []
    for label, c in enumerate(classes):
        for i in range(4):
            rel = f"{c}/sun_{label}{i}.jpg"
            image(base / rel.lstrip("/"), label, 10 * label + i)
            (train if i < 2 else test).append(rel)
    _lines(root / "Partitions" / "Training_01.txt", train)
    _lines(root / "Partitions" / "Testing_01.txt", test)


def cars(root: Path) -> None:
    names = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"]
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        rows = []
        for label in range(3):
            for i in range(2):
                fname = f"{split}_{label}{i}.jpg"
                image(base / f"cars_{split}" / fname, label, 10 * label + i + (50 if split == "test" else 0))
                rows.append((label + 1, fname))
        sio.savemat(mat, {"annotations": np.array(rows, dtype=[("class", "O"), ("fname", "O")])})


def fgvc_aircraft(root: Path) -> None:
    variants = ["707-320", "F/A-18", "Cessna 172"]
    data = root / "fgvc-aircraft-2013b" / "data"
    _lines(data / "variants.txt", variants)
    splits = {"train": [], "val": [], "test": []}
    for label, v in enumerate(variants):
        for i, split in enumerate(["train", "train", "val", "val", "test", "test"]):
            image_id = f"{label}{i:06d}"
            image(data / "images" / f"{image_id}.jpg", label, 10 * label + i)
            splits[split].append(f"{image_id} {v}")
    splits["trainval"] = splits["train"] + splits["val"]
    for split, lines in splits.items():
        _lines(data / f"images_variant_{split}.txt", lines)


def dtd(root: Path) -> None:
    classes = ["banded", "blotchy", "braided", "bubbly", "bumpy", "polka-dotted"]
    data = root / "dtd" / "dtd"
    for split_index, split in enumerate(["train", "val", "test"]):
        lines = []
        for label, c in enumerate(classes):
            for i in range(2):
                name = f"{c}_{split_index}{i}.jpg"
                image(data / "images" / c / name, label, 100 * split_index + 10 * label + i)
                lines.append(f"{c}/{name}")
        _lines(data / "labels" / f"{split}1.txt", lines)


def pets(root: Path) -> None:
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]  # class ids follow case-insensitive order
    base = root / "oxford-iiit-pet"
    for split, offset in (("trainval", 0), ("test", 10)):
        lines = []
        for label, b in enumerate(breeds):
            for i in range(2):
                image_id = f"{b}_{offset + i}"
                image(base / "images" / f"{image_id}.jpg", label, 10 * label + i + offset)
                lines.append(f"{image_id} {label + 1} {1 if b[0].isupper() else 2} 1")
        _lines(base / "annotations" / f"{split}.txt", lines)


def caltech101(root: Path, per_class: int = 2) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes"] + [f"c{i:03d}" for i in range(97)]
    for label, folder in enumerate(sorted(folders)):
        for i in range(per_class):
            image(base / folder / f"image_{i + 1:04d}.jpg", label, 10 * label + i)
    (base / "Faces" / "notes.txt").write_text("not an image")


def flowers(root: Path) -> None:
    base = root / "flowers-102"
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    for label in range(102):
        for key in ids:
            labels.append(label + 1)
            ids[key].append(len(labels))
            image(base / "jpg" / f"image_{len(labels):05d}.jpg", label, len(labels))
    sio.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    sio.savemat(base / "setid.mat", {k: np.array(v) for k, v in ids.items()})


def stl10(root: Path, per_class: int = 2) -> None:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    _lines(base / "class_names.txt", published_classnames("stl10"))
    for split, seed in (("train", 0), ("test", 500)):
        labels = [c for c in range(10) for _ in range(per_class)]
        hwc = np.stack([pixels(c, seed + i, 96) for i, c in enumerate(labels)])
        hwc.transpose(0, 3, 2, 1).tofile(base / f"{split}_X.bin")  # stored column-major, as the release
        (np.array(labels, dtype=np.uint8) + 1).tofile(base / f"{split}_y.bin")


EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
           "PermanentCrop", "Residential", "River", "SeaLake"]


def eurosat(root: Path, per_class: int = 5) -> None:
    for label, c in enumerate(EUROSAT):
        for i in range(per_class):
            image(root / "eurosat" / "2750" / c / f"{c}_{i + 1}.jpg", label, 10 * label + i)


def resisc45(root: Path, per_class: int = 5) -> None:
    for label, c in enumerate(["airplane", "baseball_diamond", "sea_ice"]):
        for i in range(per_class):
            image(root / "NWPU-RESISC45" / c / f"{c}_{i + 1:03d}.jpg", label, 10 * label + i)


def gtsrb(root: Path) -> None:
    base = root / "gtsrb"
    rows = []
    for label in range(43):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        for i in range(2):
            image(folder / f"00000_{i:05d}.ppm", label, 10 * label + i)
        (folder / f"GT-{label:05d}.csv").write_text("Filename;ClassId\n")
        name = f"{label:05d}.ppm"
        image(base / "GTSRB" / "Final_Test" / "Images" / name, label, 1000 + label)
        rows.append([name, SIZE, SIZE, 0, 0, SIZE, SIZE, label])
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)


def country211(root: Path) -> None:
    for s, split in enumerate(["train", "valid", "test"]):
        for label in range(211):
            image(root / "country211" / split / f"C{label:03d}" / f"{s}.jpg", label, 1000 * s + label)


def imagenet1k(root: Path, per_class: int = 2) -> None:
    for split in ("train", "val"):
        for label, wnid in enumerate(IMAGENET_WNIDS[:3]):
            for i in range(per_class):
                image(root / split / wnid / f"{split}_{i}.JPEG", label, 10 * label + i + (0 if split == "val" else 50))


CAPTIONS = [["a red square", "a square, red and small"], ["a green field", "green grass"],
            ["a blue sky", "the sky is blue", "blue"], ["a dog", "a dog, running"], ["two cats", "cats"]]


def flickr30k(root: Path) -> None:
    lines = ["image,caption"]
    for i, caps in enumerate(CAPTIONS):
        image(root / f"{1000 + i}.jpg", i, i)
        lines += [f"{1000 + i}.jpg,{c}" for c in caps]
    _lines(root / "flickr30k_test_karpathy.txt", lines)


def mscoco_captions(root: Path) -> None:
    images, anns = [], []
    for i, caps in enumerate(CAPTIONS):
        name = f"COCO_val2014_{i:012d}.jpg"
        image(root / "val2014" / name, i, i)
        images.append({"id": 10 - i, "file_name": name})
        anns += [{"id": len(anns), "image_id": 10 - i, "caption": c} for c in caps]
    _lines(root / "coco_test_karpathy.json", [json.dumps({"images": images, "annotations": anns})])


MAKERS = {
    "food101": food101, "cifar10": lambda r: cifar(r, 10), "cifar100": lambda r: cifar(r, 100), "sun397": sun397,
    "cars": cars, "fgvc_aircraft": fgvc_aircraft, "dtd": dtd, "pets": pets, "caltech101": caltech101,
    "flowers": flowers, "stl10": stl10, "eurosat": eurosat, "resisc45": resisc45, "gtsrb": gtsrb,
    "country211": country211, "imagenet1k": imagenet1k, "flickr30k": flickr30k, "mscoco_captions": mscoco_captions,
}


def make(name: str, root) -> str:
    root = Path(root) / name
    root.mkdir(parents=True)
    MAKERS[name](root)
    return str(root)


def tiny_checkpoint(path, seed: int = 0) -> str:
    """A CLIP_TINY checkpoint as train.py writes it (``module.`` keys)."""
    import torch

    import models
    torch.manual_seed(seed)
    model = models.get_model("CLIP_TINY")
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return os.fspath(path)
