"""rewrite/llama_rewrite.py in-process with a tiny random LLaMA: alignment,
determinism, resume, refusal, dry run and bad-input messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REWRITE_PAIRS as PAIRS, interrupt_at_window, make_tiny_rewrite_setup
from rewrite import cli_args, llama_rewrite, runner
from rewrite.llama import Tokenizer
from rewrite.units import ShareWriter, record_path

REWRITE = Path(__file__).resolve().parents[1] / "rewrite"

CAPTIONS = ["person rides a bike", "a bowl of soup", "", "boats in the harbour", "   ",
            "actor at the premiere", "a => b caption", "snow on the hills", "tea and cake",
            "a cat on a mat", "the old bridge", "kids play football", "a lamp", "dog runs"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_rewrite_setup(tmp_path_factory.mktemp("rewrite_cli"), CAPTIONS, PAIRS)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def rewrite(tiny, src: Path, out: Path, **flags) -> bytes:
    args = dict(tiny, prompt_filename=str(src), output_filename=str(out), max_seq_len=256,
                max_gen_len=6, max_batch_size=3)
    args.update(flags)
    llama_rewrite.main(**args)
    return out.read_bytes()


def test_alignment_and_determinism_across_batch_sizes(tiny, tmp_path):
    src = tmp_path / "src.txt"
    long = " ".join(["a very long caption"] * 80)
    raw = "\n".join(CAPTIONS[:5] + [long] + CAPTIONS[5:]).encode() + b"\nbad \xff\xfe bytes\r\nlast"
    src.write_bytes(raw)  # CRLF line, undecodable bytes, no final newline
    a = rewrite(tiny, src, tmp_path / "a.txt", max_batch_size=1)
    b = rewrite(tiny, src, tmp_path / "b.txt", max_batch_size=5)
    assert a == b
    lines = a.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == raw.count(b"\n") + 1
    for k in (2, 4):  # empty and blank input lines stay empty
        assert lines[k] == ""
    assert all(lines[k] for k in range(len(lines) - 1) if k not in (2, 4))
    stats = json.loads(record_path(tmp_path / "a.txt").read_text())["state"]["stats"]
    assert stats["lines"] == len(lines) - 1 and stats["empty"] == 2
    assert stats["truncated"] == 1 and stats["undecodable"] == 1
    assert stats["rewritten"] + stats["fallbacks"] == stats["lines"] - 2


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("windows", [0, 1, 2])
def test_resume_gives_identical_file(tiny, tmp_path, monkeypatch, windows):
    src = write_lines(tmp_path / "src.txt", CAPTIONS * 2)
    reference = rewrite(tiny, src, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, windows, Interrupt)
        with pytest.raises(Interrupt):
            rewrite(tiny, src, out)
    with open(out, "ab") as f:  # bytes written after the last commit must be discarded
        f.write(b"half a line that was never committed")
    assert rewrite(tiny, src, out, max_batch_size=2) == reference


def test_two_modes_in_one_pass_equal_single_mode_runs(tiny, tmp_path, monkeypatch):
    """--sample_mode chatgpt,bard on a caption file: OUT.chatgpt.txt and OUT.bard.txt, each the
    single-mode run's file byte for byte, also when the pass is interrupted and resumed."""
    src = write_lines(tmp_path / "src.txt", CAPTIONS * 2)
    single = {m: rewrite(tiny, src, tmp_path / f"{m}.txt", sample_mode=m) for m in ("chatgpt", "bard")}
    real, calls = ShareWriter.commit, []

    def commit(self, *args, **kwargs):  # killed between the two modes' commits of window 2
        if len(calls) == 3:
            raise Interrupt()
        calls.append(self.out_path.name)
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ShareWriter, "commit", commit)
        with pytest.raises(Interrupt):
            rewrite(tiny, src, tmp_path / "out.txt", sample_mode="chatgpt,bard")
    assert calls == ["out.chatgpt.txt", "out.bard.txt", "out.chatgpt.txt"] and not (tmp_path / "out.txt").exists()
    args = dict(tiny, prompt_filename=str(src), output_filename=str(tmp_path / "out.txt"), max_seq_len=256,
                max_gen_len=6, max_batch_size=2, sample_mode="chatgpt,bard")
    llama_rewrite.main(**args)
    for mode, expected in single.items():
        assert (tmp_path / f"out.{mode}.txt").read_bytes() == expected
        assert json.loads(record_path(tmp_path / f"out.{mode}.txt").read_text())["complete"]


def test_more_units_than_processes_resume_to_the_same_file(tiny, tmp_path, monkeypatch):
    """A caption file planned as 3 units, interrupted, then resumed by one process that
    claims them in turn: the units concatenated equal an uninterrupted run."""
    from rewrite import units_text
    src = write_lines(tmp_path / "src.txt", CAPTIONS * 2)
    reference = rewrite(tiny, src, tmp_path / "ref.txt")
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        m.setattr(units_text, "UNIT_LINES", 10)  # 28 lines: 3 units
        interrupt_at_window(m, 2, Interrupt)
        with pytest.raises(Interrupt):
            rewrite(tiny, src, out)
    assert sorted(p.name for p in tmp_path.glob("out.txt.part-*-of-00003")) == [
        f"out.txt.part-0000{u}-of-00003" for u in range(3)]
    assert rewrite(tiny, src, out, max_batch_size=2) == reference
    assert sorted(p.name for p in tmp_path.glob("out.txt*")) == ["out.txt", "out.txt.progress.json"]


