"""open_clip models in train.py: built by open_clip (name or config JSON), its loss semantics and
weight-decay rule, checkpoints interchangeable with open_clip, open_clip_train and the eval scripts,
open_clip_train's flag spellings, --aug-text-weights, and the refusals of bad input."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from common.distributed import cleanup_distributed
from models import open_clip_arch
from openclip_fixtures import run_open_clip_train, tiny_config, write_tiny_config
from shard_fixtures import make_shards
from testkit.loss_parity import parity
from train_fixtures import make_imagenet_root, make_train_data, read_log, train_argv
from training.engine import param_groups
from training.data import pick_caption

pytestmark = pytest.mark.usefixtures("one_thread")


def oc_argv(data, out, config, *extra, aug=True):
    """train_argv with the tiny open_clip config as --model."""
    argv = train_argv(data, out, *extra, aug=aug)
    argv[argv.index("CLIP_TINY")] = config
    return argv


def shard_argv(shards, out, config, *extra):
    return ["--train-data", shards.tars, "--train-num-samples", "16", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--model", config, "--output-dir", str(out), "--device", "cpu", "--warmup", "1",
            "--lr", "1e-3", "--precision", "fp32", "--local-loss", "--gather-with-grad", *extra]


# ------------------------------------------------------------------ models, names, configs
def test_unknown_open_clip_name_gets_the_closest_names():
    with pytest.raises(ValueError, match=r"--model 'ViT-B-23' .*did you mean ViT-B-32"):
        train.resolve(train.get_args_parser().parse_args(["--train-data", "x.csv", "--model", "ViT-B-23"]))


@pytest.mark.parametrize("change, field", [
    (lambda c: c.pop("text_cfg"), "field 'text_cfg' is missing"),
    (lambda c: c["vision_cfg"].update(widht=32), r"field 'vision_cfg.widht' .*did you mean width"),
    (lambda c: c.update(quick_gelu_x=True), "field 'quick_gelu_x'"),
])
def test_a_config_open_clip_rejects_names_the_file_and_field(tmp_path, change, field):
    cfg = tiny_config()
    change(cfg)
    path = tmp_path / "bad-tiny.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"--model '{path}': {field}"):
        open_clip_arch.resolve_name(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"--model '{path}': not a JSON file"):
        open_clip_arch.resolve_name(str(path))


def test_quickgelu_and_grad_checkpointing_on_a_preset_are_refused(tmp_path):
    data = make_train_data(tmp_path, n=4)
    for flag in ("--quickgelu", "--grad-checkpointing"):
        with pytest.raises(ValueError, match=f"{flag} is for open_clip models; --model CLIP_TINY"):
            train.main(train_argv(data, tmp_path / "out", flag))
    assert not (tmp_path / "out").exists()


def test_open_clip_train_flags_are_accepted_or_refused_by_name(tmp_path):
    data = make_train_data(tmp_path, n=4)
    parse = train.get_args_parser().parse_args
    argv = train_argv(data, tmp_path / "o", "--precision", "amp_bf16", "--accum-freq", "2", "--warmup", "100")
    del argv[argv.index("--warmup-epochs"):argv.index("--warmup-epochs") + 2]
    args = parse(argv)
    cfg = train.resolve(args)
    assert (cfg.precision, cfg.update_freq, cfg.warmup_epochs) == ("amp_bf16", 2, None)
    assert (cfg.settings()["disable_amp"], cfg.settings()["amp_dtype"]) == (False, "bf16")  # as checkpoints record them
    with pytest.raises(ValueError, match=r"--lock-image \(an open_clip_train flag .*not implement\), "
                                         r"--beta1 \(open_clip_train's; here --betas"):
        train.main(train_argv(data, tmp_path / "o", "--lock-image", "--beta1", "0.9"))
    with pytest.raises(ValueError, match="--local-loss alone is not implemented"):
        train.main(train_argv(data, tmp_path / "o", "--local-loss"))
    with pytest.raises(ValueError, match="--delete-previous-checkpoint deletes the epoch_E.pt files"):
        train.main(train_argv(data, tmp_path / "o", "--delete-previous-checkpoint"))


def test_weight_decay_follows_open_clip_train():
    """open_clip_train: no decay under 2-D or for names with bn/ln/bias/logit_scale; that group first."""
    torch.manual_seed(0)
    model = open_clip_arch.create("ViT-B-32", device="meta").model
    no_decay, decay = param_groups(model, 0.2, no_decay_first=True)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert {"logit_scale", "visual.class_embedding", "ln_final.weight", "visual.conv1.weight"} - skipped == {
        "visual.conv1.weight"}
    assert {"positional_embedding", "token_embedding.weight", "visual.positional_embedding"} <= {
        names[id(p)] for p in decay["params"]}
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------ the loss
def test_loss_equals_open_clip_clip_loss_one_process():
    diff = parity()
    assert diff["loss"] <= 1e-6 and diff["grad"] <= 1e-6


def _parity_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(parity(rank, 2), os.path.join(out, f"parity{rank}.pt"))
    finally:
        cleanup_distributed()


@pytest.mark.slow
def test_loss_equals_open_clip_clip_loss_two_processes(tmp_path):
    mp.spawn(_parity_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        diff = torch.load(tmp_path / f"parity{rank}.pt")
        assert diff["loss"] <= 1e-6 and diff["grad"] <= 1e-6, diff


# ------------------------------------------------------------------ --aug-text-weights
def test_aug_text_weights_pick_by_weight_and_default_stays_uniform():
    rng = random.Random(0)
    picks = [pick_caption("orig caption", ["first rewrite", "second rewrite"], rng, (0.8, 0.2, 0)) for _ in range(2000)]
    assert "second rewrite" not in picks and 0.75 < picks.count("orig caption") / 2000 < 0.85
    a, b = random.Random(5), random.Random(5)
    assert [pick_caption("o w", ["r1 w", "r2 w"], a) for _ in range(50)] == \
           [["o w", "r1 w", "r2 w"][b.randrange(3)] for _ in range(50)]


@pytest.mark.parametrize("weights, message", [
    (["1", "1"], "has 2 values; it needs 3"), (["1", "-1", "1"], "must be finite, >= 0"),
    (["0", "0", "0"], "not all 0")])
def test_bad_aug_text_weights_are_refused_before_work(tmp_path, weights, message):
    data = make_train_data(tmp_path, n=4)
    with pytest.raises(ValueError, match=f"--aug-text-weights .*{message}"):
        train.main(train_argv(data, tmp_path / "out", "--aug-text-weights", *weights))
    assert not (tmp_path / "out").exists()


def test_aug_text_weights_train_on_shards_with_an_open_clip_model(tmp_path):
    shards = make_shards(tmp_path / "shards", n_shards=4, per_shard=6, bad=False)
    config = write_tiny_config(tmp_path / "cfg")
    argv = shard_argv(shards, tmp_path / "out", config, "--aug-text", "--rewrite-json-keys", "re_caption")
    with pytest.raises(ValueError, match="it needs 2: the original caption's, then one per rewrite source"):
        train.main(argv + ["--aug-text-weights", "1", "1", "1"])
    stats = train.main(argv + ["--aug-text-weights", "0.8", "0.2"])
    assert stats[0]["samples"] == 16 and torch.isfinite(torch.tensor(stats[0]["loss"]))


# ------------------------------------------------------------------ checkpoints, both ways
@pytest.mark.slow
def test_train_py_checkpoint_loads_in_open_clip_eval_scripts_and_open_clip_train(tmp_path, capsys):
    import open_clip

    import eval_zeroshot_imagenet_laion
    from evaluation.models import load_for_eval
    data = make_train_data(tmp_path, n=8)
    config = write_tiny_config(tmp_path / "cfg")
    out = tmp_path / "out"
    train.main(oc_argv(data, out, config, "--epochs", "1", "--save-frequency", "1"))
    ckpt = out / "checkpoint.pt"
    assert (out / "epoch_1.pt").is_file()
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    model = open_clip.create_model("laclip-tiny-oc", pretrained=str(ckpt))  # strict load by open_clip
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["module." + key]), key
    result = eval_zeroshot_imagenet_laion.main(["--imagenet-root", make_imagenet_root(tmp_path), "--ckpt-path",
                                                str(ckpt), "--model", "laclip-tiny-oc", "--workers", "0",
                                                "--batch-size", "4", "--device", "cpu"])
    assert 0 <= result["top1"] <= 100
    em = load_for_eval("laclip-tiny-oc", str(ckpt), False, torch.device("cpu"))  # eval_benchmark.py's loader
    assert torch.equal(em.model.state_dict()["visual.conv1.weight"], saved["module.visual.conv1.weight"])

    # open_clip_train continues it: epoch 2 from train.py's weights and optimizer state
    shards = make_shards(tmp_path / "shards", n_shards=4, per_shard=6, bad=False)
    run = run_open_clip_train(config, [
        "--train-data", shards.tars, "--dataset-type", "webdataset", "--train-num-samples", "16",
        "--batch-size", "4", "--workers", "0", "--epochs", "2", "--model", "laclip-tiny-oc", "--precision", "fp32",
        "--resume", str(ckpt), "--logs", str(tmp_path / "logs"), "--name", "oc", "--warmup", "1", "--lr", "1e-3",
        "--report-to", ""])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming checkpoint" in run.stdout + run.stderr and "(epoch 1)" in run.stdout + run.stderr
    theirs = tmp_path / "logs" / "oc" / "checkpoints" / "epoch_2.pt"
    assert torch.load(theirs, weights_only=True)["epoch"] == 2

    # and train.py continues open_clip_train's epoch_2.pt, saying what does not carry over
    capsys.readouterr()
    stats = train.main(shard_argv(shards, tmp_path / "back", config, "--epochs", "3", "--resume", str(theirs)))
    printed = capsys.readouterr().out
    assert [s["epoch"] for s in stats] == [2]
    assert "written by open_clip_train" in printed and "data order and learning-rate schedule do not" in printed
    resumed = torch.load(tmp_path / "back" / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == 3


def test_a_checkpoint_for_another_open_clip_model_names_the_fitting_one(tmp_path):
    data = make_train_data(tmp_path, n=4)
    p16 = write_tiny_config(tmp_path / "a", "laclip-tiny-b16", patch=16, width=768)  # ViT-B-16's patch embedding
    p32 = write_tiny_config(tmp_path / "b", "laclip-tiny-p32", patch=32)
    train.main(oc_argv(data, tmp_path / "out", p16, "--epochs", "1", aug=False))
    released = tmp_path / "released.pt"  # as LaCLIP's LAION files: epoch and weights, no flags to compare
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    torch.save({"epoch": 32, "state_dict": ckpt["state_dict"]}, released)
    with pytest.raises(ValueError, match=r"does not fit open_clip --model .*laclip-tiny-p32\.json[\s\S]*"
                                         r"patch embedding \(768, 3, 16, 16\) fits ViT-B-16"):
        train.main(oc_argv(data, tmp_path / "new", p32, "--resume", str(released), "--epochs", "33", aug=False))
    with pytest.raises(ValueError, match=r"looks like an open_clip ViT-B-16 checkpoint: try --model ViT-B-16"):
        train.main(train_argv(data, tmp_path / "new2", "--resume", str(released), "--epochs", "33", aug=False))


# ------------------------------------------------------------------ longer runs
def test_a_larger_epochs_extends_a_finished_run_and_a_smaller_one_is_refused(tmp_path, capsys):
    data = make_train_data(tmp_path, n=8)
    out = tmp_path / "out"
    argv = train_argv(data, out, "--epochs", "1")
    train.main(argv)
    capsys.readouterr()
    stats = train.main(train_argv(data, out, "--epochs", "2"))
    assert [s["epoch"] for s in stats] == [1]
    assert "extending the run from --epochs 1 to 2: the learning-rate schedule" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == [0, 1]
    with pytest.raises(ValueError, match=r"--epochs 2 \(now 1\)"):
        train.main(argv)
    with pytest.raises(ValueError, match=r"--batch-size 4 \(now 2\)"):  # data flags stay refused
        train.main(train_argv(data, out, "--epochs", "3", "--batch-size", "2"))


def test_save_frequency_keeps_open_clip_train_epoch_files(tmp_path):
    data = make_train_data(tmp_path, n=8)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--epochs", "3", "--save-frequency", "2", "--delete-previous-checkpoint"))
    # epoch 2 kept (every 2nd), epoch 3 kept (the last) and epoch 2 then deleted, as open_clip_train does
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_3.pt"]
    train.main(train_argv(data, tmp_path / "o2", "--epochs", "3", "--save-frequency", "2"))
    assert sorted(p.name for p in (tmp_path / "o2").glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_3.pt"]


def test_multi_text_trains_an_open_clip_model_on_the_csv(tmp_path):
    """LaCLIP-MT: every text of an image through open_clip's tokenizer ([T, 77] per sample)."""
    data = make_train_data(tmp_path, n=8)
    config = write_tiny_config(tmp_path / "cfg")
    stats = train.main(oc_argv(data, tmp_path / "out", config, "--epochs", "1", "--multi-text"))
    assert stats[0]["samples"] == 8 and torch.isfinite(torch.tensor(stats[0]["loss"]))
