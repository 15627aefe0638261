"""llama_rewrite.py refuses, in one line and before the model loads, what used to run silently:
mistyped flags, a second run on a locked output, an output changed since its record, a
damaged record, an unwritable folder; Ctrl-C is one line and keeps the committed work."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.locking import FileLock
from conftest import REWRITE_PAIRS as PAIRS, interrupt_at_window, make_tiny_rewrite_setup, one_line_error, \
    unwritable_dir
from rewrite import cli as rewrite_cli, llama_rewrite, runner
from rewrite.units import record_path

CAPTIONS = ["person rides a bike", "a bowl of soup", "boats in the harbour", "snow on the hills",
            "tea and cake", "a cat on a mat", "the old bridge", "kids play football", "a lamp"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_rewrite_setup(tmp_path_factory.mktemp("rewrite_refusals"), CAPTIONS, PAIRS)


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "src.txt"
    path.write_text("".join(f"{c}\n" for c in CAPTIONS * 3), encoding="utf-8")
    return path


def argv(tiny, src: Path, out: Path, **extra) -> list[str]:
    flags = dict(tiny, prompt_filename=str(src), output_filename=str(out), max_seq_len=256, max_gen_len=4,
                 max_batch_size=2)
    flags.update(extra)
    return [f"--{k}={v}" for k, v in flags.items()]


def forbid_model(monkeypatch) -> None:
    """Any refusal here must come before the weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_generator", refuse)


@pytest.fixture
def no_model(monkeypatch):
    forbid_model(monkeypatch)


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("typo, suggestion", [
    (["--temprature", "0.5"], "did you mean --temperature?"),
    (["--max_batchsize", "8"], "did you mean --max_batch_size?"),
    (["--max-batchsize=8"], "did you mean --max_batch_size?"),
    (["--dryrun"], "did you mean --dry_run?"),
    (["--nodryrun"], "did you mean --nodry_run?"),
    (["-m", "3"], "is ambiguous: it could be --max_seq_len, --max_batch_size"),
    (["stray"], "unexpected argument 'stray'"),
    (["--overwrite", "stray"], "--overwrite is a switch"),  # fire hands 'stray' over as its value
])
def test_unknown_flag_stops_before_any_work(tiny, src, tmp_path, capsys, monkeypatch, typo, suggestion):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(runner, "prepare", refuse)
    out = tmp_path / "out.txt"
    assert llama_rewrite.cli(argv(tiny, src, out) + typo) == 2
    err = one_line_error(capsys)
    assert err.startswith("llama_rewrite.py: error: ") and suggestion in err and typo[0].split("=")[0] in err
    assert not out.exists() and not record_path(out).exists()


def test_every_spelling_fire_accepts_passes_the_check(tiny, src, tmp_path, monkeypatch, capsys):
    """fire parses; the check refuses only names that are not flags (the values fire bound kept)."""
    bound = []
    monkeypatch.setattr(rewrite_cli, "validate", lambda flags: bound.append(flags))
    monkeypatch.setattr(rewrite_cli, "run_cli", lambda cfg: None)
    accepted = {("--max-batch-size=3",): {"max_batch_size": 3}, ("--max_batch_size", "3"): {"max_batch_size": 3},
                ("--dry-run",): {"dry_run": True}, ("--nodry_run",): {"dry_run": False},
                ("--temperature", "-0.5"): {"temperature": -0.5}, ("---top_p=0.5",): {"top_p": 0.5},
                ("-p", "x.txt"): {"prompt_filename": "x.txt"}, ("--dry_run", "--overwrite"):
                {"dry_run": True, "overwrite": True}}
    for args, flags in accepted.items():
        assert llama_rewrite.cli(list(args)) == 0 and bound.pop() == flags
    for args in (["--help"], ["--max_batch_size", "3", "-h"]):  # fire's help, wherever the flag stands
        with pytest.raises(SystemExit) as stop:
            llama_rewrite.cli(args)
        shown = capsys.readouterr()
        assert stop.value.code == 0 and "--max_batch_size" in shown.out + shown.err and not bound
    monkeypatch.undo()
    out = tmp_path / "out.txt"
    assert llama_rewrite.cli([f"--prompt-filename={src}", "--output-filename", str(out), "--dry-run",
                              "--examples", tiny["examples"]]) == 0
    assert (tmp_path / "out.txt.prompts.jsonl").is_file()


# ---------------------------------------------------------------- locks
def test_a_held_output_is_left_to_its_holder(tiny, src, tmp_path, capsys):
    """A live run holds the only unit of OUT (its claim): a second run writes nothing, says
    so, and a rerun after the holder is gone does the work."""
    out = tmp_path / "out.txt"
    with FileLock(out, "a first run"):  # the claim another live run would hold
        assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert f"done: {out} is not finished" in capsys.readouterr().out
    assert not out.exists() and not record_path(out).exists()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert len(out.read_text().splitlines()) == 3 * len(CAPTIONS)


