"""Image-caption test sets for retrieval: Flickr30k and MSCOCO as CLIP_benchmark reads them.

Three annotation formats are read, each with several captions per image:
- CLIP_benchmark's Flickr text file: a header line, then ``<image>.jpg,<caption>`` lines;
- COCO's captions JSON (``images`` + ``annotations``), e.g. coco_test_karpathy.json;
- Karpathy's split JSON (dataset_flickr30k.json, dataset_coco.json): ``images`` with a
  ``split`` and ``sentences``; only images of the requested split are kept.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

from evaluation.catalog import get_spec
from evaluation.readers import LayoutError, Listing, SplitData, check_split


@dataclass
class CaptionSet:
    dataset: str
    split: str
    paths: list[str]            # one per image
    captions: list[list[str]]   # the captions of each image
    annotation_file: str
    notes: list[str] = field(default_factory=list)  # images and captions left out, for the result

    def images(self) -> SplitData:
        """The images as a split whose 'label' is the image index (so skipped images are known)."""
        return SplitData(self.dataset, self.split, Listing(list(range(len(self.paths))), self.paths), [], [])


def default_annotation(name: str, root: str, split: str) -> str:
    if name == "flickr30k":
        return os.path.join(root, f"flickr30k_{split}_karpathy.txt")
    return os.path.join(root, f"coco_{split}_karpathy.json")


def _flickr_txt(path: str, image_dir: str) -> tuple[list[str], list[list[str]]]:
    data: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        f.readline()  # header
        for number, line in enumerate(f, start=2):
            line = line.strip()
            if not line:
                continue
            image, sep, caption = line.partition(".jpg,")  # captions may hold commas
            if not sep:
                raise LayoutError(f"--annotation_file: line {number} of {path!r} is not '<image>.jpg,<caption>'")
            data[image + ".jpg"].append(caption)
    return [os.path.join(image_dir, k) for k in data], list(data.values())


def _coco_json(obj: dict, image_dir: str) -> tuple[list[str], list[list[str]]]:
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in obj["annotations"]:
        captions[ann["image_id"]].append(ann["caption"])
    files = {img["id"]: img["file_name"] for img in obj["images"]}
    ids = sorted(files)  # torchvision's CocoCaptions order
    return [os.path.join(image_dir, files[i]) for i in ids], [captions[i] for i in ids]


def _karpathy_json(obj: dict, root: str, split: str) -> tuple[list[str], list[list[str]]]:
    images = [img for img in obj["images"] if img.get("split") == split]
    return ([os.path.join(root, img.get("filepath", ""), img["filename"]) for img in images],
            [[s["raw"] for s in img["sentences"]] for img in images])


def read_captions(name: str, root: str, split: str, annotation_file: str | None = None) -> CaptionSet:
    spec = get_spec(name)
    check_split(spec, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--dataset_root: folder {root!r} does not exist (expected {spec.layout})")
    path = annotation_file or default_annotation(name, root, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--annotation_file: {path!r} does not exist (expected {spec.layout})")
    image_dir = root if name == "flickr30k" else os.path.join(root, "train2014" if split == "train" else "val2014")
    try:
        if path.endswith(".txt"):
            paths, captions = _flickr_txt(path, image_dir)
        else:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if "annotations" in obj:
                paths, captions = _coco_json(obj, image_dir)
            else:
                paths, captions = _karpathy_json(obj, root, split)
    except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, LayoutError):
            raise
        raise LayoutError(f"--annotation_file: {path!r} is neither CLIP_benchmark's caption file nor COCO or "
                          f"Karpathy JSON ({type(err).__name__}: {err})") from err
    paths, captions, notes = _drop_uncaptioned(paths, captions)
    if not captions:
        raise LayoutError(f"--annotation_file: {path!r} holds no captioned image for split {split!r}")
    return CaptionSet(name, split, paths, captions, path, notes)


def _drop_uncaptioned(paths: list[str], captions: list[list[str]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Blank captions are no query, and an image without a caption can be no one's answer: scoring
    it would count a miss for every model alike. Both are left out and counted."""
    blank = sum(not c.strip() for caps in captions for c in caps)
    kept = [(p, [c for c in caps if c.strip()]) for p, caps in zip(paths, captions)]
    bare = [p for p, caps in kept if not caps]
    kept = [(p, caps) for p, caps in kept if caps]
    notes = []
    if bare:
        shown = ", ".join(os.path.basename(p) for p in bare[:3]) + (", ..." if len(bare) > 3 else "")
        notes.append(f"{len(bare)} images without captions left out of retrieval: {shown}")
    if blank:
        notes.append(f"{blank} blank captions left out of retrieval (not used as queries)")
    return [p for p, _ in kept], [caps for _, caps in kept], notes
