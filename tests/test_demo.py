"""demo.py end to end at a reduced size: real entry points, aligned rewrites, a loadable checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import models
from demo import MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(out, *extra):
    cmd = [sys.executable, "demo.py", "--out", str(out), "--lines", "8", "--llama-steps", "30", "--epochs", "2",
           "--eval-images", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "demo"
    stdout = run_demo(out)
    source = (out / "source.txt").read_text(encoding="utf-8").splitlines()
    assert len(source) == 8
    # the tiny LLaMA is in Meta's format, split for model parallel 2
    names = sorted(p.name for p in (out / "llama" / "tiny").iterdir())
    assert names == ["consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    for mode in MODES:
        lines = (out / "rewrites" / f"source_{mode}.txt").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == len(source), mode  # one line per caption
        assert all(line.strip() for line in lines[:-1]), mode  # a rewrite or the original, never empty
    state = models.load_checkpoint_state(str(out / "train" / "checkpoint_best.pt"))
    models.load_into(models.get_model("CLIP_TINY"), state, "CLIP_TINY", "checkpoint_best.pt")
    epochs = [json.loads(line) for line in (out / "train" / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0, 1]
    result = json.loads((out / "zeroshot.json").read_text())
    assert result["images"] == 10 and result["classes"] == 5
    assert f"ImageNet zero-shot accuracy: {result['top1']}" in stdout
    assert "CLIP training loss per epoch:" in stdout and "original: " + source[0] in stdout
    # a second run reuses every finished step
    again = run_demo(out)
    assert again.count("reusing") == 1 + len(MODES) + 1
    launched = [line for line in stdout.splitlines() if line.startswith("$ ") and "llama_rewrite.py" in line]
    assert len(launched) == len(MODES) and all("--nproc_per_node 2" in line for line in launched)
    assert not [line for line in again.splitlines() if line.startswith("$ ") and "llama_rewrite.py" in line]


def test_demo_rejects_bad_line_count(tmp_path):
    proc = subprocess.run([sys.executable, "demo.py", "--out", str(tmp_path), "--lines", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--lines" in proc.stderr
