"""Nothing stale on resume (issue 23), the rewriter's side: a run resumed or rerun with other
weights of the same shapes is refused naming --ckpt_dir (content identity: sampled blocks of
every weight file, remembered by stat); a progress record damaged on disk is refused naming it;
a resumed shard run's summary adds up."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import shard_fixtures as sf
from common.rewrite_format import read_metadata
from conftest import REWRITE_PAIRS, interrupt_at_window, make_tiny_rewrite_setup, one_line_error
from rewrite import llama_rewrite, runner
from rewrite.shard_input import RUN_RECORD
from rewrite.units import record_path

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["person rides a bike", "a bowl of soup", "boats in the harbour", "snow on the hills",
            "tea and cake", "a cat on a mat", "the old bridge", "kids play football", "a lamp"]
FLAGS = {"max_seq_len": 256, "max_gen_len": 4, "max_batch_size": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA, a second folder with the same files but other weights (a fine-tune of the
    same shapes: params.json, tokenizer, file names and sizes equal), a caption file, shards."""
    root = tmp_path_factory.mktemp("rewrite_stale")
    shards = sf.make_shards(root / "shards", n_shards=3, per_shard=5)
    captions = CAPTIONS + [sf.caption_of(s, i) for s in range(3) for i in range(5)]
    tiny = make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)
    other = root / "other"
    shutil.copytree(tiny["ckpt_dir"], other)
    weights = other / "consolidated.00.pth"
    state = torch.load(weights)
    torch.save({k: v if k == "rope.freqs" else (v.float() * 1.01).to(v.dtype) for k, v in state.items()}, weights)
    assert weights.stat().st_size == (Path(tiny["ckpt_dir"]) / weights.name).stat().st_size
    src = root / "src.txt"
    src.write_text("".join(f"{c}\n" for c in CAPTIONS * 3), encoding="utf-8")
    return {"tiny": tiny, "other": str(other), "src": src, "shards": shards}


def flags(setup, out: Path, ckpt_dir: str | None = None, prompt: str | None = None, **extra) -> dict:
    return {**setup["tiny"], **FLAGS, "prompt_filename": prompt or str(setup["src"]), "output_filename": str(out),
            **({"ckpt_dir": ckpt_dir} if ckpt_dir else {}), **extra}


def cli(**kwargs) -> int:
    return llama_rewrite.cli([f"--{k}={v}" for k, v in kwargs.items()])


def forbid_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_generator", refuse)


# ---------------------------------------------------------------- case 2: other weights, same shapes
def test_text_resume_with_other_weights_is_refused_naming_the_folder(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 2)
        assert cli(**flags(setup, out)) == 130
    forbid_model(monkeypatch)
    capsys.readouterr()
    assert cli(**flags(setup, out, ckpt_dir=setup["other"])) == 2
    err = one_line_error(capsys)
    assert f"--ckpt_dir {setup['other']}" in err and "consolidated.00.pth" in err and str(out) in err
    assert "--overwrite" in err
    monkeypatch.undo()
    assert cli(**flags(setup, out)) == 0  # the weights it was made with resume it
    content = json.loads(record_path(out).read_text())["fingerprint"]["settings"]["checkpoint"]["content"]
    assert list(content) == ["consolidated.00.pth"]


