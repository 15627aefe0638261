"""rewrite/prompts.py: pools, seeded example choice, the prompt, truncation, the cut."""
from __future__ import annotations

import json
import random

import pytest

from rewrite import prompts
from rewrite.prompts import (Pool, build_prompt, choose_examples, cut_rewrite, finish_line, fit_prompt,
                             is_degenerate, load_pool, make_pool, normalize_sample_mode, one_line, sampling_seed)

# docs/formats.md ("The rewriting prompt"), copied as text: the lines after the first start with 12 spaces.
TEMPLATE = ("write image captions differently,\n\n            {s1} => {t1}\n\n            {s2} => {t2}\n\n"
            "            {s3} => {t3}\n\n            {caption} =>")


def expected_prompt(examples, caption: str) -> str:
    text = TEMPLATE
    for k, (s, t) in enumerate(examples, 1):
        text = text.replace(f"{{s{k}}}", s).replace(f"{{t{k}}}", t)
    return text.replace("{caption}", caption)


class CharTokenizer:
    """One token per character (ids offset by 3), BOS 1: easy to count by hand."""
    bos_id, eos_id = 1, 2

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        return ([1] if bos else []) + [ord(c) + 3 for c in s] + ([2] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) for i in ids if i > 2)


def test_prompt_matches_formats_template():
    examples = [("a dog", "A dog runs."), ("city at night", "The city glows."), ("x", "y z")]
    assert build_prompt(examples, "person on a bike") == expected_prompt(examples, "person on a bike")


def test_truncation_cuts_long_prompt_and_appends_arrow():
    tok = CharTokenizer()
    examples = [("a", "b"), ("c", "d"), ("e", "f")]
    short = build_prompt(examples, "short caption")
    tokens, text, truncated = fit_prompt(short, tok, max_seq_len=len(short) + 1 + 5)
    assert (text, truncated, tokens) == (short, False, tok.encode(short, True, False))
    long = build_prompt(examples, "word " * 200)
    tokens, text, truncated = fit_prompt(long, tok, max_seq_len=100)
    assert truncated and text == long[:100 - 10 - 1] + " =>"  # 90 tokens kept, BOS among them
    assert tokens == tok.encode(text, True, False) and len(tokens) <= 100 - 5


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory):
    """A SentencePiece model like LLaMA's (BPE, byte fallback) that has seen a little CJK and
    emoji: characters it has not seen become 3-4 byte pieces, so a cut can land inside one."""
    from rewrite.llama import Tokenizer
    from testkit.tiny_llama import TINY_TEXTS, train_tokenizer
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(train_tokenizer(TINY_TEXTS + ["一只猫坐在窗台上", "東京の夜景", "🐶 dog 🐱 cat", "café"], 400))
    return Tokenizer(str(path))


CUT_PIECES = ["🐶", "🌅", "👩‍👩‍👧", "🇯🇵", "猫", "夜景", "東京", "ﾌﾞ", "café", "a dog", " ", "naïve", "on the"]


def test_cut_inside_a_multibyte_character_keeps_the_arrow(byte_fallback_tokenizer):
    """Emoji, CJK and mixed captions cut at many lengths: the prompt always ends in ' =>', fits the
    context, holds only whole characters of the caption, and its tokens are its encoding."""
    tok, rng = byte_fallback_tokenizer, random.Random(0)
    examples = [("a dog", "A dog runs."), ("city at night", "The city glows."), ("x", "y z")]
    cut = 0
    for _ in range(300):
        caption = "".join(rng.choice(CUT_PIECES) for _ in range(rng.randint(30, 120)))
        prompt, max_seq_len = build_prompt(examples, caption), rng.randint(40, 140)
        tokens, text, truncated = fit_prompt(prompt, tok, max_seq_len)
        if not truncated:
            continue
        cut += 1
        assert text.endswith(" =>") and prompt.startswith(text[:-len(" =>")]), text[-20:]
        assert tokens == tok.encode(text, True, False) and len(tokens) <= max_seq_len - 5
        assert tok.decode(tokens).endswith("=>")
    assert cut > 200


def test_cut_on_a_clean_token_boundary_is_the_original_rule(byte_fallback_tokenizer):
    """Where the first max_seq_len - 10 tokens decode and re-encode to themselves (every ASCII
    caption here), the prompt is exactly the original's: those tokens, decoded, plus ' =>'."""
    tok, rng = byte_fallback_tokenizer, random.Random(1)
    words = "a photo of the dog running on beach at sunset two cats sleeping red sofa city night".split()
    examples = [("a dog", "A dog runs."), ("city at night", "The city glows."), ("x", "y z")]
    for _ in range(100):
        prompt = build_prompt(examples, " ".join(rng.choice(words) for _ in range(rng.randint(20, 80))))
        max_seq_len = rng.randint(40, 120)
        tokens, text, truncated = fit_prompt(prompt, tok, max_seq_len)
        original = tok.decode(tok.encode(prompt, True, False)[1:max_seq_len - 10]) + " =>"
        assert truncated == (len(tok.encode(prompt, True, False)) > max_seq_len - 5)
        assert text == (original if truncated else prompt)


def test_cut_rewrite_at_newline_and_arrow():
    assert cut_rewrite(" A red bus on a street.\n            next => thing") == "A red bus on a street."
    assert cut_rewrite(" A red bus => another rewrite") == "A red bus"
    assert cut_rewrite("\tA bus\twith tabs\r here ") == "A bus with tabs  here"
    assert cut_rewrite("a\u2028b\x85c") == "a b c"  # separators that other readers split lines on


