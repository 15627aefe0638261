"""The weights users hold, against an implementation nobody here wrote: tiny random LLaMA-1/2/3/3.1
models built with `transformers` (test-only), saved as Hugging Face folders (safetensors, sharded
or not, .bin shards with an index, old and new config.json) and as Meta LLaMA-2/3 folders, loaded
by the engine at model-parallel sizes 1 and 2: logits close to transformers', greedy continuations
identical. Tokenizers: ids equal transformers' on the same files."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rewrite.llama import ParallelInfo, load_generator, load_tokenizer
from testkit.hf_llama import (META_FFN, byte_bpe_tokenizer_json, llama_config, random_llama, sp_tokenizer_json,
                              tiktoken_file, write_hf, write_meta)
from testkit.net import free_port
from testkit.tiny_llama import TINY_TEXTS, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = TINY_TEXTS + ["A dog runs.\nA cat sleeps.\nIt rains.\n" * 3, "Über café, naïve 2024!\n\n  tabs\tand  spaces"]
PROMPTS = ["a photo of a dog running on the beach", "two cats", "old wooden boat tied to the pier at sunrise"]
GEN = 10
# Logits are O(5); RoPE is computed in float32 by both implementations even for float64 models.
# Measured (2026-12, CPU): max |diff| 0.8-1.9e-6 in float64, 2.9-5.3e-6 in float32.
ATOL = {torch.float64: 2e-5, torch.float32: 5e-5}


@dataclass
class Case:
    path: Path
    reference: torch.nn.Module  # the transformers model, float64, with the weights as saved
    tokenizer: str  # what --tokenizer_path would be


def _case(zoo: Path, name: str, style: str, tok_files: list[Path], save_dtype=torch.float32, meta=None,
          tie=False, **hf) -> Case:
    tok = load_tokenizer(str(tok_files[0]))
    model = random_llama(llama_config(style, tok.n_words, tok.bos_id, tok.eos_id, tie), seed=len(name))
    with torch.no_grad():  # the reference holds the weights as saved (its RoPE buffers stay float32)
        for p in model.parameters():
            p.copy_(p.to(save_dtype))
    if meta is None:
        path = write_hf(copy.deepcopy(model).to(save_dtype), zoo / name, tok_files, **hf)
    else:
        params, vocab_parallel = meta
        path = write_meta(model, zoo / name, 2, params, tok_files[0], vocab_parallel, save_dtype)
    tokenizer = str(path / ("tokenizer.model" if meta else tok_files[0].name))
    return Case(path, model.double(), tokenizer)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("zoo")
    (root / "sp").mkdir()
    sp = root / "sp" / "tokenizer.model"
    sp.write_bytes(train_tokenizer(TEXTS, 400))
    sp_json = sp_tokenizer_json(sp, root / "sp")
    bpe = byte_bpe_tokenizer_json(TEXTS, 400, root / "bpe")
    tik = tiktoken_file(bpe, root / "tik")
    base = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, **META_FFN}
    llama3 = {**base, "vocab_size": load_tokenizer(str(tik)).n_words, "rope_theta": 500000.0, "use_scaled_rope": True}
    return {
        "hf-llama1-bin": _case(root, "hf-llama1-bin", "llama1", [sp], weights="bin", old_config=True),
        "hf-llama2-sharded": _case(root, "hf-llama2-sharded", "llama2", [sp, sp_json, sp_json.parent /
                                   "tokenizer_config.json"], max_shard_size="40KB"),
        "hf-llama3-bf16-tied": _case(root, "hf-llama3-bf16-tied", "llama3", [bpe], torch.bfloat16, tie=True),
        "hf-llama31-old-config": _case(root, "hf-llama31-old-config", "llama31", [bpe], max_shard_size="60KB",
                                       old_config=True),
        "meta-llama2": _case(root, "meta-llama2", "llama2", [sp], torch.bfloat16, meta=({**base, "vocab_size": -1},
                                                                                        False)),
        "meta-llama31": _case(root, "meta-llama31", "llama31", [tik], torch.bfloat16, meta=(llama3, True)),
    }


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' model, one full forward per new token."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def engine_outputs(path: str, tokenizer: str, parallel, dtype=torch.float64) -> dict:
    g = load_generator(path, tokenizer, 64, 2, parallel, dtype=dtype)
    g.tokenizer.eos_ids = frozenset()  # compare GEN free tokens
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in PROMPTS]
    with torch.inference_mode():
        logits = g.model(torch.tensor([prompts[2]]))
    return {"prompts": prompts, "logits": logits,
            "greedy": g.generate(prompts, GEN, 0.0, 0.95, [0] * len(prompts), stop_at_newline=False)}


def assert_matches(case: Case, got: dict, dtype=torch.float64) -> None:
    reference = case.reference if dtype == torch.float64 else copy.deepcopy(case.reference).to(dtype)
    with torch.inference_mode():
        want = reference(torch.tensor([got["prompts"][2]])).logits.double()
    # the engine's logits are float32 whatever the model's dtype
    torch.testing.assert_close(got["logits"].double(), want, atol=ATOL[dtype], rtol=0)
    assert got["greedy"] == [hf_greedy(reference, p, GEN) for p in got["prompts"]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["hf-llama1-bin", "hf-llama2-sharded", "hf-llama3-bf16-tied",
                                  "hf-llama31-old-config", "meta-llama2", "meta-llama31"])
def test_one_process_matches_transformers(zoo, name, dtype):
    case = zoo[name]
    got = engine_outputs(str(case.path), case.tokenizer, ParallelInfo.single(torch.device("cpu")), dtype)
    assert_matches(case, got, dtype)
    # the tokenizer the folder comes with, found without a path: the same text
    assert engine_outputs(str(case.path), None, ParallelInfo.single(torch.device("cpu")))["greedy"] == got["greedy"]


def test_the_rope_scaling_is_what_makes_llama31_match(zoo):
    """Without its llama3 scaling, the 3.1 model's logits miss transformers' by far more than ATOL:
    the parity above does test the scaling."""
    case = zoo["hf-llama31-old-config"]
    g = load_generator(str(case.path), None, 64, 2, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)
    tokens = torch.tensor([g.tokenizer.encode(" ".join(PROMPTS * 3), bos=True, eos=False)])
    with torch.inference_mode():
        want = case.reference(tokens).logits
        g.model.args.rope_scaling, g.model._rope_table = None, None
        assert (g.model(tokens) - want).abs().max() > 100 * ATOL[torch.float64]


def test_tokenizer_ids_equal_transformers(zoo):
    from transformers import PreTrainedTokenizerFast
    sp_dir, bpe = zoo["hf-llama2-sharded"].path, zoo["hf-llama3-bf16-tied"].path / "tokenizer.json"
    sp, sp_json = (load_tokenizer(str(sp_dir / n), str(sp_dir)) for n in ("tokenizer.model", "tokenizer.json"))
    byte_level, tik = load_tokenizer(str(bpe)), load_tokenizer(str(zoo["meta-llama31"].path / "tokenizer.model"))
    ref_sp, ref_bpe = (PreTrainedTokenizerFast(tokenizer_file=str(p)) for p in (sp_dir / "tokenizer.json", bpe))
    for text in TEXTS + PROMPTS + [" leading space", "x\n\ny", "emoji 🙂 and 中文"]:
        ids = sp.encode(text, bos=False, eos=False)
        assert ids == sp_json.encode(text, False, False) == ref_sp(text, add_special_tokens=False).input_ids
        assert sp.decode(ids) == sp_json.decode(ids) == text
        ids = byte_level.encode(text, bos=False, eos=False)
        assert ids == tik.encode(text, False, False) == ref_bpe(text, add_special_tokens=False).input_ids
        assert byte_level.decode(ids) == tik.decode(ids) == text
    assert (sp.bos_id, sp.eos_ids, sp_json.bos_id, sp_json.eos_ids) == (1, {2}, 1, {2})
    assert tik.n_words == byte_level.n_words and tik.bos_id == byte_level.bos_id == tik.n_words - 256
    assert tik.eos_ids == {tik.n_words - 255, tik.n_words - 256 + 8, tik.n_words - 256 + 9}  # end_of_text, eom, eot


def test_newlines_inside_merged_tokens_are_found(zoo):
    """Byte-level BPE learns '.\\n' as one token: it ends a rewrite, and its '.' is kept."""
    tok = load_tokenizer(str(zoo["hf-llama3-bf16-tied"].path / "tokenizer.json"))
    texts = {i: tok.decode([i]) for i in tok.newline_ids}
    assert "\n" in texts.values() and all("\n" in t for t in texts.values())
    assert tok.newline_kept and all(texts[i].split("\n")[0] for i in tok.newline_kept)
    assert any(tok.decode([i]) == ".\n" for i in tok.newline_kept)
    sp = load_tokenizer(str(zoo["hf-llama1-bin"].path / "tokenizer.model"))
    assert [sp.decode([i]) for i in sp.newline_ids] == ["\n"] and not sp.newline_kept  # <0x0A> alone


def test_special_ids_come_from_the_checkpoint_config(zoo, tmp_path):
    import shutil
    d = shutil.copytree(zoo["hf-llama3-bf16-tied"].path, tmp_path / "c")
    tok = load_tokenizer(str(d / "tokenizer.json"), str(d))
    assert tok.eos_ids == {tok.n_words - 255}  # config.json's eos_token_id: <|end_of_text|>
    eot = tok.n_words - 256 + 9
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": tok.bos_id, "eos_token_id": [eot, 7]}))
    tok = load_tokenizer(str(d / "tokenizer.json"), str(d))
    assert (tok.eos_id, tok.eos_ids) == (eot, {eot, 7})  # an instruct model's several EOS: any stops a row


def worker(out_dir: str, zoo_dir: str) -> None:
    from rewrite.launch import setup_parallel, teardown_parallel
    cases = json.loads((Path(zoo_dir) / "cases.json").read_text())
    info = setup_parallel(cases[0][1], model_parallel_size=2, device="cpu")
    res = {name: engine_outputs(path, tok, info) for name, path, tok in cases}
    torch.save(res, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()
    teardown_parallel()


@pytest.mark.slow
def test_two_model_parallel_processes_match_transformers(zoo, tmp_path):
    """MP=2 over gloo: HF folders cut in two per rank (safetensors slices, .bin slices), Meta's
    2 shards (LLaMA-3's embedding split by vocabulary rows), key/value heads split."""
    (tmp_path / "cases.json").write_text(json.dumps([[n, str(c.path), c.tokenizer] for n, c in zoo.items()]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for name, case in zoo.items():
            assert_matches(case, res[name])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
