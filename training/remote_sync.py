"""--remote-sync URL (open_clip's flag): a copy of --output-dir on object storage.

The run writes to its local --output-dir as always (flock claim, atomic checkpoint replace,
appended log.txt, TensorBoard files), and the main process uploads every file that changed
since the last upload after each epoch's checkpoint and at the end. Each file is uploaded
whole, so the remote copy of a file is always one complete version: checkpoint.pt first,
then log.txt, so a log line never names an epoch whose checkpoint is not there yet.

Resuming from the remote copy: a run whose local --output-dir holds no checkpoint.pt (a new
node, a wiped scratch disk) first downloads checkpoint.pt, checkpoint_best.pt and log.txt
from the URL, and then resumes from them as from a local folder.

Two runs never sync to the same URL: the main process holds a claim on URL/train.claim for
the whole run (common.claims: S3 conditional PUT, heartbeat, takeover after
--claim-timeout seconds of silence).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from common import claims, storage

PULLED = ("checkpoint.pt", "checkpoint_best.pt", "log.txt")  # what a resume needs, in download order
FIRST, LAST = ("checkpoint.pt", "checkpoint_best.pt"), ("log.txt",)


def skipped(name: str) -> bool:
    """Local-only files: the folder's lock and unfinished temporaries of atomic writes."""
    return name.endswith(".lock") or ".tmp-" in name or name.startswith(".")


def local_files(output_dir: str) -> list[str]:
    """Relative names of the files to sync, checkpoints first and log.txt last."""
    names = []
    for folder, _, files in os.walk(output_dir):
        for f in files:
            if not skipped(f):
                names.append(os.path.relpath(os.path.join(folder, f), output_dir).replace(os.sep, "/"))

    def order(name: str) -> tuple[int, str]:
        return (0 if name in FIRST else 2 if name in LAST else 1, name)

    return sorted(names, key=order)


@dataclass
class RemoteSync:
    url: str
    output_dir: str
    claim: Optional[claims.Claim] = None
    uploaded: dict = field(default_factory=dict)  # name -> (size, mtime_ns) of the version uploaded

    def pull(self) -> list[str]:
        """Fill an output folder without checkpoint.pt from the remote copy; the names fetched."""
        if os.path.isfile(os.path.join(self.output_dir, "checkpoint.pt")):
            return []
        remote = set(storage.list_names(self.url))
        fetched = []
        for name in PULLED:
            if name in remote:
                local = os.path.join(self.output_dir, name)
                storage.download(storage.join(self.url, name), local)
                self.uploaded[name] = _stamp(local)  # the remote already holds this version
                fetched.append(name)
        return fetched

    def push(self) -> list[str]:
        """Upload every file changed since its last upload (whole objects); the names uploaded."""
        if self.claim is not None:
            self.claim.check()  # raises ClaimLost if another run took the URL over
        sent = []
        for name in local_files(self.output_dir):
            local = os.path.join(self.output_dir, name)
            stamp = _stamp(local)
            if self.uploaded.get(name) == stamp:
                continue
            with open(local, "rb") as f:
                storage.write_atomic(storage.join(self.url, name), lambda tmp: _copy(f, tmp))
            self.uploaded[name] = stamp
            sent.append(name)
        return sent

    def release(self) -> None:
        """Give up the URL's claim (the run ended, or failed)."""
        if self.claim is not None:
            self.claim.release()

    def close(self) -> None:
        try:
            self.push()
        finally:
            self.release()


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _copy(src, tmp: str) -> None:
    import shutil
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 8 << 20)


def start(url: str, output_dir: str, claim_timeout: float) -> RemoteSync:
    """Main process, after --output-dir is claimed: check the URL, claim it, pull what a resume
    needs. Errors are one line naming --remote-sync and the URL."""
    if not storage.is_url(url):
        raise ValueError(f"--remote-sync {url!r}: needs an object-storage URL such as s3://bucket/runs/name "
                         "(a local copy is --output-dir itself)")
    url = url.rstrip("/")
    try:
        storage.check_reachable(url)
        claims.check_atomic_create(url)
        claim = claims.claim_for(storage.join(url, "train"), f"--remote-sync {url}", claim_timeout)
        if not claim.try_acquire():
            raise ValueError(f"--remote-sync {url} is in use by {claim.holder()}; wait for that run to end, or for "
                             f"its claim to go stale (--claim-timeout {claim_timeout:g} s)")
        sync = RemoteSync(url, output_dir, claim)
        try:
            fetched = sync.pull()
        except BaseException:
            claim.release()
            raise
    except (storage.StorageError, claims.ClaimsUnsupported) as e:
        raise ValueError(f"--remote-sync: {e}") from None
    if fetched:
        print(f"=> --remote-sync: fetched {', '.join(fetched)} from {url} into {output_dir} to resume from them")
    return sync
