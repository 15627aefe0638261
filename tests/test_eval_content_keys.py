"""eval_benchmark.py's caches keyed on content (issue 19): images or a checkpoint rewritten with
their old times, edited cached labels, --skip_existing on another checkpoint of the same name;
and retrieval and probe inputs that used to be scored or fail silently."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import benchmark_fixtures as bf
import eval_benchmark
from evaluation import content_keys
from evaluation import features as features_mod


def run(tmp_path, ckpt, dataset, root, *extra, task=("auto",), output="{dataset}_{task}.json"):
    argv = ["--dataset", dataset, "--dataset_root", root, "--task", *task, "--model", "CLIP_TINY",
            "--pretrained", str(ckpt), "--output", str(tmp_path / output), "--batch_size", "8",
            "--num_workers", "0", "--feature_root", str(tmp_path / "features"), "--device", "cpu", "--quiet", *extra]
    return eval_benchmark.main(argv)


@pytest.fixture
def encodes(monkeypatch):
    calls = []
    real = features_mod.encode_images
    monkeypatch.setattr(features_mod, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _keep_times(path, write) -> None:
    st = os.stat(path)
    write()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_images_rewritten_in_place_with_their_times_are_encoded_again(tmp_path, encodes, one_thread):
    root = bf.make("dtd", tmp_path)
    ckpt = bf.tiny_checkpoint(tmp_path / "tiny.pt")
    [first] = run(tmp_path, ckpt, "dtd", root)
    test_images = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".jpg")]
    for i, path in enumerate(test_images):  # other pixels, same names, same mtimes
        _keep_times(path, lambda path=path, i=i: bf.image(path, (i + 3) % 6, 5000 + i))
    [second] = run(tmp_path, ckpt, "dtd", root)
    assert len(encodes) == 2 and not second["features_from_cache"]
    [fresh] = run(tmp_path, ckpt, "dtd", root, "--feature_root", "")
    assert second["metrics"] == fresh["metrics"] != first["metrics"]


def test_checkpoint_hash_is_remembered_and_a_rewritten_checkpoint_is_another_model(tmp_path, encodes, monkeypatch,
                                                                                     one_thread):
    root = bf.make("dtd", tmp_path)
    ckpt = bf.tiny_checkpoint(tmp_path / "tiny.pt")
    hashed = []
    real = content_keys.file_sha256
    monkeypatch.setattr(content_keys, "file_sha256", lambda p: hashed.append(p) or real(p))
    [first] = run(tmp_path, ckpt, "dtd", root)
    assert hashed.count(ckpt) == 1  # once for the cache key and the result's pretrained_sha256 together
    assert first["pretrained_sha256"] == real(ckpt)
    hashed.clear()
    [again] = run(tmp_path, ckpt, "dtd", root)
    assert again["features_from_cache"] and ckpt not in hashed  # a hit stats the checkpoint, reads nothing
    size = os.path.getsize(ckpt)
    _keep_times(ckpt, lambda: bf.tiny_checkpoint(ckpt, seed=1))  # new weights, same size and mtime
    assert os.path.getsize(ckpt) == size
    [replaced] = run(tmp_path, ckpt, "dtd", root)
    assert ckpt in hashed and not replaced["features_from_cache"] and len(encodes) == 2
    assert replaced["pretrained_sha256"] != first["pretrained_sha256"]
    # the same bytes under another path are the same model: features come from the cache
    copy = tmp_path / "copy.pt"
    shutil.copyfile(ckpt, copy)
    [copied] = run(tmp_path, copy, "dtd", root)
    assert copied["features_from_cache"] and copied["metrics"] == replaced["metrics"]


def test_cached_labels_are_checked_against_the_dataset(tmp_path, encodes, one_thread):
    root = bf.make("dtd", tmp_path)
    ckpt = bf.tiny_checkpoint(tmp_path / "tiny.pt")
    [first] = run(tmp_path, ckpt, "dtd", root)
    [cached] = [p for p in (tmp_path / "features").iterdir() if p.suffix == ".safetensors"]
    tensors = load_file(cached)
    tensors["labels"] = torch.roll(tensors["labels"], 1)  # an edited cache would score other labels
    with safe_open(str(cached), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(cached), metadata=metadata)
    [second] = run(tmp_path, ckpt, "dtd", root)
    assert not second["features_from_cache"] and len(encodes) == 2
    assert any("labels or a sample count that differ" in n for n in second["notes"])
    assert second["metrics"] == first["metrics"]


def test_skip_existing_skips_only_a_result_of_the_same_checkpoint(tmp_path, one_thread, capsys):
    root = bf.make("dtd", tmp_path)
    for run_dir, seed in (("run1", 0), ("run2", 1)):
        (tmp_path / run_dir).mkdir()
        bf.tiny_checkpoint(tmp_path / run_dir / "checkpoint_best.pt", seed=seed)
    out = "{dataset}_{pretrained}.json"
    [record] = run(tmp_path, tmp_path / "run1" / "checkpoint_best.pt", "dtd", root, output=out)
    assert run(tmp_path, tmp_path / "run1" / "checkpoint_best.pt", "dtd", root, "--skip_existing", output=out) == []
    assert "skipped (--skip_existing)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--skip_existing: .*dtd_checkpoint_best.pt.json' holds a result of "
                                         r"checkpoint sha256 .*not of --pretrained .*run2"):
        run(tmp_path, tmp_path / "run2" / "checkpoint_best.pt", "dtd", root, "--skip_existing", output=out)
    saved = json.loads((tmp_path / "dtd_checkpoint_best.pt.json").read_text())
    assert saved == record  # the other checkpoint's result is kept
    del saved["pretrained_sha256"]  # a result written before the hash was recorded cannot be vouched for
    (tmp_path / "dtd_checkpoint_best.pt.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="no checkpoint hash"):
        run(tmp_path, tmp_path / "run1" / "checkpoint_best.pt", "dtd", root, "--skip_existing", output=out)


def test_retrieval_leaves_out_images_without_captions_and_blank_captions(tmp_path, one_thread, capsys):
    root = bf.make("mscoco_captions", tmp_path)
    ckpt = bf.tiny_checkpoint(tmp_path / "tiny.pt")
    [clean] = run(tmp_path, ckpt, "mscoco_captions", root, "--feature_root", "")
    assert clean["notes"] == []
    annotations = os.path.join(root, "coco_test_karpathy.json")
    with open(annotations) as f:
        coco = json.load(f)
    for i in range(2):  # two images nobody captioned, and blank captions of a captioned one
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        bf.image(os.path.join(root, "val2014", name), i, 900 + i)
        coco["images"].append({"id": 100 + i, "file_name": name})
    coco["annotations"] += [{"id": 1000 + i, "image_id": 10, "caption": c} for i, c in enumerate(["", "  "])]
    with open(annotations, "w") as f:
        json.dump(coco, f)
    capsys.readouterr()
    [record] = run(tmp_path, ckpt, "mscoco_captions", root, "--feature_root", "", "--recall_k", "1", "5", "10")
    assert record["images"] == 5
    assert {k: record["metrics"][k] for k in clean["metrics"]} == clean["metrics"]
    assert record["metrics"]["text_retrieval_recall@10"] == 1.0
    assert record["notes"] == ["2 images without captions left out of retrieval: COCO_val2014_000000000100.jpg, "
                               "COCO_val2014_000000000101.jpg",
                               "2 blank captions left out of retrieval (not used as queries)"]
    out = capsys.readouterr().out
    assert "note: 2 images without captions left out" in out and "note: 2 blank captions" in out


def test_a_probe_split_too_small_to_hold_out_names_val_proportion(tmp_path, one_thread):
    root = bf.make("pets", tmp_path)  # 2 images per class in trainval: 0.2 of 2 rounds to none
    ckpt = bf.tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"^--val_proportion 0.2: no image of trainval is held out for validation "
                                         r"\(per class: 2 images in 3 classes\); pass --val_proportion above 0.25 "
                                         r"or a --val_split$"):
        run(tmp_path, ckpt, "pets", root, task=("linear_probe",))
