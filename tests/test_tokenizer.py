"""The CLIP tokenizer must give OpenAI CLIP's ids for every caption.

open_clip's SimpleTokenizer (a copy of OpenAI's) is the reference; the two
differ only on captions that literally contain special-token text, where we
follow OpenAI and assert the expected ids by hand.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import pickle
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer as OpenClipTokenizer

import models.clip_tokenizer as tok_module
import tokenizer as root_tokenizer
from models.clip_tokenizer import SimpleTokenizer, clean_text

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "a photo of a dog",
    "A Photo Of A DOG.",
    "Tom &amp; Jerry",
    "fish &amp;amp; chips &amp;amp;amp; more",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39; &eacute;t&eacute;",
    "<b>tag</b> &amp; entity kept escaped once by ftfy",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 M\u00fcnchen \u00c5ngstr\u00f6m S\u00e3o Paulo",
    "cafe\u0301 (combining accent, NFC joins it)",
    "\U0001f60d love it \U0001f436\U0001f431\U0001f1fa\U0001f1f8",
    "\u6771\u4eac\u30bf\u30ef\u30fc \uc11c\uc6b8 \u5317\u4eac\u70e4\u9e2d",
    "it's the dog's bone, they're here, we've seen, I'm ok, you'll go, he'd say, don't",
    "IT'S LOUD, THEY'RE HERE",
    "\u201ccurly\u201d quotes and it\u2019s \ufb01ne \uff2c\uff2f\uff35\uff24",
    "mojibake: caf\u00c3\u00a9 and don\u00e2\u20ac\u2122t",
    "numbers 1920x1080 3.14159 2,000,000 1st 22nd 4k",
    "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ (([[{{}}]])) ;-) :-D",
    "tabs\tand\nnewlines\r\nand  many   spaces \x0b\x0c here",
    "control\x00chars\x07and\x1b[31mterminal\x1b[0m escapes\x7f\x1c\x1d",
    "   leading and trailing white space   ",
    "IMG_2043.JPG - stock photo | Getty Images",
    "",
    "   ",
    "x",
    " ".join(["a very long caption with many words"] * 20),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u0661\u0662\u0663 \u0968 \u00bd \u2167 digits from other scripts",
]

# Pieces for random captions: everything that exercises a cleaning or
# splitting rule, mixed in random order.
FUZZ_PIECES = [
    "dog", "Photo", "THE", "a", "of", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
    "'", "don't", "1", "42", "3.5", "!", "?!", "...", "-", "_", "/", "<", ">", "|",
    " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00",
    "\x7f", "\x85", "\x9c", "\xa0", "\u2028", "\u3000", "\x1b[1m", "&amp;",
    "&amp;amp;", "&lt;", "&gt;", "&#39;", "&#x2019;", "&eacute;", "&nbsp;", "&",
    "&#28;", "caf\u00e9", "\u00c3\u00a9", "\u00e2\u20ac\u2122", "\u201c", "\u2019",
    "\ufb01", "\uff21\uff22", "e\u0301", "\u00df", "\u0130", "\U0001f60d",
    "\U0001f3f3\ufe0f\u200d\U0001f308", "\u6771\u4eac", "\u0e01\u0e32", "\u0661",
    "\u00bd", "\u200b", "\ufeff", "\u00ff",
]


def openai_clean(text: str) -> str:
    """OpenAI's cleaning spelled out: ftfy, two html.unescape, regex `\\s+`."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def fuzz_captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 25)))
            for _ in range(count)]


@pytest.fixture(scope="module")
def ours() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def reference() -> OpenClipTokenizer:
    return OpenClipTokenizer()


def test_vocabulary_matches_reference(ours, reference):
    assert ours.vocab_size == 49408
    assert (ours.sot_token, ours.eot_token, ours.context_length) == (49406, 49407, 77)
    # Every non-special id decodes to the same BPE string as the reference.
    assert all(ours.decoder[i] == reference.decoder[i] for i in range(49406))


def test_ids_equal_reference_on_corpus(ours, reference):
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text), repr(text)
    assert torch.equal(ours(CORPUS), reference(CORPUS))


def test_ids_equal_reference_on_random_captions(ours, reference):
    captions = fuzz_captions(300)
    for text in captions:
        assert ours.encode(text) == reference.encode(text), repr(text)
    assert torch.equal(ours(captions), reference(captions))


