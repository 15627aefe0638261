"""Caption-rewriting throughput: our LLaMA engine vs the LLaMA-v1 example schedule, and our
engine with prefix sharing on vs off.

    python -m bench.bench_rewrite                 # 256 captions, batch 16, 1 torch thread; sharing at batch 100
    python -m bench.bench_rewrite --n 128 --max_batch_size 8 --part schedule
    python -m bench.bench_rewrite --part sharing --sharing_n 400 --modes chatgpt,mscoco

Both engines run the same tiny model (float32, CPU) on the same in-context
prompts (3 example pairs + caption, FORMATS.md section 4, built with
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

Prefix sharing (--part sharing): the trained model rewrites --sharing_n synthetic captions
at batch 100 with LaCLIP's prompts built as the CLI builds them (rewrite/prompts.py: the
shipped pools of --modes, examples and sampling seed per line from --seed 1), one engine
call per 4 batches as the CLI's commit window does, sharing off then on: prompt columns
actually prefilled (rows x columns, padding included), prefill and total CPU time,
captions/s, and how many rewrites are identical (float32: equal up to rounding).
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from rewrite.llama import Generator, ParallelInfo, load_generator
from rewrite.llama.generation import sample
from rewrite.prompts import SAMPLE_MODES, build_prompt, choose_examples, cut_rewrite, load_pool, sampling_seed
from testkit.tiny_llama import make_tiny_llama, train_tiny_llama

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
    """Wrap model.forward; the returned list counts [calls, multi-column calls, rows x columns fed]."""
    counts = [0, 0, 0]
    forward = model.forward

    def counted(tokens, *a, **k):
        counts[0] += 1
        counts[1] += tokens.shape[1] > 1
        counts[2] += tokens.numel()
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
    base_calls, calls[:] = list(calls), [0, 0, 0]
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


def run_schedule(a, tmp: Path, trained: Path, pool: list, captions: list[str]) -> None:
    texts = [build_prompt(random.Random(i).sample(pool, 3), c) for i, c in enumerate(captions)]
    rand = make_tiny_llama(tmp / "random", texts[:64], dim=64, n_layers=2, n_heads=4)
    for name, d in (("random", rand), ("trained", trained)):
        gen = load_generator(str(d), None, a.max_seq_len, a.max_batch_size, ParallelInfo.single(torch.device("cpu")))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="captions to rewrite (schedule comparison)")
    ap.add_argument("--max_batch_size", type=int, default=16, help="batch of the schedule comparison")
    ap.add_argument("--max_seq_len", type=int, default=400)
    ap.add_argument("--max_gen_len", type=int, default=77)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on shared cores)")
    ap.add_argument("--train_steps", type=int, default=300)
    ap.add_argument("--part", choices=("all", "schedule", "sharing"), default="all")
    ap.add_argument("--sharing_n", type=int, default=400, help="captions per pool (sharing comparison)")
    ap.add_argument("--sharing_batch", type=int, default=100, help="batch of the sharing comparison")
    ap.add_argument("--modes", default=",".join(SAMPLE_MODES), help="shipped pools for the sharing comparison")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(0)
    pool = [synthetic_pair(rng) for _ in range(400)]
    captions = [synthetic_pair(rng)[0] for _ in range(max(a.n, a.sharing_n))]
    modes = [m for m in a.modes.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()  # the shipped pools' text is in its training set, so it tokenizes well
        trained = train_tiny_llama(Path(tmp) / "trained", pool + [p for m in SAMPLE_MODES for p in pool_pairs(m)],
                                   build_prompt, steps=a.train_steps)
        print(f"trained the tiny model (dim 64, 2 layers) in {time.perf_counter() - t0:.0f} s")
        if a.part in ("all", "schedule"):
            run_schedule(a, Path(tmp), trained, pool, captions[:a.n])
        if a.part in ("all", "sharing"):
            gen = load_generator(str(trained), None, a.max_seq_len, a.sharing_batch,
                                 ParallelInfo.single(torch.device("cpu")))
            for mode in modes:
                compare_sharing(gen, mode, captions[:a.sharing_n], a.max_gen_len)


if __name__ == "__main__":
    main()
