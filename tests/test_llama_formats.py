"""Format detection, refusals that name the file, and the rewriting CLI on a Hugging Face folder:
the same command as for Meta's folders, the tokenizer found in --ckpt_dir, a resumable record."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REWRITE_PAIRS as PAIRS
from rewrite import llama_rewrite, runner
from rewrite.cli_args import validate
from rewrite.llama import CheckpointError, ParallelInfo, TokenizerError, load_generator, load_tokenizer, open_checkpoint
from rewrite.units import record_path
from testkit.hf_llama import llama_config, random_llama, write_hf
from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["person rides a bike", "a bowl of soup", "", "boats in the harbour", "tea and cake", "a lamp"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A LLaMA-2-style Hugging Face folder (GQA, sharded safetensors) whose tokenizer.model knows the captions."""
    root = tmp_path_factory.mktemp("formats")
    (root / "tok").mkdir()
    sp = root / "tok" / "tokenizer.model"
    sp.write_bytes(train_tokenizer(TINY_TEXTS + CAPTIONS + [s for p in PAIRS for s in p] + ["=>"], 300))
    tok = load_tokenizer(str(sp))
    model = random_llama(llama_config("llama2", tok.n_words, tok.bos_id, tok.eos_id))
    return write_hf(model, root / "hf", [sp], max_shard_size="40KB")


def load(d, tok=None):
    return load_generator(str(d), tok, 64, 2, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)


def edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **changes}))


def test_refusals_name_the_file(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="has no params.json .Meta's format. or config.json"):
        load(tmp_path)
    cases = [({"model_type": "mistral"}, "describes a 'mistral' model, not LLaMA"),
             ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
             ({"attention_bias": True}, "attention_bias True is not LLaMA's"),
             ({"vocab_size": 100}, r"has \d+ ids but .*config.json gives vocab_size 100")]
    for changes, message in cases:
        d = shutil.copytree(hf_dir, tmp_path / "c", dirs_exist_ok=True)
        edit_config(d, **changes)
        with pytest.raises(CheckpointError, match=message) as e:
            load(d)
        assert "config.json" in str(e.value) and "--" not in str(e.value)
        shutil.rmtree(d)
    d = shutil.copytree(hf_dir, tmp_path / "c")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json lists files that .* lacks: \['model-00002"):
        load(d)
    for p in d.glob("model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="has config.json but no weights"):
        load(d)


def test_tokenizer_refusals(hf_dir, tmp_path):
    d = shutil.copytree(hf_dir, tmp_path / "c")
    (d / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="has no tokenizer.model or tokenizer.json"):
        load(d)
    shutil.copy(hf_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "generation_config.json").unlink()
    edit_config(d, bos_token_id=0)  # early LLaMA conversions named <unk>
    with pytest.raises(TokenizerError, match=r"config.json gives special id 0, which is '<unk>' .* not a control"):
        load(d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert load(d).tokenizer.bos_id == 1  # generation_config.json comes first
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    edit_config(d, bos_token_id=None, eos_token_id=None)
    with pytest.raises(TokenizerError, match="names the token '<|eot|>', which .*tokenizer.model lacks"):
        load(d)


def test_meta_folder_wins_when_it_has_both_configs(tmp_path):
    d = make_tiny_llama(tmp_path / "m", TINY_TEXTS, dim=32, n_heads=4)
    (d / "config.json").write_text("{}")  # e.g. a Hugging Face repository's original/ copied beside
    assert load(d).model.args.dim == 32


def rewrite(ckpt, src, out, **flags):
    args = dict(ckpt_dir=str(ckpt), prompt_filename=str(src), output_filename=str(out), max_seq_len=256,
                max_gen_len=6, max_batch_size=3, examples=str(src.parent / "pool.json"))
    llama_rewrite.main(**{**args, **flags})
    return out.read_bytes()


def test_cli_on_a_hugging_face_folder(hf_dir, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("".join(f"{c}\n" for c in CAPTIONS))
    (tmp_path / "pool.json").write_text(json.dumps({"pairs": PAIRS}))
    cfg = validate({"ckpt_dir": str(hf_dir), "prompt_filename": str(src), "output_filename": str(tmp_path / "o")})
    assert cfg.tokenizer_path == str(hf_dir / "tokenizer.model")  # no --tokenizer_path: the folder's
    out = rewrite(hf_dir, src, tmp_path / "out.txt", temperature=0)
    lines = out.decode().split("\n")
    assert len(lines) == len(CAPTIONS) + 1 and lines[2] == "" and all(lines[k] for k in (0, 1, 3, 4, 5))
    record = json.loads(record_path(tmp_path / "out.txt").read_text())
    ckpt = record["fingerprint"]["settings"]["checkpoint"]
    assert set(ckpt) == {"config", "weights", "specials", "tokenizer", "content"} and len(ckpt["weights"]) > 2
    assert set(ckpt["content"]) == {name for name, _ in ckpt["weights"]}  # each weight file's sampled hash
    assert set(ckpt["specials"]) == {"generation_config.json"}
    assert rewrite(hf_dir, src, tmp_path / "b.txt", temperature=0, max_batch_size=5) == out


def test_meta_record_keeps_its_earlier_form(tmp_path):
    """A run started before Hugging Face support resumes: a Meta folder's identity has the same keys,
    and the content hashes added since (records without them resume: tests/test_rewrite_stale.py)."""
    d = make_tiny_llama(tmp_path / "m", TINY_TEXTS, dim=32, n_heads=4, mp=2)
    src = tmp_path / "src.txt"
    src.write_text("a photo\n")
    cfg = validate({"ckpt_dir": str(d), "prompt_filename": str(src), "output_filename": str(tmp_path / "o")})
    identity = runner.checkpoint_identity(open_checkpoint(cfg.ckpt_dir), cfg.tokenizer_path)
    assert set(identity) == {"params", "shards", "tokenizer", "content"}
    assert [name for name, _ in identity["shards"]] == ["consolidated.00.pth", "consolidated.01.pth"]
