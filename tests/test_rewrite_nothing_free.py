"""A rewriting run that finds no free unit (each finished, or held by another live run) says so
and ends before it opens a weight file: on the caption-file path and on the shard path. Nothing
here loads weights where there is nothing to do; a run that does load them fails the test."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import shard_fixtures as sf
from common.locking import FileLock
from conftest import REWRITE_PAIRS, make_tiny_rewrite_setup
from rewrite import llama_rewrite, runner, units_text as text_units
from rewrite.llama import default_dtype, hf, meta
from rewrite.units import DONE
from rewrite.units_text import unit_file

pytestmark = pytest.mark.usefixtures("one_thread")
FLAGS = {"max_seq_len": 256, "max_gen_len": 4, "max_batch_size": 2}
CAPTIONS = ["person rides a bike", "a bowl of soup", "boats in the harbour", "snow on the hills",
            "tea and cake", "a cat on a mat"]
NOTHING = "no unit is free (each is finished or held by another live run): nothing for this run to do"

_opened: list[str] = []  # paths opened while a test watches
_watching = [False]


def _audit(event: str, args: tuple) -> None:
    if _watching[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only while _watching


@contextmanager
def weights_forbidden(ckpt_dir: str) -> Iterator[None]:
    """Every way to the weights raises, and no file of the checkpoint's weights may be opened
    (Python's audit hook sees open() and os.open(); safetensors' own opening is patched out)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    import safetensors
    with pytest.MonkeyPatch.context() as m:
        for module, name in ((runner, "load_generator"), (meta, "load_shard"), (hf, "load_shard"),
                             (safetensors, "safe_open")):
            m.setattr(module, name, refuse)
        _opened.clear()
        _watching[0] = True
        try:
            yield
        finally:
            _watching[0] = False
    folder = Path(ckpt_dir).resolve()
    assert not [p for p in _opened if Path(p).resolve().parent == folder and p.endswith((".pth", ".safetensors"))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("nothing_free")
    captions = CAPTIONS + [sf.caption_of(s, i) for s in range(3) for i in range(4)]
    return make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)


