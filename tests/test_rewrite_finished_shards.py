"""A finished shard output is kept only for its own input and settings (issue 19 cases 2 and 7,
and repeated keys in the rewriter's tars): another data set under the same shard names, a
re-downloaded shard or other settings are refused naming the shard; --overwrite of a subset
changes only those shards and never leaves the folder with two settings; every parquet
input's columns are checked at start."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import shard_fixtures as sf
from conftest import REWRITE_PAIRS, make_tiny_rewrite_setup
from rewrite import llama_rewrite, shard_input

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = {"max_seq_len": 256, "max_gen_len": 4, "max_batch_size": 4, "sample_mode": "chatgpt"}
RUN_RECORD = "rewrite.json"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished_shards")
    shards = sf.make_shards(root / "shards", n_shards=3, per_shard=3, bad=False)
    captions = [sf.caption_of(s, i) for s in range(3) for i in range(3)] + ["a cat on a mat", "a dog in snow"]
    return {"root": root, "shards": shards, "tiny": make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)}


def rewrite(setup, out: Path, prompt: str | None = None, **extra) -> None:
    llama_rewrite.main(**{**setup["tiny"], **FLAGS, "prompt_filename": prompt or setup["shards"].parquets,
                          "output_filename": str(out), **extra})


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def test_outputs_of_another_input_are_refused_not_counted_finished(setup, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    shutil.copytree(setup["shards"].folder, inputs)
    out = tmp_path / "out"
    rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))
    before = outputs(out)
    hashed = []
    real = shard_input.input_fingerprint
    monkeypatch.setattr(shard_input, "input_fingerprint", lambda p: hashed.append(p) or real(p))
    rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))  # same input: every shard is finished
    assert outputs(out) == before and hashed == []  # checked against the hashes remembered when claimed
    (inputs / "00000.parquet").touch()  # touched, not changed: hashed again, and still the same input
    rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))
    assert outputs(out) == before and [p.name for p in hashed] == ["00000.parquet"]
    table = pq.read_table(inputs / "00001.parquet").to_pydict()  # downloaded again: other captions
    table["caption"] = [c.replace("near", "by") for c in table["caption"]]
    pq.write_table(pa.table(table), inputs / "00001.parquet")
    with pytest.raises(ValueError, match=r"^--output_filename: shard .*00001.parquet was rewritten from another "
                                         r"00001.parquet \((size|content hash) .* then, .* now\): .*--overwrite"):
        rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))
    assert outputs(out) == before
    rewrite(setup, out, prompt=str(inputs / "00001.parquet"), overwrite=True)  # redoes that shard only
    after = outputs(out)
    assert after["00001.parquet"] != before["00001.parquet"]
    assert {n: b for n, b in after.items() if n != "00001.parquet"} == \
        {n: b for n, b in before.items() if n != "00001.parquet"}
    rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))  # now consistent: nothing to redo
    assert outputs(out) == after


def test_an_output_with_other_settings_is_refused_naming_the_shard(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rewrite(setup, a)
    rewrite(setup, b, seed=7)
    shutil.copy(b / "00002.parquet", a / "00002.parquet")  # e.g. copied in from another run's folder
    with pytest.raises(ValueError, match=r"^--output_filename: shard .*a/00002.parquet was rewritten with other "
                                         r"settings: seed: 7 -> 1; pass --overwrite"):
        rewrite(setup, a)


def test_overwrite_of_a_subset_never_mixes_settings_in_one_folder(setup, tmp_path):
    out = tmp_path / "out"
    rewrite(setup, out)
    before, record = outputs(out), (out / RUN_RECORD).read_bytes()
    subset = str(setup["shards"].folder / "{00000..00001}.parquet")
    with pytest.raises(ValueError, match=r"^--overwrite: .*00002.parquet is not among this run's shards and keeps "
                                         r"other settings \(.*sample_mode.*\); one folder holds shards of one "
                                         r"setting"):
        rewrite(setup, out, prompt=subset, overwrite=True, sample_mode="mscoco,human")
    assert outputs(out) == before and (out / RUN_RECORD).read_bytes() == record  # nothing touched
    rewrite(setup, out, prompt=subset, overwrite=True, seed=1)  # the same settings: only the subset is redone
    assert outputs(out) == before and (out / RUN_RECORD).read_bytes() == record


def test_every_parquet_input_is_checked_at_start(setup, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(setup["shards"].folder, inputs)
    table = pq.read_table(inputs / "00002.parquet").to_pydict()
    pq.write_table(pa.table({"key": table["key"], "text": table["caption"]}), inputs / "00002.parquet")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--text_key: .*00002.parquet has no column 'caption'"):
        rewrite(setup, out, prompt=str(inputs / "{00000..00002}.parquet"))
    assert not list(out.glob("*.parquet"))  # refused before the first shard, not when its turn came


def test_repeated_keys_in_a_tar_are_counted_and_get_no_row(setup, tmp_path):
    (tmp_path / "t").mkdir()
    with wds.TarWriter(str(tmp_path / "t" / "00000.tar")) as tar:
        for key, caption in (("K", "a cat on a mat"), ("J", "a dog in snow"), ("J", "a dog in snow"),
                             ("A", sf.caption_of(0, 0)), ("K", "a cat on a mat")):
            tar.write({"__key__": key, "jpg": sf.jpeg(1), "txt": caption.encode()})
    out = tmp_path / "out"
    rewrite(setup, out, prompt=str(tmp_path / "t" / "00000.tar"))
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["A"]
    meta = json.loads(pq.read_schema(out / "00000.parquet").metadata[b"laclip_rewrite"])
    assert meta["skipped"] == {"duplicate_key": 4}  # K twice, J twice; not a broken tar
