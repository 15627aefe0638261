"""Exclusive locks on outputs, so two runs never write the same file.

A lock is `fcntl.flock` on a small file beside the output (OUT.lock), holding who
took it (host, pid, command, time) for the message another run gets. The kernel
drops a flock when its process dies, however it dies, so a lock left by a killed
run never blocks a rerun. Where the file system has no flock (some network file
systems without the option), taking a lock fails with a message that says so.

A forked child (a DataLoader worker) inherits the descriptor, and with it the flock, which would
outlive a killed parent for as long as the child takes to notice (seconds): forked children close
their copies at once (`os.register_at_fork`), so the lock goes with the process that took it.

The lock file is removed on release, while still locked. Another process may have
opened the old file just before: after taking the lock it checks that the path still
names the file it locked, and tries again if not, so two holders can never coexist.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LOCK_SUFFIX = ".lock"


class LockHeld(ValueError):
    """The output is locked by another live process."""


def lock_path(target: str | os.PathLike) -> Path:
    p = Path(target)
    return p.with_name(p.name + LOCK_SUFFIX)


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join(sys.argv)[:300]})


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')}: "
            f"{info.get('command', '?')})")


_HELD: dict[int, "FileLock"] = {}  # id -> a lock this process holds


def _drop_in_child() -> None:
    """After fork, in the child: close the inherited lock descriptors (the parent keeps its locks)."""
    for lock in list(_HELD.values()):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


@dataclass
class FileLock:
    """An exclusive lock on `target` (the lock file is target + '.lock'); `what` names it in messages."""
    target: Path
    what: str
    _fd: Optional[int] = None

    @property
    def path(self) -> Path:
        return lock_path(self.target)

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if a live process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return False
                raise OSError(f"{self.what}: cannot lock {self.path} ({e.strerror}); the file system may not "
                              "support flock (on Lustre, mount with -o flock)") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder had just removed: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode("utf-8"))
        self._fd = fd
        _HELD[id(self)] = self
        return True

    def acquire(self) -> "FileLock":
        if not self.try_acquire():
            raise LockHeld(f"{self.what} is in use by {describe_holder(self.path)}; wait for that run to "
                           f"end or stop it (its lock {self.path} goes with the process)")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: nobody can take the old file meanwhile
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD.pop(id(self), None)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
