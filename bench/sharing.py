"""Prefix sharing on vs off on the same prompts: the helpers of bench_rewrite.py --sharing,
also used by gpu_check.py (prefill time, a run in the CLI's windows, the comparison on LaCLIP's
prompts from a shipped pool)."""
from __future__ import annotations

import time

import torch

from rewrite.llama import Generator
from rewrite.prompts import build_prompt, choose_examples, load_pool, sampling_seed


def pool_pairs(mode: str) -> list[tuple[str, str]]:
    """A shipped pool as (source, target) pairs (an MSCOCO group gives its consecutive captions)."""
    pool = load_pool(mode)
    return list(pool.pairs) or [(g[i], g[i + 1]) for g in pool.groups for i in range(len(g) - 1)]


def timed_prefill(gen: Generator) -> list[float]:
    """Wrap gen._prefill; the returned list accumulates its seconds: process CPU time on the CPU,
    CUDA-synchronised wall time on a GPU."""
    spent = [0.0]
    prefill = gen._prefill
    cuda = gen.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def timed(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize(gen.device)
        t0 = clock()
        out = prefill(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(gen.device)
        spent[0] += clock() - t0
        return out

    gen._prefill = timed
    return spent


def sharing_run(gen: Generator, prompts: list[list[int]], seeds: list[int], share: bool, max_gen_len: int,
                window: int) -> dict:
    """One pass over the prompts in windows of `window` (one engine call each), sharing on or off."""
    gen.share_prefixes = share
    spent = timed_prefill(gen)
    before = gen.stats
    out, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for a in range(0, len(prompts), window):
        out += gen.generate(prompts[a:a + window], max_gen_len, 0.9, 0.95, seeds[a:a + window])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    del gen._prefill
    after = gen.stats
    return {"out": out, "cpu": cpu, "wall": wall, "prefill": spent[0],
            "fed": after["prefill_tokens"] - before["prefill_tokens"]}


def compare_sharing(gen: Generator, mode: str, captions: list[str], max_gen_len: int) -> None:
    pool = load_pool(mode)
    prompts = [gen.tokenizer.encode(build_prompt(choose_examples(pool, 1, mode, i), c), bos=True, eos=False)
               for i, c in enumerate(captions)]
    seeds = [sampling_seed(1, mode, i) for i in range(len(captions))]
    window = 4 * gen.max_batch_size  # rewrite/runner.py's WINDOW_BATCHES
    off = sharing_run(gen, prompts, seeds, False, max_gen_len, window)
    on = sharing_run(gen, prompts, seeds, True, max_gen_len, window)
    n, total = len(prompts), sum(map(len, prompts))
    same = sum(a == b for a, b in zip(off["out"], on["out"]))
    print(f"[sharing, {mode} pool ({len(pool)} entries)] {n} captions at batch {gen.max_batch_size}, "
          f"{total} prompt tokens ({total / n:.0f} per caption)")
    for name, r in (("off", off), ("on ", on)):
        print(f"  sharing {name}: prefilled {r['fed']:7d} rows x columns; prefill {r['prefill']:5.2f} s of {r['cpu']:5.2f} s "
              f"CPU ({100 * r['prefill'] / r['cpu']:.0f}%); {n / r['cpu']:6.1f} captions/s CPU ({n / r['wall']:.1f} wall)")
    print(f"  ratio on/off: prefilled columns {on['fed'] / off['fed']:.3f}, prefill CPU time "
          f"{on['prefill'] / off['prefill']:.3f}, captions/s {off['cpu'] / on['cpu']:.2f}x CPU "
          f"({off['wall'] / on['wall']:.2f}x wall); "
          f"rewrites identical {same}/{n}")
