"""eval_benchmark.py's datasets: every layout read in miniature, against torchvision's own classes
and CLIP_benchmark's class names and prompts; one-line errors; CIFAR read without unpickling code."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from torchvision import datasets as tvd

import benchmark_fixtures as bf
from evaluation import arrays
from evaluation.catalog import CATALOG, DOWNSTREAM, MEAN_PER_CLASS, published_classnames, templates_for
from evaluation.readers import LayoutError, read_split

CLASSIFICATION = [name for name, spec in CATALOG.items() if spec.kind == "classification"]
COUNTS = {"food101": 101, "cifar10": 10, "cifar100": 100, "sun397": 397, "cars": 196, "fgvc_aircraft": 100,
          "dtd": 47, "pets": 37, "caltech101": 102, "flowers": 102, "stl10": 10, "eurosat": 10, "resisc45": 45,
          "gtsrb": 43, "country211": 211, "imagenet1k": 1000}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Every miniature dataset, built once for the module."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: bf.make(name, base) for name in bf.MAKERS}


def clip_benchmark_json(name: str) -> dict:
    import clip_benchmark
    with open(os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets", name), encoding="utf-8") as f:
        return json.load(f)


def test_published_names_and_templates_are_clips():
    """Counts of the releases; templates equal CLIP_benchmark's (CLIP's prompts) where it has the
    dataset outside VTAB; names equal its lists where it ships names instead of the release's."""
    theirs_t = clip_benchmark_json("en_zeroshot_classification_templates.json")
    theirs_n = clip_benchmark_json("en_classnames.json")
    for name, count in COUNTS.items():
        names = published_classnames(name)
        assert len(names) == count and (len(set(names)) == count or name == "imagenet1k"), name
        for kind in ("preset", "open_clip"):
            assert all(t.count("{}") == 1 for t in templates_for(name, kind))
        if name not in ("imagenet1k", "resisc45"):  # CLIP_benchmark's resisc45 is VTAB's, 4 prompts
            assert templates_for(name, "preset") == [t.replace("{c}", "{}") for t in theirs_t[name]], name
    assert templates_for("imagenet1k", "open_clip") == [t.replace("{c}", "{}") for t in theirs_t["imagenet1k"]]
    assert len(templates_for("imagenet1k", "preset")) == 7 and len(templates_for("resisc45", "preset")) == 18
    for name in ("flowers", "gtsrb", "country211", "eurosat", "caltech101", "imagenet1k"):
        assert published_classnames(name) == theirs_n[name], name
    assert sorted(n.lower() for n in published_classnames("pets")) == sorted(n.lower() for n in theirs_n["pets"])
    assert [s for s in DOWNSTREAM] == ["food101", "cifar10", "cifar100", "sun397", "cars", "fgvc_aircraft", "dtd",
                                       "pets", "caltech101", "flowers", "stl10", "eurosat", "resisc45", "gtsrb",
                                       "country211"]
    assert {n for n, s in CATALOG.items() if s.metric == MEAN_PER_CLASS} == {"fgvc_aircraft", "pets", "caltech101",
                                                                          "flowers"}


def _torchvision_labels(name: str, root: str, split: str) -> list[int] | None:
    """Labels as torchvision's own class yields them, integrity checks aside (the miniature
    files cannot have the release's md5)."""
    kw = {"transform": None}
    ctor = {
        "food101": lambda: tvd.Food101(root, split=split, **kw), "sun397": lambda: tvd.SUN397(root, **kw),
        "cars": lambda: tvd.StanfordCars(root, split=split, **kw), "dtd": lambda: tvd.DTD(root, split=split, **kw),
        "fgvc_aircraft": lambda: tvd.FGVCAircraft(root, split=split, **kw),
        "pets": lambda: tvd.OxfordIIITPet(root, split=split, **kw), "gtsrb": lambda: tvd.GTSRB(root, split=split),
        "country211": lambda: tvd.Country211(root, split=split, **kw), "eurosat": lambda: tvd.EuroSAT(root, **kw),
        "flowers": lambda: tvd.Flowers102(root, split=split, **kw),
        "stl10": lambda: tvd.STL10(root, split=split, **kw),
    }
    if name not in ctor or (name == "sun397" and split != "all") or (name == "eurosat" and split != "all"):
        return None
    ds = ctor[name]()
    return [int(ds[i][1]) for i in range(len(ds))]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_every_layout_reads_as_torchvision_does(roots, name, monkeypatch):
    for cls in (tvd.Flowers102, tvd.STL10):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    spec = CATALOG[name]
    seen = {}
    for split in spec.splits:
        data = read_split(name, roots[name], split)
        labels = data.listing.labels
        assert len(labels) > 0 and max(labels) < len(data.classnames)
        if data.listing.paths is not None:
            assert all(os.path.isfile(p) for p in data.listing.paths)
        expected = _torchvision_labels(name, roots[name], split)
        if expected is not None:  # SUN397: torchvision lists in the filesystem's order, ours sorted by path
            assert (sorted(labels) if name == "sun397" else labels) == \
                (sorted(expected) if name == "sun397" else expected), (name, split)
        assert set(data.classnames) <= set(published_classnames(name)), name
        seen[split] = data
    names = {tuple(d.classnames) for d in seen.values()}
    assert len(names) == 1  # one label space across splits
    if "all" in spec.splits:  # the seeded split: disjoint, covering all, every class in train
        parts = [set(seen[s].listing.paths) for s in spec.splits if s != "all"]
        assert sum(len(p) for p in parts) == len(set().union(*parts)) == len(seen["all"])
        assert set(seen["train"].listing.labels) == set(seen["all"].listing.labels)
        assert read_split(name, roots[name], "test").listing.paths == seen["test"].listing.paths  # stable