def test_lock_of_a_killed_run_does_not_block(tiny, src, tmp_path, capsys):
    out = tmp_path / "out.txt"
    taker = ("import os, signal, sys; from common.locking import FileLock; "
             "FileLock(__import__('pathlib').Path(sys.argv[1]), 'x').acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", taker, str(out)], cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == -signal.SIGKILL and (tmp_path / "out.txt.lock").exists()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert len(out.read_text().splitlines()) == 3 * len(CAPTIONS)
    assert not (tmp_path / "out.txt.lock").exists()  # released at the end of the run


def test_text_units_are_claimed_one_holder_each(tmp_path):
    """A unit held by a live process is not claimed; the others are, and a second claim of
    a held unit fails while its holder lives."""
    from rewrite.units_text import scan_input
    from rewrite.units_text import TextUnits, unit_file
    src = tmp_path / "src.txt"
    src.write_text("".join(f"caption {i}\n" for i in range(10)))
    units = TextUnits(src, tmp_path / "out.txt", scan_input(src), {"chatgpt": {"input": 1}})
    with units.plan_lock():
        assert units.plan(dp_size=4, overwrite=False) == (4, ("chatgpt",))
    assert all(unit_file(tmp_path / "out.txt", u, 4).exists() for u in range(4))
    with FileLock(unit_file(tmp_path / "out.txt", 2, 4), "another writer"):
        assert units.claim(2) is None
        claim = units.claim(1)
        assert (claim.start, claim.offset) == (2, len("caption 0\ncaption 1\n"))
        assert units.claim(1) is None  # held by this claim now
        claim.close()
        with pytest.raises(ValueError, match=r"--overwrite: .*part-00002-of-00004 is in use by process"):
            units.plan(dp_size=4, overwrite=True)  # a live run's unit is never pulled away


# ---------------------------------------------------------------- the record
def run_once(tiny, src, out, **extra) -> bytes:
    assert llama_rewrite.cli(argv(tiny, src, out, **extra)) == 0
    return out.read_bytes()


@pytest.mark.parametrize("change", ["cut", "same_size", "appended"])
def test_finished_output_changed_since_is_refused(tiny, src, tmp_path, capsys, monkeypatch, change):
    out = tmp_path / "out.txt"
    data = run_once(tiny, src, out)
    forbid_model(monkeypatch)
    if change == "cut":
        out.write_bytes(b"".join(data.splitlines(keepends=True)[:9]))
    elif change == "same_size":
        out.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    else:
        out.write_bytes(data + b"more\n")
    capsys.readouterr()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 2
    err = one_line_error(capsys)
    assert "--output_filename" in err and str(out) in err and "changed" in err and "--overwrite" in err


def test_partial_output_changed_in_its_committed_bytes_is_refused(tiny, src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    interrupt_at_window(monkeypatch, 2)
    assert llama_rewrite.cli(argv(tiny, src, out)) == 130
    data = out.read_bytes()
    out.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one committed byte changed
    capsys.readouterr()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 2
    err = one_line_error(capsys)
    assert "checksum" in err and str(out) in err and "--overwrite" in err


def test_record_with_incomplete_state_is_one_line(tiny, src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    interrupt_at_window(monkeypatch, 1)
    assert llama_rewrite.cli(argv(tiny, src, out)) == 130
    record = json.loads(record_path(out).read_text())
    del record["state"]["in_offset"], record["checksum"]  # with its checksum: refused as damaged (test_rewrite_stale)
    record_path(out).write_text(json.dumps(record))
    capsys.readouterr()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 2
    err = one_line_error(capsys)
    assert f"progress record {record_path(out)}" in err and "in_offset" in err and "--overwrite" in err


# ---------------------------------------------------------------- Ctrl-C and folders
def test_ctrl_c_is_one_line_and_keeps_committed_work(tiny, src, tmp_path, capsys, monkeypatch):
    reference = run_once(tiny, src, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 2)
        capsys.readouterr()
        assert llama_rewrite.cli(argv(tiny, src, out)) == 130
    err = one_line_error(capsys)
    window = runner.WINDOW_BATCHES * 2  # lines per window at --max_batch_size 2
    assert f"interrupted; {2 * window} of {3 * len(CAPTIONS)} lines of {out} committed" in err
    assert "rerun the same command to resume" in err
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name or p.name.endswith(".lock")]
    assert run_once(tiny, src, out) == reference


def test_unwritable_output_folder_names_the_flag(tiny, src, tmp_path, capsys, no_model):
    folder = unwritable_dir(tmp_path)
    assert llama_rewrite.cli(argv(tiny, src, folder / "out.txt")) == 2
    err = one_line_error(capsys)
    assert f"--output_filename {folder / 'out.txt'}: cannot write in {folder}" in err
