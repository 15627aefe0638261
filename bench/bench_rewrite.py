"""Caption-rewriting throughput: our LLaMA engine vs the LLaMA-v1 example schedule, and our
engine with prefix sharing on vs off.

    python -m bench.bench_rewrite                 # 256 captions, batch 16, 1 torch thread
    python -m bench.bench_rewrite --n 128 --max_batch_size 8
    python -m bench.bench_rewrite --ablation      # our schedule with parts switched off
    python -m bench.bench_rewrite --sharing       # prefix sharing on vs off, the shipped pools, batch 100
    python -m bench.bench_rewrite --decode        # eager vs compiled decode step, fused or not, batch 100

Both engines run the same tiny model (float32, CPU) on the same in-context
prompts (3 example pairs + caption, docs/formats.md "The rewriting prompt", built with
rewrite/prompts.py) of seeded synthetic alt-text captions. The baseline follows
Meta's v1 `generate`: batches in file order, one KV cache of
max_batch_size x max_seq_len, decoding from the shortest prompt's length while
feeding longer prompts' remaining tokens one step at a time, always
max_gen_len steps, text cut at the newline afterwards. Ours: length-sorted
micro-batches, one-pass padded prefill, cache sized to the batch, stop at the
first newline, finished rows dropped.

Two settings:
  random:  random weights, stop disabled, every caption gets exactly
           --max_gen_len tokens in both engines (gain from prefill + sorting);
  trained: a model trained by `train_tiny_llama` (~20 s) on prompts whose
           completions are a 20-40 token rewrite then a newline, sampled at
           temperature 0.9 / top-p 0.95 like LaCLIP (adds the early stop).
Time is this process's CPU time (one thread: shared cores skew it less than
wall time); wall time is printed too. A greedy run on the trained model checks
that both engines write the same rewrites.

--ablation runs only the trained setting, at batch sizes 16 and 100 (LaCLIP's),
on 8 batches' worth of captions each, our engine against itself with parts of
its schedule switched off (ABLATION: today the compaction of finished rows; a
straggler hand-off measured here earlier did not pay and was removed, see
bench/README.md); every variant must write the same texts. Each variant runs
--repeats times, in rounds of one run per variant; captions/s is from a
variant's fastest run (other processes on the shared cores only add time), the
ratio against the full engine is the median over rounds of the two runs' time
ratio (paired: robust to load that drifts), with its lowest and highest round.

--sharing trains the tiny model with the shipped pools (rewrite/pools/) added to its data
(so their text tokenizes well) and rewrites --sharing_n synthetic captions per pool of
--modes at batch 100 with LaCLIP's prompts built as the CLI builds them (rewrite/prompts.py:
examples and sampling seed of each line from --seed 1), one engine call per 4 batches as
the CLI's commit window does, sharing off then on (bench/sharing.py): rows x columns
actually prefilled (padding included), prefill and total CPU time, captions/s, and how many
rewrites are identical (float32: equal up to rounding).

--decode runs only the trained setting at --max_batch_size (use 100, LaCLIP's) on --n captions:
the LLaMA-v1 schedule, our engine eager without and with fused projections, and compiled with
and without compaction (bench/decoding.py); compile time, the captions after which compiling
repays itself, and whether compiled texts equal eager ones (sampled, and greedy).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from rewrite.llama import Generator, ParallelInfo, generation, load_generator
from rewrite.llama.sampling import sample
from rewrite.prompts import SAMPLE_MODES, build_prompt, cut_rewrite
from testkit.tiny_llama import make_tiny_llama, train_tiny_llama

from bench.decoding import compare_decode
from bench.sharing import compare_sharing, pool_pairs

ADJ = ("red old small vintage wooden bright quiet snowy golden modern tiny rusty colorful empty busy "
       "ancient white dark sunny misty").split()
NOUN = ("dog cat bicycle boat house bridge car tree lighthouse train horse church market garden castle "
        "kitchen beach mountain street cafe").split()
PLACE = ["in the park", "by the river", "on a hill", "near the old town", "at the harbor", "in the city center",
         "along the coast", "in a small village", "under the bridge", "next to the lake"]
TIME = ["sunrise", "sunset", "night", "noon", "a rainy afternoon", "winter", "early morning", "a summer evening"]
VERB = ["standing", "resting", "waiting", "sitting", "shining", "sleeping"]
SITE = ["stock photo", "free image", "royalty free picture", "wallpaper", "photo", "hd image"]


def synthetic_pair(rng: random.Random) -> tuple[str, str]:
    """An alt-text style caption and a fluent rewrite of it (four shapes of varying length)."""
    a, a2, n, p, t, v, s = (rng.choice(x) for x in (ADJ, ADJ, NOUN, PLACE, TIME, VERB, SITE))
    form = rng.randrange(4)
    if form == 0:
        return f"{a} {n} {p} at {t}", f"A {a} {n} is {v} quietly {p}, softly lit by the light of {t}."
    if form == 1:
        return (f"{s} of {a} {n} {p} {rng.randrange(1990, 2024)}",
                f"This picture shows a {a} {n} {v} {p}, with a {a2} sky above it at {t}.")
    if form == 2:
        return f"{n} {p} - {a} and {a2}", f"A {a} and {a2} {n} can be seen {v} {p} as the day turns to {t}."
    return f"{a} {n}, {t}, {s}", f"At {t}, a {a} {n} is {v} {p}, surrounded by {a2} colors and calm air."


@torch.inference_mode()
def meta_schedule(gen: Generator, prompts: list[list[int]], max_gen_len: int, temperature: float,
                  top_p: float, cache: list) -> list[list[int]]:
    """Meta's LLaMA-v1 generate loop, batch by batch in file order (the baseline)."""
    model, out = gen.model, []
    for b in range(0, len(prompts), gen.max_batch_size):
        batch = prompts[b:b + gen.max_batch_size]
        bsz, lo, hi = len(batch), min(map(len, batch)), max(map(len, batch))
        total = min(gen.max_seq_len, max_gen_len + hi)
        tokens = torch.full((bsz, total), -1, dtype=torch.long)
        for i, p in enumerate(batch):
            tokens[i, :len(p)] = torch.tensor(p)
        is_prompt = tokens != -1
        tokens[~is_prompt] = 0
        view = [(k[:bsz], v[:bsz]) for k, v in cache]  # the model-wide max_batch x max_seq_len cache
        prev = 0
        for cur in range(lo, total):
            logits = model(tokens[:, prev:cur], cache=view, start=prev, last_only=True)
            if temperature > 0:  # Meta: top-p then torch.multinomial on the global generator
                probs = torch.softmax(logits / temperature, -1)
                p_sorted, idx = probs.sort(-1, descending=True)
                p_sorted[p_sorted.cumsum(-1) - p_sorted > top_p] = 0.0
                nxt = idx.gather(-1, torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1))[:, 0]
            else:
                nxt = sample(logits, 0.0, top_p, None)
            tokens[:, cur] = torch.where(is_prompt[:, cur], tokens[:, cur], nxt)
            prev = cur
        out += [tokens[i, len(p):len(p) + max_gen_len].tolist() for i, p in enumerate(batch)]
    return out


