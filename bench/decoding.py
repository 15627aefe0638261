"""The decode step's pieces timed against each other and against the LLaMA-v1 schedule: the
helpers of bench_rewrite.py --decode.

Variants (VARIANTS) run on the same prompts and seeds in rounds of one run each:
  meta v1         Meta's LLaMA-v1 generate loop (bench_rewrite.meta_schedule), the baseline;
  eager, unfused  our engine with one matmul per projection (as before issue 18);
  eager           our engine as loaded: fused QKV and gate/up projections;
  compiled        the same, decode step through torch.compile (inductor on the CPU);
  compiled, no compaction   finished rows never leave the batch.
The compiled generator's first call compiles; it is timed apart (wall time: the C++ compiler
runs in child processes) and the rounds that follow are its marginal cost. Rates are from a
variant's fastest round of process CPU time; ratios are medians of per-round time ratios.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

from rewrite.llama import Generator, generation
from rewrite.llama.model import unfuse_projections


def _variants(gen: Generator, meta: Callable) -> dict[str, Callable]:
    plain = copy.deepcopy(gen)  # its own model, one matmul per projection
    unfuse_projections(plain.model)
    compiled = Generator(gen.model, gen.tokenizer, gen.max_seq_len, gen.max_batch_size, gen.parallel,
                         share_prefixes=gen.share_prefixes, compile=True)

    def ours(g: Generator, compact: float = generation.COMPACT_BELOW):
        def run(prompts, temperature, seeds):
            default, generation.COMPACT_BELOW = generation.COMPACT_BELOW, compact
            try:
                return g.generate(prompts, 77, temperature, 0.95, seeds)
            finally:
                generation.COMPACT_BELOW = default
        run.generator = g
        return run
    return {"meta v1": lambda prompts, temperature, seeds: meta(plain, prompts, temperature),  # unfused, as Meta's
            "eager, unfused": ours(plain), "eager": ours(gen), "compiled": ours(compiled),
            "compiled, no compaction": ours(compiled, compact=0.0)}


def compare_decode(gen: Generator, prompts: list[list[int]], meta: Callable, repeats: int) -> dict:
    """Time the variants on `prompts` (sampled at 0.9 / 0.95); print rates, ratios, compile time
    and the break-even; check the texts (sampled, then greedy on the first 100).
    meta(generator, prompts, temperature): the baseline's texts."""
    runs = _variants(gen, meta)
    compiled = runs["compiled"].generator
    seeds = list(range(len(prompts)))
    t0 = time.perf_counter()
    first = runs["compiled"](prompts, 0.9, seeds)
    compile_wall = time.perf_counter() - t0
    texts = {name: first if name == "compiled" else run(prompts, 0.9, seeds) for name, run in runs.items()}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            run(prompts, 0.9, seeds)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    n, ref = len(prompts), "eager"
    print(f"[decode] {n} captions, batch {gen.max_batch_size}, {repeats} rounds; compiled generator's first call "
          f"{compile_wall:.1f} s wall, of which compiling {compiled.stats['compile_seconds']:.1f} s "
          f"({compiled.stats['compiles']} graphs)")
    rows = {}
    for name in runs:
        vs_meta = sorted(m / t for m, t in zip(cpu["meta v1"], cpu[name]))[repeats // 2]
        vs_eager = sorted(e / t for e, t in zip(cpu[ref], cpu[name]))[repeats // 2]
        same = sum(a == b for a, b in zip(texts[name], texts[ref]))
        rows[name] = {"captions_per_s": n / min(cpu[name]), "wall_captions_per_s": n / min(wall[name]),
                      "vs_meta": vs_meta, "vs_eager": vs_eager, "same_as_eager": same}
        print(f"  {name:24s}: {n / min(cpu[name]):7.1f} captions/s CPU ({n / min(wall[name]):.1f} wall); "
              f"x{vs_meta:.2f} vs meta v1, x{vs_eager:.2f} vs eager; sampled texts as eager's: {same}/{n}")
    saved = min(cpu[ref]) - min(cpu["compiled"])
    if saved > 0:
        print(f"  compiling repays itself after {compiled.stats['compile_seconds'] / saved * n:.0f} captions "
              f"(it saves {saved / n * 1e3:.2f} ms of CPU per caption)")
    else:
        print("  the compiled step is not faster than eager here: compiling never repays itself")
    k = min(100, n)
    greedy = [runs[name](prompts[:k], 0.0, seeds[:k]) for name in ("eager", "compiled")]
    print(f"  greedy: compiled texts as eager's {sum(a == b for a, b in zip(*greedy))}/{k}")
    return {"compile_wall": compile_wall, "compile_seconds": compiled.stats["compile_seconds"],
            "compiles": compiled.stats["compiles"], "variants": rows}
