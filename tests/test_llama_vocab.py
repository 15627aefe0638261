"""The tokenizer and the weights must speak one vocabulary (issue 19 case 6): a folder with both
tokenizer files is used only if they agree, and embedding rows are exactly the tokenizer's ids
or a known padding, whose rows are never generated."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rewrite.cli_args import validate
from rewrite.llama import CheckpointError, ParallelInfo, TokenizerError, load_generator, load_tokenizer
from testkit.hf_llama import llama_config, random_llama, sp_tokenizer_json, write_hf
from testkit.tiny_llama import TINY_TEXTS, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two SentencePiece models of the same size trained on different texts, and their tokenizer.json."""
    root = tmp_path_factory.mktemp("vocab")
    out = {}
    for name, texts in (("a", TINY_TEXTS), ("b", [t[::-1] for t in TINY_TEXTS] + ["zq xj vk"] * 5)):
        (root / name).mkdir()
        sp = root / name / "tokenizer.model"
        sp.write_bytes(train_tokenizer(texts, 300))
        out[name] = (sp, sp_tokenizer_json(sp, root / name / "json"))
    return out


def hf_folder(path, tokenizers, files, extra_rows: int = 0):
    tok = load_tokenizer(str(files[0]))
    model = random_llama(llama_config("llama2", tok.n_words + extra_rows, tok.bos_id, tok.eos_id))
    d = write_hf(model, path, [files[0]])
    for f in files[1:]:
        shutil.copy(f, d / f.name)
    shutil.copy(tokenizers["a"][1].parent / "tokenizer_config.json", d / "tokenizer_config.json")
    return d


def load(d, tok=None):
    return load_generator(str(d), tok, 64, 2, ParallelInfo.single(torch.device("cpu")), dtype=torch.float32)


def test_both_tokenizer_files_are_used_only_if_they_agree(tokenizers, tmp_path):
    sp, hf = tokenizers["a"]
    same = hf_folder(tmp_path / "same", tokenizers, [sp, hf])
    assert load(same).tokenizer.model_path == str(same / "tokenizer.model")  # the same vocabulary: fine
    other = hf_folder(tmp_path / "other", tokenizers, [sp, tokenizers["b"][1]])  # same size, other pieces
    assert load_tokenizer(str(other / "tokenizer.json")).n_words == load_tokenizer(str(sp)).n_words
    message = (rf"{other / 'tokenizer.model'} and {other / 'tokenizer.json'} disagree \(the probe text .* encodes "
               r"differently from token \d+ on")
    with pytest.raises(TokenizerError, match=message):
        load(other)
    with pytest.raises(ValueError, match="^--ckpt_dir: " + message + r".*\(--tokenizer_path\)$"):  # the CLI
        validate({"ckpt_dir": str(other), "prompt_filename": str(tmp_path / "p.txt"),
                  "output_filename": str(tmp_path / "o")})
    assert load(other, str(other / "tokenizer.model")).tokenizer.model_path == str(other / "tokenizer.model")


def test_padded_rows_declared_as_added_tokens_are_never_generated(tokenizers, tmp_path):
    sp, hf = tokenizers["a"]
    from tokenizers import AddedToken, Tokenizer
    padded = Tokenizer.from_file(str(hf))
    padded.add_special_tokens([AddedToken("[PAD]", special=True, normalized=False)])  # as fine-tunes do
    (tmp_path / "pad").mkdir()
    padded.save(str(tmp_path / "pad" / "tokenizer.json"))
    n = load_tokenizer(str(sp)).n_words
    d = hf_folder(tmp_path / "hf", tokenizers, [sp, tmp_path / "pad" / "tokenizer.json"], extra_rows=1)
    with pytest.raises(TokenizerError, match=f"disagree \\({n} ids against {n + 1}\\)"):
        load(d)  # the two files differ in size: the user picks one
    assert load(d, str(d / "tokenizer.json")).tokenizer.n_words == n + 1  # exact: no warning, no mask
    with pytest.warns(UserWarning, match=rf"{n + 1} embedding rows for the {n} ids .* are tokens added after "
                                         r"training \('\[PAD\]'\); they are never generated"):
        g = load(d, str(d / "tokenizer.model"))
    h = torch.randn(3, g.model.output.weight.shape[1])
    with torch.no_grad():
        g.model.output.weight[n] = 1e3 * h.mean(0)  # the padded row would win every argmax ...
        logits = g.model.output(h)
    assert torch.isinf(logits[:, n:]).all() and torch.isfinite(logits[:, :n]).all()  # ... but is masked
    out = g.generate([g.tokenizer.encode("a photo of", bos=True, eos=False)], max_gen_len=8, temperature=0.0,
                     top_p=1.0, seeds=[0])
    assert all(t < n for seq in out for t in seq)


def test_rows_that_are_no_known_padding_are_refused(tokenizers, tmp_path):
    sp, _ = tokenizers["a"]
    n = load_tokenizer(str(sp)).n_words
    d = hf_folder(tmp_path / "hf", tokenizers, [sp], extra_rows=3)  # neither declared nor a multiple of 64
    assert (n + 3) % 64 and (n + 3) % 128
    with pytest.raises(CheckpointError, match=rf"has {n} ids but .*config.json has {n + 3} embedding rows, which is "
                                              r"no known padding"):
        load(d)
    rounded = -(-n // 64) * 64
    d = hf_folder(tmp_path / "r", tokenizers, [sp], extra_rows=rounded - n)  # pad_to_multiple_of=64
    with pytest.warns(UserWarning, match="padding to a multiple of 64"):
        load(d)
