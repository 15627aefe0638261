"""llama_rewrite.py stopped at a known point of its work, for tests of what happens to a run in
progress (a second run beside it, Ctrl-C, kill -9) without racing the clock:

    python -m testkit.paused_rewrite [--pause-before-window K --ready FILE] [--kill-before-window K]
                                     [--kill-in-commit K] -- LLAMA_REWRITE_FLAGS...

Windows are counted per process, over all its units, from 0; a window is committed before the
next one is read, so "before window K" is "after K windows committed".
--pause-before-window K --ready FILE: there, create FILE (FILE.RANK under torchrun) and wait
  until a signal ends the process (SIGINT: the run's own Ctrl-C handling). A pause nobody ends
  stops the process after PAUSE_LIMIT_S with exit status 3, so a broken test fails loudly.
--kill-before-window K: there, SIGKILL this process.
--kill-in-commit K: SIGKILL this process inside commit K (from 0), after the window's lines are
  appended and fsynced and before the progress record names them.
Run it with the repository root as the working directory (`python -m` puts that on the path);
testkit/processes.py waits for the ready file and kills process trees.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

PAUSE_LIMIT_S = 600.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pause-before-window", type=int)
    p.add_argument("--ready", type=Path, help="created when the pause begins (with .RANK under torchrun)")
    p.add_argument("--kill-before-window", type=int)
    p.add_argument("--kill-in-commit", type=int)
    p.add_argument("flags", nargs=argparse.REMAINDER, help="after --: llama_rewrite.py's flags")
    return p


def ready_path(ready: Path, rank: Optional[str] = None) -> Path:
    """The file a paused process creates: FILE, or FILE.RANK in a torchrun process."""
    rank = os.environ.get("RANK") if rank is None else rank
    return ready if rank is None else ready.with_name(f"{ready.name}.{rank}")


def _pause(ready: Path) -> None:
    ready.touch()
    end = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < end:
        time.sleep(0.05)  # a signal's handler runs here (SIGINT raises KeyboardInterrupt)
    print(f"paused_rewrite: nobody ended the pause within {PAUSE_LIMIT_S:g} s", file=sys.stderr, flush=True)
    os._exit(3)


def install(args: argparse.Namespace) -> None:
    """Wrap the runner's window iterator and the writer's commit at the points asked for."""
    from rewrite import runner, units
    real_windows, real_commit = runner.windows, units.ShareWriter.commit
    counted = {"windows": 0, "commits": 0}

    def windows(items: Iterable, size: int):
        for window in real_windows(items, size):
            k = counted["windows"]
            counted["windows"] += 1
            if k == args.kill_before_window:
                os.kill(os.getpid(), signal.SIGKILL)
            if k == args.pause_before_window:
                _pause(ready_path(args.ready))
            yield window

    def commit(self, *a, **kw):
        k = counted["commits"]
        counted["commits"] += 1
        if k == args.kill_in_commit:  # the lines go to disk, the record that would name them does not
            self._write_record = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return real_commit(self, *a, **kw)

    runner.windows, units.ShareWriter.commit = windows, commit


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if (args.pause_before_window is None) != (args.ready is None):
        raise SystemExit("paused_rewrite: --pause-before-window and --ready go together")
    install(args)
    # Ctrl-C as a user's terminal gives it: a process started from a background job of a
    # non-interactive shell (a CI script, nohup ... &) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler, so the test's SIGINT would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from rewrite.cli import cli
    return cli([f for f in args.flags if f != "--"])


if __name__ == "__main__":
    sys.exit(main())
