"""The datasets eval_benchmark.py knows: names (as CLIP_benchmark spells them), splits, the metric
each is reported with, the on-disk layout, and the class names and prompts CLIP published.

Class names and templates are data (evaluation/data/zeroshot_classification.json, from OpenAI's
CLIP `data/prompts.md`; ImageNet's from evaluation/imagenet_classes.py). The metric follows the CLIP paper
(Table 9) and SLIP's evaluation, which LaCLIP's tables use: mean per-class accuracy for FGVC
Aircraft, Oxford-IIIT Pets, Caltech-101 and Flowers-102, top-1 accuracy for the others.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import cache

from evaluation.imagenet_classes import IMAGENET_CLASSNAMES, OPENAI_TEMPLATES, SIMPLE_TEMPLATES

TOP1 = "acc1"
MEAN_PER_CLASS = "mean_per_class_recall"
CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "zeroshot_classification.json")


@dataclass(frozen=True)
class DatasetSpec:
    name: str                    # as CLIP_benchmark spells it (--dataset)
    title: str                   # column title in the paper's tables
    layout: str                  # what --dataset_root must hold; quoted in every layout error
    splits: tuple[str, ...]
    kind: str = CLASSIFICATION
    zeroshot_split: str = "test"  # what CLIP_benchmark evaluates zero-shot (it ignores --split where
    test_split: str = "test"      # a dataset has no official split, so that is "all" there)
    train_split: str = "train"
    val_split: str | None = None  # None: --val_proportion of the train split is held out
    metric: str = TOP1
    fetch: str = "manual"         # how to get the files (README / docs/benchmark.md)


def _tv(cls: str) -> str:
    return f"torchvision.datasets.{cls}(ROOT, download=True) writes this layout"


_SPECS = [
    DatasetSpec("food101", "Food-101", "<root>/food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}",
                ("train", "test"), fetch=_tv("Food101")),
    DatasetSpec("cifar10", "CIFAR-10", "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
                ("train", "test"), fetch=_tv("CIFAR10")),
    DatasetSpec("cifar100", "CIFAR-100", "<root>/cifar-100-python/{train, test, meta}",
                ("train", "test"), fetch=_tv("CIFAR100")),
    DatasetSpec("sun397", "SUN397", "<root>/SUN397/{ClassName.txt, a/abbey/sun_*.jpg, ...}; the train and test "
                "splits also need the official partition files <root>/Partitions/Training_01.txt and Testing_01.txt",
                ("all", "train", "test"), zeroshot_split="all", fetch=_tv("SUN397") + " (plus Partitions.zip)"),
    DatasetSpec("cars", "Cars", "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
                "cars_train/, cars_test/, cars_test_annos_withlabels.mat}", ("train", "test"),
                fetch="manual (Stanford's server is gone; the Kaggle copy 'stanford-cars-dataset' has these files)"),
    DatasetSpec("fgvc_aircraft", "Aircraft", "<root>/fgvc-aircraft-2013b/data/{variants.txt, images/<id>.jpg, "
                "images_variant_<split>.txt}", ("train", "val", "trainval", "test"), val_split="val",
                metric=MEAN_PER_CLASS, fetch=_tv("FGVCAircraft")),
    DatasetSpec("dtd", "DTD", "<root>/dtd/dtd/{images/<class>/<file>.jpg, labels/train1.txt, val1.txt, test1.txt}",
                ("train", "val", "test"), val_split="val", fetch=_tv("DTD")),
    DatasetSpec("pets", "Pets", "<root>/oxford-iiit-pet/{images/<id>.jpg, annotations/trainval.txt, "
                "annotations/test.txt}", ("trainval", "test"), train_split="trainval", metric=MEAN_PER_CLASS,
                fetch=_tv("OxfordIIITPet")),
    DatasetSpec("caltech101", "Caltech-101", "<root>/caltech101/101_ObjectCategories/<class>/<file>.jpg (102 "
                "folders, BACKGROUND_Google included)", ("all", "train", "test"), zeroshot_split="all",
                metric=MEAN_PER_CLASS, fetch="manual (101_ObjectCategories.tar.gz from data.caltech.edu)"),
    DatasetSpec("flowers", "Flowers", "<root>/flowers-102/{jpg/image_00001.jpg, imagelabels.mat, setid.mat}",
                ("train", "val", "test"), val_split="val", metric=MEAN_PER_CLASS, fetch=_tv("Flowers102")),
    DatasetSpec("stl10", "STL-10", "<root>/stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, "
                "class_names.txt}", ("train", "test"), fetch=_tv("STL10")),
    DatasetSpec("eurosat", "EuroSAT", "<root>/eurosat/2750/<class>/<file>.jpg (the RGB release)",
                ("all", "train", "val", "test"), zeroshot_split="all", val_split="val", fetch=_tv("EuroSAT")),
    DatasetSpec("resisc45", "RESISC45", "<root>/NWPU-RESISC45/<class>/<file>.jpg", ("all", "train", "val", "test"),
                zeroshot_split="all", val_split="val", fetch="manual (NWPU-RESISC45.rar, unpacked)"),
    DatasetSpec("gtsrb", "GTSRB", "<root>/gtsrb/{GTSRB/Training/<00000..00042>/*.ppm, GTSRB/Final_Test/Images/"
                "*.ppm, GT-final_test.csv}", ("train", "test"), fetch=_tv("GTSRB")),
    DatasetSpec("country211", "Country211", "<root>/country211/{train,valid,test}/<ISO code>/<file>.jpg",
                ("train", "valid", "test"), val_split="valid", fetch=_tv("Country211")),
    DatasetSpec("imagenet1k", "ImageNet", "<root>/{train,val}/<WordNet ID>/<file>.JPEG (any subset of the "
                "1000 WordNet-ID folders; 'test' reads val/)", ("train", "test"),
                fetch="manual (image-net.org; val/ sorted into WordNet-ID folders, e.g. with valprep.sh)"),
    DatasetSpec("flickr30k", "Flickr30k", "<root>/<image>.jpg, captions in --annotation_file (default "
                "<root>/flickr30k_<split>_karpathy.txt with 'image,caption' lines, or Karpathy's "
                "dataset_flickr30k.json)", ("train", "val", "test"), kind=RETRIEVAL,
                fetch="manual (Flickr30k images; Karpathy split annotations)"),
    DatasetSpec("mscoco_captions", "MSCOCO", "<root>/val2014/<image>.jpg, captions in --annotation_file "
                "(default <root>/coco_<split>_karpathy.json in COCO captions format, or Karpathy's "
                "dataset_coco.json)", ("train", "val", "test"), kind=RETRIEVAL,
                fetch="manual (COCO 2014 images; Karpathy split annotations)"),
]
CATALOG: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
# The paper's column order: the 15 downstream datasets (averaged), then ImageNet apart.
DOWNSTREAM = tuple(s.name for s in _SPECS if s.kind == CLASSIFICATION and s.name != "imagenet1k")


def get_spec(name: str) -> DatasetSpec:
    if name not in CATALOG:
        close = difflib.get_close_matches(name, CATALOG, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(CATALOG)})"
        raise ValueError(f"--dataset {name!r} is not a dataset this evaluation knows{hint}")
    return CATALOG[name]


@cache
def _published() -> dict:
    with open(_DATA, encoding="utf-8") as f:
        return json.load(f)


def published_classnames(name: str) -> list[str]:
    """CLIP's class names for ``name`` (label order of the dataset's own release)."""
    if name == "imagenet1k":
        return list(IMAGENET_CLASSNAMES)
    return list(_published()[name]["classnames"])


def templates_for(name: str, model_kind: str) -> list[str]:
    """CLIP's prompts for ``name``. ImageNet: the 7 LaCLIP templates for this project's presets
    (how the CC/RedCaps numbers were made), OpenAI's 80 for open_clip models (the LAION numbers)."""
    if name == "imagenet1k":
        return list(SIMPLE_TEMPLATES if model_kind == "preset" else OPENAI_TEMPLATES)
    return list(_published()[name]["templates"])
