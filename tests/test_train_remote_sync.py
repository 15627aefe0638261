"""--remote-sync never resumes from, nor uploads, older progress than the remote copy holds (issue 23,
case 1): node A is preempted inside epoch 0 with a newer local checkpoint than it uploaded, node B
finishes the run from the remote copy, and A's rerun of the same command takes B's result instead of
training on from its stale folder and overwriting the remote copy. Uploads of checkpoint.pt are
conditional on the remote copy this run read (moto's S3 server on 127.0.0.1)."""
from __future__ import annotations

import json

import pytest
import torch

import models
import train
from common import storage
from train_fixtures import Crash, crash_after_saves, make_train_data, read_log, train_argv
from training import remote_sync, train_state

pytestmark = pytest.mark.usefixtures("one_thread", "single_process")


def remote_progress(url: str) -> dict:
    return json.loads(storage.read_bytes(url + "/checkpoint.pt.sum"))["versions"][0]


def etag(s3_server, url: str) -> str:
    bucket, key = url[len("s3://"):].split("/", 1)
    return s3_server.client().head_object(Bucket=bucket, Key=key)["ETag"]


def test_a_stale_local_folder_takes_the_newer_remote_progress_and_never_uploads_over_it(
        s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    data = make_train_data(tmp_path, n=12)
    url = f"s3://{s3_bucket}/runs/laclip"
    a, b = tmp_path / "node_a", tmp_path / "node_b"

    def argv(out):
        return train_argv(data, out, "--batch-size", "2", "--save-every-steps", "2", "--remote-sync", url)

    crash_after_saves(monkeypatch, 2)  # A uploaded step 2 of epoch 0, then wrote step 4 locally and died
    with pytest.raises(Crash):
        train.main(argv(a))
    monkeypatch.undo()
    assert remote_progress(url) == {**remote_progress(url), "epoch": 0, "steps": 2}
    assert models.read_checkpoint(str(a / "checkpoint.pt"))["epoch_progress"]["steps"] == 4
    train.main(argv(b))  # a new node: pulls step 2, finishes both epochs, syncs
    assert remote_progress(url)["epoch"] == 2
    before = etag(s3_server, url + "/checkpoint.pt"), storage.read_bytes(url + "/log.txt")
    capsys.readouterr()
    records = train.main(argv(a))  # A comes back with its old scratch disk
    printed = capsys.readouterr().out
    assert records == []  # resumed from the remote epoch 2: nothing left to train
    assert "newer than the local" in printed and "epoch 2" in printed
    assert (etag(s3_server, url + "/checkpoint.pt"), storage.read_bytes(url + "/log.txt")) == before
    assert torch.load(a / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert [r["epoch"] for r in read_log(a)] == [0, 1]


def test_a_newer_local_checkpoint_is_kept_and_uploaded(s3_bucket, tmp_path, monkeypatch, capsys):
    data = make_train_data(tmp_path, n=12)
    url = f"s3://{s3_bucket}/runs/laclip"
    argv = train_argv(data, tmp_path / "a", "--batch-size", "2", "--save-every-steps", "2", "--remote-sync", url)
    crash_after_saves(monkeypatch, 2)
    with pytest.raises(Crash):
        train.main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    train.main(argv)
    assert "inside epoch 0 after 4 of 6 steps" in capsys.readouterr().out
    assert remote_progress(url)["epoch"] == 2


def saved(out, epoch: int) -> None:
    train_state.save_checkpoint({"epoch": epoch, "state_dict": {"w": torch.full((4,), float(epoch))}}, str(out),
                                is_best=False)


def test_an_upload_over_a_remote_copy_changed_behind_the_run_is_refused(s3_server, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/runs/x"
    out = tmp_path / "out"
    out.mkdir()
    saved(out, 1)
    sync = remote_sync.start(url, str(out), claim_timeout=60)
    assert sync.push()[:2] == ["checkpoint.pt", "checkpoint.pt.sum"]
    bucket = s3_bucket
    s3_server.client().put_object(Bucket=bucket, Key="runs/x/checkpoint.pt", Body=b"another writer")
    saved(out, 2)
    with pytest.raises(ValueError, match=rf"--remote-sync {url}: checkpoint.pt changed there since this run read "
                                         r"it .*not uploading"):
        sync.push()
    sync.release()
    assert storage.read_bytes(url + "/checkpoint.pt") == b"another writer"
    # the record now describes another upload than the object: the next start cannot compare, says so
    with pytest.raises(ValueError, match=r"cannot tell whether .*describes another upload"):
        remote_sync.start(url, str(out), claim_timeout=60)


def test_a_remote_copy_whose_progress_cannot_be_read_is_refused_in_one_line(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/runs/y"
    storage.write_bytes(url + "/checkpoint.pt", b"synced by an older train.py: no progress record")
    out = tmp_path / "out"
    out.mkdir()
    saved(out, 1)
    with pytest.raises(ValueError) as err:
        remote_sync.start(url, str(out), claim_timeout=60)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--remote-sync {url}: cannot tell whether")
    assert str(out / "checkpoint.pt") in message
    (tmp_path / "empty").mkdir()
    assert remote_sync.start(url, str(tmp_path / "empty"), claim_timeout=60).release() is None  # nothing local: pulled
    assert (tmp_path / "empty" / "checkpoint.pt").read_bytes().startswith(b"synced by an older")
