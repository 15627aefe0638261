"""What a webdataset run says or settles at start-up, before any shard streams: empty tars left
out (a loader worker whose shards hold no sample would fail with a worker traceback), rewrite
sources not found or partial, and a --train-num-samples above the samples the shards hold when
their counts are known (img2dataset's NNNNN_stats.json, or a sizes.json as open_clip reads)."""
from __future__ import annotations

import dataclasses
import json
import os

from common.tar_keys import holds_no_member
from training.wds import StreamSpec

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")  # webdataset opens these itself


def without_empty_tars(spec: StreamSpec) -> tuple[StreamSpec, list[str]]:
    """(the spec without the local tars that hold no member, those tars): a loader worker with
    only empty shards would fail with a worker traceback."""
    empty = [u for u in spec.urls if not u.startswith(REMOTE_PREFIXES) and holds_no_member(u)]
    if not empty:
        return spec, []
    if len(empty) == len(spec.urls):
        raise ValueError(f"--train-data: all {len(empty)} shards are empty tars (e.g. {empty[0]})")
    kept = tuple(u for u in spec.urls if u not in set(empty))
    return dataclasses.replace(spec, urls=kept), empty


def empty_note(empty: list[str]) -> list[str]:
    return [f"{len(empty)} --train-data shards are empty tars (e.g. {empty[0]}): left out"] if empty else []


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def known_sample_count(urls: tuple[str, ...]) -> tuple[int, str] | None:
    """(samples, where from) when every shard's count is known: img2dataset's NNNNN_stats.json
    ("successes") beside each tar, or a sizes.json ({"NNNNN.tar": n}) in its folder."""
    total, sources, sizes = 0, set(), {}
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            return None
        folder, name = os.path.split(url)
        stats = os.path.join(folder, name[: -len(".tar")] + "_stats.json")
        try:
            if os.path.isfile(stats):
                total += int(_read_json(stats)["successes"])
                sources.add("_stats.json")
                continue
            if folder not in sizes:
                path = os.path.join(folder, "sizes.json")
                sizes[folder] = _read_json(path) if os.path.isfile(path) else {}
            total += int(sizes[folder][name])
            sources.add("sizes.json")
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total, " and ".join(sorted(sources))


def start_notes(spec: StreamSpec) -> list[str]:
    notes = []
    missing = spec.rewrites.missing if spec.rewrites else ()
    if missing:
        notes.append(f"{len(missing)} --rewrite-data files do not exist (e.g. {missing[0]}): the samples of "
                     "their shards train on their original captions, counted as missing_rewrites in log.txt")
    notes += spec.rewrites.notes if spec.rewrites else ()
    known = known_sample_count(spec.urls)
    if known and not spec.resampled and spec.num_samples > known[0]:
        notes.append(f"--train-num-samples {spec.num_samples} is above the {known[0]} samples the shards hold "
                     f"({known[1]}): each epoch reads them {spec.num_samples / max(known[0], 1):.1f} times")
    return notes
