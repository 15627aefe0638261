"""`python -m rewrite.report`: a quality and diversity report of the rewriter's outputs.

    python -m rewrite.report --source captions.txt --rewrites out.chatgpt.txt out.bard.txt --out report/
    python -m rewrite.report --rewrites s3://bucket/rewrites --out report/   # shard outputs

writes DIR/report.json, DIR/index.html and its PNGs, and prints a short table. Inputs:
rewrite/report_inputs.py; metrics (defined in docs/report.md): rewrite/report_metrics.py;
the page: rewrite/report_page.py; the optional CLIP scores: rewrite/report_images.py.
Bad flags and files: one line naming the flag and the file, exit status 2.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from common import claims, storage
from common.locking import FileLock
from rewrite import report_inputs as inputs_mod
from rewrite.flags import as_int, as_switch, check_names, document, flag, run_fire
from rewrite.report_images import ImageSpec, image_agreement
from rewrite.report_metrics import (BetweenModes, Column, ModeStats, Reservoir, TextStats, fallback_text, normalised,
                                    sketch_note)
from rewrite.report_page import first_note, page, text_table

REPORT_VERSION = 1


@dataclass(frozen=True)
class Config:
    rewrites: Optional[str | list] = flag(None, "text outputs: one file per mode (OUT.txt OUT.bard.txt, or a comma "
                                                "list); shard outputs: the folder or prefix of NNNNN.parquet; local "
                                                "or any fsspec URL.")
    out: Optional[str] = flag(None, "folder for report.json, index.html and the PNGs (local or a URL).")
    source: Optional[str] = flag(None, "text outputs: the caption file that was rewritten.")
    modes: Optional[str | list] = flag(None, "the modes of the --rewrites files, in order (default: their "
                                             "progress records or .<mode>. names); shards: the columns to report "
                                             "(default: all).")
    examples: Optional[str] = flag(None, "the example pool the rewrites were made with, if not the shipped one "
                                         "(as the rewriter's --examples).")
    samples: int = flag(20, "lines shown on the page (a uniform sample).")
    seed: int = flag(0, "seed of the sampled lines.")
    exact_limit: int = flag(1 << 20, "distinct strings counted exactly up to this many, then estimated (KMV).")
    images: Optional[str] = flag(None, "image agreement: the shards' tars (pattern, folder or prefix) or, for text "
                                       "outputs, the training CSV (image_path,caption; with --root).")
    root: Optional[str] = flag(None, "the folder the CSV's image paths are under.")
    model: Optional[str] = flag(None, "with --images: a CLIP preset (CLIP_VITB16, ...) or an open_clip name.")
    pretrained: Optional[str] = flag(None, "with --images: the CLIP checkpoint (as eval_benchmark.py's --pretrained).")
    quickgelu: bool = flag(False, "open_clip models trained with QuickGELU.")
    trust_checkpoint: bool = flag(False, "allow a --pretrained file that pickles more than weights.")
    clip_samples: int = flag(1000, "lines scored against their images (a uniform sample).")
    batch_size: int = flag(64, "images per CLIP forward pass.")
    device: Optional[str] = flag(None, "cuda or cpu (default: cuda when available).")
    progress: bool = flag(True, "show a progress bar (after 2 s).")


MULTI = ("rewrites", "modes")  # --rewrites a.txt b.txt: several values after one flag


def resolve_report_flags(flags: dict) -> Config:
    """The flags fire bound (names of Config) -> a checked Config, before any input is read."""
    c = Config(**check_names(Config, flags))
    for name in ("rewrites", "out"):
        if getattr(c, name) in (None, True, ""):
            raise ValueError(f"--{name} is required")
    for name, low in (("samples", 0), ("seed", 0), ("clip_samples", 1), ("exact_limit", 16), ("batch_size", 1)):
        as_int(name, getattr(c, name), low)
    for name in ("quickgelu", "trust_checkpoint", "progress"):
        as_switch(name, getattr(c, name))
    image_flags = [n for n in ("model", "pretrained") if getattr(c, n) is not None]
    if c.images is not None and len(image_flags) < 2:
        raise ValueError("--images needs --model and --pretrained (the CLIP model that scores the images)")
    if c.images is None and (image_flags or c.root is not None):
        raise ValueError(f"--{(image_flags or ['root'])[0]} is for image agreement: give --images too")
    if c.images is not None:
        check_image_flags(c)
    return c


def check_image_flags(c: Config) -> None:
    """What image agreement needs, checked before the pass (which may take hours)."""
    from models.open_clip_arch import kind
    if not storage.exists(str(c.images)) and "{" not in str(c.images):
        raise ValueError(f"--images {c.images}: not found")
    if c.source is not None:  # text outputs: the training CSV and its image folder
        if storage.is_url(str(c.images)) or not os.path.isfile(str(c.images)):
            raise ValueError(f"--images {c.images}: for text outputs give the training CSV, a local file")
        if c.root is None or not os.path.isdir(str(c.root)):
            raise ValueError(f"--root {c.root}: not a folder (the folder the --images CSV's paths are under)")
    elif c.root is not None:
        raise ValueError("--root is for a training CSV (text outputs); shard outputs read their images from tars")
    kind(str(c.model))  # a preset or an open_clip name, told the close ones otherwise
    if not os.path.isfile(str(c.pretrained)):
        raise ValueError(f"--pretrained {c.pretrained}: file not found")
    if c.device is not None and str(c.device) not in ("cpu", "cuda") and not str(c.device).startswith("cuda:"):
        raise ValueError(f"--device {c.device!r}: give cpu or cuda")
    if c.device is not None and str(c.device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {c.device}: no CUDA device is visible")


def open_inputs(c: Config) -> inputs_mod.Inputs:
    rewrites, modes = inputs_mod.as_list(c.rewrites), inputs_mod.as_list(c.modes)
    if c.source is not None:
        return inputs_mod.text_inputs(str(c.source), rewrites, modes)
    if len(rewrites) > 1 or rewrites[0].endswith(".txt"):
        raise ValueError(f"--rewrites {','.join(rewrites)}: text outputs need --source, the captions they rewrite")
    return inputs_mod.shard_inputs(rewrites[0], modes)


@dataclass
class Analysis:
    """Every accumulator of one pass over the rows."""
    modes: tuple[str, ...]
    per_mode: dict[str, ModeStats]
    original: TextStats
    between: BetweenModes
    reservoir: Reservoir
    lines: int = 0
    blank: int = 0

    def add(self, batch: inputs_mod.Batch) -> None:
        self.lines += len(batch.captions)
        keep = [k for k, c in enumerate(batch.captions) if c.strip()]
        self.blank += len(batch.captions) - len(keep)
        if len(keep) < len(batch.captions):
            for m in self.modes:  # a blank caption's rewrite should be blank too
                col = batch.rewrites[m]
                self.per_mode[m].counts["rewrites_of_blank_captions"] += sum(
                    1 for k, c in enumerate(batch.captions) if not c.strip() and col[k].strip())
        captions = Column.of([batch.captions[k] for k in keep])
        columns = {m: Column.of([batch.rewrites[m][k] for k in keep]) for m in self.modes}
        fallbacks = [fallback_text(c) for c in captions.texts]
        self.original.add(captions)
        for m in self.modes:
            self.per_mode[m].add(captions, fallbacks, columns[m])
        if len(self.modes) > 1:
            self.between.add(columns)
        for i, k in enumerate(keep):
            slot = self.reservoir.slot()
            if slot is not None:  # the row is built only when it is kept
                self.reservoir.rows[slot] = (batch.ids[k], captions.texts[i],
                                             {m: columns[m].texts[i] for m in self.modes})


def analyse(inputs: inputs_mod.Inputs, pools: dict, c: Config) -> tuple[dict, list]:
    targets = {m: frozenset(normalised(t) for t in inputs_mod.pool_targets(p)) for m, p in pools.items()}
    size = max(c.samples, c.clip_samples if c.images is not None else 0)
    a = Analysis(inputs.modes, {m: ModeStats(c.exact_limit, targets[m]) for m in inputs.modes},
                 TextStats(c.exact_limit), BetweenModes(inputs.modes), Reservoir(size, c.seed))
    bar = tqdm(total=inputs.total, unit=" lines", delay=2.0, disable=not c.progress, file=sys.stderr)
    for batch in inputs_mod.batches(inputs):
        a.add(batch)
        bar.update(len(batch.captions))
    bar.close()
    shown = sorted(a.reservoir.rows[:c.samples], key=lambda r: r[0])
    report = {
        "version": REPORT_VERSION,
        "input": {"kind": inputs.kind, "source": inputs.source, "files": list(inputs.files.values()),
                  "modes": list(inputs.modes), "examples": c.examples},
        "lines": a.lines, "blank_captions": a.blank, "seed": c.seed,
        "original": a.original.summary(),
        "modes": {m: a.per_mode[m].summary(inputs.recorded.get(m)) for m in inputs.modes},
        "between_modes": a.between.summary(),
        "distinct_counting": sketch_note(c.exact_limit),
        "samples": [{"id": i if isinstance(i, int) else "/".join(i), "caption": cap, "rewrites": rw}
                    for i, cap, rw in shown],
        "images": None,
    }
    return report, a.reservoir.rows


def output_claim(out: str):
    """Two runs never write one report: flock locally, a claim object on S3, none elsewhere (said)."""
    target = storage.join(out, "report")
    if not storage.is_url(out):
        if os.path.exists(storage.local_path(out)) and not os.path.isdir(storage.local_path(out)):
            raise ValueError(f"--out {out} is a file; give a folder")
        os.makedirs(storage.local_path(out), exist_ok=True)
        return FileLock(target, f"--out {out}").acquire()
    if storage.protocol(out) == "s3":
        claim = claims.S3Claim(target + claims.CLAIM_SUFFIX, claims.DEFAULT_TIMEOUT_S)
        if not claim.try_acquire():
            raise ValueError(f"--out {out} is being written by {claim.holder()}")
        return claim
    print(f"note: --out {out}: no lock on {storage.protocol(out)}:// (two runs could overwrite each other)",
          file=sys.stderr)
    return None


def run(c: Config) -> dict:
    inputs = open_inputs(c)
    pools = inputs_mod.load_pools(inputs, None if c.examples is None else str(c.examples))
    claim = output_claim(str(c.out))
    try:
        report, sampled = analyse(inputs, pools, c)
        if c.images is not None:
            spec = ImageSpec(str(c.model), str(c.pretrained), str(c.images), None if c.root is None else str(c.root),
                             c.quickgelu, c.trust_checkpoint, c.batch_size, c.device)
            report["images"] = image_agreement(spec, inputs.kind, sampled[:c.clip_samples], inputs.modes)
        for name, data in page(report).items():
            storage.write_bytes(storage.join(str(c.out), name), data)
        storage.write_bytes(storage.join(str(c.out), "report.json"),
                            json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"))
    finally:
        if claim is not None:
            claim.release()
    return report


def main(**flags) -> None:
    c = resolve_report_flags(flags)
    report = run(c)
    print(text_table(report))
    note = first_note(report)
    if note:
        print(note)
    print(f"{report['lines']} lines ({report['blank_captions']} with a blank caption left out); "
          f"report: {storage.join(str(c.out), 'index.html')}")


document(main, Config, "A quality and diversity report of rewritten captions (docs/report.md).")


def cli(argv: Optional[list[str]] = None) -> int:
    return run_fire(main, Config, sys.argv[1:] if argv is None else argv, "rewrite.report", multi=MULTI)


if __name__ == "__main__":
    sys.exit(cli())
