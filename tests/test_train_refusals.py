"""train.py refuses at start, in one line, what used to cost an epoch or mix two runs: a locked,
unwritable or full --output-dir, a checkpoint that would run code, a resume with other settings."""
from __future__ import annotations

import os

import pytest
import torch

import models
import train
from common.locking import FileLock
from conftest import unwritable_dir, write_payload_checkpoint
from train_fixtures import make_train_data, read_log, train_argv
from training import train_state
from training.output_dir import lock_target

pytestmark = pytest.mark.usefixtures("single_process")


def no_model(monkeypatch) -> None:
    monkeypatch.setattr(train, "setup", lambda *a: pytest.fail("the model was built"))


def test_second_run_on_a_locked_output_dir_stops_at_once(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    out.mkdir()
    no_model(monkeypatch)
    with FileLock(lock_target(str(out)), "a first run"):
        with pytest.raises(ValueError) as err:
            train.main(train_argv(data, out))
    assert str(err.value).startswith(f"--output-dir {str(out)!r} is in use by process {os.getpid()}")
    assert sorted(os.listdir(out)) == []  # nothing written, and the lock file went with its holder


def test_unwritable_output_dir_fails_at_start(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=4)
    folder = unwritable_dir(tmp_path)
    no_model(monkeypatch)
    for out in (folder, folder / "run"):  # the folder itself, or one to create inside it
        with pytest.raises(ValueError, match=f"--output-dir {str(out)!r}: cannot (write in|create) it"):
            train.main(train_argv(data, out))


def test_failed_save_is_one_line_naming_the_folder_and_free_space(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    real_save, calls = torch.save, []

    def disk_full(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half")  # a file object that hashes what it writes (training/checkpoint_sums.py)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(train_state.torch, "save", disk_full)
    with pytest.raises(ValueError) as err:
        train.main(train_argv(data, out))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--output-dir {str(out)!r}: saving checkpoint.pt failed")
    assert "file write failed" in message and "free there" in message and "previous checkpoint.pt is unchanged" in message
    assert sorted(set(os.listdir(out)) - {"tb_logs", ".data_sha256.jsonl"}) == [
        "checkpoint.pt", "checkpoint.pt.sum", "checkpoint_best.pt", "checkpoint_best.pt.sum", "log.txt"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path, capsys):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint.pt.tmp-4242", "checkpoint_best.pt.tmp-77"):
        (out / name).write_bytes(b"left by a crash")
    (out / "notes.tmp-1").write_text("not ours")
    train.main(train_argv(data, out, "--epochs", "1"))
    assert "removed 2 unfinished checkpoint files left by an earlier run" in capsys.readouterr().out
    assert sorted(set(os.listdir(out)) - {"tb_logs", ".data_sha256.jsonl"}) == [
        "checkpoint.pt", "checkpoint.pt.sum", "checkpoint_best.pt", "checkpoint_best.pt.sum", "log.txt", "notes.tmp-1"]


def test_resume_with_other_settings_is_refused_unless_overridden(tmp_path, capsys):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    changed = train_argv(data, out, "--epochs", "1")
    changed[changed.index("--batch-size") + 1] = "2"
    changed[changed.index("--lr") + 1] = "2e-3"
    with pytest.raises(ValueError) as err:
        train.main(changed + ["--epochs", "2"])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--resume {str(out / 'checkpoint.pt')!r}: ")
    for difference in ("--batch-size 4 (now 2)", "--lr 0.001 (now 0.002)"):
        assert difference in message
    assert "--epochs" not in message  # a longer run is an extension (tests/test_train_open_clip.py)
    assert "--resume-override" in message and len(read_log(out)) == 1
    capsys.readouterr()
    harmless = train_argv(data, out, "--epochs", "1", "--print-freq", "3", "--eval-batch-size", "7")
    assert train.main(harmless) == []  # nothing left to train, and no refusal
    assert "--print-freq 1 (now 3)" in capsys.readouterr().out
    records = train.main(changed + ["--epochs", "2", "--resume-override"])
    assert [r["epoch"] for r in records] == [1]
    assert "--resume-override" in capsys.readouterr().out


def test_resume_from_a_checkpoint_that_would_run_code_needs_trust(tmp_path):
    data = make_train_data(tmp_path, n=4)
    marker = tmp_path / "payload_ran"
    path = write_payload_checkpoint(tmp_path / "evil.pt", models.get_model("CLIP_TINY").state_dict(), marker)
    argv = train_argv(data, tmp_path / "out", "--resume", path)
    with pytest.raises(ValueError, match=f"--resume: {path!r} .*mkdir.*--trust-checkpoint"):
        train.main(argv)
    assert not marker.exists()
    assert [r["epoch"] for r in train.main(argv + ["--trust-checkpoint"])] == [1] and marker.exists()
