"""python -m rewrite.report: every metric on a small fixture computed by hand, text and shard
outputs (local and s3://) giving the same numbers, the page and its PNGs, the distinct-count
sketch, CLIP scores with a tiny random model, and every bad input refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import shard_fixtures as sf
from rewrite import report
from rewrite.report_metrics import Column, DistinctCounter, words

# line: (caption, chatgpt rewrite, bard rewrite); line 1's caption is blank
LINES = [
    ("A dog runs on the beach", "A happy dog runs along the beach", "dog => beach"),
    ("  ", "", "something"),
    ("two cats sleep", "two cats sleep", "Two cats are sleeping\x07"),
    ("a red car", "A cat  on a mat.", ""),
    ("Snow\ton the hills", "Snow on the hills", "snow on the hills and snow on the hills"),
    ("a dog on the beach", "A happy dog runs along the beach", "a dog on the beach"),
]
POOL = {"pairs": [["a cat", "A cat on a mat."], ["a dog", "A brown dog sits."], ["a bus", "A red bus."]]}
MODES = ("chatgpt", "bard")

# By hand (docs/report.md's definitions), over lines 0, 2, 3, 4, 5.
EXPECTED = {
    "chatgpt": {"lines": 5, "rewritten": 3, "fallbacks": 2, "identical_to_original": 2 / 5, "empty": 0 / 5,
                "mean_words": 26 / 5, "mean_words_original": 21 / 5, "distinct_2": 15 / 21, "example_copies": 1,
                "novel_word_rate": 8 / 26, "leaked_prompt": 0 / 5, "non_printable": 0 / 5,
                "repeated_rewrites": 1 / 5, "rewrites_of_blank_captions": 0},
    "bard": {"lines": 5, "rewritten": 3, "fallbacks": 1, "identical_to_original": 1 / 5, "empty": 1 / 5,
             "mean_words": 20 / 5, "mean_words_original": 21 / 5, "distinct_2": 13 / 17, "example_copies": 0,
             "novel_word_rate": 3 / 20, "leaked_prompt": 1 / 5, "non_printable": 1 / 5, "repeated_rewrites": 0 / 5,
             "rewrites_of_blank_captions": 1},
}
JACCARDS = [0 / 8, 1 / 4, 0 / 4, 3 / 5, 1 / 9]  # chatgpt vs bard bigram sets, lines 0, 2, 3, 4, 5


def write_text(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"source": folder / "captions.txt", **{m: folder / f"out.{m}.txt" for m in MODES}}
    files["source"].write_text("".join(c + "\n" for c, _, _ in LINES))
    for k, m in enumerate(MODES):
        files[m].write_text("".join(row[k + 1] + "\n" for row in LINES))
    (folder / "pool.json").write_text(json.dumps(POOL))
    return {k: str(v) for k, v in files.items()} | {"pool": str(folder / "pool.json")}


def shard_table(rows: list[tuple], keys: list[str]) -> pa.Table:
    table = pa.table({"key": keys, "caption": [r[0] for r in rows],
                      **{m: [r[k + 1] for r in rows] for k, m in enumerate(MODES)}})
    stats = {"lines": len(rows), "rewritten": 0, "fallbacks": 0, "empty": 0, "truncated": 0, "undecodable": 0}
    return table.replace_schema_metadata({b"laclip_rewrite": json.dumps({"stats": stats})})


def write_shards(folder: Path) -> str:
    """LINES as the rewriter's shard output: two shards of 3 rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        rows = LINES[3 * s:3 * s + 3]
        pq.write_table(shard_table(rows, [sf.key_of(s, i) for i in range(3)]), folder / f"{s:05d}.parquet")
    (folder / "rewrite.json").write_text(json.dumps({"version": 1, "settings": {"sample_mode": list(MODES)}}))
    return str(folder)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = report.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def check_by_hand(result: dict) -> None:
    assert result["lines"] == 6 and result["blank_captions"] == 1
    for m in MODES:
        got = result["modes"][m]
        assert {k: got[k] for k in EXPECTED[m]} == EXPECTED[m], m
        assert got["distinct_2_exact"] and got["repeated_rewrites_exact"]
    assert result["original"]["mean_words"] == 21 / 5 and result["original"]["distinct_2"] == 12 / 16
    assert result["original"]["repeated"] == 0
    between = result["between_modes"]
    mean = sum(JACCARDS) / 5  # summed per batch: the last bit may differ with the order
    assert between["bigram_jaccard"] == pytest.approx(mean, rel=1e-15, abs=0)
    assert between["bigram_jaccard_per_pair"] == {"chatgpt|bard": pytest.approx(mean, rel=1e-15, abs=0)}
    assert between["all_identical"] == 0 and between["pairs_without_bigrams"] == 0
    hist = result["modes"]["bard"]["word_count_histogram"]
    assert [i for i, n in enumerate(hist) for _ in range(n)] == [0, 2, 4, 5, 9]