def test_ids_equal_reference_on_bench_captions(ours, reference):
    spec = importlib.util.spec_from_file_location("bench_tok", ROOT / "bench" / "bench_tokenizer.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    captions = bench.make_captions(300, seed=1)
    assert captions == bench.make_captions(300, seed=1)
    assert torch.equal(ours(captions), reference(captions))


def test_cleaning_equals_openai_on_both_paths():
    # The ASCII shortcut and str.split() folding must agree with ftfy and
    # OpenAI's regex `\s+` on every input, fast path or not.
    for text in CORPUS + fuzz_captions(300, seed=1):
        assert clean_text(text) == openai_clean(text), repr(text)


def test_plain_ascii_skips_ftfy(monkeypatch):
    calls = []
    monkeypatch.setattr(tok_module.ftfy, "fix_text", lambda t: calls.append(t) or t)
    assert clean_text("A  Dog, on the\u00a0beach") == "a dog, on the beach"
    assert calls == ["A  Dog, on the\u00a0beach"]  # non-ASCII goes through ftfy
    clean_text("A  Dog's bone!")
    clean_text("tab\there")  # tab: full path, to be safe
    assert len(calls) == 2


def test_shapes(ours):
    one = ours("a photo of a dog")
    assert one.shape == (77,) and one.dtype == torch.long
    assert ours(["a photo of a dog"]).shape == (1, 77)
    assert ours(["a", "b", "c"]).shape == (3, 77)
    assert ours([]).shape == (0, 77)
    assert ours("a dog", context_length=10).shape == (10,)
    assert torch.equal(ours(["a photo of a dog"])[0], one)
    with pytest.raises(ValueError, match="context_length"):
        ours("a dog", context_length=0)


def test_padding_and_frame(ours):
    row = ours("a photo of a dog")
    ids = ours.encode("a photo of a dog")
    assert row[: len(ids) + 2].tolist() == [49406, *ids, 49407]
    assert row[len(ids) + 2 :].eq(0).all()
    assert ours("").tolist()[:3] == [49406, 49407, 0]


def test_truncation_keeps_eot_last(ours, reference):
    long_text = " ".join(f"word{i}" for i in range(200))
    assert len(ours.encode(long_text)) > 77
    row = ours(long_text)
    assert row[0] == ours.sot_token and row[-1] == ours.eot_token
    assert (row[:-1] != ours.eot_token).all()
    assert row[1:-1].tolist() == ours.encode(long_text)[:75]
    assert torch.equal(row, reference(long_text)[0])
    short = ours(long_text, context_length=5)
    assert short.tolist() == [49406, *ours.encode(long_text)[:3], 49407]


def test_literal_special_tokens_follow_openai(ours, reference):
    # OpenAI's regex lists <|startoftext|> and <|endoftext|> first and its BPE
    # cache is pre-seeded with them, so typed in a caption they become the real
    # ids (after lower-casing, so any case). open_clip >= 2.x renamed them
    # <start_of_text>/<end_of_text>: it splits "<|endoftext|>" into "<|",
    # "endoftext", "|>" and instead maps a literal "<end_of_text>" to 49407.
    photo, of = reference.encode("a photo"), reference.encode("of")
    assert ours.encode("a photo <|endoftext|> of") == [*photo, 49407, *of]
    assert ours.encode("a photo<|ENDOFTEXT|>of") == [*photo, 49407, *of]
    assert ours.encode("<|startoftext|>") == [49406]
    assert ours("<|endoftext|>")[:4].tolist() == [49406, 49407, 49407, 0]
    # Spaces do not change CLIP BPE ids (each regex word is merged on its
    # own), so spaced-out text gives the reference ids of the split pieces.
    assert ours.encode("<end_of_text>") == reference.encode("< end _ of _ text >")
    # A punctuation run swallows "<|" before the special pattern can match.
    assert ours.encode("!!<|endoftext|>") == reference.encode("!!<| endoftext |>")


def test_decode(ours, reference):
    assert ours.decode(ours.encode("a photo of a dog")) == "a photo of a dog "
    assert ours.decode(ours.encode("caf\u00e9 \u6771\u4eac \U0001f60d")) == "caf\u00e9 \u6771\u4eac \U0001f60d "
    ids = ours.encode(CORPUS[4])
    assert ours.decode(ids) == reference.decode(ids)
    assert ours.decode(torch.tensor(ids)) == reference.decode(ids)
    assert ours.decode([49406, 320, 49407]) == "<|startoftext|>a <|endoftext|>"


def test_cache_gives_same_ids(ours):
    text = "Rare wordzzyx appears twice: wordzzyx, wordzzyx!"
    first = ours.encode(text)
    assert ours.encode(text) == first
    assert "wordzzyx," in ours._chunk_ids
    fresh = SimpleTokenizer()
    assert all(fresh.encode(t) == ours.encode(t) for t in CORPUS)


def test_bounded_cache_stays_correct(monkeypatch, reference):
    monkeypatch.setattr(tok_module, "MAX_CACHE_ENTRIES", 8)
    small = SimpleTokenizer()
    captions = fuzz_captions(60, seed=2)
    for text in captions:
        assert small.encode(text) == reference.encode(text), repr(text)
    assert len(small._chunk_ids) <= 8 and len(small._word_ids) <= 8
    assert small.encode("<|endoftext|>") == [49407]  # seeds survive a clear


def test_pickle_round_trip(ours):
    # DataLoader workers started with "spawn" receive the tokenizer pickled.
    ours.encode("a photo of a dog, cat")
    copy = pickle.loads(pickle.dumps(ours))
    assert copy._chunk_ids._fill.__self__ is copy  # caches fill the copy
    for text in ["a photo of a dog, cat", "unseenzzword!", "x <|endoftext|>"]:
        assert copy.encode(text) == ours.encode(text)


def test_the_original_import_path_and_the_root_merge_list():
    """`from tokenizer import SimpleTokenizer` (LaCLIP's layout) is this class; the merge list
    stays at the repository root, where pip install -e . leaves it."""
    assert root_tokenizer.SimpleTokenizer is SimpleTokenizer and root_tokenizer.clean_text is clean_text
    assert tok_module.DEFAULT_BPE_PATH == ROOT / "bpe_simple_vocab_16e6.txt.gz"
    assert tok_module.DEFAULT_BPE_PATH.is_file()


def test_explicit_and_bad_bpe_path(tmp_path):
    assert SimpleTokenizer(ROOT / "bpe_simple_vocab_16e6.txt.gz").vocab_size == 49408
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="merge lines"):
        SimpleTokenizer(bad)