def test_checkpoint_folder_and_tokenizer_are_opened_once(tiny, tmp_path, monkeypatch):
    from rewrite.llama import meta
    opened = []
    real_init, real_tokenizer = meta.MetaCheckpoint.__init__, runner.load_tokenizer
    monkeypatch.setattr(meta.MetaCheckpoint, "__init__", lambda self, *a: opened.append("ckpt") or real_init(self, *a))
    monkeypatch.setattr(runner, "load_tokenizer", lambda *a: opened.append("tokenizer") or real_tokenizer(*a))
    rewrite(tiny, write_lines(tmp_path / "src.txt", CAPTIONS[:3]), tmp_path / "out.txt")
    assert sorted(opened) == ["ckpt", "tokenizer"]


def test_finished_run_reports_complete(tiny, tmp_path, capsys):
    src = write_lines(tmp_path / "src.txt", CAPTIONS[:4])
    first = rewrite(tiny, src, tmp_path / "out.txt")
    capsys.readouterr()
    assert rewrite(tiny, src, tmp_path / "out.txt") == first
    assert "already complete" in capsys.readouterr().out


def test_changed_input_or_settings_refuse_and_overwrite_restarts(tiny, tmp_path, monkeypatch):
    src = write_lines(tmp_path / "src.txt", CAPTIONS)
    out = tmp_path / "out.txt"
    with monkeypatch.context() as m:
        interrupt_at_window(m, 1, Interrupt)
        with pytest.raises(Interrupt):
            rewrite(tiny, src, out)
    write_lines(src, CAPTIONS[::-1])
    with pytest.raises(ValueError, match="--output_filename: the partial run .*different input.*--overwrite"):
        rewrite(tiny, src, out)
    write_lines(src, CAPTIONS)
    with pytest.raises(ValueError, match="settings.seed: 1 -> 2"):
        rewrite(tiny, src, out, seed=2)
    fresh = rewrite(tiny, src, out, seed=2, overwrite=True)
    assert fresh == rewrite(tiny, src, tmp_path / "seed2.txt", seed=2)
    with pytest.raises(ValueError, match="finished run of a different input or settings: settings.top_p"):
        rewrite(tiny, src, out, seed=2, top_p=0.5)


def test_dtype_flag_reaches_the_engine_and_the_record(tiny, tmp_path, monkeypatch):
    seen = []
    real = runner.load_generator

    def spy(*args, **kwargs):
        gen = real(*args, **kwargs)
        seen.append(gen.model.output.weight.dtype)
        return gen

    monkeypatch.setattr(runner, "load_generator", spy)
    src = write_lines(tmp_path / "src.txt", CAPTIONS[:4])
    out = tmp_path / "out.txt"
    lines = rewrite(tiny, src, out, dtype="bf16", temperature=0).decode().split("\n")
    assert seen == [torch.bfloat16]
    assert len(lines) == 5 and lines[2] == "" and all(lines[k] for k in (0, 1, 3))
    assert json.loads(record_path(out).read_text())["fingerprint"]["settings"]["dtype"] == "bf16"
    rewrite(tiny, src, tmp_path / "default.txt")
    assert seen[-1] == torch.float32  # the CPU default
    with pytest.raises(ValueError, match="settings.dtype: 'bf16' -> 'fp32'"):
        rewrite(tiny, src, out, dtype="fp32", temperature=0)


def test_noshare_prefixes_reaches_the_engine_and_the_record(tiny, tmp_path, monkeypatch):
    """--noshare_prefixes prefills every prompt whole; it is recorded (texts may differ from a
    sharing run by float rounding), while the default leaves the record as before the flag."""
    seen = []
    real = runner.load_generator

    def spy(*args, **kwargs):
        gen = real(*args, **kwargs)
        seen.append(gen.share_prefixes)
        return gen

    monkeypatch.setattr(runner, "load_generator", spy)
    src = write_lines(tmp_path / "src.txt", CAPTIONS)
    rewrite(tiny, src, tmp_path / "shared.txt")
    rewrite(tiny, src, tmp_path / "whole.txt", share_prefixes=False)
    assert seen == [True, False]
    settings = [json.loads(record_path(tmp_path / f).read_text())["fingerprint"]["settings"]
                for f in ("shared.txt", "whole.txt")]
    assert "share_prefixes" not in settings[0] and settings[1]["share_prefixes"] is False
    with pytest.raises(ValueError, match="settings.share_prefixes: False -> None"):
        rewrite(tiny, src, tmp_path / "whole.txt")


