"""Training from webdataset shards (training/wds.py, training/rewrite_join.py): passes over
shards split by rank and worker, counted bad samples, rewrites joined by key, positions that
a resumed run continues from, LaCLIP-MT, and flag errors; in-process, no model unless noted."""
from __future__ import annotations


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import shard_fixtures as sf
import train
import training.wds as wds_mod
from training.loss import clip_loss, multi_text_loss
from training.rewrite_join import NEW_COUNTS, open_rewrite_source
from training.loaders import ShardLoader
from training.wds import ShardStream, StreamSpec
from torch.utils.data import DataLoader

pytestmark = pytest.mark.usefixtures("one_thread", "single_process")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    info = sf.make_shards(root / "shards")
    rewrites = root / "rewrites"
    rewrites.mkdir()
    for s in range(info.n_shards):
        if s == 4:
            continue  # no rewrite file: its samples train on their originals, counted
        keys = [sf.key_of(s, i) for i in range(info.per_shard) if i != 0]  # first key of each shard: no row
        chat = [f"chatgpt says {k}" for k in keys]
        chat[0] = "short"  # under two words: falls back to the original
        captions = [sf.caption_of(s, i) for i in range(info.per_shard) if i != 0]
        table = pa.table({"key": keys, "caption": captions, "chatgpt": chat, "bard": [f"bard says {k}" for k in keys]})
        pq.write_table(table.replace_schema_metadata({b"laclip_rewrite": b"{}"}), rewrites / f"{s:05d}.parquet")
    return {"info": info, "rewrites": str(rewrites / "{00000..00007}.parquet")}


def text_of(caption: str) -> str:
    return caption  # a "tokenizer" that keeps the text, so a test sees which captions were picked


def loader(shards, num_samples: int, rewrites: bool = True, multi_text: bool = False, json_keys=(),
           resampled: bool = False, batch_size: int = 1, seed: int = 0) -> ShardLoader:
    source = open_rewrite_source(shards["rewrites"] if rewrites else None, tuple(json_keys)) \
        if rewrites or json_keys else None
    spec = StreamSpec(tuple(__import__("braceexpand").braceexpand(shards["info"].tars)), num_samples, resampled,
                      source, multi_text, seed)
    stream = ShardStream(spec, lambda image: torch.zeros(1), text_of, batch_size, world_size=1, workers=0)
    return ShardLoader(stream, DataLoader(stream, batch_size=batch_size, num_workers=0))


def epoch(ld: ShardLoader, e: int) -> tuple[list, dict]:
    ld.set_epoch(e)
    texts = []
    for _, tokens in ld:
        # default_collate: a batch of captions is a tuple; of LaCLIP-MT text lists, a list of tuples per slot
        texts += list(zip(*tokens)) if isinstance(tokens, list) else list(tokens)
    return texts, ld.report()


def key_in(text: str, shards) -> str:
    """The key a caption or rewrite belongs to."""
    for s in range(shards["info"].n_shards):
        for i in range(shards["info"].per_shard):
            if text in (sf.caption_of(s, i), f"chatgpt says {sf.key_of(s, i)}", f"bard says {sf.key_of(s, i)}"):
                return sf.key_of(s, i)
    raise AssertionError(text)


def test_a_pass_reads_every_good_sample_once_and_counts_the_bad(shards, monkeypatch):
    monkeypatch.setattr(wds_mod, "SHUFFLE_BUFFER", 1)  # no shuffle: a pass is exactly the good samples
    good = shards["info"].good_keys()
    ld = loader(shards, len(good), rewrites=False)
    texts, counts = epoch(ld, 0)
    assert sorted(key_in(t, shards) for t in texts) == sorted(good)
    assert counts["skipped_images"] + counts["skipped_no_text"] + counts["shard_errors"] <= 3
    texts2, counts2 = epoch(ld, 1)  # the next epoch is the next pass: the same samples, another order
    assert sorted(key_in(t, shards) for t in texts2) == sorted(good) and texts2 != texts
    both = {k: counts.get(k, 0) + counts2.get(k, 0) for k in counts2}
    assert both["skipped_images"] >= 1 and both["skipped_no_text"] >= 1 and both["shard_errors"] >= 1


def test_rewrites_are_joined_by_key_with_fallbacks_counted(shards):
    ld = loader(shards, 30, multi_text=True)
    texts, counts = epoch(ld, 0)
    for original, chat, bard in texts:
        key = key_in(original, shards)
        shard, index = int(key[:5]), int(key[5:])
        if shard == 4 or index == 0:  # no rewrite file / no row: the original in every slot
            assert chat == bard == original
        else:
            assert bard == f"bard says {key}"
            assert chat == (original if index == 1 else f"chatgpt says {key}")  # "short" fell back
    missing = sum(1 for o, c, b in texts if int(key_in(o, shards)[:5]) == 4 or key_in(o, shards)[5:] == "0000")
    assert counts["missing_rewrites"] == missing > 0


def test_uniform_pick_among_original_and_rewrites(shards):
    """The CSV path's pick (training/data.pick_caption): a third each over many epochs."""
    ld = loader(shards, 10)
    picks = {"original": 0, "chatgpt": 0, "bard": 0}
    for e in range(30):
        for text in epoch(ld, e)[0]:
            key = key_in(text, shards)
            if int(key[:5]) == 4 or key[5:] in ("0000", "0001"):
                continue  # samples without a usable rewrite in every slot
            picks["chatgpt" if text.startswith("chatgpt") else "bard" if text.startswith("bard") else "original"] += 1
    total = sum(picks.values())
    assert total > 150 and all(abs(n / total - 1 / 3) < 0.1 for n in picks.values()), picks


