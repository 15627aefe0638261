"""Image agreement for `python -m rewrite.report --images ... --model ... --pretrained ...`: the
CLIP score (cosine similarity of the normalised image and text embeddings) of each sampled
line's original caption and of every mode's rewrite against the line's image, through the
evaluation package's loaders (evaluation/models.py: the presets and open_clip models that
eval_benchmark.py loads).

Images: for text outputs, the training CSV (`image_path,caption`, sample k = line k of
--source) and --root; for shard outputs, the img2dataset tars (a brace pattern, or the folder
or prefix holding them), shard NNNNN.parquet's row joined by key with NNNNN.tar's sample.
Lines without an image, unreadable images and CSV rows whose caption is not the line's are
counted, never scored.
"""
from __future__ import annotations

import io
import itertools
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from common import storage
from common.images import IMAGE_EXTENSIONS, open_rgb
from common.tar_keys import keyed_samples
from common.tar_stream import is_storage_failure
from rewrite.report_metrics import ratio

PERCENTILES = (5, 25, 50, 75, 95)
BINS = np.linspace(-0.2, 0.6, 33)  # CLIP cosine scores of real pairs lie around 0.2-0.4


@dataclass
class ImageSpec:
    model: str
    pretrained: str
    images: str
    root: Optional[str] = None
    quickgelu: bool = False
    trust_checkpoint: bool = False
    batch_size: int = 64
    device: Optional[str] = None


def _csv_images(spec: ImageSpec, sampled: list[tuple], skipped: Counter) -> Iterator[tuple]:
    """Rows (line, caption, rewrites) -> (caption, rewrites, image) (line k = the CSV's sample k)."""
    from training.captions import read_caption_csv
    if storage.is_url(spec.images):
        raise ValueError(f"--images {spec.images}: a training CSV must be a local file (tars may be URLs)")
    if spec.root is None:
        raise ValueError(f"--images {spec.images} is a CSV: give --root, the folder its image paths are under")
    try:
        table = read_caption_csv(spec.images)
    except ValueError as e:
        raise ValueError(str(e).replace("--train-data", "--images")) from None
    for line, caption, rewrites in sampled:
        if line >= len(table.paths):
            skipped["no_csv_row"] += 1
        elif table.captions[line].strip() != caption.strip():
            skipped["caption_mismatch"] += 1  # the CSV is not the --source these lines came from
        else:
            try:
                image = open_rgb(os.path.join(spec.root, table.paths[line]))
            except OSError:
                skipped["unreadable_image"] += 1
                continue
            yield caption, rewrites, image


def _tar_locations(images: str) -> dict[str, str]:
    """stem -> tar: a brace pattern's tars, or the NNNNN.tar in a folder or prefix."""
    if images.endswith(".tar"):
        found, _ = storage.expand(images)
    else:
        found = [storage.join(images, n) for n in storage.list_names(images) if n.endswith(".tar")]
    if not found:
        raise ValueError(f"--images {images}: no .tar shards found there")
    return {storage.local_path(p).rstrip("/").rsplit("/", 1)[-1][:-len(".tar")]: p for p in found}


def _tar_images(spec: ImageSpec, sampled: list[tuple], skipped: Counter) -> Iterator[tuple]:
    """Rows ((stem, key), caption, rewrites) -> (caption, rewrites, the image of that key in tar `stem`)."""
    tars = _tar_locations(spec.images)
    wanted: dict[str, dict] = defaultdict(dict)
    for (stem, key), caption, rewrites in sampled:
        wanted[stem][key] = (caption, rewrites)
    for stem, rows in wanted.items():
        if stem not in tars:
            skipped["no_tar"] += len(rows)
            continue
        broken = []

        def damaged(exn: Exception, url: str = tars[stem]) -> bool:
            if is_storage_failure(url, exn):  # a dropped connection is not a damaged tar: stop, say so
                raise storage.StorageError(f"--images {url}: reading failed ({exn})") from exn
            broken.append(exn)
            return True  # webdataset goes on after the damage where it can

        for sample in keyed_samples(tars[stem], handler=damaged):
            row = rows.pop(sample["__key__"], None)
            if row is None:
                continue
            data = next((v for k, v in sample.items() if ("." + k) in IMAGE_EXTENSIONS), None)
            try:
                image = open_rgb(io.BytesIO(data or b""))
            except OSError:
                skipped["unreadable_image"] += 1
                continue
            yield (*row, image)
        if broken:
            skipped["damaged_tar"] += 1
        if rows:
            skipped["no_image_in_tar"] += len(rows)


def _scores(spec: ImageSpec, rows: Iterator[tuple], modes: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Cosine scores per column ('original' and each mode), NaN where a text is blank; images are
    encoded a batch at a time as they are read (never all held)."""
    import torch
    import torch.nn.functional as F
    from evaluation.models import load_for_eval
    device = torch.device(spec.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    em = load_for_eval(spec.model, spec.pretrained, spec.quickgelu, device, flag="--pretrained",
                       trust=spec.trust_checkpoint)
    columns = ("original", *modes)
    scores = {c: [] for c in columns}
    with torch.no_grad():
        while chunk := list(itertools.islice(rows, spec.batch_size)):
            pixels = torch.stack([em.transform(img) for _, _, img in chunk]).to(device)
            image = F.normalize(em.model.encode_image(pixels).float(), dim=-1)
            for c in columns:
                texts = [caption if c == "original" else rewrites[c] for caption, rewrites, _ in chunk]
                text = F.normalize(em.model.encode_text(em.tokenizer(texts).to(device)).float(), dim=-1)
                cos = (image * text).sum(-1).cpu().numpy().astype(np.float64)
                cos[[not t.strip() for t in texts]] = np.nan
                scores[c].append(cos)
    return {c: np.concatenate(v) if v else np.empty(0) for c, v in scores.items()}


def _score_summary(values: np.ndarray, original: np.ndarray) -> dict:
    """One column's scores (NaN: not scored) against the original captions' scores."""
    ok = ~np.isnan(values)
    v = values[ok]
    both = ok & ~np.isnan(original)
    return {"n": int(ok.sum()), "mean": float(v.mean()) if len(v) else None,
            "percentiles": {str(p): float(np.percentile(v, p)) for p in PERCENTILES} if len(v) else None,
            "histogram": {"edges": BINS.tolist(), "counts": np.histogram(np.clip(v, BINS[0], BINS[-1]), BINS)[0].tolist()},
            "above_original": ratio(int((values[both] > original[both]).sum()), int(both.sum())),
            "mean_minus_original": float((values[both] - original[both]).mean()) if both.any() else None}


def image_agreement(spec: ImageSpec, kind: str, sampled: list[tuple], modes: tuple[str, ...]) -> dict:
    """The `images` object of report.json for the sampled rows (id, caption, {mode: rewrite})."""
    skipped: Counter = Counter()
    read = _csv_images if kind == "text" else _tar_images
    scores = _scores(spec, read(spec, sampled, skipped), modes)
    scored = len(scores["original"])
    if not scored:
        raise ValueError(f"--images {spec.images}: none of the {len(sampled)} sampled lines has a readable image "
                         f"there ({dict(skipped)})")
    return {"model": spec.model, "pretrained": spec.pretrained, "score": "cosine similarity of the normalised "
            "CLIP image and text embeddings", "lines_sampled": len(sampled), "lines_scored": scored,
            "skipped": dict(skipped), "columns": {c: _score_summary(v, scores["original"]) for c, v in scores.items()}}
