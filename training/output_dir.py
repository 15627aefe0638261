"""The --output-dir of a training run: claimed on the main process before any other work
(created, checked writable, locked for the whole run so a second train.py on it stops at
once, checkpoint temporaries left by a crash removed), and the one-line message of a
checkpoint that could not be written."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from common.fileio import cannot_write_in
from common.locking import FileLock

LOCK_NAME = "train"  # the lock is OUTPUT_DIR/train.lock, held by the main process
# common.fileio.temp_path's names of checkpoints and their checksum records (training/checkpoint_sums.py)
CHECKPOINT_TEMPORARY = re.compile(r"(checkpoint(_best)?|epoch_\d+)\.pt(\.sum)?\.tmp-\d+")


def lock_target(output_dir: str) -> Path:
    return Path(output_dir) / LOCK_NAME


def remove_temporaries(output_dir: str) -> list[str]:
    """checkpoint*.pt.tmp-PID files: only a crashed save leaves one, and while this run holds
    the folder's lock no other save can be writing one."""
    names = sorted(n for n in os.listdir(output_dir) if CHECKPOINT_TEMPORARY.fullmatch(n))
    for name in names:
        os.remove(os.path.join(output_dir, name))
    return names


def claim_output_dir(output_dir: str) -> FileLock:
    """Create, check and lock --output-dir; raises ValueError naming it (LockHeld names the holder)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {output_dir!r}: cannot create it ({e.strerror or e})") from None
    reason = cannot_write_in(output_dir)
    if reason:
        raise ValueError(f"--output-dir {output_dir!r}: cannot write in it ({reason})")
    lock = FileLock(lock_target(output_dir), f"--output-dir {output_dir!r}").acquire()
    removed = remove_temporaries(output_dir)
    if removed:
        print(f"=> removed {len(removed)} unfinished checkpoint file{'s' if len(removed) > 1 else ''} left by an "
              f"earlier run that stopped while saving: {', '.join(removed)}")
    return lock


def _free_space(folder: str) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free there"
    except OSError:
        return "free space unknown"


def save_failed(output_dir: str, name: str, err: BaseException) -> ValueError:
    """One line for a checkpoint write that failed (full disk, read-only mount, quota):
    torch's message without the C++ location, and the free space."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    return ValueError(f"--output-dir {output_dir!r}: saving {name} failed ({text}); {_free_space(output_dir)}; "
                      "the previous checkpoint.pt is unchanged")
