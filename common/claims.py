"""Claims: at most one live holder per output, on a local disk or on object storage.

Local paths keep common.locking's flock (the kernel frees it when the holder dies).

Object storage has no locks, so a claim is a small object `TARGET.claim` created only if
absent: an S3 PUT with `If-None-Match: *` (the server answers 412 when it exists). The object
holds the holder's host, pid, a random token and a heartbeat time; the holder refreshes the
heartbeat every timeout/4 from a background thread, and before each commit (`check()`), by a
PUT with `If-Match: <its own ETag>`. A claim whose heartbeat is older than `timeout` (its holder
died or hung) is taken over by a conditional replace of exactly the version that was read
(`If-Match: <ETag read>`): of two takers, the server lets one through, the other gets 412. A
holder whose refresh gets 412 has lost the claim and stops before its next commit
(ClaimLost). Release is a conditional delete of its own version, so it never removes another
holder's claim. A holder on the taker's own machine (same host name, boot id and pid namespace)
whose process is gone (no such pid, a zombie, or a pid reused by a process started at another
time) is taken over at once: a rerun right after kill -9 does not wait out the timeout. Claims
written without a boot id (an earlier version, or no /proc) wait for the timeout as before.
The heartbeat is the holder's wall clock compared with the taker's: nodes must agree on the
time to well within the timeout (NTP gives milliseconds).

Before the first claim a run checks once that the server really refuses a second
create-if-absent (`check_atomic_create`); a server that ignores the header (an old MinIO or
S3 clone) is refused rather than trusted. Backends without such a create are refused with a
message naming them: there is no unsafe fallback.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from common import storage
from common.locking import FileLock

CLAIM_SUFFIX = ".claim"
DEFAULT_TIMEOUT_S = 300.0  # --claim_timeout: a heartbeat older than this is a dead holder's
ATOMIC_CREATE = {"s3": "S3 conditional PUT (If-None-Match: *)"}


class ClaimLost(OSError):
    """Another run took this claim over (our heartbeat was older than its timeout)."""


class ClaimsUnsupported(ValueError):
    """The backend offers no atomic create-if-absent, so claims there would be unsafe."""


class Claim(Protocol):
    def try_acquire(self) -> bool: ...
    def check(self) -> None: ...
    def release(self) -> None: ...
    def holder(self) -> str: ...


@dataclass
class LocalClaim:
    """A local path's claim: flock on TARGET.lock (common.locking)."""
    lock: FileLock

    def try_acquire(self) -> bool:
        return self.lock.try_acquire()

    def check(self) -> None:
        """An flock cannot be taken over while its process lives."""

    def release(self) -> None:
        self.lock.release()

    def holder(self) -> str:
        from common.locking import describe_holder
        return describe_holder(self.lock.path)


def _is_precondition_failed(err: BaseException) -> bool:
    """412 (or S3's 409 ConditionalRequestConflict for a race on the same key)."""
    for e in (err, err.__cause__):
        resp = getattr(e, "response", None) or {}
        code = str(resp.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            return True
    return isinstance(err, FileExistsError)


@dataclass
class S3Claim:
    """A claim object on S3 (or an S3 API that honours If-None-Match / If-Match)."""
    url: str  # the claim object: TARGET.claim
    timeout: float
    etag: Optional[str] = None
    lost: bool = False
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _stop: Optional[threading.Event] = None

    def _s3(self, op: str, **kwargs) -> dict:
        return storage.s3_object("claim", self.url, op, **kwargs)

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), **_machine(),
                           "started": _process_start(os.getpid()), "token": self.token,
                           "heartbeat": time.time(), "command": " ".join(sys.argv)[:300]}).encode("utf-8")

    def _put(self, **condition) -> bool:
        """A conditional PUT of our holder record; False when the condition failed."""
        try:
            self.etag = self._s3("put_object", Body=self._body(), **condition)["ETag"]
            return True
        except storage.StorageError as err:
            if _is_precondition_failed(err.__cause__ or err) or isinstance(err, storage.NotFound):
                return False
            raise

    def read(self) -> tuple[Optional[dict], Optional[str]]:
        """(holder record, its ETag) of one version; (None, None) when there is no claim object."""
        body, etag = storage.s3_read_versioned("claim", self.url)
        if body is None:
            return None, None
        try:
            record = json.loads(body.decode("utf-8"))
        except ValueError:
            record = {}  # a damaged claim is stale at once: nobody refreshes it
        return record, etag

    def _ours(self) -> bool:
        """After a failed condition: is the stored claim ours after all? (A retried PUT whose
        first try succeeded but whose answer was lost gets 412 from its own first write.)"""
        record, etag = self.read()
        if record is not None and record.get("token") == self.token:
            self.etag = etag
            return True
        return False

    def free(self) -> bool:
        """Whether try_acquire would find no live holder (no claim object, or a stale one);
        only reads, so asking never keeps anyone from the claim."""
        record, etag = self.read()
        return etag is None or _age(record) > self.timeout or _dead_here(record)

    def try_acquire(self) -> bool:
        if self._put(IfNoneMatch="*") or self._ours():
            return self._start_heartbeat()
        record, etag = self.read()
        if etag is None:  # released meanwhile: try the create once more
            return self._put(IfNoneMatch="*") and self._start_heartbeat()
        age = _age(record)
        dead = age <= self.timeout and _dead_here(record)
        if age <= self.timeout and not dead:
            return False
        if not self._put(IfMatch=etag):  # another taker (or the holder's refresh) came first
            return False
        why = "its process is no longer running on this host" if dead else \
            f"heartbeat {age:.0f} s old > --claim_timeout {self.timeout:g} s"
        print(f"=> {self.url}: took over a stale claim ({describe(record)}, {why})", flush=True)
        return self._start_heartbeat()

    def _start_heartbeat(self) -> bool:
        self.lost, self._stop = False, threading.Event()
        threading.Thread(target=self._beat, args=(self._stop,), daemon=True, name="claim-heartbeat").start()
        return True

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.timeout / 4):
            try:
                self.refresh()
            except ClaimLost:
                return
            except storage.StorageError as err:  # a transient outage: the next beat tries again
                print(f"=> warning: {err}", file=sys.stderr, flush=True)

    def refresh(self) -> None:
        with self._mutex:
            if self.lost or self.etag is None:
                raise ClaimLost(f"{self.url}: this run no longer holds the claim")
            if not self._put(IfMatch=self.etag) and not self._ours():
                self.lost = True
                raise ClaimLost(f"{self.url}: another run took this claim over (this run's heartbeat was older "
                                f"than its --claim_timeout); stopping before writing more")

    def check(self) -> None:
        """Before a commit: refresh the heartbeat, which fails if the claim was taken over."""
        self.refresh()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
        with self._mutex:
            if self.etag is not None and not self.lost:
                try:
                    self._s3("delete_object", IfMatch=self.etag)
                except storage.StorageError as err:
                    if not _is_precondition_failed(err.__cause__ or err):
                        raise
            self.etag = None

    def holder(self) -> str:
        record, _ = self.read()
        return describe(record) if record is not None else "nobody (released)"


