"""Both data paths behind one loader interface (training/loaders.py): a state taken at an epoch
end and restored into a fresh loader gives the same next epoch, batch for batch; a mid-epoch
position continues the epoch (tests/test_train_mid_epoch.py: whole runs)."""
from __future__ import annotations

import pytest
import torch

import shard_fixtures as sf
import train
from common.distributed import DistInfo
from tokenizer import SimpleTokenizer
from train_fixtures import make_train_data, train_argv
from training.loaders import CsvLoader, ShardLoader, TrainLoader, build_loader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["csv", "shards"])
def args(request, tmp_path):
    if request.param == "csv":
        argv = train_argv(make_train_data(tmp_path, n=10, corrupt=(3,)), tmp_path / "out")
    else:
        shards = sf.make_shards(tmp_path / "shards")
        argv = ["--train-data", shards.tars, "--train-num-samples", "20", "--workers", "2", "--batch-size", "2",
                "--output-dir", str(tmp_path / "out")]
    return train.resolve(train.get_args_parser().parse_args(argv))


def epoch(loader: TrainLoader, e: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(e)
    return list(loader)


def test_state_restored_at_an_epoch_end_gives_the_same_next_epoch(args):
    first = build_loader(args, DistInfo(), SimpleTokenizer())
    assert isinstance(first, TrainLoader) and isinstance(first, ShardLoader if args.train_num_samples else CsvLoader)
    assert len(epoch(first, 0)) == len(first) > 0
    state = first.state()
    counts = first.report()
    assert state["epoch"] == 0 and state["batches"] == len(first)
    expected = epoch(first, 1)
    bad = sum(counts.values()) + sum(first.report().values())
    assert bad >= 1  # the corrupt image (CSV); the bad samples of the shards' first pass
    for restored in (state, {k: v for k, v in state.items() if k not in ("epoch", "batches")}):  # old files' form
        again = build_loader(args, DistInfo(), SimpleTokenizer())
        assert again.restore(restored) is None
        got = epoch(again, 1)
        assert len(got) == len(expected)
        for (images, tokens), (images2, tokens2) in zip(got, expected):
            assert torch.equal(images, images2) and torch.equal(tokens, tokens2)
        assert again.report() == first.report()


def test_a_mid_epoch_position_continues_the_epoch_after_its_batches(args):
    """A CSV position inside an epoch skips the sampler's used indices; a shard position without
    each worker's draws (or for another layout) is refused, never half-used."""
    first = build_loader(args, DistInfo(), SimpleTokenizer())
    first.restore({"epoch": 1, "batches": 1})
    first.set_epoch(2)  # a later epoch: the position is an epoch end
    first.restore({"epoch": 1, "batches": 1})
    if isinstance(first, ShardLoader):
        with pytest.raises(ValueError, match=r"inside epoch 1 with data positions for None processes x --workers"):
            first.set_epoch(1)
        return
    expected = epoch(build_loader(args, DistInfo(), SimpleTokenizer()), 1)
    got = epoch(first, 1)
    assert len(got) == len(expected) - 1
    for (images, tokens), (images2, tokens2) in zip(got, expected[1:]):
        assert torch.equal(images, images2) and torch.equal(tokens, tokens2)