def test_finished_text_output_rerun_with_other_weights_is_refused(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    assert cli(**flags(setup, out)) == 0
    forbid_model(monkeypatch)
    capsys.readouterr()
    assert cli(**flags(setup, out, ckpt_dir=setup["other"])) == 2
    err = one_line_error(capsys)
    assert f"--ckpt_dir {setup['other']}" in err and "consolidated.00.pth" in err


def test_shards_rerun_with_other_weights_is_refused_and_the_identity_recorded(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    shards = setup["shards"].parquets
    with monkeypatch.context() as m:
        interrupt_at_window(m, 3)  # windows of 4 lines: shard 0 finished, shard 1 partly
        assert cli(**flags(setup, out, prompt=shards, max_batch_size=1)) == 130
    assert (out / "00000.parquet").exists() and (out / "00001.parquet.part").exists()
    forbid_model(monkeypatch)
    capsys.readouterr()
    assert cli(**flags(setup, out, ckpt_dir=setup["other"], prompt=shards)) == 2
    err = one_line_error(capsys)
    assert f"--ckpt_dir {setup['other']}" in err and "consolidated.00.pth" in err and str(out) in err
    monkeypatch.undo()
    assert cli(**flags(setup, out, prompt=shards)) == 0
    recorded = json.loads((out / RUN_RECORD).read_text())["settings"]["checkpoint"]
    other = tmp_path / "other_out"
    assert cli(**flags(setup, other, ckpt_dir=setup["other"], prompt=shards)) == 0
    theirs = json.loads((other / RUN_RECORD).read_text())["settings"]["checkpoint"]
    # two finished outputs tell their weights apart (in rewrite.json and in every shard's metadata)
    assert {k: v for k, v in recorded.items() if k != "content"} == {k: v for k, v in theirs.items() if k != "content"}
    assert recorded["content"] != theirs["content"]
    assert read_metadata(other / "00002.parquet")["settings"]["checkpoint"] == theirs


def test_records_of_the_previous_version_resume_with_a_note(setup, tmp_path, capsys, monkeypatch):
    """A record without content hashes (written before they existed) is accepted: names, sizes
    and config still match; one note says the content could not be compared; the new identity
    is recorded from then on."""
    out = tmp_path / "out.txt"
    real = runner.checkpoint_identity

    def previous_version(ckpt, tokenizer_path):
        return {k: v for k, v in real(ckpt, tokenizer_path).items() if k != "content"}

    with monkeypatch.context() as m:
        m.setattr(runner, "checkpoint_identity", previous_version)
        interrupt_at_window(m, 2)
        assert cli(**flags(setup, out)) == 130
    assert "content" not in json.loads(record_path(out).read_text())["fingerprint"]["settings"]["checkpoint"]
    capsys.readouterr()
    assert cli(**flags(setup, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("could not be compared") == 1 and "--ckpt_dir" in printed
    assert "content" in json.loads(record_path(out).read_text())["fingerprint"]["settings"]["checkpoint"]
    assert len(out.read_text().splitlines()) == 3 * len(CAPTIONS)


def test_shard_folders_of_the_previous_version_resume_with_a_note(setup, tmp_path, capsys, monkeypatch):
    """rewrite.json, a finished shard's metadata and a part's record without content hashes:
    accepted with one note; rewrite.json and the shards finished from now on hold them."""
    out, shards = tmp_path / "out", setup["shards"].parquets
    real = runner.checkpoint_identity
    with monkeypatch.context() as m:
        m.setattr(runner, "checkpoint_identity",
                  lambda ckpt, tok: {k: v for k, v in real(ckpt, tok).items() if k != "content"})
        interrupt_at_window(m, 3)
        assert cli(**flags(setup, out, prompt=shards, max_batch_size=1)) == 130
    assert "content" not in read_metadata(out / "00000.parquet")["settings"]["checkpoint"]
    capsys.readouterr()
    assert cli(**flags(setup, out, prompt=shards)) == 0
    printed = capsys.readouterr().out
    assert printed.count("could not be compared") == 1 and "done: 3 of 3 shards finished" in printed
    assert "content" in json.loads((out / RUN_RECORD).read_text())["settings"]["checkpoint"]
    assert "content" in read_metadata(out / "00002.parquet")["settings"]["checkpoint"]
    forbid_model(monkeypatch)
    assert cli(**flags(setup, out, ckpt_dir=setup["other"], prompt=shards)) == 2  # now told apart


def test_vllm_engine_records_the_identity_of_the_users_folder(setup, tmp_path, monkeypatch):
    """--engine vllm loads a converted Hugging Face folder; what is recorded is --ckpt_dir's."""
    import rewrite.vllm_engine as vllm_engine
    from rewrite.cli_args import validate
    from rewrite.llama import open_checkpoint
    monkeypatch.setattr(vllm_engine, "vllm_version", lambda: "0.0-test")
    monkeypatch.setattr(runner, "check_supported", lambda *a: None)
    cfg = validate(flags(setup, tmp_path / "out.txt", engine="vllm"))
    job = runner.prepare(cfg)
    expected = runner.checkpoint_identity(open_checkpoint(setup["tiny"]["ckpt_dir"]), setup["tiny"]["tokenizer_path"])
    assert job.units.fingerprints["chatgpt"]["settings"]["checkpoint"] == expected
    assert "consolidated.00.pth" in expected["content"]


# ---------------------------------------------------------------- case 5: a damaged progress record
def flip_last_digit(path: Path, key: str) -> None:
    """One bit of the record flipped on disk, keeping it valid JSON: '"key": 16' -> 17."""
    data = bytearray(path.read_bytes())
    at = re.search(rf'"{key}": \d+'.encode(), data).end() - 1
    data[at] ^= 1
    path.write_bytes(bytes(data))


def test_text_record_with_a_flipped_byte_is_refused(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 2)
        assert cli(**flags(setup, out)) == 130
    flip_last_digit(record_path(out), "next_line")  # today: resumed one line off, silently
    forbid_model(monkeypatch)
    capsys.readouterr()
    assert cli(**flags(setup, out)) == 2
    err = one_line_error(capsys)
    assert f"progress record {record_path(out)} is damaged" in err and "--overwrite" in err


def test_shard_part_record_with_a_flipped_byte_is_refused(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 3)
        assert cli(**flags(setup, out, prompt=setup["shards"].parquets, max_batch_size=1)) == 130
    record = out / "00001.parquet.part.progress.json"
    flip_last_digit(record, "rewritten")  # today: resumed, the shard's counts wrong
    capsys.readouterr()
    assert cli(**flags(setup, out, prompt=setup["shards"].parquets)) == 2
    err = one_line_error(capsys)
    assert f"progress record {record} is damaged" in err and "00001.parquet.part" in err


def test_records_without_a_checksum_still_resume(setup, tmp_path, monkeypatch):
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 2)
        assert cli(**flags(setup, out)) == 130
    record = json.loads(record_path(out).read_text())
    record.pop("checksum", None)  # as the previous version wrote it
    record_path(out).write_text(json.dumps(record))
    assert cli(**flags(setup, out)) == 0
    assert len(out.read_text().splitlines()) == 3 * len(CAPTIONS)


# ---------------------------------------------------------------- case 7: the shard summary adds up
def test_resumed_shard_summary_adds_up(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    two = dict(prompt=setup["shards"].parquets, sample_mode="chatgpt,bard")
    with monkeypatch.context() as m:
        interrupt_at_window(m, 6)  # windows of 8 lines x 2 modes: shard 0 done, shard 1 one window in
        assert cli(**flags(setup, out, max_batch_size=1, **two)) == 130
    assert (out / "00000.parquet").exists() and (out / "00001.parquet.part").exists()
    capsys.readouterr()
    assert cli(**flags(setup, out, **two)) == 0
    summary = capsys.readouterr().out
    found = re.search(r"This run: (\d+) shards, (\d+) samples x (\d+) modes: (\d+) rewritten, (\d+) fell back to the "
                      r"caption, (\d+) empty captions", summary)
    shards, samples, modes, rewritten, fallbacks, empty = map(int, found.groups())
    finished = [read_metadata(out / f"0000{s}.parquet")["stats"] for s in (1, 2)]
    assert (shards, modes) == (2, 2)
    assert samples == sum(s["lines"] for s in finished) == sum(pq.read_metadata(out / f"0000{s}.parquet").num_rows
                                                               for s in (1, 2))
    assert rewritten + fallbacks + modes * empty == samples * modes
    assert rewritten == sum(s["rewritten"] for s in finished)


def test_a_record_without_checksum_is_still_checked_by_its_line_count(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 2)
        assert cli(**flags(setup, out)) == 130
    record = json.loads(record_path(out).read_text())
    del record["checksum"]  # as the previous version wrote it
    record_path(out).write_text(json.dumps(record))
    flip_last_digit(record_path(out), "next_line")
    capsys.readouterr()
    assert cli(**flags(setup, out)) == 2
    err = one_line_error(capsys)
    assert f"progress record {record_path(out)} is damaged: it says 17 lines were committed, {out} holds 16" in err


def test_object_storage_record_with_a_flipped_byte_is_refused(s3_bucket):
    """The progress object of a shard in progress on S3 (rewrite/units_shards.py) likewise."""
    from common import storage
    from rewrite.units_shards import ObjectShareWriter
    part = f"s3://{s3_bucket}/out/00000.parquet.part"
    fingerprint, layout = {"input": {"name": "00000.parquet", "size": 10, "etag": "x"}, "settings": {}}, {"shard": "0"}
    w = ObjectShareWriter(part, fingerprint, layout, overwrite=False)
    w.open(0, 0)
    w.commit([f'{{"key": "{k}"}}' for k in range(16)], 16, 16, {"lines": 16, "rewritten": 16})
    record = storage.read_bytes(w.record_path)
    at = record.index(b'"next_line": 16') + len(b'"next_line": 1')
    storage.write_bytes(w.record_path, record[:at] + bytes([record[at] ^ 1]) + record[at + 1:])
    with pytest.raises(ValueError, match=rf"progress record {w.record_path} is damaged: its content does not match"):
        ObjectShareWriter(part, fingerprint, layout, overwrite=False).open(0, 0)
    unsealed = json.loads(record)
    del unsealed["checksum"]  # as an earlier version wrote it: its row count still guards it
    unsealed["state"]["next_line"] = 17
    storage.write_bytes(w.record_path, json.dumps(unsealed).encode())
    with pytest.raises(ValueError, match="it says 17 rows were committed, its windows hold 16"):
        ObjectShareWriter(part, fingerprint, layout, overwrite=False).open(0, 0)
