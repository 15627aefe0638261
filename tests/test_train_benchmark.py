"""train.py --eval-benchmark: downstream tasks every N epochs into log.txt, equal to eval_benchmark.py
on the checkpoint of that epoch; bad datasets stop the run before training."""
from __future__ import annotations

import pytest

import benchmark_fixtures as bf
import eval_benchmark
import train
from train_fixtures import make_train_data, read_log, train_argv

pytestmark = pytest.mark.usefixtures("single_process")


def test_benchmark_every_n_epochs_matches_eval_benchmark(tmp_path, one_thread):
    data = make_train_data(tmp_path, n=8)
    dtd, flickr = bf.make("dtd", tmp_path), bf.make("flickr30k", tmp_path)
    out = tmp_path / "out"
    train.main(train_argv(data, out, "--eval-benchmark", f"dtd={dtd}", f"flickr30k={flickr}",
                          "--eval-every", "2", "--epochs", "2"))
    first, second = read_log(out)
    assert "benchmark" not in first  # epoch 0: not due
    bench = second["benchmark"]
    assert set(bench) == {"dtd/zeroshot_classification", "flickr30k/zeroshot_retrieval"}
    # the last epoch's weights are checkpoint.pt: the standalone evaluation gives the same numbers
    for name, root in (("dtd", dtd), ("flickr30k", flickr)):
        [record] = eval_benchmark.main(["--dataset", name, "--dataset_root", root, "--model", "CLIP_TINY",
                                        "--pretrained", str(out / "checkpoint.pt"), "--output",
                                        str(tmp_path / f"{name}.json"), "--num_workers", "0",
                                        "--feature_root", "", "--quiet"])
        logged = bench[f"{name}/{record['task']}"]
        assert logged.pop("skipped_images") == 0
        assert logged == pytest.approx(record["metrics"], abs=1e-6)


@pytest.mark.parametrize("extra, expect", [
    (["--eval-benchmark", "dtd"], r"--eval-benchmark 'dtd': expected DATASET=ROOT"),
    (["--eval-benchmark", "dtd=/nowhere/dtd"], r"--dataset_root: folder '/nowhere/dtd' does not exist"),
    (["--eval-benchmark", "dtdd=/x"], r"--dataset 'dtdd' is not a dataset .*did you mean dtd"),
    (["--eval-tasks", "zeroshot_retrieval"], r"--eval-tasks zeroshot_retrieval: none of the --eval-benchmark"),
    (["--eval-every", "0"], r"--eval-every must be >= 1"),
])
def test_bad_benchmark_flags_stop_before_training(tmp_path, extra, expect):
    data = make_train_data(tmp_path, n=4)
    dtd = bf.make("dtd", tmp_path)
    argv = train_argv(data, tmp_path / "out", *extra)
    if "--eval-benchmark" not in extra:
        argv += ["--eval-benchmark", f"dtd={dtd}"]
    with pytest.raises((ValueError, FileNotFoundError), match=expect):
        train.main(argv)
    assert not (tmp_path / "out").exists()