def test_text_outputs_by_hand(tmp_path, capsys):
    f = write_text(tmp_path / "in")
    out = tmp_path / "report"
    rc, printed, err = run(["--source", f["source"], "--rewrites", f["chatgpt"], f["bard"], "--examples", f["pool"],
                            "--out", out, "--samples", 3], capsys)
    assert rc == 0, err
    result = json.loads((out / "report.json").read_text())
    check_by_hand(result)
    assert result["input"]["modes"] == list(MODES)  # from the .<mode>. names
    assert len(result["samples"]) == 3 and all(s["id"] != 1 for s in result["samples"])  # blank line 1 never shown
    for s in result["samples"]:
        assert [s["caption"], *s["rewrites"].values()] == list(LINES[s["id"]])
    assert "distinct-2" in printed and "0.714" in printed  # the table: chatgpt's 15/21
    page = (out / "index.html").read_text()
    for png in ("lengths.png", "metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"src='{png}'" in page
    assert "A cat  on a mat." in page and "dog =&gt; beach" in page  # sampled text, escaped


def test_shard_outputs_equal_text_outputs(tmp_path, capsys):
    f = write_text(tmp_path / "in")
    rc, _, err = run(["--rewrites", write_shards(tmp_path / "shards"), "--examples", f["pool"],
                      "--out", tmp_path / "report"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "report" / "report.json").read_text())
    check_by_hand(result)
    assert result["input"]["kind"] == "shards" and len(result["input"]["files"]) == 2
    assert {s["id"].split("/")[0] for s in result["samples"]} == {"00000", "00001"}


@pytest.mark.slow
def test_s3_outputs(tmp_path, s3_bucket, capsys):
    import fsspec
    f = write_text(tmp_path / "in")
    folder = Path(write_shards(tmp_path / "shards"))
    fs = fsspec.filesystem("s3")
    prefix = f"{s3_bucket}/rewrites"
    for p in folder.iterdir():
        fs.put_file(str(p), f"{prefix}/{p.name}")
    fs.put_file(f["source"], f"{prefix}/captions.txt")
    fs.put_file(f["chatgpt"], f"{prefix}/out.chatgpt.txt")
    fs.put_file(f["bard"], f"{prefix}/out.bard.txt")
    rc, _, err = run(["--rewrites", f"s3://{prefix}", "--examples", f["pool"], "--out", f"s3://{s3_bucket}/rep"],
                     capsys)
    assert rc == 0, err
    check_by_hand(json.loads(fs.cat_file(f"{s3_bucket}/rep/report.json")))
    assert fs.exists(f"{s3_bucket}/rep/index.html") and fs.exists(f"{s3_bucket}/rep/lengths.png")
    assert not fs.exists(f"{s3_bucket}/rep/report.claim")  # released
    rc, _, err = run(["--source", f"s3://{prefix}/captions.txt", "--rewrites",
                      f"s3://{prefix}/out.chatgpt.txt,s3://{prefix}/out.bard.txt", "--examples", f["pool"],
                      "--out", tmp_path / "rep2"], capsys)
    assert rc == 0, err
    check_by_hand(json.loads((tmp_path / "rep2" / "report.json").read_text()))


def test_recorded_counts_and_modes_from_records(tmp_path, capsys):
    from rewrite.prompts import load_pool
    f = write_text(tmp_path / "in")
    plain = tmp_path / "in" / "plain.txt"  # no mode in the name: the record says
    Path(f["chatgpt"]).rename(plain)
    stats = {"lines": 6, "rewritten": 4, "fallbacks": 1, "empty": 1, "truncated": 0, "undecodable": 0}
    digest = load_pool("chatgpt", f["pool"]).digest()
    record = {"version": 2, "complete": True, "fingerprint": {"settings": {"sample_mode": "chatgpt", "examples": digest}},
              "state": {"stats": stats}}
    Path(str(plain) + ".progress.json").write_text(json.dumps(record))
    rc, printed, err = run(["--source", f["source"], "--rewrites", plain, "--examples", f["pool"],
                            "--out", tmp_path / "r"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "r" / "report.json").read_text())
    assert result["modes"]["chatgpt"]["recorded"] == stats and result["modes"]["chatgpt"]["rewritten"] == 3
    assert result["between_modes"] is None
    assert "the rewriter recorded 4 rewritten, the lines show 3" in printed
    # the record's pool is not the shipped one: counting copies against it would be wrong
    rc, _, err = run(["--source", f["source"], "--rewrites", plain, "--out", tmp_path / "r2"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--examples" in err and str(plain) in err and digest in err


@pytest.mark.parametrize("case", ["short", "long", "no_caption", "no_pool", "unknown_flag", "no_mode", "no_source",
                                  "root_with_shards", "csv_without_root"])
def test_bad_inputs(tmp_path, capsys, case):
    f = write_text(tmp_path / "in")
    argv = ["--source", f["source"], "--rewrites", f["chatgpt"], f["bard"], "--out", tmp_path / "r"]
    named = f["bard"]
    if case in ("short", "long"):
        lines = Path(f["bard"]).read_text().splitlines(keepends=True)
        Path(f["bard"]).write_text("".join(lines[:-1] if case == "short" else lines + ["extra\n"]))
    elif case == "no_caption":
        folder = Path(write_shards(tmp_path / "shards"))
        pq.write_table(pa.table({"key": ["k"], "chatgpt": ["x"], "bard": ["y"]}), folder / "00001.parquet")
        argv, named = ["--rewrites", folder, "--out", tmp_path / "r"], str(folder / "00001.parquet")
    elif case == "no_pool":
        argv += ["--modes", "llama3,bard"]
        named = f["chatgpt"]
    elif case == "unknown_flag":
        argv += ["--sampels", "3"]
        named = "--samples"
    elif case == "no_mode":
        plain = Path(f["chatgpt"]).with_name("plain.txt")
        Path(f["chatgpt"]).rename(plain)
        argv[3], named = str(plain), str(plain)
    elif case == "no_source":
        argv = argv[2:]
    elif case == "root_with_shards":
        folder = write_shards(tmp_path / "shards")
        argv = ["--rewrites", folder, "--out", tmp_path / "r", "--images", folder, "--root", folder,
                "--model", "CLIP_TINY", "--pretrained", f["pool"]]
        named = "--root"
    elif case == "csv_without_root":
        argv += ["--images", f["source"], "--model", "CLIP_TINY", "--pretrained", f["pool"]]
        named = "--images"
    rc, _, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert named in err and "--" in err
    flag = {"short": "--rewrites", "long": "--rewrites", "no_caption": "'caption'", "no_pool": "--examples",
            "unknown_flag": "--sampels", "no_mode": "--modes", "no_source": "--source",
            "root_with_shards": "tars", "csv_without_root": "--root"}[case]
    assert flag in err
    assert not (tmp_path / "r" / "report.json").exists()
    if case == "short":
        assert "has 5 lines but --source" in err and "has 6" in err


def test_distinct_counter_exact_then_estimated():
    words = [f"w{i}" for i in range(50_000)]
    exact = DistinctCounter(1 << 17)
    for k in range(0, len(words), 7000):
        exact.add(words[k:k + 7000] + words[:100])  # repeats count once
    assert exact.count() == (50_000.0, True)
    sketch = DistinctCounter(4096)
    for k in range(0, len(words), 7000):
        sketch.add(words[k:k + 7000])
    value, is_exact = sketch.count()
    assert not is_exact and len(sketch.kept) == 4096
    assert abs(value / 50_000 - 1) < 4 / np.sqrt(4096 - 2)  # 4 standard errors


def test_module_entry_point(tmp_path):
    f = write_text(tmp_path / "in")
    done = subprocess.run([sys.executable, "-m", "rewrite.report", "--source", f["source"], "--rewrites",
                           f"{f['chatgpt']},{f['bard']}", "--examples", f["pool"], "--out", str(tmp_path / "r"),
                           "--noprogress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r" / "report.json").read_text())["modes"]["bard"]["leaked_prompt"] == 1 / 5


def test_clip_scores_of_shards(tmp_path, tiny_open_clip, capsys):
    import torch
    import torch.nn.functional as F
    from PIL import Image
    import io
    import open_clip
    path, model, preprocess = tiny_open_clip
    sf.make_shards(tmp_path / "data", n_shards=2, per_shard=4, bad=True)  # shard 1's tar cut after 2 samples
    out = tmp_path / "rewrites"
    out.mkdir()
    for s in range(2):
        rows = [(sf.caption_of(s, i), f"a photo: {sf.caption_of(s, i)}", "") for i in range(4)]
        pq.write_table(shard_table(rows, [sf.key_of(s, i) for i in range(4)]), out / f"{s:05d}.parquet")
    rc, _, err = run(["--rewrites", out, "--out", tmp_path / "r", "--images", tmp_path / "data",
                      "--model", "LaCLIP-test-tiny", "--pretrained", path, "--device", "cpu"], capsys)
    assert rc == 0, err
    images = json.loads((tmp_path / "r" / "report.json").read_text())["images"]
    assert images["lines_scored"] == 6 and images["skipped"] == {"damaged_tar": 1, "no_image_in_tar": 2}
    assert images["columns"]["bard"]["n"] == 0  # blank rewrites are not scored
    tok = open_clip.get_tokenizer("LaCLIP-test-tiny")
    readable = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    with torch.no_grad():  # an independent computation of the original captions' mean score
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(sf.jpeg(100 * s + i))).convert("RGB"))
                              for s, i in readable])
        texts = [sf.caption_of(s, i) for s, i in readable]
        cos = (F.normalize(model.encode_image(pixels), dim=-1) * F.normalize(model.encode_text(tok(texts)), dim=-1)).sum(-1)
    assert images["columns"]["original"]["mean"] == pytest.approx(cos.mean().item(), abs=1e-5)
    assert (tmp_path / "r" / "clip.png").exists() and "clip.png" in (tmp_path / "r" / "index.html").read_text()


