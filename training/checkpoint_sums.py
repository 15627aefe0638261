"""A checksum beside every training checkpoint, so a damaged file is refused, not trained on.

torch's zip reader does not check the CRCs it stores: bytes flipped inside a tensor load as
other numbers. Each checkpoint FILE therefore gets `FILE.sum`, a small JSON record:

    {"format": 1, "versions": [{"size": N, "sha256": "...", "epoch": E, "steps": K}, ...]}

`epoch` is the checkpoint's epoch field (epochs completed) and `steps` the optimizer steps done
inside epoch E (0 at an epoch end): the file's progress, which --remote-sync compares without
downloading the checkpoint. The SHA-256 is taken while torch.save writes (no second read), and
checked in full on resume: a resume reads every byte of the file anyway, and SHA-256 (with the
CPU's SHA instructions) runs faster than torch.load (bench/bench_resume_checks.py).

Crash safety: the record is replaced before and after the checkpoint. Before the rename it lists
the new version and the one on disk; after, the new one only. A crash between the two leaves a
file that matches one listed version, so a file that matches none was damaged after it was written.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from common.fileio import atomic_write, write_json_atomic
from common.stat_memo import file_sha256

SUFFIX = ".sum"
FORMAT = 1


def sum_path(path: str) -> str:
    return path + SUFFIX


class _Hashing:
    """A write-only file object that hashes what passes through: torch.save writes a zip to a file
    object in one forward pass (it is given no seek), so the digest is the file's."""

    def __init__(self, f) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def read_versions(path: str) -> Optional[list[dict]]:
    """The versions recorded beside checkpoint `path`; None when there is no record. A record that
    is not ours (hand-edited, cut) is a ValueError naming it."""
    where = sum_path(path)
    try:
        with open(where, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{where!r}: checksum record unreadable ({err}); remove it to load {path!r} unverified") from None
    versions = record.get("versions") if isinstance(record, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, dict) and {"size", "sha256"} <= set(v)
                                                  for v in versions):
        raise ValueError(f"{where!r}: not a checksum record of {path!r}; remove it to load the file unverified")
    return versions


def write_sums(path: str, versions: list[dict]) -> None:
    write_json_atomic(sum_path(path), {"format": FORMAT, "versions": versions})


def remove_record(path: str) -> None:
    try:
        os.remove(sum_path(path))
    except FileNotFoundError:
        pass


def progress_of(ckpt: dict) -> dict:
    """(epoch, steps) of a checkpoint dict, as recorded beside it."""
    inside = ckpt.get("epoch_progress")
    return {"epoch": int(ckpt.get("epoch", 0)), "steps": int(inside["steps"]) if inside else 0}


def _commit(path: str, make: Callable[[str], dict]) -> dict:
    """make(tmp) writes the new file and returns its version; the record lists it with the old one
    while the file is replaced (see the module note), then alone."""
    try:
        old = read_versions(path) or []
    except ValueError:
        old = []  # an unreadable record describes nothing: the new file gets a fresh one
    made: list[dict] = []

    def write(tmp: str) -> None:
        made.append(make(tmp))
        write_sums(path, made + old[:1])

    atomic_write(path, write)
    write_sums(path, made)
    return made[0]


def save(obj: dict, path: str) -> dict:
    """torch.save(obj) to `path` atomically with its checksum record; returns the version."""
    def make(tmp: str) -> dict:
        with open(tmp, "wb") as f:
            hashing = _Hashing(f)
            torch.save(obj, hashing)
        return {"size": hashing.size, "sha256": hashing.h.hexdigest(), **progress_of(obj)}

    return _commit(path, make)


def link(src: str, dst: str, version: dict, place: Callable[[str, str], Any]) -> None:
    """`dst` becomes `src`'s bytes (place(src, tmp): a hard link or a copy), with `version` recorded."""
    def make(tmp: str) -> dict:
        place(src, tmp)
        return dict(version)

    _commit(dst, make)


@dataclass(frozen=True)
class Verified:
    path: str
    verified: bool  # False: no checksum record beside the file (another script's file)
    version: Optional[dict] = None  # the recorded version the file matches: size, sha256, epoch, steps


def check(path: str) -> tuple[Optional[Verified], str]:
    """(the result, '') when the file is intact or has no record; (None, why) when it matches no
    recorded version."""
    versions = read_versions(path)
    if versions is None:
        return Verified(path, False), ""
    size = os.path.getsize(path)
    sized = [v for v in versions if v["size"] == size]
    if not sized:
        return None, f"it holds {size} bytes, the checkpoint written there {versions[0]['size']}"
    digest = file_sha256(path)
    for v in sized:
        if v["sha256"] == digest:
            return Verified(path, True, v), ""
    return None, "its SHA-256 is not the one recorded when it was written"


def verify(path: str, flag: str = "--resume") -> Verified:
    """The file checked against its record; a mismatch is one line naming the file, with an intact
    older checkpoint of the same folder offered when there is one."""
    result, why = check(path)
    if result is not None:
        return result
    offer = intact_alternative(path)
    hint = (f"an intact older checkpoint is {offer.path} (epoch {offer.version['epoch']}"
            f"{', step ' + str(offer.version['steps']) if offer.version['steps'] else ''}): pass --resume "
            f"{offer.path} to continue from it" if offer else
            "no intact older checkpoint (checkpoint_best.pt, epoch_N.pt) is in its folder")
    raise ValueError(f"{flag} {path!r} is damaged: {why} ({sum_path(path)}); {hint}")


EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def intact_alternative(path: str) -> Optional[Verified]:
    """The newest checkpoint beside `path` (checkpoint.pt, checkpoint_best.pt, epoch_N.pt) that has a
    record and matches it; files that are the same inode as `path` share its damage and are skipped."""
    folder = os.path.dirname(os.path.abspath(path))
    names = ["checkpoint.pt", "checkpoint_best.pt"] + sorted(
        (os.path.basename(p) for p in glob.glob(os.path.join(folder, "epoch_*.pt"))
         if EPOCH_FILE.fullmatch(os.path.basename(p))),
        key=lambda n: -int(EPOCH_FILE.fullmatch(n).group(1)))
    found = []
    for name in names:
        other = os.path.join(folder, name)
        if not os.path.isfile(other) or os.path.samefile(other, path):
            continue
        try:
            result, _ = check(other)
        except (OSError, ValueError):
            continue
        if result is not None and result.verified:
            found.append(result)
    return max(found, key=lambda r: (r.version["epoch"], r.version["steps"]), default=None)
