"""The caption files a checkpoint was trained on, so a resume knows whether they changed.

A mid-epoch checkpoint (--save-every-steps) resumes by skipping the batches already used in the
sampler's order, which is a function of the sample count and (seed, epoch): over a CSV that gained,
lost or reordered rows, the rest of the epoch would repeat some samples and never reach others.
Every checkpoint of a CSV run therefore holds `data_identity`: the sample count and, for the CSV and
each rewrite file used, its size and SHA-256 (whole file, 8 MB blocks). A different identity is
refused inside an epoch and noted at an epoch end, where nothing of the old order is carried over.

Hashing CC12M's caption files (~5 GB with four rewrite files) takes seconds, so each digest is
remembered in OUTPUT_DIR/.data_sha256.jsonl under the file's stat (common/stat_memo.py): a repeat
run stats the files and reads nothing. Webdataset shards are identified by the stream's own
fingerprint (training/wds.py), not here.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from common.stat_memo import StatMemo, file_sha256

MEMO = ".data_sha256.jsonl"  # a dot file: local to the folder, never uploaded by --remote-sync


def _digests(paths: Sequence[str], memo_dir: Optional[str]) -> list[str]:
    if not memo_dir:
        return [file_sha256(p) for p in paths]
    memo = StatMemo(os.path.join(memo_dir, MEMO), "sha256")  # one that cannot be written: hashed afresh
    return [memo.value(p, lambda p=p: file_sha256(p)) for p in paths]


def csv_identity(csv_path: str, rewrite_files: Sequence[str], samples: int, memo_dir: Optional[str]) -> dict:
    """{"samples": N, "files": [{"flag", "path", "size", "sha256"}, ...]}: the CSV, then each rewrite file."""
    flagged = [("--train-data", csv_path)] + [("--augmented_caption_filelist", p) for p in rewrite_files]
    digests = _digests([p for _, p in flagged], memo_dir)
    return {"samples": samples,
            "files": [{"flag": flag, "path": path, "size": os.path.getsize(path), "sha256": digest}
                      for (flag, path), digest in zip(flagged, digests)]}


def changes(saved: dict, current: dict) -> list[str]:
    """'FLAG PATH' of each file whose size or hash differs (by position: the flags already match)."""
    return [f"{now['flag']} {now['path']!r}" for old, now in zip(saved.get("files", []), current["files"])
            if (old.get("size"), old.get("sha256")) != (now["size"], now["sha256"])]


def compare_on_resume(saved: Optional[dict], current: Optional[dict], inside: Optional[int], override: bool) -> list[str]:
    """Compare a checkpoint's data identity with this run's. inside: the epoch a mid-epoch checkpoint
    stopped in (None at an epoch end). Returns notes; a change inside an epoch raises ValueError
    naming the file, unless override (--resume-override)."""
    if current is None:  # shards: the stream's fingerprint covers them
        return []
    if saved is None:
        return [f"the checkpoint records no data identity (written before train.py kept one, or by another "
                f"script): cannot tell whether {current['files'][0]['path']!r} changed since"] if inside is not None else []
    changed = changes(saved, current)
    if not changed:
        return []
    also = f"; also changed: {', '.join(changed[1:])}" if changed[1:] else ""
    what = f"{changed[0]} changed since the checkpoint ({saved.get('samples')} samples then, {current['samples']} now{also}"
    if inside is None:
        return [f"{what}): epoch-end checkpoint, so training goes on over the files as they are now"]
    if override:
        return [f"--resume-override: {what}): finishing epoch {inside} on the new files, which repeats and "
                "skips some of its samples"]
    raise ValueError(f"{what}; saved inside epoch {inside}): resuming there would repeat and skip samples of "
                     "that epoch. Put the files back as they were, resume from an epoch-end checkpoint (--resume "
                     "epoch_N.pt with --save-frequency), or pass --resume-override to finish the epoch on the new files")
