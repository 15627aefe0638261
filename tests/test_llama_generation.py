"""Generator: batched prefill + early stop + compaction + sorting vs a plain reference; seeded sampling."""
from __future__ import annotations

import random

import pytest
import torch

from rewrite.llama import Generator, ParallelInfo, generation, load_generator
from rewrite.llama.sampling import sample
from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Generator:
    d = make_tiny_llama(tmp_path_factory.mktemp("llama"), TINY_TEXTS, dim=32, n_layers=2, n_heads=4, seed=1)
    # float64: batched and one-by-one arithmetic then agree far below any argmax margin
    return load_generator(str(d), str(d / "tokenizer.model"), MAX_SEQ_LEN, 3, ParallelInfo.single(),
                          dtype=torch.float64)


def prompts_of(gen: Generator) -> list[list[int]]:
    tok = gen.tokenizer
    texts = TINY_TEXTS[:6] + ["dog", "a", "two cats", "old wooden boat", "a photo of a dog"]
    return [tok.encode(t, bos=True, eos=False) for t in texts]


def reference_greedy(gen: Generator, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """One sequence, no cache, no padding: a full forward pass per new token."""
    toks, out = list(prompt), []
    with torch.inference_mode():
        while len(out) < n and len(toks) < gen.max_seq_len:
            nxt = int(gen.model(torch.tensor([toks]))[0, -1].argmax())
            if nxt in stop:
                break
            out.append(nxt)
            toks.append(nxt)
    return out


def frequent_tokens(outputs: list[list[int]], n: int) -> list[int]:
    """The n tokens that most outputs contain (after their first two tokens)."""
    counts: dict[int, int] = {}
    for seq in outputs:
        for t in set(seq[2:10]):
            counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: (-counts[t], t))[:n]


def generate_counting_compactions(gen: Generator, *args, **kwargs) -> tuple[list[list[int]], int]:
    """gen.generate(...), and how many decode steps fed fewer rows than their micro-batch's prefill
    (finished rows dropped from the cache)."""
    prefill_rows, shrunk = [0], [0]

    def see(module, args):
        rows, cols = args[0].shape
        if cols > 1:
            prefill_rows[0] = rows
        else:
            shrunk[0] += rows < prefill_rows[0]

    hook = gen.model.register_forward_pre_hook(see)
    try:
        return gen.generate(*args, **kwargs), shrunk[0]
    finally:
        hook.remove()


@pytest.fixture
def stops(gen):
    """Lets a test make ordinary tokens play newline and EOS; restored afterwards."""
    tok = gen.tokenizer
    old = tok.newline_ids, tok.newline_kept, tok.eos_ids, gen.max_batch_size

    def set_stops(nl: int, eos: int, kept: bool = False) -> None:
        tok.newline_ids, tok.eos_ids = frozenset({nl}), frozenset({eos})
        tok.newline_kept = frozenset({nl}) if kept else frozenset()

    yield set_stops
    tok.newline_ids, tok.newline_kept, tok.eos_ids, gen.max_batch_size = old


def test_greedy_batched_matches_reference_with_early_stop(gen, stops, monkeypatch):
    prompts = prompts_of(gen)
    free = [reference_greedy(gen, p, 14, set()) for p in prompts]
    # Two tokens the model really emits mid-sequence play newline and EOS, so rows
    # stop at different steps and finished rows are dropped from the cache.
    nl, eos = frequent_tokens(free, 2)
    stops(nl, eos)
    compactions, default = 0, generation.COMPACT_BELOW
    for stop_at_newline in (True, False):
        stop = {nl, eos} if stop_at_newline else {eos}
        want = [reference_greedy(gen, p, 14, stop) for p in prompts]
        assert any(len(w) < 14 for w in want) and any(len(w) == 14 for w in want)
        for bs, compact in ((3, default), (4, default), (16, default), (16, 0.0)):  # 0: finished rows stay
            monkeypatch.setattr(generation, "COMPACT_BELOW", compact)
            gen.max_batch_size = bs
            got, shrunk = generate_counting_compactions(gen, prompts, 14, 0.0, 0.95, list(range(len(prompts))),
                                                        stop_at_newline=stop_at_newline)
            assert got == want, (stop_at_newline, bs, compact)
            assert compact or not shrunk
            compactions += shrunk
    assert compactions


def test_a_newline_merged_after_text_ends_the_row_and_stays_in_it(gen, stops):
    """LLaMA-3's '.\\n' ends a rewrite like '\\n' does, but its '.' belongs to the text: the token
    is the row's last output token; an EOS is not."""
    prompts = prompts_of(gen)
    free = [reference_greedy(gen, p, 14, set()) for p in prompts]
    nl, eos = frequent_tokens(free, 2)
    stops(nl, eos, kept=True)
    want = []
    for f in free:
        end = next((j for j, t in enumerate(f) if t in (nl, eos)), len(f))
        want.append(f[:end] + ([nl] if end < len(f) and f[end] == nl else []))
    assert any(w and w[-1] == nl for w in want) and any(len(w) < 14 and nl not in w for w in want)
    for bs in (3, 16):
        gen.max_batch_size = bs
        assert gen.generate(prompts, 14, 0.0, 0.95, seeds=list(range(len(prompts)))) == want


