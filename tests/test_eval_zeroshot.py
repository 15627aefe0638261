"""Both eval scripts end to end on synthetic ImageFolders, checked against an independent computation."""
from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import eval_zeroshot_imagenet
import eval_zeroshot_imagenet_laion
import imagenet_templates
import models
from common.distributed import resolve_device
from conftest import TINY_OPEN_CLIP, unwritable_dir, write_image, write_payload_checkpoint
from evaluation import imagenet_eval
from evaluation.features import Features
from evaluation.imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_WNIDS, OPENAI_TEMPLATES, SIMPLE_TEMPLATES
from evaluation.imagenet_folders import imagenet_val
from evaluation.tasks import build_classifier, classification_metrics
from tokenizer import SimpleTokenizer

WNIDS = ("n01440764", "n02102040", "n03000684", "n04592741")


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY")
    path = tmp_path / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path), model.eval()


def eval_args(root, ckpt, *extra):
    return ["--imagenet-root", root, "--ckpt-path", ckpt, "--model", "CLIP_TINY", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", *extra]


def reference_top1(model, encode_text, tokenize, root, folders, names, templates, preprocess):
    """Per-image, per-template loop, written apart from evaluation/imagenet_eval.py."""
    with torch.no_grad():
        weights = []
        for name in names:
            emb = torch.stack([F.normalize(encode_text(tokenize([t.format(name)]))[0], dim=-1)
                               for t in templates])
            weights.append(F.normalize(emb.mean(0), dim=-1))
        weights = torch.stack(weights)  # [C, E]
        correct = total = 0
        for label, folder in enumerate(folders):
            for fname in sorted(os.listdir(os.path.join(root, "val", folder))):
                image = Image.open(os.path.join(root, "val", folder, fname)).convert("RGB")
                feat = F.normalize(model.encode_image(preprocess(image)[None])[0], dim=-1)
                correct += int((weights @ feat).argmax()) == label
                total += 1
    return 100.0 * correct / total, total


def laclip_preprocess(image):
    image = TF.resize(image, 224, interpolation=TF.InterpolationMode.BILINEAR)
    image = TF.to_tensor(TF.center_crop(image, 224))
    return TF.normalize(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_eval_matches_independent_computation(tmp_path, make_imagenet, tiny_ckpt, capsys):
    ckpt, model = tiny_ckpt
    root = make_imagenet(WNIDS, per_class=3)
    # grayscale, RGBA, palette and CMYK images are converted, not rejected
    for i, mode in enumerate(["L", "RGBA", "P"]):
        write_image(os.path.join(root, "val", WNIDS[i], f"mode_{mode}.png"), seed=900 + i, mode=mode)
    write_image(os.path.join(root, "val", WNIDS[3], "cmyk.jpg"), seed=999, mode="CMYK")
    out = tmp_path / "res.json"
    results = eval_zeroshot_imagenet.main(eval_args(root, ckpt, "--output-json", str(out)))
    names = [IMAGENET_CLASSNAMES[IMAGENET_WNIDS.index(w)] for w in WNIDS]
    tok = SimpleTokenizer()
    top1, total = reference_top1(model, model.encode_text, tok, root, WNIDS, names, SIMPLE_TEMPLATES,
                                 laclip_preprocess)
    assert results["images"] == total == 16
    assert results["top1"] == pytest.approx(top1)
    assert results["top5"] == pytest.approx(100.0)  # 4 classes: the top-5 holds all of them
    saved = json.loads(out.read_text())
    assert saved["top1"] == pytest.approx(top1) and saved["templates"] == SIMPLE_TEMPLATES
    assert saved["model"] == "CLIP_TINY" and saved["images"] == 16 and "mean_per_class" in saved
    # the original's line, value unrounded: 100 * correct / images
    assert f"\nImageNet zero-shot accuracy: {top1}\n" in "\n" + capsys.readouterr().out


def test_imagenet_data_equals_open_clip_and_timm():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES as OC_NAMES
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo
    assert list(IMAGENET_CLASSNAMES) == list(OC_NAMES)
    assert list(OPENAI_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert SIMPLE_TEMPLATES == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                "a photo of the small {}."]
    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(1000)]
    assert list(IMAGENET_WNIDS) == wnids == sorted(wnids)
    # the original LaCLIP import path serves the same lists
    assert imagenet_templates.IMAGENET_CLASSNAMES is IMAGENET_CLASSNAMES
    assert imagenet_templates.SIMPLE_TEMPLATES is SIMPLE_TEMPLATES


def test_subset_of_wordnet_folders_gets_right_names(make_imagenet):
    root = make_imagenet(("n01443537", "n02123045", "n04592741"), per_class=1)
    _, names = imagenet_val(root, transform=lambda x: x)
    assert names == ["goldfish", "tabby cat", "airplane wing"]


def test_non_wordnet_folders_need_classnames(tmp_path, make_imagenet, tiny_ckpt):
    ckpt, _ = tiny_ckpt
    root = make_imagenet(("cats", "dogs"), per_class=2)
    with pytest.raises(ValueError, match="--classnames"):
        eval_zeroshot_imagenet.main(eval_args(root, ckpt))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    with pytest.raises(ValueError, match="3 names but"):
        eval_zeroshot_imagenet.main(eval_args(root, ckpt, "--classnames", str(names)))
    names.write_text("cat\ndog\n")
    assert eval_zeroshot_imagenet.main(eval_args(root, ckpt, "--classnames", str(names)))["images"] == 4


def test_corrupt_image_fails_naming_file_or_is_skipped_and_counted(make_imagenet, tiny_ckpt, capsys):
    ckpt, _ = tiny_ckpt
    root = make_imagenet(WNIDS[:2], per_class=2)
    good = os.path.join(root, "val", WNIDS[0], "img_0.png")
    bad = os.path.join(root, "val", WNIDS[1], "broken.png")
    with open(good, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(OSError, match="broken.png.*pass --skip-bad-images to leave such files out"):
        eval_zeroshot_imagenet.main(eval_args(root, ckpt))
    results = eval_zeroshot_imagenet.main(eval_args(root, ckpt, "--skip-bad-images"))
    assert results["skipped_images"] == 1 and results["images"] == 4
    assert results["skipped_files"] == [bad]
    assert "Skipped 1 unreadable images" in capsys.readouterr().out


def test_corrupt_image_in_a_worker_is_one_line_naming_the_file(make_imagenet, tiny_ckpt):
    """With --workers > 0 (the default is 8) the error is ours, not a DataLoader worker traceback."""
    ckpt, _ = tiny_ckpt
    root = make_imagenet(WNIDS[:2], per_class=2)
    bad = os.path.join(root, "val", WNIDS[1], "broken.JPEG")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    args = eval_args(root, ckpt)
    args[args.index("--workers") + 1] = "2"
    with pytest.raises(OSError) as err:
        eval_zeroshot_imagenet.main(args)
    assert str(err.value).startswith(f"cannot read image {bad!r}") and "Traceback" not in str(err.value)
    results = eval_zeroshot_imagenet.main(args + ["--skip-bad-images"])
    assert results["skipped_files"] == [bad] and results["images"] == 4


@pytest.mark.parametrize("case", ["missing_ckpt", "wrong_model", "no_val", "empty_class", "unknown_model",
                                  "missing_root", "bad_templates", "flat_val", "root_is_val", "bad_device",
                                  "missing_classnames"])
def test_bad_inputs_get_clear_errors(tmp_path, make_imagenet, tiny_ckpt, case):
    ckpt, _ = tiny_ckpt
    root = make_imagenet(WNIDS[:2], per_class=1)
    args = eval_args(root, ckpt)
    if case == "missing_ckpt":
        args[3], expect = str(tmp_path / "nope.pt"), "--ckpt-path.*nope.pt"
    elif case == "wrong_model":
        args[5], expect = "CLIP_VITS16", "(?s)does not fit --model CLIP_VITS16.*missing keys.*try --model CLIP_TINY"
    elif case == "no_val":
        os.rename(os.path.join(root, "val"), os.path.join(root, "train"))
        expect = "no 'val' folder"
    elif case == "empty_class":
        os.makedirs(os.path.join(root, "val", "n04592741"))
        expect = "n04592741.*has no images"
    elif case == "unknown_model":
        args[5], expect = "CLIP_VITB32", "--model 'CLIP_VITB32'"
    elif case == "missing_root":
        args[1], expect = str(tmp_path / "nowhere"), "--imagenet-root.*nowhere"
    elif case == "bad_templates":
        (tmp_path / "t.txt").write_text("a photo of a dog\n")
        args += ["--templates", str(tmp_path / "t.txt")]
        expect = "--templates"
    elif case == "flat_val":  # ILSVRC2012_img_val.tar unpacked as it is
        flat = tmp_path / "flat"
        (flat / "val").mkdir(parents=True)
        write_image(str(flat / "val" / "ILSVRC2012_val_00000001.JPEG"), seed=1)
        args[1], expect = str(flat), "no class folders; it holds 1 images directly.*valprep"
    elif case == "root_is_val":
        args[1], expect = os.path.join(root, "val"), "no 'val' folder.*pass the folder above it"
    elif case == "bad_device":
        args[args.index("--device") + 1], expect = "gpu0", "--device 'gpu0' is not a device"
    else:
        args += ["--classnames", str(tmp_path / "names.txt")]
        expect = "--classnames.*names.txt"
    if case not in ("missing_ckpt", "wrong_model", "unknown_model", "bad_device"):
        args[3] = str(tmp_path / "nope.pt")  # folder and file errors come before the checkpoint is read
    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        eval_zeroshot_imagenet.main(args)


def test_cuda_index_beyond_the_machine_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="--device cuda:1: this machine has 1 CUDA device"):
        resolve_device("cuda:1")


def test_repeated_class_names_share_one_column_and_ties_go_to_the_first():
    """ImageNet names two pairs of classes alike; the original's argmax gives such ties to the first."""
    torch.manual_seed(0)
    model = models.get_model("CLIP_TINY").eval()
    long = "a very long class name with many many words in it indeed"
    names = ["missile", long, "missile", "x", long]
    # 14 texts a batch: the two "missile" land in batches of different lengths
    weights = build_classifier(model, SimpleTokenizer(), names, SIMPLE_TEMPLATES, torch.device("cpu"),
                               text_batch_size=14)
    assert weights.shape == (32, 5)
    assert torch.equal(weights[:, 0], weights[:, 2]) and torch.equal(weights[:, 1], weights[:, 4])

    # Exact ties: class 4's column is class 0's; every image is class 0.
    classifier = torch.eye(5)
    classifier[:, 4] = classifier[:, 0]
    gen = torch.Generator().manual_seed(0)
    feats = torch.rand(64, 5, generator=gen) + torch.tensor([2.0, 0, 0, 0, 0])
    res = imagenet_eval.percent_metrics(feats @ classifier, Features(feats, torch.zeros(64, dtype=torch.long), []))
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["mean_per_class"] == 100.0
    # eval_benchmark.py's metrics apply the same rule
    assert classification_metrics(feats @ classifier, torch.zeros(64, dtype=torch.long))["acc1"] == 1.0


def test_laion_eval_matches_independent_computation(make_imagenet, tiny_open_clip):
    ckpt, model, preprocess = tiny_open_clip
    root = make_imagenet(WNIDS[:3], per_class=2)
    args = ["--imagenet-root", root, "--ckpt-path", ckpt, "--model", "LaCLIP-test-tiny", "--batch-size", "3",
            "--workers", "0", "--device", "cpu"]
    results = eval_zeroshot_imagenet_laion.main(args)
    names = [IMAGENET_CLASSNAMES[IMAGENET_WNIDS.index(w)] for w in WNIDS[:3]]
    tokenizer = open_clip.get_tokenizer("LaCLIP-test-tiny")
    top1, total = reference_top1(model, model.encode_text, tokenizer, root, WNIDS[:3], names,
                                 OPENAI_TEMPLATES, preprocess)
    assert results["images"] == total == 6 and len(results["templates"]) == 80
    assert results["top1"] == pytest.approx(top1)
    # --quickgelu builds another activation: same keys, different outputs
    quick = eval_zeroshot_imagenet_laion.main(args + ["--quickgelu"])
    assert quick["images"] == 6


def test_laion_bad_model_and_mismatch(make_imagenet, tiny_open_clip, tiny_ckpt):
    root = make_imagenet(WNIDS[:1], per_class=1)
    laion_ckpt, _, _ = tiny_open_clip
    with pytest.raises(ValueError, match="not an open_clip model.*ViT-B-32"):
        eval_zeroshot_imagenet_laion.main(["--imagenet-root", root, "--ckpt-path", laion_ckpt,
                                           "--model", "ViT-B-33"])
    with pytest.raises(ValueError, match="(?s)does not fit.*use eval_zeroshot_imagenet.py"):
        eval_zeroshot_imagenet_laion.main(["--imagenet-root", root, "--ckpt-path", tiny_ckpt[0],
                                           "--model", "LaCLIP-test-tiny"])


def test_laion_open_clip_training_checkpoints_load(tmp_path, make_imagenet, tiny_open_clip):
    """Files as open_clip's training writes them: epoch/name/optimizer beside a 'module.' state
    dict; with a logit_bias (trained with --siglip) or not; logit_scale stored as [1]."""
    _, model, _ = tiny_open_clip
    root = make_imagenet(WNIDS[:3], per_class=2)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    base = ["--imagenet-root", root, "--model", "LaCLIP-test-tiny", "--batch-size", "3",
            "--workers", "0", "--device", "cpu", "--templates", "simple"]
    plain = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "laion400m_laclip", "optimizer": optimizer,
                "state_dict": {**state, "module.logit_scale": state["module.logit_scale"].reshape(1)}}, plain)
    expected = eval_zeroshot_imagenet_laion.main(base + ["--ckpt-path", str(plain)])
    biased = tmp_path / "siglip.pt"
    torch.save({"epoch": 1, "name": "x", "optimizer": optimizer,
                "state_dict": {**state, "module.logit_bias": torch.tensor(-7.5)}}, biased)
    with_bias = eval_zeroshot_imagenet_laion.main(base + ["--ckpt-path", str(biased)])
    assert with_bias["top1"] == expected["top1"] and with_bias["images"] == 6
    loaded = eval_zeroshot_imagenet_laion.load_model(
        eval_zeroshot_imagenet_laion.get_args_parser().parse_args(base + ["--ckpt-path", str(biased)]),
        torch.device("cpu")).model
    assert float(loaded.logit_bias.detach()) == -7.5
    # a config with a logit_bias (SigLIP-style) and a file without one: 0, as open_clip does
    cfg_dir = tmp_path / "configs_bias"
    cfg_dir.mkdir()
    (cfg_dir / "LaCLIP-test-tiny-bias.json").write_text(json.dumps({**TINY_OPEN_CLIP, "init_logit_bias": -10}))
    open_clip.add_model_config(str(cfg_dir))
    args = base + ["--ckpt-path", str(plain)]
    args[args.index("--model") + 1] = "LaCLIP-test-tiny-bias"
    assert eval_zeroshot_imagenet_laion.main(args)["top1"] == expected["top1"]


