"""What a resume checks before it trusts a file (issue 23): every checkpoint carries a checksum, and a
damaged one is refused naming it (an intact older one offered); the caption CSV and rewrite files a
checkpoint was made from (a changed file refused inside an epoch, noted at an epoch end); a mid-epoch
checkpoint that open_clip_train cannot load; --resume of an empty file, a folder, a JSON file."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import models
import train
from train_fixtures import Crash, crash_after_saves, make_train_data, read_log, train_argv
from training import checkpoint_sums

pytestmark = pytest.mark.usefixtures("one_thread", "single_process")


def preempted_mid_epoch(tmp_path: Path, monkeypatch, model: str | None = None) -> tuple[dict, Path, list[str]]:
    """A CSV run (12 samples, batch 2, a checkpoint every 2 steps) preempted right after its first
    checkpoint: (data, output folder, the run's argv)."""
    data = make_train_data(tmp_path, n=12)
    out = tmp_path / "out"
    argv = train_argv(data, out, "--batch-size", "2", "--save-every-steps", "2")
    if model:
        argv[argv.index("CLIP_TINY")] = model
    crash_after_saves(monkeypatch)
    with pytest.raises(Crash):
        train.main(argv)
    return data, out, argv


def flip_bytes_in_last_tensor(path: Path, count: int = 64) -> None:
    """Invert `count` bytes inside the last tensor record of a torch zip: the optimizer state, which
    torch.save writes after the weights (torch's reader checks no CRC, so it loads anyway)."""
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if "/data/" in i.filename and i.file_size >= count]
        last = max(records, key=lambda i: int(i.filename.rsplit("/", 1)[1]))
        with open(path, "rb") as f:
            f.seek(last.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = last.header_offset + 30 + name_len + extra_len + last.file_size // 2 - count // 2
    with open(path, "r+b") as f:
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


# ------------------------------------------------------------------ case 5: checksums
def test_every_checkpoint_has_a_checksum_and_a_damaged_one_is_refused_with_an_intact_one_offered(tmp_path, capsys):
    data = make_train_data(tmp_path, n=8)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--save-frequency", "1"))
    for name in ("checkpoint.pt", "checkpoint_best.pt", "epoch_1.pt", "epoch_2.pt"):
        assert checkpoint_sums.verify(str(out / name)).verified, name
    flip_bytes_in_last_tensor(out / "checkpoint.pt")  # epoch_2.pt and checkpoint_best.pt are the same file
    models.read_checkpoint(str(out / "checkpoint.pt"))  # torch alone reads it without a word
    with pytest.raises(ValueError) as err:
        train.main(train_argv(data, out, "--save-frequency", "1", "--epochs", "3"))
    message = str(err.value)
    assert "\n" not in message and str(out / "checkpoint.pt") in message and "damaged" in message
    assert f"--resume {out / 'epoch_1.pt'}" in message  # the intact older one (epoch 1)
    capsys.readouterr()
    records = train.main(train_argv(data, out, "--save-frequency", "1", "--epochs", "3",
                                    "--resume", str(out / "epoch_1.pt")))
    assert [r["epoch"] for r in records] == [1, 2]
    assert checkpoint_sums.verify(str(out / "checkpoint.pt")).verified


def test_a_checkpoint_without_checksum_loads_with_a_note(tmp_path, capsys):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    released = tmp_path / "released.pt"
    torch.save(torch.load(out / "checkpoint.pt", weights_only=True), released)  # as another script saves it
    capsys.readouterr()
    train.main(train_argv(data, tmp_path / "again", "--epochs", "2", "--resume", str(released)))
    printed = capsys.readouterr().out
    assert f"{str(released)!r} has no checksum beside it" in printed and "not verified" in printed


def test_a_crash_between_a_checkpoint_and_its_checksum_is_not_called_damage(tmp_path, monkeypatch):
    """The checksum file lists the new version before the checkpoint is replaced: whichever of the two
    a crash leaves, it verifies."""
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    real = checkpoint_sums.write_sums
    monkeypatch.setattr(checkpoint_sums, "write_sums",
                        lambda path, versions: real(path, versions) if len(versions) > 1 else (_ for _ in ()).throw(
                            OSError("power cut")))
    with pytest.raises(ValueError, match="power cut"):
        train.main(train_argv(data, out, "--epochs", "2"))
    monkeypatch.undo()
    assert len(json.loads((out / "checkpoint.pt.sum").read_text())["versions"]) == 2
    assert checkpoint_sums.verify(str(out / "checkpoint.pt")).verified
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------ case 3: the data a checkpoint was made from
def grow(data: dict, rows: int) -> None:
    """The CSV at the same path gains rows, and each rewrite file as many lines."""
    with open(data["csv"], "a") as f:
        for i in range(rows):
            f.write(f"sub/img_{i}.png,an added caption {i}\n")
    for path in data["rewrites"]:
        with open(path, "a") as f:
            f.write("".join(f"an added rewrite {i}\n" for i in range(rows)))


def test_a_changed_csv_inside_an_epoch_is_refused_naming_it(tmp_path, monkeypatch):
    data, out, argv = preempted_mid_epoch(tmp_path, monkeypatch)
    monkeypatch.undo()
    grow(data, 4)
    with pytest.raises(ValueError) as err:
        train.main(argv)
    message = str(err.value)
    assert "\n" not in message and f"--train-data {data['csv']!r}" in message and "inside epoch 0" in message
    assert "12 samples" in message and "16" in message


def test_a_changed_rewrite_file_inside_an_epoch_is_refused_naming_it(tmp_path, monkeypatch):
    data, out, argv = preempted_mid_epoch(tmp_path, monkeypatch)
    monkeypatch.undo()
    path = Path(data["rewrites"][1])
    path.write_text(path.read_text().replace("rewrite 2 of sample 5", "something else entirely"))
    with pytest.raises(ValueError, match=rf"--augmented_caption_filelist {str(path)!r} .*changed"):
        train.main(argv)


def test_a_changed_csv_at_an_epoch_end_goes_on_with_a_note(tmp_path, capsys):
    data = make_train_data(tmp_path, n=8)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    grow(data, 4)
    capsys.readouterr()
    records = train.main(train_argv(data, out, "--epochs", "2"))
    assert [r["epoch"] for r in records] == [1]
    printed = capsys.readouterr().out
    assert f"--train-data {data['csv']!r} changed since the checkpoint" in printed and "8 samples" in printed
    assert read_log(out)[-1]["epoch"] == 1


def test_the_data_hash_is_remembered_by_stat(tmp_path, monkeypatch):
    from training import data_identity
    data = make_train_data(tmp_path, n=4)
    memo = tmp_path / "memo"
    memo.mkdir()
    first = data_identity.csv_identity(data["csv"], data["rewrites"], 4, str(memo))
    monkeypatch.setattr(data_identity, "file_sha256", lambda path: pytest.fail(f"{path} hashed again"))
    assert data_identity.csv_identity(data["csv"], data["rewrites"], 4, str(memo)) == first


# ------------------------------------------------------------------ case 7: --resume of what is not a checkpoint
@pytest.mark.parametrize("kind, expected", [
    ("empty", "is an empty file (0 bytes), not a torch checkpoint"),
    ("folder", "is a folder: did you mean"),
    ("json", "is not a torch checkpoint (it starts with '{\"epoch\": 1"),
])
def test_resume_of_something_that_is_no_checkpoint_says_what_it_is(tmp_path, kind, expected):
    data = make_train_data(tmp_path, n=4)
    given = tmp_path / "given"
    if kind == "empty":
        given.write_bytes(b"")
    elif kind == "folder":
        given.mkdir()
    else:
        given.write_text('{"epoch": 1, "state_dict": {}}')
    with pytest.raises(ValueError) as err:
        train.main(train_argv(data, tmp_path / "out", "--resume", str(given)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--resume {str(given)!r}") and expected in message
    if kind == "folder":
        assert str(given / "checkpoint.pt") in message


# ------------------------------------------------------------------ case 6: open_clip_train and mid-epoch files
def test_a_mid_epoch_checkpoint_is_marked_and_train_py_still_resumes_it(tmp_path, monkeypatch):
    _, out, argv = preempted_mid_epoch(tmp_path, monkeypatch)
    monkeypatch.undo()
    with pytest.raises(Exception, match="MidEpochCheckpoint"):  # what open_clip_train's torch.load does
        torch.load(out / "checkpoint.pt", weights_only=True)
    assert models.read_checkpoint(str(out / "checkpoint.pt"))["epoch_progress"]["steps"] == 2
    train.main(argv)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2  # epoch ends: loadable anywhere


@pytest.mark.slow
def test_open_clip_train_refuses_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    from openclip_fixtures import run_open_clip_train, write_tiny_config
    from shard_fixtures import make_shards
    config = write_tiny_config(tmp_path / "cfg")
    _, out, _ = preempted_mid_epoch(tmp_path, monkeypatch, model=config)
    shards = make_shards(tmp_path / "shards", n_shards=4, per_shard=6, bad=False)
    run = run_open_clip_train(config, [
        "--train-data", shards.tars, "--dataset-type", "webdataset", "--train-num-samples", "16",
        "--batch-size", "4", "--workers", "0", "--epochs", "2", "--model", "laclip-tiny-oc", "--precision", "fp32",
        "--resume", str(out / "checkpoint.pt"), "--logs", str(tmp_path / "logs"), "--name", "oc", "--warmup", "1",
        "--lr", "1e-3", "--report-to", ""])
    assert run.returncode != 0
    assert "MidEpochCheckpoint" in run.stderr and "resuming checkpoint" not in run.stdout + run.stderr
    assert not (tmp_path / "logs" / "oc" / "checkpoints" / "epoch_1.pt").exists()