def argv(tiny, src, out, **extra) -> list[str]:
    return [f"--{k}={v}" for k, v in {**tiny, **FLAGS, "prompt_filename": str(src), "output_filename": str(out),
                                        **extra}.items()]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A machine that has never read these weights: no sampled-block hash is remembered
    (rewrite/weights_identity.py), so taking their identity would open every weight file."""
    monkeypatch.setenv("LACLIP_CACHE", str(tmp_path / "fresh_cache"))


def test_a_held_caption_file_ends_before_the_weights(tiny, tmp_path, capsys, fresh_cache):
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c}\n" for c in CAPTIONS))
    out = tmp_path / "out.txt"
    with FileLock(out, "a first run"), weights_forbidden(tiny["ckpt_dir"]):  # OUT's only unit, held
        assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    printed = capsys.readouterr().out
    assert NOTHING + "; the model is not loaded and no weight file is opened" in printed
    assert f"done: {out} is not finished" in printed
    assert "This run: 0 lines" in printed
    assert not out.exists() and not list(tmp_path.glob("*.lock"))  # the look took no claim that stays


def test_finished_and_held_units_end_before_the_weights(tiny, tmp_path, capsys, monkeypatch):
    """Two units: the first finished by a run while the second was held; a run while it is still
    held finds nothing free and loads nothing; once the holder is gone a run does it and merges."""
    monkeypatch.setattr(text_units, "UNIT_LINES", 3)  # 6 lines: 2 units
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c}\n" for c in CAPTIONS))
    out = tmp_path / "out.txt"
    with FileLock(unit_file(out, 1, 2), "a first run") as held:
        assert llama_rewrite.cli(argv(tiny, src, out)) == 0  # plans 2 units, does unit 0
        assert "This run: 3 lines" in capsys.readouterr().out
        monkeypatch.setenv("LACLIP_CACHE", str(tmp_path / "another_machine"))  # nothing remembered there
        with weights_forbidden(tiny["ckpt_dir"]):
            assert llama_rewrite.cli(argv(tiny, src, out)) == 0
        printed = capsys.readouterr().out
        assert NOTHING + "; the model is not loaded and no weight file is opened" in printed
        assert f"done: {out} is not finished: some of its 2 units" in printed
        assert held.path.exists()
    assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert "This run: 3 lines" in capsys.readouterr().out
    assert out.read_text().count("\n") == 6 and not unit_file(out, 1, 2).exists()


def test_finished_but_unmerged_units_are_merged_without_the_model(tiny, tmp_path, capsys, monkeypatch):
    """Killed after the last unit finished, before the merge: the rerun merges, with no model."""
    monkeypatch.setattr(text_units, "UNIT_LINES", 3)
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c}\n" for c in CAPTIONS))
    out = tmp_path / "out.txt"
    monkeypatch.setattr(text_units.TextUnits, "merge_finished", lambda self: {m: None for m in self.pending})
    assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert unit_file(out, 1, 2).exists() and not out.exists()
    monkeypatch.undo()
    monkeypatch.setattr(text_units, "UNIT_LINES", 3)
    seen = text_units.TextUnits(src, out, text_units.scan_input(src), {"chatgpt": {}})  # a look's units
    assert seen.look(1) == DONE and seen.merge_finished() == {"chatgpt": None}  # no fingerprint: no merge
    assert not out.exists()
    capsys.readouterr()
    with weights_forbidden(tiny["ckpt_dir"]):
        assert llama_rewrite.cli(argv(tiny, src, out)) == 0
    assert f"done: {out} has 6 lines" in capsys.readouterr().out
    assert out.read_text().count("\n") == 6 and not unit_file(out, 0, 2).exists()


def test_finished_and_held_shards_end_before_the_weights(tiny, tmp_path, capsys, monkeypatch):
    shards = sf.make_shards(tmp_path / "shards", n_shards=3, per_shard=4, bad=False)
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / "00001.parquet", "another run") as held:
        assert llama_rewrite.cli(argv(tiny, shards.parquets, out)) == 0
        assert "done: 2 of 3 shards finished" in capsys.readouterr().out
        monkeypatch.setenv("LACLIP_CACHE", str(tmp_path / "another_machine"))  # nothing remembered there
        with weights_forbidden(tiny["ckpt_dir"]):
            assert llama_rewrite.cli(argv(tiny, shards.parquets, out)) == 0
        printed = capsys.readouterr().out
        assert NOTHING + "; the model is not loaded and no weight file is opened" in printed
        assert "done: 2 of 3 shards finished" in printed and "This run: 0 shards" in printed
        assert held.path.exists()
    assert llama_rewrite.cli(argv(tiny, shards.parquets, out)) == 0
    assert "done: 3 of 3 shards finished" in capsys.readouterr().out


def test_the_stored_dtype_is_asked_only_where_it_decides():
    """On a CPU the run's dtype is float32 whatever the weights hold: a Meta folder's first
    weight file is not opened to ask."""
    asked = []
    assert default_dtype(torch.device("cpu"), lambda: asked.append(1) or torch.bfloat16) == torch.float32
    assert default_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert not asked


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_meta_folder_tells_its_stored_dtype_from_the_pickle_alone(tmp_path, monkeypatch, dtype):
    """Where the stored dtype decides (a GPU with bfloat16, no --dtype), consolidated.00.pth's
    pickle names it: no tensor is loaded or mapped; a file that is not a torch zip is loaded."""
    (tmp_path / "params.json").write_text('{"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": -1}')
    torch.save({"tok_embeddings.weight": torch.zeros(4, 8, dtype=dtype), "norm.weight": torch.ones(8, dtype=dtype)},
               tmp_path / "consolidated.00.pth")
    ckpt = meta.MetaCheckpoint(str(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(meta, "load_shard", lambda path: pytest.fail("the shard was loaded"))
        assert ckpt.stored_dtype() == dtype
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a zip")
    with pytest.raises(meta.CheckpointError, match="cannot read shard"):
        ckpt.stored_dtype()
