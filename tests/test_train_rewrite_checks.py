"""Rewrites joined only to the samples they were written for (issue 19 cases 1, 3 and 7): the
row's caption checked against the sample's text, repeated keys never joined, rewrite files
checked at start-up, non-UTF-8 shard text read as the CSV path reads it, empty tars and
--train-num-samples above the data noted at start."""
from __future__ import annotations

import json

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import shard_fixtures as sf
import train
import training.wds as wds_mod
from training.rewrite_join import open_rewrite_source
from training.loaders import ShardLoader
from training.wds import ShardStream, StreamSpec, known_sample_count, start_notes

pytestmark = pytest.mark.usefixtures("one_thread", "single_process")
META = {b"laclip_rewrite": b"{}"}


def write_rewrites(path, keys, captions, meta=META, **columns):
    table = pa.table({"key": keys, "caption": captions,
                      **(columns or {"chatgpt": [f"chatgpt says {k}" for k in keys]})})
    pq.write_table(table.replace_schema_metadata(meta) if meta else table, path)


def stream(tars: str, pattern: str | None, samples: int, limit: float = 0.01, columns=()) -> ShardLoader:
    urls = tuple(braceexpand.braceexpand(tars))
    source = open_rewrite_source(pattern, (), tuple(columns), urls, limit)
    spec = StreamSpec(urls, samples, False, source, True, 0)
    s = ShardStream(spec, lambda image: torch.zeros(1), lambda texts: texts, 1, world_size=1, workers=0)
    return ShardLoader(s, DataLoader(s, batch_size=1, num_workers=0))


def one_epoch(ld: ShardLoader) -> tuple[dict, dict]:
    """(key-free view) {original caption: its rewrite slot}, summed counts."""
    ld.set_epoch(0)
    texts = {}
    for _, tokens in ld:
        original, chat = (t[0] for t in tokens)
        texts[original] = chat
    return texts, ld.report()


@pytest.fixture
def shards(tmp_path):
    return sf.make_shards(tmp_path / "shards", n_shards=2, per_shard=5, bad=False)


