"""bench/gpu_check.py's logic on the CPU (--tiny), so the GPU script stays runnable where no GPU is."""
from __future__ import annotations

import json

import pytest

from rewrite.llama import generation

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_dry_run_writes_its_summary(tmp_path, monkeypatch, capsys):
    from bench import gpu_check
    push = generation._Row.push
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--tiny", "--n", "80", "--batch", "40"]) == 0
    assert generation._Row.push is push  # the forced lengths are undone
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["identical"] == 80 and summary["prefilled_ratio"] < 0.8
    assert 170 < summary["prompt_tokens"] < 200
    assert 0 < summary["on"]["generated"] == summary["off"]["generated"] <= 40 * 80  # rows stop by 40 tokens
    assert "| `gpu_check` |" in capsys.readouterr().out
