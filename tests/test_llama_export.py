"""Meta folders converted to Hugging Face folders (rewrite.llama.hf_export), for vLLM: LLaMA-1
(tokenizer one level up, rope.freqs, fp16), LLaMA-2 with grouped-query attention and Meta's FFN
multiplier, LLaMA-3 and 3.1 (tiktoken tokenizer, scaled RoPE, vocabulary-split embedding), each
in 2 model-parallel shards. The export loads back into the engine bit for bit, transformers'
LlamaForCausalLM gives the native model's logits, reruns reuse, other folders are refused, an
interrupted export leaves nothing, and a second process waits for the first."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from rewrite.llama import (CheckpointError, ParallelInfo, export_hf, find_tokenizer, load_model, load_rank_state,
                           load_tokenizer, open_checkpoint)
from rewrite.llama import hf_export
from testkit.hf_llama import META_FFN, byte_bpe_tokenizer_json, llama_config, random_llama, tiktoken_file, write_meta
from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = TINY_TEXTS + ["A dog runs.\nA cat sleeps.\nIt rains.\n" * 3]
BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, **META_FFN}


def _meta_from_hf(root: Path, name: str, style: str, tok_file: Path, params: dict, vocab_parallel: bool,
                  dtype: torch.dtype) -> Path:
    tok = load_tokenizer(str(tok_file))
    model = random_llama(llama_config(style, tok.n_words, tok.bos_id, tok.eos_id), seed=len(name))
    return write_meta(model, root / name, 2, params, tok_file, vocab_parallel, dtype)


@pytest.fixture(scope="module")
def metas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("meta")
    # LLaMA-1 as Meta's download lays it out: tokenizer.model beside the 7B/ folder
    llama1 = make_tiny_llama(root / "llama1" / "7B", TEXTS, mp=2, vocab_size=300)
    (llama1 / "tokenizer.model").rename(root / "llama1" / "tokenizer.model")
    sp = root / "sp.model"
    sp.write_bytes(train_tokenizer(TEXTS, 300))
    tik = tiktoken_file(byte_bpe_tokenizer_json(TEXTS, 400, root / "bpe"), root / "tik")
    llama3 = {**BASE, "vocab_size": load_tokenizer(str(tik)).n_words, "rope_theta": 500000.0}
    return {
        "llama1": llama1,
        "llama2": _meta_from_hf(root, "llama2", "llama2", sp, {**BASE, "vocab_size": -1}, False, torch.bfloat16),
        "llama3": _meta_from_hf(root, "llama3", "llama3", tik, llama3, True, torch.float32),
        "llama31": _meta_from_hf(root, "llama31", "llama31", tik, {**llama3, "use_scaled_rope": True}, True,
                                 torch.bfloat16),
    }


@pytest.fixture(scope="module")
def exported(metas, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    # llama2 in files of ~40 KB: several safetensors files with an index
    sizes = {"llama2": 40_000}
    return {name: export_hf(str(path), root / name, max_file_bytes=sizes.get(name, hf_export.MAX_FILE_BYTES)).path
            for name, path in metas.items()}


def _files(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())}


@pytest.mark.parametrize("name", ["llama1", "llama2", "llama3", "llama31"])
def test_export_loads_back_bit_for_bit(metas, exported, name):
    meta, hf = metas[name], exported[name]
    assert open_checkpoint(str(hf)).kind == "hf"
    for mp, rank in ((1, 0), (2, 0), (2, 1)):
        want, got = load_rank_state(str(meta), mp, rank), load_rank_state(str(hf), mp, rank)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (key, mp, rank)
    tok_meta = load_tokenizer(find_tokenizer(str(meta)), str(meta))
    tok_hf = load_tokenizer(find_tokenizer(str(hf)), str(hf))  # the copied tokenizer, with config.json's ids
    assert (tok_hf.n_words, tok_hf.bos_id, tok_hf.eos_ids) == (tok_meta.n_words, tok_meta.bos_id, tok_meta.eos_ids)
    single = ParallelInfo.single(torch.device("cpu"))
    a, b = (load_model(str(d), tok_meta, single, torch.float32) for d in (meta, hf))
    arch = ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "vocab_size", "norm_eps", "rope_theta",
            "rope_scaling", "ffn_hidden")  # ffn_hidden: Meta's rule gave what intermediate_size states
    assert [getattr(a.args, f) for f in arch] == [getattr(b.args, f) for f in arch]
    for key, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[key]), key


def test_config_and_files(metas, exported):
    c = json.loads((exported["llama31"] / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["num_hidden_layers"]) == (64, 224, 4, 2, 16, 2)
    assert c["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert (c["rope_theta"], c["torch_dtype"], c["tie_word_embeddings"], c["max_position_embeddings"]) == \
        (500000.0, "bfloat16", False, 131072)
    tok = load_tokenizer(str(metas["llama31"] / "tokenizer.model"))
    assert c["bos_token_id"] == tok.bos_id and set(c["eos_token_id"]) == tok.eos_ids and len(tok.eos_ids) == 3
    c1 = json.loads((exported["llama1"] / "config.json").read_text())
    assert (c1["rope_scaling"], c1["torch_dtype"], c1["max_position_embeddings"], c1["eos_token_id"]) == \
        (None, "float16", 2048, 2)
    assert (exported["llama1"] / "tokenizer.model").read_bytes() == \
        (metas["llama1"].parent / "tokenizer.model").read_bytes()
    assert json.loads((exported["llama3"] / "config.json").read_text())["max_position_embeddings"] == 8192
    # several files: each within the limit unless a single tensor is larger; the index lists every tensor
    index = json.loads((exported["llama2"] / "model.safetensors.index.json").read_text())
    files = sorted(exported["llama2"].glob("model-*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == {p.name for p in files}
    from safetensors import safe_open
    for p in files:
        with safe_open(str(p), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or p.stat().st_size < 40_000 + 4096
    assert not (exported["llama1"] / "model.safetensors.index.json").exists()
    assert not list(exported["llama1"].parent.glob(".*.partial"))


@pytest.mark.slow  # transformers' import and four model builds
@pytest.mark.parametrize("name", ["llama1", "llama2", "llama3", "llama31"])
def test_transformers_logits_equal_the_native_models(metas, exported, name):
    from transformers import LlamaForCausalLM
    meta = metas[name]
    tok = load_tokenizer(find_tokenizer(str(meta)), str(meta))
    native = load_model(str(meta), tok, ParallelInfo.single(torch.device("cpu")), torch.float32)
    ref = LlamaForCausalLM.from_pretrained(exported[name], dtype=torch.float32).eval()
    # long enough that LLaMA-3.1's scaling changes the angles measurably
    ids = torch.tensor([[tok.bos_id] + tok.encode(" ".join(TEXTS * 2), bos=False, eos=False)[:200]])
    with torch.inference_mode():
        want, got = native(ids).float(), ref(ids).logits.float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if name == "llama31":  # the scaling is what makes them equal
        ref.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
        plain = LlamaForCausalLM.from_pretrained(exported[name], config=ref.config, dtype=torch.float32).eval()
        with torch.inference_mode():
            assert (plain(ids).logits - want).abs().max() > 1e-3


def test_rerun_reuses_and_other_folders_are_refused(metas, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(metas["llama3"], src)
    out = tmp_path / "hf"
    first = export_hf(str(src), out)
    assert not first.reused and first.line.endswith(str(out))
    before = _files(out)
    again = export_hf(open_checkpoint(str(src)), out)
    assert again.reused and again.line == f"reusing converted weights in {out}" and _files(out) == before
    # another context length is another folder
    with pytest.raises(CheckpointError, match="another checkpoint"):
        export_hf(str(src), out, max_position_embeddings=4096)
    # the source changed (a shard rewritten): refused, naming both folders, nothing touched
    shard = src / "consolidated.01.pth"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(CheckpointError, match=f"{out} holds weights converted from another.*{src}"):
        export_hf(str(src), out)
    assert _files(out) == before
    # a folder this converter did not write is never overwritten
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match=f"{foreign} exists and was not written by this converter"):
        export_hf(str(src), foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(CheckpointError, match=f"no tokenizer at {tmp_path / 'none.model'}"):
        export_hf(str(src), tmp_path / "other", tokenizer_path=str(tmp_path / "none.model"))
    (src / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=f"{src} has no tokenizer.model"):
        export_hf(str(src), tmp_path / "other")
    assert not (tmp_path / "other").exists()
    # a Hugging Face folder has nothing to convert
    with pytest.raises(CheckpointError, match="already a Hugging Face folder"):
        export_hf(str(out), tmp_path / "again")


def test_interrupted_export_leaves_nothing_and_a_rerun_completes(metas, exported, tmp_path, monkeypatch):
    out, calls = tmp_path / "hf", []
    real = hf_export._save

    def failing(tensors, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path)
    monkeypatch.setattr(hf_export, "_save", failing)
    with pytest.raises(OSError, match="disk full"):
        export_hf(str(metas["llama2"]), out, max_file_bytes=40_000)
    assert calls and [p.name for p in tmp_path.iterdir()] == [".hf.lock"]  # no target, no partial folder
    monkeypatch.setattr(hf_export, "_save", real)
    # a folder left by a killed conversion (no chance to clean up) is removed under the lock, and said so
    (tmp_path / ".hf.partial").mkdir()
    (tmp_path / ".hf.partial" / "model-00001-of-00009.safetensors").write_bytes(b"torn")
    lines: list[str] = []
    result = export_hf(str(metas["llama2"]), out, max_file_bytes=40_000, log=lines.append)
    assert not result.reused and lines == [f"removing {tmp_path / '.hf.partial'}, left by an interrupted conversion"]
    for key, t in load_rank_state(str(metas["llama2"]), 1, 0).items():
        assert torch.equal(load_rank_state(str(out), 1, 0)[key], t)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "hf"]


def test_a_second_process_waits_for_the_first_and_reuses(metas, exported, tmp_path):
    """While another holder has the lock and writes the folder, export_hf waits, then reuses it."""
    out, waiting, result = tmp_path / "hf", threading.Event(), {}
    with open(tmp_path / ".hf.lock", "a") as held:
        import fcntl
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: result.update(r=export_hf(
            str(metas["llama1"]), out, log=lambda line: waiting.set())))
        t.start()
        assert waiting.wait(60), "export_hf did not wait for the lock"
        assert not out.exists()
        shutil.copytree(exported["llama1"], out)  # the other process's finished folder
        before = _files(out)
        fcntl.flock(held, fcntl.LOCK_UN)
    t.join(60)
    assert result["r"].reused and _files(out) == before


@pytest.mark.slow  # two interpreters importing torch
def test_two_processes_convert_once(metas, tmp_path):
    """Whatever the interleaving, exactly one of two processes converts and the other reuses."""
    import subprocess
    import sys
    code = ("import sys; from rewrite.llama import export_hf; "
            "print(export_hf(sys.argv[1], sys.argv[2]).reused)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(metas["llama31"]), str(tmp_path / "hf")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert sorted(out.strip() for out, _ in outs) == ["False", "True"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.lock", "hf"]
