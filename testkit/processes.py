"""Child processes in tests: wait for one to reach a known point, and kill a process tree for
good (torchrun starts each worker in a session of its own, so killing torchrun's process group
leaves the workers running). Outcomes are decided by events, never by how long something took:
the time limits here only stop a broken test loudly."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def wait_until_paused(ready: Path, proc: subprocess.Popen, limit_s: float = 300.0) -> None:
    """Return once the run has created `ready` (testkit/paused_rewrite.py). Its end before that,
    or no pause within limit_s, fails loudly."""
    end = time.monotonic() + limit_s
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit status {proc.returncode}) before it paused at {ready}")
        if time.monotonic() > end:
            raise AssertionError(f"the run did not pause at {ready} within {limit_s:g} s")
        time.sleep(0.01)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _alive(pid: int) -> bool:
    """Running (a zombie has already closed its files, and with them its locks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen, limit_s: float = 60.0) -> None:
    """SIGKILL `proc` and all its descendants, as a node failure would, and return once every
    one of them has ended (its flocks released), so a rerun never meets a dying holder."""
    children, todo, tree = _children(), [proc.pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    end = time.monotonic() + limit_s
    while any(_alive(p) for p in tree):
        if time.monotonic() > end:
            raise AssertionError(f"processes {[p for p in tree if _alive(p)]} outlived SIGKILL by {limit_s:g} s")
        time.sleep(0.01)