def test_words_and_bigram_hashes():
    import random
    import re
    rng = random.Random(0)
    alphabet = "abcXYZ \t\n.,=>'-_0123éüßİﬁ\u2028\x07\ufffd"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        assert words(text) == re.findall(r"[a-z]+", text.lower()), repr(text)
    # bigrams never join two lines, blank lines included; equal bigrams hash equal
    col = Column.of(["", "a b c", "", "d", "A  b", "x y", ""])
    hashes = col.bigram_hashes()
    assert len(hashes) == 4 and len(set(hashes.tolist())) == 3
    assert set(hashes.tolist()) == set(Column.of(["a b", "b c", "x y"]).bigram_hashes().tolist())


def test_clip_scores_of_a_training_csv(tmp_path, tiny_open_clip, capsys):
    import train_fixtures
    path, _, _ = tiny_open_clip
    data = train_fixtures.make_train_data(tmp_path, n=6, corrupt=(2,))
    captions = [f'original {i}, a "quoted" caption' for i in range(6)]
    captions[4] = "not the CSV's caption"
    (tmp_path / "source.txt").write_text("".join(c + "\n" for c in captions))
    rc, _, err = run(["--source", tmp_path / "source.txt", "--rewrites", ",".join(data["rewrites"]),
                      "--modes", "chatgpt,bard", "--out", tmp_path / "r", "--images", data["csv"], "--root",
                      data["root"], "--model", "LaCLIP-test-tiny", "--pretrained", path], capsys)
    assert rc == 0, err
    images = json.loads((tmp_path / "r" / "report.json").read_text())["images"]
    assert images["lines_sampled"] == 6 and images["lines_scored"] == 4
    assert images["skipped"] == {"unreadable_image": 1, "caption_mismatch": 1}
    assert all(images["columns"][c]["n"] == 4 for c in ("original", "chatgpt", "bard"))
    rc, _, err = run(["--source", tmp_path / "source.txt", "--rewrites", ",".join(data["rewrites"]),
                      "--modes", "chatgpt,bard", "--out", tmp_path / "r3", "--images", data["csv"], "--root",
                      data["root"], "--model", "LaCLIP-test-tiny", "--pretrained", path, "--clip_samples", 3,
                      "--samples", 5], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "r3" / "report.json").read_text())
    assert result["images"]["lines_sampled"] == 3 and len(result["samples"]) == 5
    rc, _, err = run(["--source", tmp_path / "source.txt", "--rewrites", ",".join(data["rewrites"]),
                      "--modes", "chatgpt,bard", "--out", tmp_path / "r2", "--images", data["csv"]], capsys)
    assert rc == 2 and "--images needs --model and --pretrained" in err