def _machine() -> dict:
    """What tells this machine's processes from others' with the same host name: the boot (a
    reboot reuses pids) and the pid namespace (containers on one host share host names and boots
    but not pids). Empty where /proc does not say (then no holder counts as this machine's)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return {"boot_id": f.read().strip(), "pid_ns": os.readlink("/proc/self/ns/pid")}
    except OSError:
        return {}


def _proc_stat(pid: int) -> Optional[list[bytes]]:
    """/proc/PID/stat's fields from the state on (the command name before may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def _start_tick(fields: Optional[list[bytes]]) -> Optional[str]:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    return fields[19].decode() if fields and len(fields) > 19 else None


def _process_start(pid: int) -> Optional[str]:
    return _start_tick(_proc_stat(pid))


def _dead_here(record: Optional[dict]) -> bool:
    """The holder ran on this machine and its process is gone: no such pid, a zombie (killed,
    not yet reaped), or the pid now names a process started at another time (reused). A pid
    reused by a process whose start tick is the same is not told apart (a risk of one in many
    millions); a claim without the machine's ids (another machine, an earlier version) never is
    taken over here: it waits for its timeout."""
    here = _machine()
    if not record or not here or record.get("host") != socket.gethostname() or \
            any(record.get(k) != v for k, v in here.items()):
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # running, under another user
    fields = _proc_stat(pid)
    if fields is None:
        return False
    return fields[0] == b"Z" or (record.get("started") is not None and _start_tick(fields) != record.get("started"))


def _age(record: Optional[dict]) -> float:
    """Seconds since the holder's last heartbeat (a damaged claim: since the epoch)."""
    return time.time() - float((record or {}).get("heartbeat", 0))


def describe(record: Optional[dict]) -> str:
    if not record:
        return "an unreadable claim"
    beat = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("heartbeat", 0))))
    return f"process {record.get('pid')} on {record.get('host')} (heartbeat {beat})"


def claim_for(target: str, what: str, timeout: float = DEFAULT_TIMEOUT_S) -> Claim:
    """The claim of one output (not yet taken): flock beside a local path, TARGET.claim on S3."""
    if not storage.is_url(target):
        return LocalClaim(FileLock(Path(storage.local_path(target)), what))
    check_backend(target)
    return S3Claim(target + CLAIM_SUFFIX, timeout)


def check_backend(url: str) -> None:
    proto = storage.protocol(url)
    if proto in ("s3", "s3a"):
        return
    raise ClaimsUnsupported(
        f"{url}: {proto}:// has no atomic create-if-absent that this project uses for claims (supported: "
        f"{', '.join(f'{k}:// ({v})' for k, v in ATOMIC_CREATE.items())}, and local paths (flock)); refusing "
        "rather than letting two runs write the same output. Write to a local or shared disk, or to s3://")


_checked: set = set()


def check_atomic_create(prefix: str) -> None:
    """Once per prefix and process: the server must refuse a second create-if-absent."""
    if not storage.is_url(prefix) or prefix in _checked:
        return
    check_backend(prefix)
    probe = S3Claim(storage.join(prefix, f".claim-probe-{uuid.uuid4().hex}"), DEFAULT_TIMEOUT_S)
    try:
        first, second = probe._put(IfNoneMatch="*"), probe._put(IfNoneMatch="*")
    finally:
        storage.remove(probe.url)
    if not first or second:
        raise ClaimsUnsupported(f"{prefix}: the server {'accepted' if second else 'refused'} a second create of "
                                "the same object with If-None-Match: *; it does not implement conditional PUT, "
                                "so claims there would be unsafe (use AWS S3, or a server that answers 412)")
    _checked.add(prefix)
