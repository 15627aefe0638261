"""--remote-sync URL (open_clip's flag): a copy of --output-dir on object storage.

The run writes to its local --output-dir as always (flock claim, atomic checkpoint replace,
appended log.txt, TensorBoard files), and the main process uploads every file that changed
since the last upload after each epoch's checkpoint and at the end. Each file is uploaded
whole, so the remote copy of a file is always one complete version: checkpoint.pt first,
then log.txt, so a log line never names an epoch whose checkpoint is not there yet.

Resuming from the remote copy: at start the progress of the remote checkpoint.pt (epoch, and the
step inside it for a mid-epoch file) is read from its small record checkpoint.pt.sum and compared
with the local one (training/checkpoint_sums.py). The newer wins: a remote copy further on than
the local folder (a preempted node back with its old scratch disk) is downloaded over it, with a
note; an equal or older one leaves the local folder as it is. A folder without checkpoint.pt
(a new node) takes the remote copy. When either side's progress cannot be read with certainty
(no record: an older train.py's upload; a record of another upload), the run is refused in one
line rather than guess.

Never older over newer: the ETags of the remote checkpoint.pt and its record are kept from the
start and from each upload. Before checkpoint.pt is uploaded, the remote one must still be the
version this run read (else someone else wrote there: refused) and not further on than the local
one; the record is written after the checkpoint, with the checkpoint's ETag in it and an S3
conditional PUT on the record's ETag. A crash between the two uploads leaves a record that names
another ETag than the object's, which the next start reports as uncertain instead of trusting.

Two runs never sync to the same URL: the main process holds a claim on URL/train.claim for
the whole run (common.claims: S3 conditional PUT, heartbeat, takeover after
--claim-timeout seconds of silence).
"""
from __future__ import annotations

import os
import json
from dataclasses import dataclass, field
from typing import Optional

from common import claims, storage
from training import checkpoint_sums

LATEST, RECORD = "checkpoint.pt", "checkpoint.pt" + checkpoint_sums.SUFFIX
# what a resume needs, in download order (a checkpoint before its record, the log last)
PULLED = (LATEST, RECORD, "checkpoint_best.pt", "checkpoint_best.pt" + checkpoint_sums.SUFFIX, "log.txt")
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
class RemoteCopy:
    """What this run knows of the remote checkpoint.pt: its progress (None: none there, or unknown),
    the ETags of the object and of its record (None: absent), and why its progress is unknown."""
    progress: Optional[tuple[int, int]] = None
    etag: Optional[str] = None
    record_etag: Optional[str] = None
    version: Optional[dict] = None  # its record's version: size, sha256, epoch, steps
    unknown: str = ""


@dataclass
class RemoteSync:
    url: str
    output_dir: str
    claim: Optional[claims.Claim] = None
    uploaded: dict = field(default_factory=dict)  # name -> (size, mtime_ns) of the version uploaded
    remote: RemoteCopy = field(default_factory=RemoteCopy)

    def pull(self) -> list[str]:
        """Compare the remote and local progress; download the remote copy when the local folder has
        no checkpoint.pt or an older one. Returns the names fetched."""
        self.remote = read_remote(self.url)
        local = os.path.join(self.output_dir, LATEST)
        if self.remote.etag is None:
            return []
        if os.path.isfile(local):
            version, why = local_version(local)
            if why or self.remote.unknown:
                raise ValueError(f"--remote-sync {self.url}: cannot tell whether its {LATEST} or the local {local} "
                                 f"is further on ({self.remote.unknown or why}); move the one you do not want out "
                                 "of the way and rerun")
            if progress(version) >= self.remote.progress:
                if version["sha256"] == self.remote.version["sha256"]:
                    self.uploaded[LATEST] = _stamp(local)  # the remote already holds these bytes
                return []
            print(f"=> --remote-sync: {self.url}/{LATEST} ({_said(self.remote.progress)}) is newer than the local "
                  f"{local} ({_said(progress(version))}): continuing from the remote copy")
        names = set(storage.list_names(self.url))
        skip = {RECORD} if self.remote.unknown else set()  # a record of another upload would call it damaged
        if self.remote.unknown:
            checkpoint_sums.remove_record(local)
        else:  # listed before the download, so a download cut before the record's is not taken for damage
            checkpoint_sums.write_sums(local, [self.remote.version] + (_versions(local) or [])[:1])
        fetched = []
        for name in PULLED:
            if name in names and name not in skip:
                path = os.path.join(self.output_dir, name)
                storage.download(storage.join(self.url, name), path)
                self.uploaded[name] = _stamp(path)  # the remote already holds this version
                fetched.append(name)
        if self.remote.unknown:
            print(f"=> note: --remote-sync: {self.url}/{LATEST}: {self.remote.unknown}; it is resumed unverified")
        return fetched

    def push(self) -> list[str]:
        """Upload every file changed since its last upload (whole objects); the names uploaded."""
        if self.claim is not None:
            self.claim.check()  # raises ClaimLost if another run took the URL over
        sent = []
        for name in local_files(self.output_dir):
            local = os.path.join(self.output_dir, name)
            stamp = _stamp(local)
            if name == RECORD or self.uploaded.get(name) == stamp:
                continue  # (the record goes up with checkpoint.pt)
            if name == LATEST:
                sent += self._push_latest(local)
                continue
            with open(local, "rb") as f:
                storage.write_atomic(storage.join(self.url, name), lambda tmp: _copy(f, tmp))
            self.uploaded[name] = stamp
            sent.append(name)
        return sent

    def _push_latest(self, local: str) -> list[str]:
        """checkpoint.pt, only over the remote version this run read or wrote and never over further
        progress; then its record, with the object's ETag, by a conditional PUT."""
        stamp, url = _stamp(local), storage.join(self.url, LATEST)
        version, why = local_version(local)
        if self.remote.progress is not None and (why or progress(version) < self.remote.progress):
            raise ValueError(f"--remote-sync {self.url}: not uploading {local} ({why or _said(progress(version))}) over "
                             f"the remote {LATEST} ({_said(self.remote.progress)}), which is further on")
        if _etag(url) != self.remote.etag:
            raise ValueError(f"--remote-sync {self.url}: {LATEST} changed there since this run read it (another run "
                             "writing to the same URL?); not uploading over it. Compare the two and rerun")
        with open(local, "rb") as f:
            storage.write_atomic(url, lambda tmp: _copy(f, tmp))
        self.remote = RemoteCopy(None if why else progress(version), _etag(url), self.remote.record_etag)
        self.uploaded[LATEST] = stamp
        if version is None:
            return [LATEST]
        body = json.dumps({"format": checkpoint_sums.FORMAT, "versions": [version], "object_etag": self.remote.etag})
        self.remote.record_etag = _put_if(storage.join(self.url, RECORD), body.encode("utf-8"), self.remote.record_etag)
        self.remote.version = version
        self.uploaded[RECORD] = _stamp(checkpoint_sums.sum_path(local))
        return [LATEST, RECORD]

    def release(self) -> None:
        """Give up the URL's claim (the run ended, or failed)."""
        if self.claim is not None:
            self.claim.release()

    def close(self) -> None:
        try:
            self.push()
        finally:
            self.release()