def test_between_modes_against_python_sets():
    import random
    from itertools import combinations
    from rewrite.report_metrics import BetweenModes
    rng = random.Random(1)
    modes = ("chatgpt", "bard", "human")
    rows = [[" ".join(rng.choice("ab c dD") for _ in range(rng.randrange(5))) for _ in modes] for _ in range(300)]
    between = BetweenModes(modes)
    for start in (0, 100, 250):  # three batches of different sizes
        chunk = rows[start:{0: 100, 100: 250, 250: 300}[start]]
        between.add({m: Column.of([r[k] for r in chunk]) for k, m in enumerate(modes)})
    total, pairs, empty = 0.0, 0, 0
    for row in rows:
        sets = [set(zip(t.lower().split(), t.lower().split()[1:])) for t in row]
        for a, b in combinations(sets, 2):
            if a | b:
                total, pairs = total + len(a & b) / len(a | b), pairs + 1
            else:
                empty += 1
    got = between.summary()
    assert got["pairs_without_bigrams"] == empty > 0 and got["lines"] == 300
    assert got["bigram_jaccard"] == pytest.approx(total / pairs, rel=1e-12)
    assert got["all_identical"] == sum(len({" ".join(t.lower().split()) for t in row}) == 1 for row in rows) / 300


def test_a_locked_output_is_refused(tmp_path, capsys):
    from common.locking import FileLock
    f = write_text(tmp_path / "in")
    out = tmp_path / "r"
    out.mkdir()
    argv = ["--source", f["source"], "--rewrites", f["chatgpt"], "--examples", f["pool"], "--out", out]
    with FileLock(out / "report", "another report"):
        rc, _, err = run(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--out {out}" in err and "in use" in err
    assert not (out / "report.json").exists()
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    (tmp_path / "file").write_text("")
    rc, _, err = run(argv[:-1] + [tmp_path / "file"], capsys)
    assert rc == 2 and "--out" in err and "is a file" in err


def test_reservoir_is_uniform():
    from rewrite.report_metrics import Reservoir
    counts = np.zeros(20)
    for seed in range(4000):
        r = Reservoir(5, seed)
        for item in range(20):
            slot = r.slot()
            if slot is not None:
                r.rows[slot] = item
        assert sorted(set(r.rows)) == sorted(r.rows) and len(r.rows) == 5
        counts[r.rows] += 1
    assert np.abs(counts / 4000 - 5 / 20).max() < 0.03  # ~4 standard errors of 0.0068


def test_the_report_reads_argv_through_fire(monkeypatch, capsys):
    """rewrite/flags.py, as for the rewriter: fire binds every flag; the values typed after
    --rewrites / --modes join it; a value after no such flag, an unknown or ambiguous name is
    refused in one line before any work; --help wherever it stands."""
    bound = []
    monkeypatch.setattr(report, "main", lambda **flags: bound.append(flags))
    accepted = {("--rewrites", "a.txt", "b.txt", "--out", "r"): {"rewrites": ["a.txt", "b.txt"], "out": "r"},
                ("--rewrites=a.txt,b.txt", "--out=r"): {"rewrites": "a.txt,b.txt", "out": "r"},
                ("--rewrites", "a.txt", "--modes", "chatgpt", "bard", "--noprogress"):
                {"rewrites": "a.txt", "modes": ["chatgpt", "bard"], "progress": False},
                ("-o", "r", "--seed", "-1", "--exact-limit=64"): {"out": "r", "seed": -1, "exact_limit": 64}}
    for args, flags in accepted.items():
        assert report.cli(list(args)) == 0 and bound.pop() == flags
    refused = {("--out", "r", "b.txt"): "unexpected argument 'b.txt'",
               ("--rewrites=a.txt", "b.txt"): "unexpected argument 'b.txt'",
               ("stray", "--rewrites", "a.txt"): "unexpected argument 'stray'",
               ("--rewrites", "a.txt", "--sampels", "3"): "unknown flag --sampels; did you mean --samples?",
               ("--rewrits", "a.txt", "b.txt"): "unknown flag --rewrits; did you mean --rewrites?",
               ("-s", "3"): "flag -s is ambiguous: it could be --source, --samples, --seed"}
    for args, message in refused.items():
        assert report.cli(list(args)) == 2 and not bound
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"rewrite.report: error: {message}"), err
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stop:
        report.cli(["--out", "r", "-h"])
    shown = capsys.readouterr()
    assert stop.value.code == 0 and "--rewrites" in shown.out + shown.err and "--clip_samples" in shown.out + shown.err