def test_rewrites_of_other_captions_train_on_the_original_and_stop_the_run_above_the_limit(shards, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(wds_mod, "SHUFFLE_BUFFER", 1)  # no shuffle: an epoch is exactly one pass
    (tmp_path / "rw").mkdir()
    for s in range(2):
        keys = [sf.key_of(s, i) for i in range(5)]
        captions = [sf.caption_of(s, i) for i in range(5)]
        if s == 1:
            captions[2] = "a caption of another download"  # same key, another sample
        write_rewrites(tmp_path / "rw" / f"{s:05d}.parquet", keys, captions)
    pattern = str(tmp_path / "rw" / "{00000..00001}.parquet")
    texts, counts = one_epoch(stream(shards.tars, pattern, 10, limit=0.1))
    foreign = sf.caption_of(1, 2)
    assert texts[foreign] == foreign and counts["rewrite_caption_mismatch"] == 1  # trained on its own caption
    assert all(chat == f"chatgpt says {sf.key_of(s, i)}" for s in range(2) for i in range(5)
               if (chat := texts[sf.caption_of(s, i)]) != foreign)
    with pytest.raises(ValueError, match=r"^--rewrite-data: 2 samples this epoch have rewrites written for another "
                                         r"caption \(above --rewrite-mismatch-limit, 1 samples\); first: key "
                                         rf"{sf.key_of(1, 2)} in .*00001.parquet"):
        write_rewrites(tmp_path / "rw" / "00000.parquet", [sf.key_of(0, i) for i in range(5)],
                       ["stale"] + [sf.caption_of(0, i) for i in range(1, 5)])
        one_epoch(stream(shards.tars, pattern, 10, limit=0.1))


def _tar(path, samples):
    with wds.TarWriter(str(path)) as tar:
        for key, caption in samples:
            tar.write({"__key__": key, "jpg": sf.jpeg(len(caption)), "txt": caption.encode()})


def test_repeated_keys_are_counted_and_never_joined(tmp_path, monkeypatch):
    monkeypatch.setattr(wds_mod, "SHUFFLE_BUFFER", 1)
    (tmp_path / "s").mkdir()
    # K again later in the tar; J twice in a row (webdataset would merge it into one sample and call
    # the tar broken); the rewrite file has two rows for L
    samples = [("K", "a cat on a mat"), ("J", "a dog in snow"), ("J", "a dog in the rain"), ("A", "a red boat"),
               ("K", "a cat on a bed"), ("L", "a lamp on a desk")]
    _tar(tmp_path / "s" / "00000.tar", samples)
    keys = ["K", "J", "A", "L", "L"]
    write_rewrites(tmp_path / "s" / "r.parquet", keys, ["a cat on a mat", "a dog in snow", "a red boat",
                                                        "a lamp on a desk", "a lamp on a desk"])
    (tmp_path / "s" / "r.parquet").rename(tmp_path / "s" / "00000.parquet")
    ld = stream(str(tmp_path / "s" / "00000.tar"), str(tmp_path / "s" / "00000.parquet"), 6)
    texts, counts = one_epoch(ld)
    assert len(texts) == 6 and counts["shard_errors"] == 0  # two J samples, not one broken tar
    assert counts["duplicate_key"] == 5 and counts["missing_rewrites"] == 0
    assert texts["a red boat"] == "chatgpt says A"
    assert all(texts[c] == c for c in texts if c != "a red boat")  # K, J and L: never joined


def test_rewrite_sources_are_checked_at_start(shards, tmp_path, capsys):
    tars = tuple(braceexpand.braceexpand(shards.tars))
    # img2dataset's own parquet: same names as the tars, no rewriter metadata
    with pytest.raises(ValueError, match=r"00000.parquet is not the rewriter's output .*--rewrite-columns"):
        open_rewrite_source(shards.parquets, (), (), tars)
    source = open_rewrite_source(shards.parquets, (), ("url",), tars)  # named: its string column is used
    assert source.columns == ("url",)
    (tmp_path / "w").mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["c"], "width": [3]}), tmp_path / "w" / "00000.parquet")
    with pytest.raises(ValueError, match=r"column 'width' of .*00000.parquet holds int64, not text"):
        open_rewrite_source(str(tmp_path / "w" / "00000.parquet"), (), ("width",), tars)
    (tmp_path / "m").mkdir()
    write_rewrites(tmp_path / "m" / "00000.parquet", ["a"], ["c"], chatgpt=["x"], bard=["y"])
    write_rewrites(tmp_path / "m" / "00001.parquet", ["a"], ["c"], chatgpt=["x"])
    with pytest.raises(ValueError, match=r"00001.parquet has rewrite columns chatgpt but .*00000.parquet has "
                                         r"chatgpt, bard"):
        open_rewrite_source(str(tmp_path / "m" / "{00000..00001}.parquet"), (), (), tars)
    source = open_rewrite_source(str(tmp_path / "m" / "00000.parquet"), (), (), tars)  # covers one of two tars
    assert source.notes == ("rewrites: columns chatgpt, bard of 1 --rewrite-data files",
                            f"--rewrite-data covers 1 of 2 --train-data shards (e.g. {tars[1]} has no rewrite "
                            "file): their samples train on their original captions, counted as missing_rewrites "
                            "in log.txt")
    with pytest.raises(ValueError, match="--rewrite-columns names columns of the --rewrite-data files"):
        train.main(["--train-data", shards.tars, "--train-num-samples", "4", "--aug-text", "--rewrite-json-keys",
                    "re_caption", "--rewrite-columns", "url", "--model", "CLIP_TINY", "--output-dir",
                    str(tmp_path / "out"), "--device", "cpu"])


def test_non_utf8_shard_text_is_read_as_windows_1252_and_counted(tmp_path):
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "00000.tar")) as tar:
        tar.write({"__key__": "a", "jpg": sf.jpeg(1), "txt": "café crème".encode("cp1252")})
        tar.write({"__key__": "b", "jpg": sf.jpeg(2), "txt": "naïve".encode()})
    urls = (str(tmp_path / "s" / "00000.tar"),)
    s = ShardStream(StreamSpec(urls, 2, False, None, False, 0), lambda image: torch.zeros(1), lambda t: t, 1, 1, 0)
    texts, counts = [], 0
    for _, text, info in DataLoader(s, batch_size=1, num_workers=0):
        texts.append(text[0])
        counts += int(info["non_utf8_captions"].sum())
    assert sorted(texts) == ["café crème", "naïve"] and counts == 1