def test_existing_output_without_record_is_not_clobbered(tiny, tmp_path):
    src = write_lines(tmp_path / "src.txt", CAPTIONS[:3])
    out = tmp_path / "out.txt"
    out.write_text("precious\n")
    with pytest.raises(ValueError, match="out.txt exists and has no progress record"):
        rewrite(tiny, src, out)
    assert out.read_text() == "precious\n"


def test_dry_run_prompt_is_the_template(tiny, tmp_path):
    src = write_lines(tmp_path / "src.txt", ["a cat on a mat", "", "x " * 300])
    llama_rewrite.main(prompt_filename=str(src), output_filename=str(tmp_path / "t.txt"), dry_run=True,
                       examples=tiny["examples"], tokenizer_path=tiny["tokenizer_path"], max_seq_len=256)
    rows = [json.loads(line) for line in (tmp_path / "t.txt.prompts.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [0, 1, 2] and rows[1]["prompt"] is None
    s, t = zip(*rows[0]["examples"])
    expected = ("write image captions differently,\n\n            " + f"{s[0]} => {t[0]}\n\n            "
                f"{s[1]} => {t[1]}\n\n            {s[2]} => {t[2]}\n\n            a cat on a mat =>")
    assert rows[0]["prompt"] == expected and not rows[0]["truncated"]
    assert all(list(p) in PAIRS for p in rows[0]["examples"])
    tok = Tokenizer(tiny["tokenizer_path"])
    assert rows[2]["truncated"] and rows[2]["prompt"].endswith(" =>")
    assert rows[2]["prompt_tokens"] == len(tok.encode(rows[2]["prompt"], True, False)) <= 256 - 5


def test_readme_paths_from_rewrite_dir_and_repo_root(tmp_path, monkeypatch):
    for cwd in (REWRITE, REWRITE.parent):
        monkeypatch.chdir(cwd)
        cfg = cli_args.validate(dict(
            ckpt_dir=None, tokenizer_path=None, temperature=0.9, top_p=0.95, max_seq_len=400, max_batch_size=100,
            prompt_filename="text/source.txt", output_filename="text/target.txt", sample_mode="chatgpt",
            max_gen_len=77, seed=1, examples=None, dry_run=True, overwrite=False, model_parallel_size=None,
            dtype=None))
        assert cfg.prompt_filename.resolve() == REWRITE / "text" / "source.txt"
        assert cfg.output_filename.resolve() == REWRITE / "text" / "target.txt"
    assert len((REWRITE / "text" / "source.txt").read_text().splitlines()) >= 90


@pytest.mark.parametrize("flags, message", [
    ({"max_batch_size": 0}, "--max_batch_size must be at least 1, got 0"),
    ({"max_seq_len": 4096}, "--max_seq_len must be between 16 and 2048"),
    ({"max_seq_len": 40}, "--max_seq_len 40 is too small for the chatgpt examples of --examples"),
    ({"max_gen_len": 0}, "--max_gen_len must be at least 1"),
    ({"top_p": 0}, r"--top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"--top_p must be in \(0, 1\]"),
    ({"temperature": -0.1}, "--temperature must be >= 0"),
    ({"seed": "abc"}, "--seed must be an integer"),
    ({"dtype": "int8"}, "--dtype 'int8' is not supported"),
    ({"sample_mode": "gpt4"}, "choose one of: chatgpt, bard, mscoco, human"),
    ({"ckpt_dir": None}, "--ckpt_dir is required"),
    ({"ckpt_dir": "/no/such/dir"}, "--ckpt_dir: /no/such/dir is not a directory"),
    ({"ckpt_dir": "/no/such/dir", "tokenizer_path": None}, "--ckpt_dir: /no/such/dir is not a directory"),
    ({"tokenizer_path": "/no/tokenizer.model"}, "--tokenizer_path: no tokenizer at /no/tokenizer.model"),
    ({"prompt_filename": "/no/src.txt"}, "--prompt_filename /no/src.txt: file not found"),
    ({"prompt_filename": "EMPTY"}, "--prompt_filename .*empty.txt: the file is empty"),
    ({"output_filename": "/no/dir/out.txt"}, "--output_filename /no/dir/out.txt: directory /no/dir does not exist"),
    ({"output_filename": "TMP"}, "--output_filename .* is a directory"),
    ({"examples": "/no/pool.json"}, "--examples /no/pool.json: file not found"),
])
def test_bad_input_names_the_flag(tiny, tmp_path, capsys, flags, message):
    src = write_lines(tmp_path / "src.txt", CAPTIONS[:2])
    (tmp_path / "empty.txt").write_bytes(b"")
    args = dict(tiny, prompt_filename=str(src), output_filename=str(tmp_path / "out.txt"), max_seq_len=256)
    args.update(flags)
    if args["prompt_filename"] == "EMPTY":
        args["prompt_filename"] = str(tmp_path / "empty.txt")
    if args["output_filename"] == "TMP":
        args["output_filename"] = str(tmp_path)
    argv = [f"--{k}={v}" for k, v in args.items() if v is not None]
    assert llama_rewrite.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama_rewrite.py: error: ") and "Traceback" not in err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out.txt").exists()  # nothing written on bad input