@pytest.mark.slow
def test_the_rewriters_own_outputs(tmp_path, capsys, one_thread):
    """The rewriter's text outputs in two modes (tiny random LLaMA), read back with the modes and
    counts from its progress records: fallbacks as the rewriter made them."""
    from conftest import REWRITE_PAIRS, make_tiny_rewrite_setup
    from rewrite import llama_rewrite
    captions = ["a dog on grass", "", "red car\tnear a city at night", "a cat", "  a cat  "] * 3
    source = tmp_path / "captions.txt"
    source.write_text("".join(c + "\n" for c in captions))
    tiny = make_tiny_rewrite_setup(tmp_path, captions, REWRITE_PAIRS)
    llama_rewrite.main(**tiny, prompt_filename=str(source), output_filename=str(tmp_path / "out.txt"),
                       sample_mode="chatgpt,bard", max_seq_len=256, max_gen_len=8, max_batch_size=4)
    files = [tmp_path / "out.chatgpt.txt", tmp_path / "out.bard.txt"]
    rc, _, err = run(["--source", source, "--rewrites", *files, "--examples", tiny["examples"], "--out",
                      tmp_path / "r"], capsys)
    assert rc == 0, err
    result = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(result["modes"]) == ["chatgpt", "bard"] and result["blank_captions"] == 3
    for m, path in zip(MODES, files):
        got, rec = result["modes"][m], result["modes"][m]["recorded"]
        assert rec == json.loads(Path(str(path) + ".progress.json").read_text())["state"]["stats"]
        assert got["lines"] == rec["lines"] - rec["empty"] == 12 and got["empty"] == 0
        # a rewrite equal to its caption reads as a fallback: never fewer fallbacks than recorded
        assert got["rewritten"] + got["fallbacks"] == rec["rewritten"] + rec["fallbacks"]
        assert got["fallbacks"] >= rec["fallbacks"]
        lines = path.read_text().split("\n")[:-1]
        copies = sum(r == c.replace("\t", " ").strip() for r, c in zip(lines, captions) if c.strip())
        assert got["fallbacks"] == copies
