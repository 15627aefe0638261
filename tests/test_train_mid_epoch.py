"""--save-every-steps: checkpoints inside an epoch, and a rerun of the same command after a crash
(kill -9 included) that ends with the weights of an uninterrupted run, bit for bit on the CPU: CSV,
shards with --dataset-resampled, and shards without it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
import train
from conftest import clean_dist_env
from openclip_fixtures import write_tiny_config
from shard_fixtures import make_shards
from testkit.processes import kill_tree, wait_until_paused
from train_fixtures import Crash, crash_after_saves, make_train_data, read_log, train_argv

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def weights(out: Path) -> dict:
    return models.read_checkpoint(str(out / "checkpoint.pt"))  # a mid-epoch file: torch.load refuses its marker


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = weights(a), weights(b)
    assert ca["epoch"] == cb["epoch"]
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def csv_argv(data, out, *extra):
    return train_argv(data, out, "--batch-size", "2", "--workers", "0", *extra)


def shard_argv(shards, out, *extra, model="CLIP_TINY"):
    return ["--train-data", shards.tars, "--train-num-samples", "24", "--batch-size", "2", "--workers", "2",
            "--epochs", "2", "--model", model, "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3",
            "--aug-text", "--rewrite-json-keys", "re_caption", *extra]


def test_a_crash_mid_epoch_then_the_same_command_equals_an_uninterrupted_run_csv(tmp_path, monkeypatch, capsys):
    data = make_train_data(tmp_path, n=12)
    train.main(csv_argv(data, tmp_path / "whole"))
    argv = csv_argv(data, tmp_path / "cut", "--save-every-steps", "2")
    crash_after_saves(monkeypatch, 3)  # epoch 1, after 2 of its 6 steps
    with pytest.raises(Crash):
        train.main(argv)
    ckpt = weights(tmp_path / "cut")
    assert ckpt["epoch"] == 1 and ckpt["data_state"]["batches"] == 2
    monkeypatch.undo()
    capsys.readouterr()
    train.main(argv)
    assert "inside epoch 1 after 2 of 6 steps" in capsys.readouterr().out
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    whole, cut = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    assert [r["train_loss"] for r in whole] == [r["train_loss"] for r in cut]


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "passes"])
def test_a_crash_mid_epoch_on_shards_equals_an_uninterrupted_run(tmp_path, monkeypatch, resampled):
    """Each worker replays its stream of the epoch up to the draws it had made: exact, with or without
    resampling, with 2 loader workers and the shards' bad samples counted once."""
    shards = make_shards(tmp_path / "shards", n_shards=4, per_shard=8)
    config = write_tiny_config(tmp_path / "cfg")
    extra = ["--dataset-resampled"] if resampled else []
    train.main(shard_argv(shards, tmp_path / "whole", *extra, model=config))
    argv = shard_argv(shards, tmp_path / "cut", "--save-every-steps", "5", *extra, model=config)
    crash_after_saves(monkeypatch, 3)  # epoch 1, after 5 of its 12 steps: an odd batch count, so the
    # resumed DataLoader's first process must continue the stream of loader worker 1
    with pytest.raises(Crash):
        train.main(argv)
    monkeypatch.undo()
    train.main(argv)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    whole, cut = read_log(tmp_path / "whole"), read_log(tmp_path / "cut")
    for key in ("train_loss", "train_samples", "skipped_images", "skipped_no_text", "shard_errors"):
        assert [r[key] for r in whole] == [r[key] for r in cut], key


def test_a_mid_epoch_checkpoint_from_other_data_or_batch_size_is_refused(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=12)
    argv = csv_argv(data, tmp_path / "cut", "--save-every-steps", "2")
    crash_after_saves(monkeypatch, 1)
    with pytest.raises(Crash):
        train.main(argv)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"--batch-size 2 \(now 4\)"):
        train.main(train_argv(data, tmp_path / "cut", "--workers", "0", "--save-every-steps", "2"))
    other = make_train_data(tmp_path / "other", n=12)
    with pytest.raises(ValueError, match=r"--train-data .*\(now .*other"):
        train.main(csv_argv(other, tmp_path / "cut", "--save-every-steps", "2"))


# train.py, paused right after its first mid-epoch checkpoint is written (FILE created then)
PAUSE_AFTER_FIRST_SAVE = (
    "import pathlib, sys, time\nimport train\nreal = train.save_mid_epoch\n\n"
    "def save(*args, **kwargs):\n    real(*args, **kwargs)\n    pathlib.Path(sys.argv[1]).touch()\n"
    "    time.sleep(600)\n    sys.exit('nobody ended the pause after the first mid-epoch checkpoint')\n\n"
    "train.save_mid_epoch = save\ntrain.main(sys.argv[2:])\n")


def kill_at_first_checkpoint(argv: list[str], out: Path) -> None:
    """Start train.py, kill -9 it (and its loader workers) once its first checkpoint (mid-epoch 0)
    is written: it waits there, so the kill lands at that point however slow the machine is."""
    env = {**clean_dist_env(), "OMP_NUM_THREADS": "1"}
    ready = out.with_name(out.name + ".paused")
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_SAVE, str(ready), *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_paused(ready, proc)
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    assert weights(out)["data_state"]["batches"] > 0  # killed inside an epoch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv", "shards-resampled"])
def test_kill_9_mid_epoch_then_rerun_equals_an_uninterrupted_run(tmp_path, kind):
    if kind == "csv":
        data = make_train_data(tmp_path, n=24)
        argv = lambda out: csv_argv(data, out, "--save-every-steps", "3")  # noqa: E731
    else:
        shards = make_shards(tmp_path / "shards", n_shards=4, per_shard=8)
        argv = lambda out: shard_argv(shards, out, "--dataset-resampled", "--save-every-steps", "3")  # noqa: E731
    train.main(argv(tmp_path / "whole"))
    kill_at_first_checkpoint(argv(tmp_path / "cut"), tmp_path / "cut")
    env = {**clean_dist_env(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "train.py", *argv(tmp_path / "cut")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "inside epoch 0 after 3 of" in done.stdout
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


def test_a_lock_goes_with_its_process_though_a_forked_child_lives_on(tmp_path):
    """A DataLoader worker is a fork of train.py: it must not keep --output-dir locked after train.py
    is killed (a rerun at once would be refused while the orphaned worker notices)."""
    from common.locking import FileLock
    script = ("import os, signal, sys, time\nfrom common.locking import FileLock\n"
              "FileLock(sys.argv[1], 'out').acquire()\nchild = os.fork()\n"
              "if child == 0:\n    os.close(1)\n    os.close(2)\n    time.sleep(30)\n    os._exit(0)\n"
              "print(child, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, env=clean_dist_env())
    child = int(done.stdout.split()[0])
    try:
        lock = FileLock(tmp_path / "out", "out")
        assert lock.try_acquire()  # the parent died; its child lives but holds nothing
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)