def test_rewrites_from_sample_json(shards):
    ld = loader(shards, 8, rewrites=False, multi_text=True, json_keys=("re_caption",))
    for original, recap in epoch(ld, 0)[0]:
        assert recap == f"recap of {original}"


def test_shards_split_across_ranks_and_workers(shards, monkeypatch):
    ld = loader(shards, 8)
    ld.stream.workers = 2  # the stream's worker id is an argument (a mid-epoch resume rotates it)
    seen = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            seen.append(ld.stream._pass_shards(0, worker))
    assert sorted(s for reader in seen for s in reader) == sorted(ld.stream.spec.urls)
    assert all(len(reader) == 2 for reader in seen)
    assert seen[0] != ld.stream._pass_shards(1, 1)  # each pass another shuffle (same env: rank 1, worker 1)


def test_resumed_positions_give_the_same_next_epoch(shards):
    first = loader(shards, 6, batch_size=2)
    epoch(first, 0)
    state = first.state()
    assert state["starts"][0][0][1] >= 1  # whole shards done: the next epoch does not read them again
    expected = epoch(first, 1)
    resumed = loader(shards, 6, batch_size=2)
    assert resumed.restore(state) is None
    assert epoch(resumed, 1) == expected
    other = loader(shards, 6, batch_size=2)
    other.stream.workers = 2  # another layout: the positions do not apply, said once
    assert "this run has [1, 2]" in other.restore(state)


def test_resampled_epochs_differ_and_need_no_positions(shards):
    ld = loader(shards, 8, resampled=True)
    a, b = epoch(ld, 0)[0], epoch(ld, 1)[0]
    assert len(a) == len(b) == 8 and a != b
    before = dict(ld.stream.starts)
    assert ld.restore({"starts": [[[3, 1, 1]]]}) is None and ld.stream.starts == before


def test_multi_text_loss_is_the_mean_of_per_text_clip_losses():
    g = torch.Generator().manual_seed(0)
    image, texts, scale = torch.randn(6, 8, generator=g), torch.randn(6, 3, 8, generator=g), torch.tensor(10.0)
    one = multi_text_loss(image, texts[:, :1], scale)
    assert torch.allclose(one["loss"], clip_loss(image, texts[:, 0], scale)["loss"])
    per = [clip_loss(image, texts[:, j], scale)["loss"] for j in range(3)]
    assert torch.allclose(multi_text_loss(image, texts, scale)["loss"], torch.stack(per).mean())


def wds_argv(shards, out, *extra: str) -> list[str]:
    return ["--train-data", shards["info"].tars, "--train-num-samples", "8", "--output-dir", str(out),
            "--model", "CLIP_TINY", "--batch-size", "4", "--workers", "0", "--epochs", "1",
            "--warmup-epochs", "1", "--lr", "1e-3", "--device", "cpu", *extra]


def test_train_multi_text_from_shards_logs_the_counts(shards, tmp_path):
    """train.py end to end (one process): LaCLIP-MT over shards with rewrites from parquet and JSON."""
    records = train.main(wds_argv(shards, tmp_path / "out", "--aug-text", "--multi-text", "--rewrite-data",
                                  shards["rewrites"], "--rewrite-json-keys", "re_caption"))
    (line,) = [__import__("json").loads(x) for x in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert line["train_samples"] == 8 and records[0]["counts"] == {k: line.get(k, 0) for k in wds_mod.COUNT_KEYS}
    assert not set(NEW_COUNTS) & set(line)  # counts this version added appear in log.txt only when not zero
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert ckpt["data_state"]["layout"] == [1, 1] and ckpt["args"]["multi_text"]


@pytest.mark.parametrize("extra, message", [
    (("--train-num-samples", "0"), "--train-num-samples N is required"),
    (("--aug-text",), "--aug-text with shards needs --rewrite-data"),
    (("--aug-text", "--augmented_caption_filelist", "x.txt"), "--augmented_caption_filelist holds rewrites"),
    (("--multi-text",), "--multi-text .* needs --aug-text"),
    (("--aug-text", "--rewrite-data", "/no/{0..1}.parquet"), "--rewrite-data .*2 of 2 files not found"),
    (("--workers", "9"), "8 shards, fewer than processes x --workers"),
])
def test_bad_webdataset_flags_name_the_flag(shards, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):  # a repeated flag: argparse keeps the last value
        train.main(wds_argv(shards, tmp_path / "out", *extra))


def test_missing_shards_and_csv_only_flags(shards, tmp_path):
    argv = wds_argv(shards, tmp_path / "out")
    argv[1] = str(shards["info"].folder / "{00000..00009}.tar")
    with pytest.raises(ValueError, match=r"--train-data .*2 of 10 shards not found, e.g. .*00008.tar"):
        train.main(argv)
    csv = tmp_path / "train.csv"
    csv.write_text("a.jpg,caption\n")
    with pytest.raises(ValueError, match="--rewrite-data is for --dataset-type webdataset"):
        train.main(["--train-data", str(csv), "--root", str(tmp_path), "--rewrite-data", "x.parquet"])


def test_csv_multi_text_items_hold_every_text(tmp_path):
    from train_fixtures import make_train_data
    from training.data import CaptionImageDataset, train_transform
    data = make_train_data(tmp_path, n=2)
    ds = CaptionImageDataset(data["csv"], data["root"], train_transform(), lambda texts: texts, data["rewrites"],
                             multi_text=True)
    _, texts, _ = ds[(0, 0)]
    original = ds.captions[0]
    assert texts == [original, "rewrite 1 of sample 0", original]  # rewrite 2 is one word: the original
    assert ds[(1, 3)][1] == [ds.captions[1], "rewrite 1 of sample 1", "rewrite 2 of sample 1"]