def test_empty_tars_are_left_out_at_start_and_sample_counts_noted(shards, tmp_path, capsys):
    folder = shards.folder
    (folder / "00002.tar").write_bytes(b"\0" * 10240)  # what tar writes for an empty archive

    def argv(workers: int) -> list[str]:
        return ["--train-data", str(folder / "{00000..00002}.tar"), "--train-num-samples", "8", "--output-dir",
                str(tmp_path / f"out{workers}"), "--model", "CLIP_TINY", "--batch-size", "2", "--workers",
                str(workers), "--epochs", "1", "--warmup-epochs", "1", "--lr", "1e-3", "--device", "cpu"]
    # a loader worker whose only shard is empty used to fail with a worker traceback
    with pytest.raises(ValueError, match=r"^--train-data has 2 shards once 1 empty tars are left out \(e.g. "
                                         r".*00002.tar\), fewer than processes x --workers \(1 x 3\)"):
        train.main(argv(3))
    [record] = train.main(argv(2))
    assert record["counts"]["shard_errors"] == 0
    assert f"note: 1 --train-data shards are empty tars (e.g. {folder / '00002.tar'}): left out" in \
        capsys.readouterr().out
    urls = tuple(str(folder / f"{s:05d}.tar") for s in range(2))
    assert known_sample_count(urls) is None  # counts unknown: nothing said
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 5}))
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 5, "count": 6}))
    assert known_sample_count(urls) == (10, "_stats.json and sizes.json")
    spec = StreamSpec(urls, 35, False, None, False, 0)
    assert start_notes(spec) == ["--train-num-samples 35 is above the 10 samples the shards hold (_stats.json "
                                 "and sizes.json): each epoch reads them 3.5 times"]


def test_the_join_reads_text_as_the_rewriter_does():
    """One rule on both sides (common.rewrite_format.decode_line): one line ending off, U+FFFD for bad bytes."""
    from training.rewrite_join import _same_text
    assert _same_text("a cat", b"a cat\r\n") and _same_text("caf\ufffd au lait", b"caf\xe9 au lait")
    assert _same_text("東京", "東京\n".encode()) and _same_text("", b"\r")
    assert not _same_text("a cat", b"a cat\n\n") and not _same_text("a cat", b"a cat ")


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_member_names_read_from_headers_equal_tarfiles(tmp_path, fmt):
    import io
    import tarfile

    from common.tar_keys import duplicated_keys, member_names
    kind = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[fmt]
    long = "d" * (90 if fmt == "ustar" else 150)
    names = [f"a/{long}/k1.jpg", f"a/{long}/k1.txt", "k2.jpg", "k2.txt", f"a/{long}/k1.json"]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=kind) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 300 * i + 1
            tar.addfile(info, io.BytesIO(b"x" * info.size))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: not a member name
    with tarfile.open(path) as tar:
        assert list(member_names(str(path))) == [m.name for m in tar if m.isreg()] == names
    assert duplicated_keys(str(path)) == {f"a/{long}/k1"}  # k1 comes back after k2
    path.write_bytes(path.read_bytes()[:2100])  # cut: no error, what was read is kept
    assert list(member_names(str(path)))[:1] == names[:1]


def test_flags_resolve_in_one_pass_reading_each_rewrite_footer_once(shards, tmp_path, monkeypatch):
    """train.py's start-up reads every --rewrite-data footer once per process (validation and the loader
    used to read them two or three times), and resolving never changes the parsed flags."""
    import training.rewrite_join as rj
    reads, real = [], rj.read_schema
    monkeypatch.setattr(rj, "read_schema", lambda path: reads.append(path) or real(path))
    argv = ["--train-data", shards.tars, "--rewrite-data", shards.parquets, "--rewrite-columns", "caption",
            "--aug-text", "--aug-text-weights", "1", "1", "--train-num-samples", "4", "--output-dir",
            str(tmp_path / "out"), "--model", "CLIP_TINY", "--batch-size", "2", "--workers", "0", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--precision", "amp_bf16", "--device", "cpu"]
    args = train.get_args_parser().parse_args(argv)
    before = dict(vars(args))
    cfg = train.resolve(args)
    assert vars(args) == before and cfg.precision == "amp_bf16" and cfg.warmup_epochs == 1
    assert sorted(reads) == sorted(str(shards.folder / f"{s:05d}.parquet") for s in range(shards.n_shards))
    reads.clear()
    train.main(argv)
    assert len(reads) == shards.n_shards  # the whole run: each footer once (workers read rows, not footers)