def cut_at(ids: list[int], stops: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stops:
            return ids[:j]
    return ids


def count_forwards(model: torch.nn.Module) -> list[int]:
    """Wrap model.forward; the returned list counts [calls, multi-column calls, rows x columns fed,
    rows x key columns attended by 1-column calls (the K/V a decode step reads)]."""
    counts = [0, 0, 0, 0]
    forward = model.forward

    def counted(tokens, *a, **k):
        counts[0] += 1
        counts[1] += tokens.shape[1] > 1
        counts[2] += tokens.numel()
        if tokens.shape[1] == 1:
            counts[3] += tokens.shape[0] * (k.get("start", a[3] if len(a) > 3 else 0) + 1)
        return forward(tokens, *a, **k)

    model.forward = counted
    return counts


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    res = fn()
    return res, time.process_time() - c0, time.perf_counter() - w0


def compare(name: str, gen: Generator, prompts: list[list[int]], max_gen_len: int, temperature: float,
            stop: bool) -> list[str]:
    """Run both engines, print captions/s and the ratio; returns our texts."""
    cache = gen.model.new_cache(gen.max_batch_size, gen.max_seq_len, gen.device, gen.dtype)
    seeds = list(range(len(prompts)))
    torch.manual_seed(1)
    calls = count_forwards(gen.model)
    base, base_cpu, base_wall = timed(lambda: meta_schedule(gen, prompts, max_gen_len, 0.9, 0.95, cache))
    base_calls, calls[:] = list(calls), [0, 0, 0, 0]
    ours, ours_cpu, ours_wall = timed(lambda: gen.generate(prompts, max_gen_len, temperature, 0.95, seeds, stop))
    ours_calls = list(calls)
    del gen.model.forward  # back to the class's method
    n, tok = len(prompts), gen.tokenizer
    lens = sorted(len(o) for o in ours)
    print(f"[{name}] {n} captions, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"ours generated {sum(lens)} tokens (per caption median {lens[n // 2]}, max {lens[-1]})")
    print(f"  baseline (Meta v1 schedule): {n / base_cpu:8.1f} captions/s CPU   ({n / base_wall:.1f} wall)")
    print(f"  ours                       : {n / ours_cpu:8.1f} captions/s CPU   ({n / ours_wall:.1f} wall)")
    print(f"  ratio ours/baseline        : {base_cpu / ours_cpu:8.2f}x CPU      ({base_wall / ours_wall:.2f}x wall)")
    print(f"  forward passes             : baseline {base_calls[0]} (all 1-column but the first per batch), "
          f"ours {ours_calls[0]} ({ours_calls[1]} prefills); rows x columns fed: baseline {base_calls[2]}, "
          f"ours {ours_calls[2]}")
    if stop:
        ended = sum(1 for b in base if tok.newline_ids & set(b))
        print(f"  baseline completions with a newline within {max_gen_len} tokens: {ended}/{n}")
    return [cut_rewrite(tok.decode(o)) for o in ours]


# (name, generation.COMPACT_BELOW): 0 is never reached, so finished rows are never dropped.
ABLATION = (("full engine", generation.COMPACT_BELOW),
            ("no compaction", 0.0))


def percentiles(xs: list[int], qs=(0, 10, 25, 50, 75, 90, 99, 100)) -> str:
    xs = sorted(xs)
    return ", ".join(f"p{q} {xs[min(len(xs) - 1, q * len(xs) // 100)]}" for q in qs)


def ablation(gen: Generator, prompts: list[list[int]], max_gen_len: int, batch_sizes: list[int],
             repeats: int) -> None:
    """Time ABLATION's variants on the same prompts; check they write the same texts."""
    try:
        for bs in batch_sizes:
            gen.max_batch_size = bs
            batch = prompts[:8 * bs]
            n, seeds = len(batch), list(range(len(batch)))
            texts, work, cpu = {}, {}, {name: [] for name, _ in ABLATION}
            for name, compact in ABLATION:  # an untimed run per variant: texts, forward passes
                generation.COMPACT_BELOW = compact
                calls = count_forwards(gen.model)
                texts[name] = gen.generate(batch, max_gen_len, 0.9, 0.95, seeds)
                del gen.model.forward
                work[name] = calls[0] - calls[1], calls[3]
            for _ in range(repeats):
                for name, compact in ABLATION:
                    generation.COMPACT_BELOW = compact
                    cpu[name].append(timed(lambda: gen.generate(batch, max_gen_len, 0.9, 0.95, seeds))[1])
            lens = [len(o) for o in texts[ABLATION[0][0]]]
            print(f"[ablation, trained, batch {bs}] {n} captions, prompts {min(map(len, batch))}-"
                  f"{max(map(len, batch))} tokens; completion tokens {percentiles(lens)}, "
                  f"{sum(x == max_gen_len for x in lens)} reach --max_gen_len {max_gen_len}")
            full = ABLATION[0][0]
            for name, _ in ABLATION:
                ratios = sorted(t / f for t, f in zip(cpu[name], cpu[full]))  # paired: rounds ran back to back
                same = sum(a == b for a, b in zip(texts[name], texts[full]))
                print(f"  {name:15s}: {n / min(cpu[name]):6.1f} captions/s CPU; "
                      f"full/this {ratios[repeats // 2]:.3f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}); "
                      f"{work[name][0]} decode steps reading {work[name][1]} row x key columns; "
                      f"texts as the full engine's: {same}/{n}")
    finally:
        generation.COMPACT_BELOW = ABLATION[0][1]


def sharing(a: argparse.Namespace, pool: list[tuple[str, str]], captions: list[str]) -> None:
    captions = captions + [synthetic_pair(random.Random(i))[0] for i in range(len(captions), a.sharing_n)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = train_tiny_llama(Path(tmp) / "trained", pool + [p for m in SAMPLE_MODES for p in pool_pairs(m)],
                                   build_prompt, steps=a.train_steps)
        print(f"trained the tiny model (dim 64, 2 layers; synthetic and shipped pairs) in "
              f"{time.perf_counter() - t0:.0f} s")
        gen = load_generator(str(trained), None, a.max_seq_len, 100, ParallelInfo.single(torch.device("cpu")))
        for mode in (m for m in a.modes.split(",") if m):
            compare_sharing(gen, mode, captions[:a.sharing_n], a.max_gen_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="captions to rewrite")
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--max_seq_len", type=int, default=400)
    ap.add_argument("--max_gen_len", type=int, default=77)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on shared cores)")
    ap.add_argument("--train_steps", type=int, default=300)
    ap.add_argument("--ablation", action="store_true", help="only the schedule ablation (trained model)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per ablation variant")
    ap.add_argument("--sharing", action="store_true", help="only prefix sharing on vs off (shipped pools)")
    ap.add_argument("--decode", action="store_true", help="only eager vs compiled decode (trained model)")
    ap.add_argument("--sharing_n", type=int, default=400, help="captions per pool (--sharing)")
    ap.add_argument("--modes", default=",".join(SAMPLE_MODES), help="shipped pools (--sharing)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    pool = [synthetic_pair(rng) for _ in range(400)]
    captions = [synthetic_pair(rng)[0] for _ in range(800 if a.ablation else a.n)]
    texts = [build_prompt(random.Random(i).sample(pool, 3), c) for i, c in enumerate(captions)]
    if a.sharing:
        return sharing(a, pool, captions)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trained = train_tiny_llama(Path(tmp) / "trained", pool, build_prompt, steps=a.train_steps)
        print(f"trained the tiny model (dim 64, 2 layers) in {time.perf_counter() - t0:.0f} s")
        if a.decode:
            gen = load_generator(str(trained), None, a.max_seq_len, a.max_batch_size,
                                 ParallelInfo.single(torch.device("cpu")))
            prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]
            cache = gen.model.new_cache(a.max_batch_size, a.max_seq_len, gen.device, gen.dtype)
            compare_decode(gen, prompts, lambda g, p, temp: meta_schedule(g, p, a.max_gen_len, temp, 0.95, cache),
                           a.repeats)
            return
        if a.ablation:
            gen = load_generator(str(trained), str(trained / "tokenizer.model"), a.max_seq_len, 100,
                                 ParallelInfo.single(torch.device("cpu")))
            prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]
            ablation(gen, prompts, a.max_gen_len, [16, 100], a.repeats)
            return
        rand = make_tiny_llama(Path(tmp) / "random", texts[:64], dim=64, n_layers=2, n_heads=4)
        for name, d in (("random", rand), ("trained", trained)):
            gen = load_generator(str(d), str(d / "tokenizer.model"), a.max_seq_len, a.max_batch_size,
                                 ParallelInfo.single(torch.device("cpu")))
            prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]
            if name == "random":
                gen.tokenizer.eos_ids = frozenset()  # never stop: both engines generate max_gen_len tokens
                compare("random weights, stop disabled", gen, prompts, a.max_gen_len, 0.9, stop=False)
            else:
                ours = compare("trained, stop at newline", gen, prompts, a.max_gen_len, 0.9, stop=True)
                print("  e.g.", captions[0], "=>", ours[0])
        k = min(32, a.n)  # greedy: both engines must write the same rewrites
        stops = gen.tokenizer.newline_ids | gen.tokenizer.eos_ids
        base = meta_schedule(gen, prompts[:k], a.max_gen_len, 0.0, 0.95, gen.model.new_cache(
            a.max_batch_size, a.max_seq_len, gen.device, gen.dtype))
        ours = gen.generate(prompts[:k], a.max_gen_len, 0.0, 0.95, list(range(k)))
        same = sum(cut_at(b, stops) == o for b, o in zip(base, ours))
        print(f"greedy check: {same}/{k} rewrites identical between the two engines")


if __name__ == "__main__":
    main()
