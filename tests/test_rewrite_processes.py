"""rewrite/llama_rewrite.py as real processes: resume after SIGKILL at different
moments, and 2 data-parallel torchrun processes against 1 process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REWRITE_PAIRS as PAIRS, clean_dist_env, make_tiny_rewrite_setup
from rewrite import llama_rewrite
from rewrite.units import record_path
from testkit.processes import wait_until_paused

REPO = Path(__file__).resolve().parents[1]
REWRITE = REPO / "rewrite"

pytestmark = pytest.mark.slow

CAPTIONS = ["person rides a bike", "a bowl of soup", "", "boats in the harbour", "actor at the premiere",
            "snow on the hills", "tea and cake", "a cat on a mat", "the old bridge", "kids play football"]
FLAGS = {"max_seq_len": 256, "max_gen_len": 8, "max_batch_size": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_rewrite_setup(tmp_path_factory.mktemp("rewrite_proc"), CAPTIONS, PAIRS)


def argv(tiny, src: Path, out: Path, **extra) -> list[str]:
    flags = dict(tiny, prompt_filename=str(src), output_filename=str(out), **FLAGS)
    flags.update(extra)
    return [f"--{k}={v}" for k, v in flags.items()]


def env() -> dict:
    return {**clean_dist_env(), "OMP_NUM_THREADS": "1"}


def reference(tiny, src: Path, out: Path, **extra) -> bytes:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert llama_rewrite.cli(argv(tiny, src, out, **extra)) == 0
    finally:
        torch.set_num_threads(before)
    return out.read_bytes()


def committed_lines(out: Path) -> int:
    try:
        return json.loads(record_path(out).read_text())["state"]["next_line"]
    except (OSError, ValueError, KeyError):
        return -1  # not there yet, or caught mid-replace


def paused_run(tiny, src: Path, out: Path, *hooks: str, **popen) -> subprocess.Popen:
    """llama_rewrite.py in a child process, stopped at a known point (testkit/paused_rewrite.py)."""
    return subprocess.Popen([sys.executable, "-m", "testkit.paused_rewrite", *hooks, "--", *argv(tiny, src, out)],
                            cwd=REPO, env=env(), **popen)


@pytest.mark.parametrize("hook, committed", [("--kill-before-window=0", 0), ("--kill-in-commit=2", 16)])
def test_resume_after_sigkill_is_byte_identical(tiny, tmp_path, hook, committed):
    """Killed right after the unit's first record, and inside a commit: the window's lines are
    on disk but the record does not name them yet (the rerun drops and redoes them)."""
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c} {i}\n" for i in range(30) for c in CAPTIONS))  # 300 lines
    expected = reference(tiny, src, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    proc = paused_run(tiny, src, out, hook, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL
    finally:
        proc.kill()  # a no-op once it has ended
    assert committed_lines(out) == committed
    if committed:  # 8-line windows: the third one's bytes follow the committed ones
        assert out.stat().st_size > json.loads(record_path(out).read_text())["state"]["out_bytes"]
    assert llama_rewrite.cli(argv(tiny, src, out, max_batch_size=3)) == 0
    assert out.read_bytes() == expected


@pytest.mark.parametrize("mp, temperature", [(1, 0.9), (2, 0.0)])
def test_two_processes_equal_one(tiny, tmp_path, mp, temperature):
    """2 data-parallel groups (MP=1), or one MP=2 group (greedy: the split matmuls
    may round differently, which sampling could amplify): the same file as 1 process."""
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c} {i}\n" for i in range(3) for c in CAPTIONS) + "last line without newline")
    expected = reference(tiny, src, tmp_path / "one.txt", temperature=temperature)
    out = tmp_path / "two.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REWRITE / "llama_rewrite.py"),
           *argv(tiny, src, out, max_batch_size=3, model_parallel_size=mp, temperature=temperature)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == expected
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two.txt"))
    assert leftovers == ["two.txt", "two.txt.progress.json"]  # parts merged and removed
    record = json.loads(record_path(out).read_text())
    assert record["complete"] and record["state"]["stats"]["lines"] == 31
    assert "done: " in done.stdout and done.stdout.count("done: ") == 1  # one summary, from rank 0


def test_second_run_leaves_the_held_unit_and_ctrl_c_keeps_the_work(tiny, tmp_path, capsys):
    """A live run holds the output's only unit: a second run on it leaves it to the holder and
    says so; SIGINT then ends the first with one line and exit 130, and the rerun completes it."""
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c} {i}\n" for i in range(12) for c in CAPTIONS))  # 120 lines
    expected = reference(tiny, src, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    ready = tmp_path / "paused"
    proc = paused_run(tiny, src, out, "--pause-before-window=1", f"--ready={ready}", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE, text=True)
    try:
        wait_until_paused(ready, proc)  # its first window committed, the unit still claimed
        assert committed_lines(out) == 8
        capsys.readouterr()
        assert llama_rewrite.cli(argv(tiny, src, out)) == 0
        printed = capsys.readouterr().out
        assert f"done: {out} is not finished" in printed and "the model is not loaded" in printed
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    (message,) = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("llama_rewrite.py")]
    assert message.startswith("llama_rewrite.py: interrupted; 8 of 120 lines") and "rerun the same command" in message
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]
    assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert out.read_bytes() == expected


def test_resume_with_another_process_count(tiny, tmp_path, monkeypatch):
    """A caption file planned as 2 units, interrupted in one process, resumed by 2 torchrun
    processes (one unit each, from where it stopped): the same file as an uninterrupted run."""
    from rewrite import runner, units_text
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c} {i}\n" for i in range(3) for c in CAPTIONS) + "last line without newline")
    expected = reference(tiny, src, tmp_path / "one.txt")
    out = tmp_path / "two.txt"
    real, calls = runner.rewrite_window, []

    def interrupted(*args, **kwargs):
        if len(calls) == 1:  # one window (8 lines) of unit 0 committed
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(units_text, "UNIT_LINES", 16)  # 31 lines: 2 units, as 2 processes would plan them
        m.setattr(runner, "rewrite_window", interrupted)
        assert llama_rewrite.cli(argv(tiny, src, out)) == 130
    assert json.loads(record_path(out.with_name("two.txt.part-00000-of-00002")).read_text())["state"]["next_line"] == 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REWRITE / "llama_rewrite.py"), *argv(tiny, src, out, max_batch_size=3)]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == expected
    assert sorted(p.name for p in tmp_path.glob("two.txt*")) == ["two.txt", "two.txt.progress.json"]