def test_generation_is_cut_at_max_seq_len(gen):
    long = gen.tokenizer.encode(" ".join(TINY_TEXTS * 3), bos=True, eos=False)[: MAX_SEQ_LEN - 4]
    short = prompts_of(gen)[0]
    got = gen.generate([long, short, long[:MAX_SEQ_LEN]], 10, 0.0, 0.95, seeds=[0, 1, 2], stop_at_newline=False)
    assert len(got[0]) == 4 and len(got[1]) == 10  # the short row is not cut by its long neighbour
    assert got[0] == reference_greedy(gen, long, 10, set())
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate([[1] * (MAX_SEQ_LEN + 1)], 4, 0.0, 0.95, seeds=[0])
    with pytest.raises(ValueError, match="seeds"):
        gen.generate([short], 4, 0.0, 0.95, seeds=[0, 1])


def test_sampling_depends_only_on_seed_and_step(gen, stops):
    prompts = prompts_of(gen) * 2  # duplicates: same prompt, different seeds
    seeds = [1000 + i for i in range(len(prompts))]
    first = gen.generate(prompts, 12, 0.9, 0.95, seeds, stop_at_newline=False)
    stops(*frequent_tokens(first, 2))  # rows end at different steps
    results, compactions = [], 0
    for bs in (1, 3, 8):
        gen.max_batch_size = bs
        out, shrunk = generate_counting_compactions(gen, prompts, 12, 0.9, 0.95, seeds)
        results.append(out)
        perm = list(range(len(prompts)))
        random.Random(bs).shuffle(perm)
        shuffled = gen.generate([prompts[i] for i in perm], 12, 0.9, 0.95, [seeds[i] for i in perm])
        results.append([shuffled[perm.index(i)] for i in range(len(prompts))])
        compactions += shrunk
    assert all(r == results[0] for r in results)
    assert compactions  # rows' draws followed them when finished rows were dropped
    assert len({len(r) for r in results[0]}) > 2
    n = len(prompts) // 2
    assert results[0][:n] != results[0][n:]  # a different seed gives a different text
    assert results[0][:n] != gen.generate(prompts[:n], 12, 0.0, 0.95, seeds[:n])  # and not the greedy one


def test_sample_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    u = torch.tensor([0.999, 0.5])
    assert sample(logits, 0.0, 0.9, None).tolist() == [1, 0]
    assert sample(logits, 1.0, 1e-6, u).tolist() == [1, 0]  # nucleus of one token: greedy
    # row 0 sorted: token 1 (0.479), 3 (0.433), 2 (0.065), 0; top_p 0.9 keeps 1 and 3 (the mass
    # before token 2 is already 0.911 > 0.9); u picks by the renormalised CDF of the kept tokens
    assert sample(logits, 1.0, 0.9, torch.tensor([0.999999, 0.0])).tolist() == [3, 0]
    assert sample(logits, 1.0, 0.9, torch.tensor([0.5, 0.0])).tolist() == [1, 0]
    assert sample(logits, 1.0, 0.9, torch.tensor([0.55, 0.0])).tolist() == [3, 0]
    assert sample(logits, 1.0, 0.95, torch.tensor([0.999999, 0.0])).tolist() == [2, 0]


def test_stats_accumulate(gen):
    before = gen.stats
    prompts = prompts_of(gen)[:3]
    out = gen.generate(prompts, 5, 0.0, 0.95, seeds=[0, 1, 2])
    after = gen.stats
    assert after["prompts"] - before["prompts"] == 3
    assert after["generated_tokens"] - before["generated_tokens"] == sum(map(len, out))
    assert after["prompt_tokens"] - before["prompt_tokens"] == sum(map(len, prompts))
    assert after["seconds"] > before["seconds"]


def test_top_k_shortcut_matches_full_sort():
    from rewrite.llama.sampling import _sorted_probs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 4
    logits[0, [5, 9, 200]] = 9.0  # exact ties at the top
    logits[1] = 0.0  # flat: the nucleus needs far more than 64 tokens
    probs = torch.softmax(logits, -1)
    full_p, full_i = probs.sort(dim=-1, descending=True, stable=True)
    for rows in ([0, 2, 3, 4, 5], [0, 1, 2]):  # shortcut taken / full sort needed for row 1
        p, i = _sorted_probs(probs[rows], 0.9)
        k = p.shape[1]
        assert torch.equal(p, full_p[rows, :k]) and torch.equal(i, full_i[rows, :k])
    assert _sorted_probs(probs[[0, 2]], 0.9)[0].shape[1] == 64
    for _ in range(20):  # the same draws whether or not a flat row forces the full sort
        u = torch.rand(5, generator=g)
        assert torch.equal(sample(logits[[0, 2, 3, 4, 5]], 1.0, 0.9, u),
                           sample(torch.cat([logits[[0, 2, 3, 4, 5]], logits[[1]]]), 1.0, 0.9,
                                  torch.cat([u, u[:1]]))[:5])


def test_train_tiny_llama_learns_the_prompt_format(tmp_path):
    from rewrite.prompts import build_prompt
    from testkit.tiny_llama import train_tiny_llama
    pairs = [(f"{c} {n} on a hill", f"A {c} {n} stands quietly on a green hill.")
             for c in ("red", "old", "small", "white") for n in ("house", "dog", "car")]
    losses: list[float] = []
    d = train_tiny_llama(tmp_path / "t", pairs, build_prompt, dim=32, steps=40, mp=2,
                         log=lambda s: losses.append(float(s.rsplit(" ", 1)[1])))
    assert sorted(p.name for p in d.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                   "params.json", "tokenizer.model"]
    assert losses[-1] < losses[0] - 1.0
    g = load_generator(str(d), str(d / "tokenizer.model"), 256, 4, ParallelInfo.single())  # merges 2 shards
    prompt = g.tokenizer.encode(build_prompt(pairs[:3], pairs[5][0]), bos=True, eos=False)
    assert len(g.generate([prompt], 8, 0.9, 0.95, seeds=[0])[0]) <= 8
