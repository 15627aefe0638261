"""eval_benchmark.py end to end on a tiny random CLIP: every task, numbers against CLIP_benchmark's
own code and against independent computations, the feature cache, result files and tables."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

import benchmark_fixtures as bf
import eval_benchmark
from evaluation import features as features_mod
from evaluation import probe
from evaluation.models import load_for_eval
from evaluation.readers import read_split
from common.locking import FileLock


@pytest.fixture
def ckpt(tmp_path):
    return bf.tiny_checkpoint(tmp_path / "tiny.pt")


def run(tmp_path, ckpt, dataset, root, *extra, task=("auto",)):
    argv = ["--dataset", dataset, "--dataset_root", root, "--task", *task, "--model", "CLIP_TINY",
            "--pretrained", ckpt, "--output", str(tmp_path / "{dataset}_{task}.json"), "--batch_size", "8",
            "--num_workers", "0", "--feature_root", str(tmp_path / "features"), "--device", "cpu", "--quiet", *extra]
    return eval_benchmark.main(argv)


def encode(model, transform, paths, batch_size: int = 8) -> torch.Tensor:
    """Image features in the batches ``run`` uses (``--batch_size 8``): a float32 matmul rounds differently
    with another batch shape, and an unconverged probe fit can turn such last-bit differences into a
    different prediction."""
    with torch.no_grad():
        images = [transform(Image.open(p).convert("RGB")) for p in paths]
        return torch.cat([model.encode_image(torch.stack(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])


@pytest.mark.slow  # 18 datasets, a few seconds in all
@pytest.mark.parametrize("name", list(bf.MAKERS))
def test_every_dataset_runs_zero_shot(tmp_path, ckpt, name, one_thread):
    root = bf.make(name, tmp_path)
    [record] = run(tmp_path, ckpt, name, root, "--feature_root", "")
    saved = json.loads((tmp_path / f"{name}_{record['task']}.json").read_text())
    assert saved["dataset"] == name and saved["model"] == "CLIP_TINY" and saved["pretrained"] == ckpt
    assert saved["task"] == ("zeroshot_retrieval" if name in ("flickr30k", "mscoco_captions") else
                             "zeroshot_classification")
    assert saved["metrics"] and all(v is None or 0.0 <= v <= 1.0 for v in saved["metrics"].values())


def test_zero_shot_equals_clip_benchmark(tmp_path, ckpt, one_thread):
    """Same model, files, prompts and preprocessing through CLIP_benchmark's own dataset builder,
    classifier and logits: the same acc1, acc5 and mean per-class recall. (Its `accuracy` helper
    fails under numpy 2.x, float() of a 1-element array, so its definitions are applied here:
    top-k of the logits, scikit-learn's balanced accuracy.)"""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score
    root = bf.make("dtd", tmp_path)
    [ours] = run(tmp_path, ckpt, "dtd", root)
    em = load_for_eval("CLIP_TINY", ckpt, False, torch.device("cpu"))
    ds = build_dataset("dtd", root=root, transform=em.transform, split="test", download=False)
    classifier = cb.zero_shot_classifier(em.model, em.tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    logits, target = cb.run_classification(em.model, classifier, DataLoader(ds, batch_size=5), "cpu", amp=False)
    top = logits.topk(5, dim=1).indices
    theirs = {"acc1": float((top[:, 0] == target).double().mean()),
              "acc5": float((top == target[:, None]).any(dim=1).double().mean()),
              "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(dim=1))}
    assert ours["metrics"] == pytest.approx(theirs, abs=1e-12)
    assert ours["templates"] == len(ds.templates) == 8 and ours["images"] == len(ds) == 12


def test_retrieval_equals_clip_benchmark_and_a_plain_loop(tmp_path, ckpt, one_thread):
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as cb
    root = bf.make("flickr30k", tmp_path)
    [ours] = run(tmp_path, ckpt, "flickr30k", root, "--recall_k", "1", "2", "3")
    em = load_for_eval("CLIP_TINY", ckpt, False, torch.device("cpu"))
    ds = build_dataset("flickr30k", root=root, transform=em.transform, split="test", download=False,
                       task="zeroshot_retrieval",
                       annotation_file=os.path.join(root, "flickr30k_test_karpathy.txt"))
    loader = DataLoader(ds, batch_size=2, collate_fn=get_dataset_collate_fn("flickr30k"))
    theirs = cb.evaluate(em.model, loader, em.tokenizer, device="cpu", amp=False, recall_k_list=[1, 2, 3])
    assert ours["metrics"] == pytest.approx(theirs, abs=1e-7)  # theirs: float32 means of the same counts
    # a plain loop over every caption and image
    paths = [os.path.join(root, f"{1000 + i}.jpg") for i in range(len(bf.CAPTIONS))]
    img = torch.nn.functional.normalize(encode(em.model, em.transform, paths), dim=-1)
    texts = [(c, i) for i, caps in enumerate(bf.CAPTIONS) for c in caps]
    with torch.no_grad():
        txt = torch.nn.functional.normalize(em.model.encode_text(em.tokenizer([c for c, _ in texts])), dim=-1)
    sim = txt @ img.t()
    for k in (1, 2, 3):
        t2i = np.mean([i in sim[t].argsort(descending=True)[:k].tolist() for t, (_, i) in enumerate(texts)])
        i2t = np.mean([any(texts[t][1] == i for t in sim[:, i].argsort(descending=True)[:k].tolist())
                       for i in range(len(paths))])
        assert ours["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert ours["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t)


def _noise_dtd(tmp_path) -> str:
    """DTD in miniature with class-free noise images, so the probe is not trivially perfect."""
    root = bf.make("dtd", tmp_path)
    images = os.path.join(root, "dtd", "dtd", "images")
    for i, (d, _, files) in enumerate(os.walk(images)):
        for j, f in enumerate(files):
            bf.image(os.path.join(d, f), 0, 7919 * i + j)
    return root


@pytest.fixture
def quick_fits(monkeypatch):
    """100 L-BFGS iterations instead of 1000: a dozen noise images never converge at small lambda,
    and the reference fits below use the same limit."""
    monkeypatch.setattr(probe, "MAX_ITER", 100)
    return 100


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the reference fits
def test_linear_probe_equals_sklearn_on_independent_features(tmp_path, ckpt, one_thread, quick_fits):
    root = _noise_dtd(tmp_path)
    [lp] = run(tmp_path, ckpt, "dtd", root, task=("linear_probe",))
    m = lp["metrics"]
    assert lp["train_split"] == "train" and lp["val_split"] == "val" and m["fewshot_k"] == -1
    assert m["lp_C"] == pytest.approx(1 / m["lp_lambda"]) and 1e-6 <= m["lp_lambda"] <= 1e6
    assert np.isclose(np.log10(m["lp_lambda"]) * 8, round(np.log10(m["lp_lambda"]) * 8))  # on CLIP's grid
    em = load_for_eval("CLIP_TINY", ckpt, False, torch.device("cpu"))
    split = {s: read_split("dtd", root, s) for s in ("train", "val", "test")}
    x = {s: encode(em.model, em.transform, d.listing.paths).numpy() for s, d in split.items()}
    clf = LogisticRegression(C=m["lp_C"], max_iter=quick_fits).fit(np.concatenate([x["train"], x["val"]]),
                                                             split["train"].listing.labels + split["val"].listing.labels)
    pred, truth = clf.predict(x["test"]), np.array(split["test"].listing.labels)
    assert m["lp_acc1"] == pytest.approx(np.mean(pred == truth), abs=1e-6)
    recalls = [np.mean(pred[truth == c] == c) for c in np.unique(truth)]
    assert m["lp_mean_per_class_recall"] == pytest.approx(np.mean(recalls), abs=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_few_shot_draws_k_per_class_and_equals_sklearn(tmp_path, ckpt, one_thread, quick_fits):
    root = _noise_dtd(tmp_path)
    [fs] = run(tmp_path, ckpt, "dtd", root, "--fewshot_k", "1", "2", "3", "--seed", "3", task=("few_shot",))
    m = fs["metrics"]
    assert {"1_shot_acc1", "2_shot_acc1", "2_shot_mean_per_class_recall", "2_shot_lambda"} <= set(m)
    # a k larger than a class (2 training images each): that k is null and said, the others run
    assert m["3_shot_acc1"] is None and m["1_shot_acc1"] is not None
    assert any(n.startswith("3-shot not run: --fewshot_k 3: class 0 has only 2") for n in fs["notes"])
    em = load_for_eval("CLIP_TINY", ckpt, False, torch.device("cpu"))
    train = read_split("dtd", root, "train")
    test = read_split("dtd", root, "test")
    labels = np.array(train.listing.labels)
    rng = np.random.default_rng(3)  # the documented draw: per class in label order, k of a permutation
    chosen = sorted(i for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:2])
    x = encode(em.model, em.transform, [train.listing.paths[i] for i in chosen]).numpy()
    clf = LogisticRegression(C=1 / m["2_shot_lambda"], max_iter=quick_fits).fit(x, labels[chosen])
    pred = clf.predict(encode(em.model, em.transform, test.listing.paths).numpy())
    assert m["2_shot_acc1"] == pytest.approx(np.mean(pred == np.array(test.listing.labels)), abs=1e-6)
    # the draw itself: k per class, seeded, refused when a class is too small
    data = probe.ProbeData(np.zeros((len(labels), 1), np.float32), labels)
    assert np.bincount(probe.few_shot(data, 2, 0).y).tolist() == [2] * 6
    assert np.array_equal(probe.few_shot(data, 1, 5).x, probe.few_shot(data, 1, 5).x)
    with pytest.raises(ValueError, match="--fewshot_k 3: class 0 has only 2 training images"):
        probe.few_shot(data, 3, 0)


def test_lambda_search_is_clips_parametric_binary_search():
    """Every 16th of the 97 values, then steps 8, 4, 2, 1 around the best: finds a unimodal peak."""
    data = probe.ProbeData(np.zeros((2, 1), np.float32), np.array([0, 1]))
    for peak in (0, 37, 50, 96):
        p = probe.Probe(data, data, "acc1")
        p.score = lambda i, p=p, peak=peak: p.scores.setdefault(i, -abs(i - peak))
        assert p.search() == peak
        assert set(range(0, 97, 16)) <= set(p.scores) and len(p.scores) <= 7 + 8
    assert probe.LAMBDAS[0] == pytest.approx(1e-6) and probe.LAMBDAS[-1] == pytest.approx(1e6)
    assert probe.LAMBDAS[8] == pytest.approx(1e-5)  # 8 steps a decade


def test_probe_holds_out_validation_without_a_val_split(tmp_path, ckpt, one_thread, quick_fits):
    root = bf.make("pets", tmp_path)
    [lp] = run(tmp_path, ckpt, "pets", root, "--val_proportion", "0.5", task=("linear_probe",))
    assert lp["val_split"] == "0.5 of trainval held out" and lp["images"] == {"trainval": 6, "test": 6}
    with pytest.raises(ValueError, match="--split all: linear_probe needs a test split apart"):
        run(tmp_path, ckpt, "eurosat", bf.make("eurosat", tmp_path), "--split", "all", task=("linear_probe",))


def test_features_are_cached_and_reused_across_tasks(tmp_path, ckpt, monkeypatch, one_thread, quick_fits):
    root = bf.make("dtd", tmp_path)
    calls = []
    real = features_mod.encode_images
    monkeypatch.setattr(features_mod, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run(tmp_path, ckpt, "dtd", root, task=("zeroshot_classification", "linear_probe"))
    assert len(calls) == 3  # test once (shared by both tasks), train, val
    second = run(tmp_path, ckpt, "dtd", root, task=("zeroshot_classification", "linear_probe"))
    assert len(calls) == 3 and all(r["features_from_cache"] for r in second)
    assert [r["metrics"] for r in second] == [r["metrics"] for r in first]
    cached = sorted(f for f in os.listdir(tmp_path / "features") if f != "checkpoint_sha256.jsonl")
    assert len(cached) == 3 and all(f.endswith(".safetensors") for f in cached)
    os.utime(ckpt, ns=(1, 1))  # a retouched checkpoint is the same model (keyed on content) ...
    run(tmp_path, ckpt, "dtd", root)
    assert len(calls) == 3
    bf.tiny_checkpoint(ckpt, seed=1)  # ... a rewritten one is another
    run(tmp_path, ckpt, "dtd", root)
    assert len(calls) == 4
    newest = max((tmp_path / "features").iterdir(), key=os.path.getmtime)
    newest.write_bytes(b"garbage")  # a broken cache file is said and recomputed, never trusted
    [record] = run(tmp_path, ckpt, "dtd", root)
    assert len(calls) == 5 and any("was unreadable" in n for n in record["notes"])
    assert record["metrics"] == run(tmp_path, ckpt, "dtd", root)[0]["metrics"] and len(calls) == 5


def test_unreadable_images_fail_naming_the_file_or_are_skipped(tmp_path, ckpt, one_thread):
    root = bf.make("flickr30k", tmp_path)
    bad = os.path.join(root, "1001.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(OSError, match=r"cannot read image .*1001.jpg.*--skip_bad_images"):
        run(tmp_path, ckpt, "flickr30k", root)
    [record] = run(tmp_path, ckpt, "flickr30k", root, "--skip_bad_images")
    assert record["skipped_files"] == [bad] and record["images"] == len(bf.CAPTIONS) - 1


def test_open_clip_models_and_imagenet_templates(tmp_path, ckpt, tiny_open_clip, one_thread):
    root = bf.make("imagenet1k", tmp_path)
    [preset] = run(tmp_path, ckpt, "imagenet1k", root)
    laion_ckpt, _, _ = tiny_open_clip
    argv = ["--dataset", "imagenet1k", "--dataset_root", root, "--model", "LaCLIP-test-tiny", "--pretrained",
            laion_ckpt, "--output", str(tmp_path / "oc.json"), "--num_workers", "0", "--feature_root",
            str(tmp_path / "oc_features"), "--quiet"]
    [oc] = eval_benchmark.main(argv)
    assert preset["templates"] == 7 and oc["templates"] == 80  # LaCLIP's CC numbers vs its LAION numbers
    assert eval_benchmark.main(argv)[0]["features_from_cache"]  # open_clip's transform keys the cache too
    assert eval_benchmark.main(argv + ["--quickgelu", "--output", str(tmp_path / "q.json")])[0]["images"] == 6
    with pytest.raises(ValueError, match="(?s)does not fit open_clip --model LaCLIP-test-tiny.*pass one of CLIP_"):
        eval_benchmark.main(argv[:7] + [ckpt] + argv[8:])


def test_result_files_feed_clip_benchmark_build_and_our_table(tmp_path, ckpt, one_thread):
    from argparse import Namespace

    from clip_benchmark.cli import main_build
    results = tmp_path / "results"
    results.mkdir()
    for name in ("dtd", "eurosat", "fgvc_aircraft", "imagenet1k"):
        root = bf.make(name, tmp_path)
        eval_benchmark.main(["--dataset", name, "--dataset_root", root, "--model", "CLIP_TINY", "--pretrained", ckpt,
                             "--output", str(results / "{dataset}_{task}.json"), "--num_workers", "0",
                             "--feature_root", "", "--quiet"])
    main_build(Namespace(files=[str(results)], output=str(tmp_path / "cb.csv")))
    assert len((tmp_path / "cb.csv").read_text().splitlines()) == 5
    records = {r["dataset"]: r for r in (json.loads(p.read_text()) for p in results.glob("*.json"))}
    text = eval_benchmark.main(["--table", str(results), "--output", str(tmp_path / "t.md")])
    header, rule, row = [line for line in text.splitlines() if line.startswith("|")][:3]
    assert header == "| checkpoint | Aircraft | DTD | EuroSAT | Average | ImageNet |"
    cells = [c.strip() for c in row.split("|")[2:-1]]
    expect = [100 * records["fgvc_aircraft"]["metrics"]["mean_per_class_recall"],  # the paper's metric
              100 * records["dtd"]["metrics"]["acc1"], 100 * records["eurosat"]["metrics"]["acc1"]]
    assert cells[:3] == [f"{v:.1f}" for v in expect]
    assert cells[3] == f"{np.mean(expect):.1f} (3/15)" and cells[4] == f"{100 * records['imagenet1k']['metrics']['acc1']:.1f}"
    assert (tmp_path / "t.md").read_text() == text
    csv = eval_benchmark.main(["--table", str(results), "--output", str(tmp_path / "t.csv")])
    assert csv.splitlines()[0] == "table,checkpoint,Aircraft,DTD,EuroSAT,Average,ImageNet"


def test_bad_invocations_stop_before_work(tmp_path, ckpt, capsys):
    root = bf.make("dtd", tmp_path)
    with pytest.raises(SystemExit):  # unknown flag: argparse stops at once
        eval_benchmark.main(["--datset", "dtd"])
    assert "unrecognized arguments: --datset" in capsys.readouterr().err
    base = {"--dataset": ["dtd"], "--dataset_root": [root], "--model": ["CLIP_TINY"], "--pretrained": [ckpt],
            "--feature_root": [""]}
    cases = [
        ({"--output": [str(tmp_path / "same.json")], "--task": ["zeroshot_classification", "linear_probe"]},
         "would both write"),
        ({"--task": ["zeroshot_retrieval"]}, "--task zeroshot_retrieval does not apply to --dataset dtd"),
        ({"--pretrained": [str(tmp_path / "nope.pt")]}, "--pretrained: checkpoint file .*nope.pt"),
        ({"--model": ["CLIP_VITB32"]}, "--model 'CLIP_VITB32'"),
        ({"--fewshot_k": ["1", "2"], "--task": ["linear_probe"]}, "linear_probe takes one k"),
        ({"--output": [str(tmp_path / "no" / "x.json")]}, "--output: folder of"),
        ({"--custom_template_file": [str(tmp_path / "t.json")]}, "--custom_template_file: cannot read"),
        ({"--output": ["{dataset}_{checkpoint}.json"]}, r"--output .*unknown placeholder \{checkpoint\}"),
        ({"--task": ["linear_probe"], "--val_split": ["test"]}, "--val_split test: shares images with --split test"),
    ]
    for extra, expect in cases:
        argv = [a for flag, values in {**base, **extra}.items() for a in (flag, *values)]
        with pytest.raises((ValueError, FileNotFoundError), match=expect):
            eval_benchmark.main(argv + ["--quiet"])
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "features").exists()  # no work was done


def test_a_second_run_on_the_same_output_stops(tmp_path, ckpt):
    root = bf.make("dtd", tmp_path)
    lock = FileLock(tmp_path / "dtd_zeroshot_classification.json", "--output").acquire()
    try:
        with pytest.raises(ValueError, match=f"is in use by process {os.getpid()}"):
            run(tmp_path, ckpt, "dtd", root)
    finally:
        lock.release()
    assert run(tmp_path, ckpt, "dtd", root)[0]["images"] == 12  # released: the next run goes ahead


def test_table_rows_keep_checkpoints_with_the_same_file_name_apart(tmp_path):
    for run_dir, acc in (("run_a", 0.5), ("run_b", 0.25)):
        record = {"dataset": "dtd", "model": "CLIP_VITB16", "pretrained": f"/out/{run_dir}/checkpoint_best.pt",
                  "task": "zeroshot_classification", "metrics": {"acc1": acc, "mean_per_class_recall": acc}}
        (tmp_path / f"{run_dir}.json").write_text(json.dumps(record))
    text = eval_benchmark.main(["--table", str(tmp_path)])
    assert "| CLIP_VITB16 /out/run_a/checkpoint_best.pt | 50.0 | 50.0 (1/15) |" in text
    assert "| CLIP_VITB16 /out/run_b/checkpoint_best.pt | 25.0 | 25.0 (1/15) |" in text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--table: .*bad.json' is not a result file"):
        eval_benchmark.main(["--table", str(tmp_path)])
