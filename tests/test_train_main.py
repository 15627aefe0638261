"""train.py end to end on the CPU: checkpoints, resume, log.txt, CLI errors."""
from __future__ import annotations

import os

import pytest
import torch

import models
import train
from train_fixtures import make_imagenet_root, make_train_data, read_log, train_argv

pytestmark = pytest.mark.usefixtures("single_process")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch with zero-shot eval and 2 loader workers, over data with one corrupt and one
    missing image."""
    tmp = tmp_path_factory.mktemp("run")
    data = make_train_data(tmp, n=8, corrupt=(3,), missing=(5,))
    imagenet = make_imagenet_root(tmp)
    out = tmp / "out"
    os.environ.pop("RANK", None)
    argv = train_argv(data, out, "--epochs", "1", "--imagenet-root", imagenet)
    argv[argv.index("--workers") + 1] = "2"  # the skip count must survive worker processes
    records = train.main(argv)
    return {"out": out, "imagenet": imagenet, "records": records, "data": data}


def test_log_has_one_json_line_per_epoch_with_skips_and_zero_shot(trained):
    (line,) = read_log(trained["out"])
    # 8 samples, 2 batches of 4, each index loaded once: 2 unreadable files.
    assert line["skipped_images"] == 2
    assert line["train_samples"] == 8 and line["epoch"] == 0
    assert 0 <= line["zeroshot_top1"] <= 100 and line["zeroshot_top5"] == 100.0  # 3 classes
    assert line["best_acc1"] == line["zeroshot_top1"]
    for key in ("train_loss", "train_clip_acc", "train_lr", "train_logit_scale", "epoch_time_s"):
        assert isinstance(line[key], float)


def test_checkpoint_holds_released_format(trained):
    ckpt = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"epoch", "state_dict", "optimizer", "scaler", "best_acc1", "args"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == "CLIP_TINY"
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    fresh = models.get_model("CLIP_TINY").state_dict()
    assert {k[len("module."):] for k in ckpt["state_dict"]} == set(fresh)
    best = torch.load(trained["out"] / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(best["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    assert not [p for p in os.listdir(trained["out"]) if ".tmp" in p]


def test_checkpoint_best_loads_in_eval_script(trained):
    eval_script = pytest.importorskip("eval_zeroshot_imagenet")
    result = eval_script.main(["--imagenet-root", trained["imagenet"], "--ckpt-path",
                               str(trained["out"] / "checkpoint_best.pt"), "--model", "CLIP_TINY",
                               "--batch-size", "4", "--workers", "0", "--device", "cpu"])
    (line,) = read_log(trained["out"])
    assert result["top1"] == pytest.approx(line["zeroshot_top1"])


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=8)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(train_argv(data, straight))

    real = train.train_one_epoch

    def crash_in_second_epoch(tr, epoch, resumed=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated preemption")
        return real(tr, epoch, resumed)

    monkeypatch.setattr(train, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_argv(data, split))
    monkeypatch.setattr(train, "train_one_epoch", real)
    records = train.main(train_argv(data, split))  # same command: resumes from checkpoint.pt
    assert [r["epoch"] for r in records] == [1]

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][pid][name]))
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]
    assert strip(read_log(straight)) == strip(read_log(split))


def test_missing_resume_path_is_an_error(tmp_path):
    data = make_train_data(tmp_path, n=4)
    with pytest.raises(ValueError, match="--resume.*does not exist"):
        train.main(train_argv(data, tmp_path / "out", "--resume", str(tmp_path / "nope.pt")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (("--model", "CLIP_HUGE"), "CLIP_TINY, CLIP_VITS16"),
    (("--train-data", "missing.csv"), "--train-data.*missing.csv"),
    (("--root", "/no/such/dir"), "--root.*/no/such/dir"),
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--imagenet-root", "/no/such/imagenet"), "--imagenet-root"),
])
def test_bad_flags_name_the_flag(tmp_path, change, message):
    data = make_train_data(tmp_path, n=4)
    argv = train_argv(data, tmp_path / "out")
    flag = change[0]
    if flag in argv:
        argv[argv.index(flag) + 1] = change[1]
    else:
        argv += list(change)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.main(argv)


def test_aug_text_without_files_is_an_error(tmp_path):
    data = make_train_data(tmp_path, n=4)
    with pytest.raises(ValueError, match="--aug-text needs --augmented_caption_filelist"):
        train.main(train_argv(data, tmp_path / "out", aug=False) + ["--aug-text"])


def test_dataset_smaller_than_a_batch_is_an_error(tmp_path):
    data = make_train_data(tmp_path, n=3)
    with pytest.raises(ValueError, match="too few for one optimizer step"):
        train.main(train_argv(data, tmp_path / "out"))


def test_update_freq_and_step_cap_drive_the_schedule(tmp_path):
    data = make_train_data(tmp_path, n=8)
    argv = train_argv(data, tmp_path / "out", "--update-freq", "2", "--max-steps-per-epoch", "1")
    argv[argv.index("--batch-size") + 1] = "2"
    train.main(argv)
    first, second = read_log(tmp_path / "out")
    # 1 optimizer step of 2 micro-batches x 2 samples per epoch; 1 warmup step sits at --lr-start.
    assert first["train_samples"] == second["train_samples"] == 4
    assert first["train_lr"] == 1e-6 and second["train_lr"] == 1e-3


def test_non_finite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    import training.engine as engine
    real = engine.clip_loss

    def nan_loss(*args):
        out = real(*args)
        return {**out, "loss": out["loss"] * float("nan")}

    monkeypatch.setattr(engine, "clip_loss", nan_loss)
    data = make_train_data(tmp_path, n=4)
    with pytest.raises(FloatingPointError, match="loss is nan at optimizer step 0"):
        train.main(train_argv(data, tmp_path / "out"))


def test_failed_zero_shot_keeps_training_and_checkpointing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("ImageNet disk went away")

    monkeypatch.setattr(train, "evaluate_imagenet", broken)
    data = make_train_data(tmp_path, n=4)
    imagenet = make_imagenet_root(tmp_path)
    train.main(train_argv(data, tmp_path / "out", "--imagenet-root", imagenet))
    lines = read_log(tmp_path / "out")
    assert [line["zeroshot_top1"] for line in lines] == [None, None]
    assert (tmp_path / "out" / "checkpoint.pt").exists()
    assert not (tmp_path / "out" / "checkpoint_best.pt").exists()  # never best without a score


def test_best_checkpoint_keeps_its_epoch_when_a_later_one_is_not_best(tmp_path, monkeypatch):
    """checkpoint_best.pt is a hard link to the best epoch's file (no copy of the weights);
    later checkpoint.pt writes must not change it, and without hard links it is a copy."""
    from training import train_state
    latest, best = tmp_path / train_state.LATEST, tmp_path / train_state.BEST
    train_state.save_checkpoint({"epoch": 1}, str(tmp_path), is_best=True)
    assert os.stat(best).st_ino == os.stat(latest).st_ino
    train_state.save_checkpoint({"epoch": 2}, str(tmp_path), is_best=False)
    assert torch.load(latest)["epoch"] == 2 and torch.load(best)["epoch"] == 1

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    train_state.save_checkpoint({"epoch": 3}, str(tmp_path), is_best=True)
    assert torch.load(best)["epoch"] == 3 and os.stat(best).st_ino != os.stat(latest).st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp files left; each file's checksum record
        train_state.LATEST, train_state.LATEST + ".sum", train_state.BEST, train_state.BEST + ".sum"]


def test_wrong_root_fails_before_the_model_is_built(tmp_path, monkeypatch):
    data = make_train_data(tmp_path, n=4)
    monkeypatch.setattr(train, "setup", lambda *a: pytest.fail("model built before the data check"))
    argv = train_argv(data, tmp_path / "out")
    argv[argv.index("--root") + 1] = str(tmp_path)  # exists, but one level above the images
    with pytest.raises(ValueError, match="--root.*none of 4 image paths"):
        train.main(argv)


class FakeWriter:
    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        assert isinstance(value, (int, float)), (tag, type(value))
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_scalars_per_step_and_epoch(tmp_path, monkeypatch):
    """tensorboard is not installed here, so the writer calls are checked on a stand-in."""
    writer = FakeWriter()
    monkeypatch.setattr(train, "open_tensorboard", lambda output_dir: writer)
    data = make_train_data(tmp_path, n=8)
    train.main(train_argv(data, tmp_path / "out"))  # 2 epochs x 2 steps
    steps = [s for tag, _, s in writer.scalars if tag == "train/loss"]
    assert steps == [0, 1, 2, 3]
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"train/lr", "train/clip_acc", "train/logit_scale", "train/amp_scale",
            "epoch/train_loss", "epoch/skipped_images"} <= tags
    assert [s for tag, _, s in writer.scalars if tag == "epoch/train_loss"] == [0, 1]
    assert writer.closed


def test_resume_from_a_released_style_checkpoint(tmp_path, capsys):
    """Weights only, args pickled as a Namespace, best_acc1 a 0-d tensor: trains on from its
    epoch with a fresh optimizer, and says that --resume wins over checkpoint.pt."""
    import argparse
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    released = tmp_path / "released.pt"
    torch.save({"state_dict": state, "epoch": 1, "best_acc1": torch.tensor(40.5),
                "args": argparse.Namespace(model="CLIP_TINY")}, released)
    capsys.readouterr()
    records = train.main(train_argv(data, out, "--epochs", "2", "--resume", str(released)))
    assert [r["epoch"] for r in records] == [1]
    assert "not from" in capsys.readouterr().out  # the note about checkpoint.pt
    assert read_log(out)[-1]["best_acc1"] == 40.5


def test_optimizer_state_in_another_parameter_order_is_an_error(tmp_path):
    data = make_train_data(tmp_path, n=4)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "1"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    state = ckpt["optimizer"]["state"]
    ids = ckpt["optimizer"]["param_groups"][0]["params"]
    a, b = next((x, y) for x in ids for y in ids if state[x]["exp_avg"].shape != state[y]["exp_avg"].shape)
    state[a], state[b] = state[b], state[a]  # what another script's registration order looks like
    foreign = tmp_path / "foreign.pt"
    torch.save(ckpt, foreign)
    with pytest.raises(ValueError, match="--resume.*parameter order"):  # same flags as the file's run
        train.main(train_argv(data, tmp_path / "out2", "--epochs", "1", "--resume", str(foreign)))


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="fork is the Linux choice")
def test_loader_workers_fork_so_caption_tables_are_shared(tmp_path):
    from tokenizer import SimpleTokenizer
    from common.distributed import DistInfo
    data = make_train_data(tmp_path, n=4)
    args = train.parse(train_argv(data, tmp_path / "out", "--workers", "2"))
    loader = train.build_loader(args, DistInfo(), SimpleTokenizer())
    assert loader.loader.multiprocessing_context.get_start_method() == "fork"