@pytest.mark.parametrize("completion", ["", "   ", "\n", " ...", " !!! ?", "=> A rewrite", " -- \u2014 *"])
def test_degenerate_rewrite_falls_back_to_caption(completion):
    assert finish_line("the caption\tkept", completion) == ("the caption kept", True)


def test_good_rewrite_is_kept():
    assert finish_line("x", " 3 cats.") == ("3 cats.", False)
    assert not is_degenerate("é") and is_degenerate(".,;")
    assert one_line("a\tb\nc\rd") == "a b c d"


def test_shipped_pools_load():
    for mode, minimum in (("chatgpt", 16), ("bard", 16), ("human", 16)):
        pool = load_pool(mode)
        assert len(pool.pairs) >= minimum and not pool.groups
    coco = load_pool("coco")
    assert len(coco.groups) >= 18 and all(len(g) == 5 for g in coco.groups)
    assert load_pool("mscoco") == coco


def test_sample_mode_error_lists_choices():
    with pytest.raises(ValueError, match="--sample_mode 'llama'.*chatgpt, bard, mscoco, human"):
        normalize_sample_mode("llama")
    assert normalize_sample_mode("COCO") == "mscoco"


def test_examples_json_pairs_and_groups(tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"pairs": [["a", "A."], ["b", "B."], ["c", "C."]]}))
    assert load_pool("bard", str(pairs)).pairs == (("a", "A."), ("b", "B."), ("c", "C."))
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"groups": [["a", "b"], ["c", "d", "e"], ["f", "g"]]}))
    pool = load_pool("chatgpt", str(groups))
    for seed in range(20):
        examples = choose_examples(pool, seed, "chatgpt", 0)
        assert len(examples) == 3 and all(s != t for s, t in examples)
        assert all(any(s in g and t in g for g in pool.groups) for s, t in examples)


@pytest.mark.parametrize("body, message", [
    ({"pairs": [["a", "b"], ["c", "d"]]}, "at least 3"),
    ({"groups": [["a"], ["b", "c"], ["d", "e"]]}, r"groups\[0\] needs at least 2"),
    ({"pairs": [["a", "b", "c"], ["c", "d"], ["e", "f"]]}, r"pairs\[0\] must be \[source, target\]"),
    ({"pairs": [["a", 3], ["c", "d"], ["e", "f"]]}, "non-empty string"),
    ({"pairs": [["a\nb", "x"], ["c", "d"], ["e", "f"]]}, "line break"),
    ({"captions": []}, "'pairs' or a 'groups'"),
])
def test_bad_examples_name_flag_and_file(tmp_path, body, message):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match=f"--examples {path}.*{message}"):
        load_pool("chatgpt", str(path))


def test_examples_missing_or_not_json(tmp_path):
    with pytest.raises(ValueError, match="--examples .*nope.json: file not found"):
        load_pool("chatgpt", str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="--examples .*bad.json: not valid UTF-8 JSON"):
        load_pool("chatgpt", str(bad))


def test_utils_py_read_as_data_never_executed(tmp_path):
    marker = tmp_path / "executed"
    utils = tmp_path / "utils.py"
    utils.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "coco_caption_list = [\n['a', 'b', 'c'],\n['d', 'e'],\n['f', 'g', 'h', 'i', 'j'],\n]\n"
        "chatgpt_source_caption_list = ['s1', 's2', 's3', 's4']\n"
        "chatgpt_target_caption_list = ['t1', 't2', 't3', 't4']\n"
        "bard_source_caption_list = ['s1', 's2', 's3']\nbard_target_caption_list = ['t1', 't2']\n"
        "human_source_caption_list = sorted(['x'])\n")
    assert load_pool("chatgpt", str(utils)).pairs[3] == ("s4", "t4")
    assert load_pool("coco", str(utils)).groups[1] == ("d", "e")
    with pytest.raises(ValueError, match="same length"):
        load_pool("bard", str(utils))
    with pytest.raises(ValueError, match="--examples .*utils.py: no literal list named human_source_caption_list"):
        load_pool("human", str(utils))
    assert not marker.exists()


def test_choice_depends_only_on_seed_mode_line():
    pool = load_pool("chatgpt")
    a = [choose_examples(pool, 7, "chatgpt", i) for i in range(50)]
    assert a == [choose_examples(pool, 7, "chatgpt", i) for i in range(50)]
    assert a != [choose_examples(pool, 8, "chatgpt", i) for i in range(50)]
    assert all(len(set(ex)) == 3 for ex in a)
    assert len({tuple(ex) for ex in a}) > 40  # lines get different examples
    seeds = [sampling_seed(7, "chatgpt", i) for i in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2 ** 63 for s in seeds)
    assert sampling_seed(7, "chatgpt", 3) != sampling_seed(7, "bard", 3)


def test_pool_digest_tracks_content():
    a = make_pool(pairs=[["a", "b"], ["c", "d"], ["e", "f"]])
    b = make_pool(pairs=[["a", "b"], ["c", "d"], ["e", "F"]])
    assert isinstance(a, Pool) and a.digest() != b.digest()
    assert a.digest() == make_pool(pairs=[("a", "b"), ("c", "d"), ("e", "f")]).digest()
    assert prompts.POOL_DIR.is_dir()
