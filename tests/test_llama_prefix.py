"""Prefix sharing in the prefill (rewrite/llama/prefix.py): the prefix tree, and texts identical
with sharing on and off for LaCLIP's prompts (shipped pools), greedy and sampled, at every batch
size, with finished rows dropped from the cache; fewer columns prefilled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewrite.llama import ParallelInfo, load_generator
from rewrite.llama.prefix import chunks, plan
from rewrite.prompts import build_prompt, choose_examples, load_pool
from testkit.net import free_port
from testkit.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a dog on the beach", "red car parked in the street 2019", "two cats sleeping", "city at night",
            "bowl of soup", "old bridge over the river", "kids play football", "a lamp"]


def test_the_tree_shares_what_groups_of_rows_start_with():
    h, a, b = [1, 5, 5, 5, 5], [7, 7, 7, 7, 7, 7], [8, 8, 8, 8, 8, 8]
    prompts = [h + a + [20, 21], h + a + [22], h + b + [23], h + b + [24, 25], h + [9, 9], h + a + [20, 30]]
    p = plan(prompts, min_gain=4, overhead=0)  # h + a + [20] (rows 0, 5): 1 token x 1 row < min_gain
    assert [sorted((n.start, n.end, n.rows) for n in level) for level in p.levels] == [
        [(0, 5, [0, 1, 2, 3, 4, 5])], [(5, 11, [0, 1, 5]), (5, 11, [2, 3])]]
    assert [p.shared(i) for i in range(6)] == [11, 11, 11, 11, 5, 11]
    assert plan(prompts, min_gain=1, overhead=0).shared(0) == 12  # kept when any saving counts
    pruned = plan(prompts, min_gain=4, overhead=10)  # level 1 saves 2 x 6 + 6 = 18 > 10; level 0: 5 x 5 = 25
    assert len(pruned.levels) == 2 and plan(prompts, min_gain=4, overhead=20).shared(0) == 5  # level 1 dropped
    same = plan([[1, 2, 3, 4], [1, 2, 3, 4]], min_gain=1, overhead=0)
    assert same.shared(0) == same.shared(1) == 3  # the last token is each row's own: its logits
    low = plan([[1, 2, 3], [1, 2, 4]], min_gain=16, overhead=0)
    assert not low.levels and low.shared(0) == 0
    rows = plan([[1] + [2] * 20 + [3], [1] + [2] * 20 + [4], [1] + [5] * 20], min_gain=16, overhead=0)
    assert [p.start for p in rows.levels[0]] == [0] and rows.shared(0) == 21 and rows.shared(2) == 0


def test_chunks_trade_padding_against_passes():
    assert chunks([10, 10, 9, 9, 9, 9, 3, 3, 3, 3], overhead=4) == [(0, 6), (6, 10)]
    assert chunks([10, 10, 9, 9, 9, 9, 3, 3, 3, 3], overhead=30) == [(0, 10)]  # a pass costs more than 24
    assert chunks([10, 9, 3], overhead=0) == [(0, 1), (1, 2), (2, 3)] and chunks([5]) == [(0, 1)]
    assert chunks([200] * 50 + [100] * 50) == [(0, 50), (50, 100)]


@pytest.fixture(scope="module")
def laclip(tmp_path_factory):
    """A tiny model whose tokenizer knows the shipped chatgpt pool, and LaCLIP's prompts of 24 lines."""
    pool = load_pool("chatgpt")
    texts = [s for pair in pool.pairs for s in pair] + CAPTIONS + [build_prompt(pool.pairs[:3], "x")]
    d = make_tiny_llama(tmp_path_factory.mktemp("prefix"), texts, dim=32, n_layers=2, n_heads=4, seed=3)
    gen = load_generator(str(d), None, 512, 8, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)
    prompts = [gen.tokenizer.encode(build_prompt(choose_examples(pool, 1, "chatgpt", i), CAPTIONS[i % 8]),
                                     bos=True, eos=False) for i in range(24)]
    gen.ckpt_dir = d
    return gen, prompts


def run(gen, prompts, share: bool, batch: int, temperature: float, seeds) -> tuple[list[list[int]], int]:
    gen.share_prefixes, gen.max_batch_size = share, batch
    before = gen.stats["prefill_tokens"]
    out = gen.generate(prompts, 10, temperature, 0.95, seeds, stop_at_newline=True)
    return out, gen.stats["prefill_tokens"] - before


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_texts_are_the_same_with_and_without_sharing(laclip, temperature):
    gen, prompts = laclip
    tok = gen.tokenizer
    old = tok.newline_ids, tok.eos_ids, gen.max_batch_size
    free, _ = run(gen, prompts, False, 24, temperature, list(range(24)))
    often = sorted({t for o in free for t in o[2:8]}, key=lambda t: -sum(t in o[2:8] for o in free))[:2]
    # tokens the model emits often, and one id in 12, end rows at different steps: finished rows
    # are dropped from the cache
    tok.newline_ids = frozenset(range(5, tok.n_words, 12)) | frozenset(often)
    try:
        for seed in (0, 7):
            seeds = [seed * 100 + i for i in range(24)]
            for batch in (1, 3, 8, 24):
                off, fed_off = run(gen, prompts, False, batch, temperature, seeds)
                on, fed_on = run(gen, prompts, True, batch, temperature, seeds)
                assert on == off, (seed, batch)
                assert fed_on < fed_off or batch < 24  # small batches: little to share; a pass costs 256 columns
        assert len({len(o) for o in on}) > 2  # rows stopped at different steps: finished rows were dropped
    finally:
        tok.newline_ids, tok.eos_ids, gen.max_batch_size = old
        gen.share_prefixes = True


def test_laclip_prompts_share_the_header_and_first_example(laclip):
    gen, prompts = laclip
    p = plan(prompts)
    header = p.levels[0][0]
    assert header.start == 0 and len(header.rows) == 24
    firsts = {}
    for i in range(24):
        firsts.setdefault(choose_examples(load_pool("chatgpt"), 1, "chatgpt", i)[0], []).append(i)
    for rows in (r for r in firsts.values() if len(r) > 1):  # lines with the same first example share it
        assert all(p.shared(i) > header.end + 10 for i in rows), rows


def worker(out_dir: str) -> None:
    from rewrite.launch import setup_parallel, teardown_parallel
    job = json.loads((Path(out_dir) / "job.json").read_text())
    info = setup_parallel(job["ckpt"], model_parallel_size=2, device="cpu")
    gen = load_generator(job["ckpt"], None, 512, 8, info, dtype=torch.float64)
    res = {}
    for share in (True, False):
        gen.share_prefixes = share
        res[share] = gen.generate(job["prompts"], 10, 0.9, 0.95, list(range(24)))
    torch.save(res, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()
    teardown_parallel()


@pytest.mark.slow
def test_two_model_parallel_processes_write_the_same_texts(laclip, tmp_path):
    """MP=2 (the checkpoint cut in two), sharing on and off, against one process without sharing."""
    gen, prompts = laclip
    gen.share_prefixes, gen.max_batch_size = False, 8
    want = gen.generate(prompts, 10, 0.9, 0.95, list(range(24)))
    gen.share_prefixes = True
    (tmp_path / "job.json").write_text(json.dumps({"ckpt": str(gen.ckpt_dir), "prompts": prompts}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res[True] == res[False] == want, rank


if __name__ == "__main__":
    worker(sys.argv[1])