def _said(progress: tuple[int, int]) -> str:
    epoch, steps = progress
    return f"inside epoch {epoch} after {steps} steps" if steps else f"epoch {epoch} done"


def progress(version: dict) -> tuple[int, int]:
    return int(version.get("epoch", 0)), int(version.get("steps", 0))


def local_version(path: str) -> tuple[Optional[dict], str]:
    """(the recorded version of a local checkpoint, '') ; (None, why) when its record cannot tell."""
    try:
        versions = checkpoint_sums.read_versions(path)
    except ValueError as err:
        return None, str(err)
    if versions is None:
        return None, f"{path} has no checksum record ({checkpoint_sums.sum_path(path)}) to read its progress from"
    if len(versions) > 1:  # a save cut between the checkpoint and its record: the bytes tell which
        result, why = checkpoint_sums.check(path)
        if result is None:
            return None, f"{path} is damaged: {why}"
        return result.version, ""
    return versions[0], ""


def _s3(op: str, url: str, **kwargs) -> dict:
    return storage.s3_object("--remote-sync", url, op, **kwargs)


def _versions(path: str) -> Optional[list[dict]]:
    try:
        return checkpoint_sums.read_versions(path) if os.path.isfile(path) else None
    except ValueError:
        return None


def _etag(url: str) -> Optional[str]:
    try:
        return _s3("head_object", url)["ETag"]
    except storage.NotFound:
        return None


def _put_if(url: str, body: bytes, etag: Optional[str]) -> str:
    """PUT only over version `etag` (None: only where there is no object); the new ETag."""
    condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        return _s3("put_object", url, Body=body, **condition)["ETag"]
    except storage.StorageError as err:
        if storage.http_status(err) in (409, 412):
            raise ValueError(f"--remote-sync {url}: changed since this run read it (another run writing to the "
                             "same URL?); not overwriting it") from None
        raise


def read_remote(url: str) -> RemoteCopy:
    """The remote checkpoint.pt's ETag and progress; `unknown` says why the progress is not certain."""
    etag = _etag(storage.join(url, LATEST))
    body, record_etag = storage.s3_read_versioned("--remote-sync", storage.join(url, RECORD))
    if etag is None:
        return RemoteCopy(record_etag=record_etag)
    if body is None:
        return RemoteCopy(None, etag, None, None, f"no progress record {RECORD} beside it (uploaded by an older "
                                                  "train.py?)")
    try:
        record = json.loads(body)
        version = record["versions"][0]
        done, _ = progress(version), version["sha256"]  # a record without a checksum is unreadable too
    except (ValueError, KeyError, IndexError, TypeError):
        return RemoteCopy(None, etag, record_etag, None, f"its progress record {RECORD} is unreadable")
    if record.get("object_etag") != etag:
        return RemoteCopy(None, etag, record_etag, None, f"its progress record {RECORD} describes another upload "
                                                         "(an upload cut between the two?)")
    return RemoteCopy(done, etag, record_etag, version)


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
