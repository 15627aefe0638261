"""The rewriter on img2dataset shards, in-process with a tiny random LLaMA: keyed parquet
output in several modes, the same rewrites from parquet and tar input, resume inside a
shard, claims, settings refusal, dry run and flag errors."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import shard_fixtures as sf
from common.locking import FileLock
from conftest import REWRITE_PAIRS, make_tiny_rewrite_setup
from rewrite import llama_rewrite, runner
from common.rewrite_format import read_metadata
from rewrite.shard_input import RUN_RECORD

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = {"max_seq_len": 256, "max_gen_len": 6, "max_batch_size": 2, "sample_mode": "chatgpt,bard"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewrite_shards")
    shards = sf.make_shards(root / "shards", n_shards=4, per_shard=5)
    captions = [sf.caption_of(s, i) for s in range(4) for i in range(5)]
    tiny = make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)
    reference = root / "reference"
    llama_rewrite.main(**tiny, **FLAGS, prompt_filename=shards.parquets, output_filename=str(reference))
    return {"root": root, "shards": shards, "tiny": tiny, "reference": reference}


def rewrite(setup, out: Path, prompt: str | None = None, **extra) -> None:
    flags = {**setup["tiny"], **FLAGS, "prompt_filename": prompt or setup["shards"].parquets,
             "output_filename": str(out), **extra}
    llama_rewrite.main(**flags)


def tables(out: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(out.glob("*.parquet"))}


def test_one_keyed_parquet_per_shard_in_every_mode(setup):
    out = setup["reference"]
    assert sorted(p.name for p in out.iterdir()) == [f"{s:05d}.parquet" for s in range(4)] + \
        ["input_fingerprints.jsonl", "manifest.json", RUN_RECORD]  # the inputs' hashes, remembered
    # (rewrite/shard_input.py); what every output holds, for a training start (common/rewrite_manifest.py)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [f"{s:05d}.parquet" for s in range(4)]
    assert manifest["files"]["00003.parquet"]["rows"] == 4
    assert manifest["settings"] == [json.loads((out / RUN_RECORD).read_text())["settings"]]
    rows = tables(out)
    assert pq.read_schema(out / "00000.parquet").names == ["key", "caption", "chatgpt", "bard"]
    assert [r["key"] for r in rows["00003.parquet"]] == [sf.key_of(3, i) for i in (0, 1, 3, 4)]  # 2: not downloaded
    for name, shard_rows in rows.items():
        s = int(name[:5])
        for r in shard_rows:
            assert r["caption"] == sf.caption_of(s, int(r["key"][5:]))
            assert r["chatgpt"] and r["bard"] and r["chatgpt"] != r["bard"]  # another pool, another rewrite
    meta = read_metadata(out / "00003.parquet")
    assert meta["skipped"] == {"not_downloaded": 1} and meta["stats"]["lines"] == 4
    assert meta["stats"]["rewritten"] + meta["stats"]["fallbacks"] == 2 * 4
    assert meta["settings"]["sample_mode"] == ["chatgpt", "bard"] and meta["input"]["name"] == "00003.parquet"


def test_tar_input_gives_the_same_rewrite_per_key(setup, tmp_path):
    """A rewrite depends on (seed, mode, key, caption) only: other batch size, other input kind."""
    out = tmp_path / "from_tars"
    rewrite(setup, out, prompt=setup["shards"].tars, max_batch_size=3)
    by_key = {r["key"]: r for rows in tables(setup["reference"]).values() for r in rows}
    got = [r for rows in tables(out).values() for r in rows]
    # 20 samples: one never downloaded (not in its tar), two lost where the last tar is cut off
    assert len(got) == 17
    for r in got:
        assert r == by_key[r["key"]]
    assert read_metadata(out / "00003.parquet")["skipped"] == {"broken_tar": 1}


class Interrupt(Exception):
    pass


def test_killed_inside_a_shard_resumes_to_the_same_files(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real, calls = runner.rewrite_window, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # windows of 4 lines x 2 modes: shard 0 done, shard 1 has one window committed
            raise Interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "rewrite_window", interrupted)
    with pytest.raises(Interrupt):
        rewrite(setup, out, max_batch_size=1)
    assert (out / "00000.parquet").exists() and not (out / "00001.parquet").exists()
    assert json.loads((out / "00001.parquet.part.progress.json").read_text())["state"]["next_line"] == 4
    monkeypatch.setattr(runner, "rewrite_window", real)
    assert sorted(p.name for p in out.glob("*.part")) and not list(out.glob("*.lock"))
    with open(next(out.glob("*.part")), "a") as f:
        f.write('{"half a row that was never committed"')
    rewrite(setup, out, max_batch_size=3)
    assert tables(out) == tables(setup["reference"])
    assert not list(out.glob("*.part*"))


def test_a_claimed_shard_is_left_to_its_holder(setup, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    held = FileLock(out / "00001.parquet", "another run").acquire()
    try:
        rewrite(setup, out)
    finally:
        held.release()
    assert not (out / "00001.parquet").exists()
    assert "done: 3 of 4 shards finished" in capsys.readouterr().out
    rewrite(setup, out)  # the holder died: the next run takes the shard, and only that one
    assert tables(out) == tables(setup["reference"])
    assert "This run: 1 shards" in capsys.readouterr().out


def test_other_settings_are_refused_and_overwrite_redoes(setup, tmp_path):
    out = tmp_path / "out"
    rewrite(setup, out, sample_mode="chatgpt")
    with pytest.raises(ValueError, match="--output_filename: the shards in .* other settings: .*seed: 1 -> 2"):
        rewrite(setup, out, sample_mode="chatgpt", seed=2)
    rewrite(setup, out, sample_mode="chatgpt", seed=2, overwrite=True)
    redone = tables(out)
    assert redone != {n: [{k: v for k, v in r.items() if k != "bard"} for r in rows]
                      for n, rows in tables(setup["reference"]).items()}
    assert json.loads((out / RUN_RECORD).read_text())["settings"]["seed"] == 2


def test_dry_run_writes_keyed_prompts_per_shard(setup, tmp_path):
    out = tmp_path / "dry"
    llama_rewrite.main(prompt_filename=setup["shards"].parquets, output_filename=str(out), dry_run=True,
                       sample_mode="chatgpt,human", examples=setup["tiny"]["examples"])
    rows = [json.loads(line) for line in (out / "00000.prompts.jsonl").read_text().splitlines()]
    assert [(r["key"], r["mode"]) for r in rows[:2]] == [(sf.key_of(0, 0), "chatgpt"), (sf.key_of(0, 0), "human")]
    assert rows[0]["prompt"].endswith(sf.caption_of(0, 0) + " =>")


@pytest.mark.parametrize("flags, message", [
    ({"text_key": "caption", "prompt_filename": "TEXT", "sample_mode": "bard"}, "--text_key names the caption field"),
    ({"sample_mode": "chatgpt,chatgpt"}, "names a mode twice"),
    ({"prompt_filename": "MISSING"}, r"1 of 5 shards not found, e.g. .*00004.parquet"),
    ({"output_filename": "FILE"}, "names a folder .* and it is a file"),
    ({"output_filename": "INPUT"}, "is the folder of the input shards"),
    ({"text_key": "title"}, "--text_key: .* has no column 'title'"),
])
def test_bad_shard_flags_name_the_flag(setup, tmp_path, capsys, flags, message):
    shards = setup["shards"]
    (tmp_path / "src.txt").write_text("a caption\n")
    (tmp_path / "file").write_text("x")
    values = {"TEXT": str(tmp_path / "src.txt"), "MISSING": str(shards.folder / "{00000..00004}.parquet"),
              "FILE": str(tmp_path / "file"), "INPUT": str(shards.folder)}
    args = {**setup["tiny"], **FLAGS, "prompt_filename": shards.parquets, "output_filename": str(tmp_path / "o"),
            **flags}
    args = {k: values.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    assert llama_rewrite.cli([f"--{k}={v}" for k, v in args.items()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama_rewrite.py: error: ") and "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_shards_with_a_hugging_face_checkpoint_and_tokenizer_json(setup, tmp_path):
    """The shard path loads every format the engine does (here a LLaMA-3-style HF folder with a
    byte-level tokenizer.json, found without --tokenizer_path), as the text-file path does."""
    from rewrite.llama import load_tokenizer
    from testkit.hf_llama import byte_bpe_tokenizer_json, llama_config, random_llama, write_hf
    texts = [sf.caption_of(s, i) for s in range(4) for i in range(5)] + [p for pair in REWRITE_PAIRS for p in pair]
    bpe = byte_bpe_tokenizer_json(texts + ["write image captions differently, =>"], 300, tmp_path / "bpe")
    tok = load_tokenizer(str(bpe))
    hf = write_hf(random_llama(llama_config("llama3", tok.n_words, tok.bos_id, tok.eos_id), seed=3), tmp_path / "hf",
                  [bpe])
    flags = {**FLAGS, "ckpt_dir": str(hf), "examples": setup["tiny"]["examples"], "temperature": 0,
             "prompt_filename": setup["shards"].parquets}
    llama_rewrite.main(**flags, output_filename=str(tmp_path / "a"))
    llama_rewrite.main(**{**flags, "max_batch_size": 5}, output_filename=str(tmp_path / "b"))
    a, b = tables(tmp_path / "a"), tables(tmp_path / "b")
    assert a == b and len(a) == 4  # greedy: the same rows whatever the batch size
    rows = [row for shard in a.values() for row in shard]
    assert all(row["chatgpt"] and row["bard"] for row in rows)