def test_names_follow_the_release_not_its_order(roots):
    """Cleaned release names spelled as CLIP published them, by label."""
    assert read_split("cifar100", roots["cifar100"], "test").classnames[:2] == ["apple", "aquarium fish"]
    assert read_split("sun397", roots["sun397"], "all").classnames == ["abbey", "apartment building outdoor",
                                                                       "bakery shop"]
    assert read_split("pets", roots["pets"], "test").classnames == ["Abyssinian", "american bulldog", "Bengal"]
    assert read_split("cars", roots["cars"], "test").classnames[1] == "Ram C/V Cargo Van Minivan 2012"
    caltech = read_split("caltech101", roots["caltech101"], "all")
    assert caltech.classnames[:3] == ["background", "off-center face", "centered face"]
    assert any("1 files in the class folders" in n for n in caltech.notes)  # a .txt among the images
    assert read_split("imagenet1k", roots["imagenet1k"], "test").classnames == ["tench", "goldfish", "great white shark"]


def test_arrays_equal_torchvision(roots, monkeypatch):
    """CIFAR and STL-10 rows equal torchvision's images (its md5 check set aside)."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)
    for name, ref in (("cifar10", lambda r: tvd.CIFAR10(r, train=False)),
                      ("cifar100", lambda r: tvd.CIFAR100(r, train=True)),
                      ("stl10", lambda r: tvd.STL10(r, split="test"))):
        split = "train" if name == "cifar100" else "test"
        ours = read_split(name, roots[name], split).listing
        theirs = ref(roots[name])
        for i in (0, len(theirs) - 1):
            image, label = theirs[i]
            assert np.array_equal(np.asarray(image), ours.images[i]) and label == ours.labels[i]


class Payload:
    def __reduce__(self):
        return os.system, ("touch pwned_marker",)


def test_cifar_batch_with_code_is_refused_not_run(tmp_path, monkeypatch):
    root = bf.make("cifar10", tmp_path)
    batch = os.path.join(root, "cifar-10-batches-py", "test_batch")
    with open(batch, "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f, 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayoutError, match=r"--dataset_root: cannot read .*test_batch.*refusing to load posix.system"):
        read_split("cifar10", root, "test")
    assert not (tmp_path / "pwned_marker").exists()
    with pytest.raises(pickle.UnpicklingError):  # the same bytes through the restricted unpickler directly
        with open(batch, "rb") as f:
            arrays.ArrayBatchUnpickler(f, encoding="latin1").load()


@pytest.mark.parametrize("case", ["missing_root", "bad_split", "unknown_dataset", "empty_root", "class_count",
                                  "no_partitions", "not_wordnet", "truncated_stl"])
def test_bad_inputs_are_one_line_naming_flag_and_layout(roots, tmp_path, case):
    name, root, split = "dtd", roots["dtd"], "test"
    if case == "missing_root":
        root, expect = str(tmp_path / "nowhere"), r"--dataset_root: folder .*nowhere.* does not exist \(expected <root>/dtd"
    elif case == "bad_split":
        split, expect = "val", r"--split 'val': pets has the splits trainval, test"
        name, root = "pets", roots["pets"]
    elif case == "unknown_dataset":
        name, expect = "cifar-10", r"--dataset 'cifar-10' is not a dataset .*did you mean cifar10"
    elif case == "empty_root":
        (tmp_path / "empty").mkdir()
        root, expect = str(tmp_path / "empty"), r"--dataset_root: .*empty' does not hold DTD split 'test'.*expected <root>/dtd/dtd"
    elif case == "class_count":
        name, split = "caltech101", "all"
        root = bf.make("caltech101", tmp_path)
        for f in os.scandir(os.path.join(root, "caltech101", "101_ObjectCategories", "c000")):
            os.remove(f.path)
        os.rmdir(os.path.join(root, "caltech101", "101_ObjectCategories", "c000"))
        expect = r"--dataset_root: caltech101 has 101 classes here but CLIP's list names 102"
    elif case == "no_partitions":
        name, split = "sun397", "train"
        root = bf.make("sun397", tmp_path)
        os.rename(os.path.join(root, "Partitions"), os.path.join(root, "parts"))
        expect = r"--dataset_root: the train split of sun397 needs the official partition file .*Training_01.txt"
    elif case == "not_wordnet":
        name, root = "imagenet1k", bf.make("imagenet1k", tmp_path)
        os.makedirs(os.path.join(root, "val", "cats"))
        bf.image(os.path.join(root, "val", "cats", "a.JPEG"), 0, 0)
        expect = r"--dataset_root: class folders such as 'cats' are not ImageNet WordNet IDs"
    else:
        name, root = "stl10", bf.make("stl10", tmp_path)
        with open(os.path.join(root, "stl10_binary", "test_X.bin"), "ab") as f:
            f.write(b"\0" * 7)
        expect = r"--dataset_root: .*test_X.bin' is \d+ bytes, not a whole number of 3x96x96 images"
    with pytest.raises((ValueError, FileNotFoundError), match=expect) as err:
        read_split(name, root, split)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