def test_a_checkpoint_that_would_run_code_needs_trust_checkpoint(tmp_path, make_imagenet, tiny_ckpt, tiny_open_clip):
    """Both scripts refuse a file whose pickle calls a function, before running it; with
    --trust-checkpoint they load it (and the payload runs: that is what trusting means)."""
    root = make_imagenet(WNIDS[:2], per_class=1)
    laion_state = tiny_open_clip[1].state_dict()
    for script, model, state in ((eval_zeroshot_imagenet, "CLIP_TINY", tiny_ckpt[1].state_dict()),
                                 (eval_zeroshot_imagenet_laion, "LaCLIP-test-tiny", laion_state)):
        marker = tmp_path / f"ran_{model}"
        path = write_payload_checkpoint(tmp_path / f"{model}.pt", state, marker)
        args = eval_args(root, path, "--model", model, "--templates", "simple")
        with pytest.raises(ValueError, match=f"--ckpt-path: {path!r} .*mkdir.*--trust-checkpoint"):
            script.main(args)
        assert not marker.exists()
        assert script.main(args + ["--trust-checkpoint"])["images"] == 2 and marker.exists()


def test_every_file_of_a_class_folder_is_evaluated_or_reported(tmp_path, make_imagenet, tiny_ckpt, capsys):
    """A broken symlink named like an image is an unreadable image (refused, or skipped with
    --skip-bad-images); a .gif (not in torchvision's list, which the original used), another
    file and a subfolder are listed as not evaluated, before the checkpoint is read."""
    ckpt, _ = tiny_ckpt
    root = make_imagenet(WNIDS[:2], per_class=2)
    first, second = os.path.join(root, "val", WNIDS[0]), os.path.join(root, "val", WNIDS[1])
    gone = os.path.join(first, "gone.png")
    os.symlink(os.path.join(first, "moved_away.png"), gone)
    write_image(os.path.join(first, "anim.gif"), seed=5)
    open(os.path.join(second, "README.txt"), "w").close()
    os.makedirs(os.path.join(second, "extra"))
    write_image(os.path.join(second, "extra", "img.png"), seed=6)
    with pytest.raises(OSError, match="gone.png"):
        eval_zeroshot_imagenet.main(eval_args(root, ckpt))
    out = capsys.readouterr().out
    assert "3 files in the class folders" in out and out.index("not evaluated") < len(out)
    for name in (f"{WNIDS[0]}/anim.gif", f"{WNIDS[1]}/README.txt", f"{WNIDS[1]}/extra"):
        assert name in out
    results = eval_zeroshot_imagenet.main(eval_args(root, ckpt, "--skip-bad-images"))
    assert results["images"] == 4 and results["skipped_files"] == [gone]
    assert sorted(results["not_evaluated_files"]) == sorted(
        [os.path.join(first, "anim.gif"), os.path.join(second, "README.txt"), os.path.join(second, "extra")])


def test_unwritable_output_json_fails_before_the_checkpoint_is_read(tmp_path, make_imagenet):
    root = make_imagenet(WNIDS[:1], per_class=1)
    target = unwritable_dir(tmp_path) / "results.json"
    with pytest.raises(ValueError, match=f"--output-json {str(target)!r}: cannot write in"):
        eval_zeroshot_imagenet.main(eval_args(root, str(tmp_path / "nope.pt"), "--output-json", str(target)))
