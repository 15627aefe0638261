"""One GPU, one command: the CUDA tests, then LLaMA-7B-shaped rewriting throughput with prefix
sharing off and on.

    python -m bench.gpu_check                  # on a machine with a GPU (~5 min on one H100-class GPU)
    python -m bench.gpu_check --tiny           # the same logic on the CPU with a tiny shape, no tests
    python -m bench.gpu_check --skip_tests --n 1600 --batch 200

Throughput: a random-weight model with LLaMA-7B's shapes (dim 4096, 32 layers, 32 heads,
vocabulary 32000, SwiGLU 11008) in fp16 on one GPU, at LaCLIP's settings: batch 100,
temperature 0.9, top-p 0.95, max_gen_len 77, windows of 4 batches per engine call as the CLI
hands them over. Prompts are LaCLIP-shaped token ids (~190 tokens): a fixed header, then 3 of
16 example pairs drawn per line exactly as rewrite/prompts.py draws them, then a caption.
Random weights never write a newline, so each row is made to stop at a length drawn from
its seed, 20-40 tokens (what LaCLIP's rewrites take). Reported per setting: captions/s,
prefill seconds and their share of the time (CUDA-synchronised), rows x columns prefilled,
and how many of the two settings' texts are identical (fp16: equal up to rounding).
Prints a table row for bench/README.md; with $OUT set, writes gpu_check.json there too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from bench.sharing import timed_prefill
from rewrite.llama import Generator, ModelArgs, ParallelInfo, Transformer, TokenizerBase
from rewrite.llama import generation
from rewrite.prompts import choose_examples, make_pool

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
          "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32)}


class IdTokenizer(TokenizerBase):
    """Token ids only: LLaMA's BOS 1, EOS 2, newline 13 (<0x0A>)."""

    def __init__(self, n_words: int):
        self.model_path, self.n_words, self.bos_id, self.eos_id = "(ids)", n_words, 1, 2
        self.eos_ids, self.newline_ids, self.newline_kept = frozenset({2}), frozenset({13}), frozenset()

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Weights drawn on the device, scaled so activations stay O(1) in fp16."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in fp16: 13.5 GB for 7B
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.startswith("tok_embeddings"):
                p.normal_(0, 1, generator=g)
            else:
                p.normal_(0, p.shape[1] ** -0.5 / (2 if name.endswith(("wo.weight", "w2.weight")) else 1), generator=g)
    return model.eval().requires_grad_(False)


def laclip_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """LaCLIP-shaped prompts: header (12 ids), 3 of 16 pairs of ~48 ids (chosen per line as the
    CLI chooses examples), a caption of 10-25 ids and ' =>' (2 ids): ~190 ids."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(100, vocab) for _ in range(k)]  # noqa: E731
    header = [1] + ids(11)
    pairs = [ids(rng.randint(8, 20)) + [3, 4] + ids(rng.randint(22, 38)) + [13, 13] + ids(4) for _ in range(16)]
    pool = make_pool(pairs=[[f"s{i}", f"t{i}"] for i in range(16)], origin="gpu_check")
    prompts = []
    for i in range(n):
        chosen = [int(s[1:]) for s, _ in choose_examples(pool, 1, "chatgpt", i)]
        prompts.append(header + [t for c in chosen for t in pairs[c]] + ids(rng.randint(10, 25)) + [3, 4])
    return prompts


@contextmanager
def forced_lengths(lo: int = 20, hi: int = 40):
    """While open, each row writes a newline after lo..hi tokens, the count drawn from its seed."""
    push = generation._Row.push

    def pushed(row, tok, stops):
        if not row.done and len(row.out) >= lo + row.seed % (hi - lo + 1):
            tok = 13
        push(row, tok, stops)

    generation._Row.push = pushed
    try:
        yield
    finally:
        generation._Row.push = push


def measure(gen: Generator, prompts: list[list[int]], share: bool, window: int) -> dict:
    gen.share_prefixes = share
    spent = timed_prefill(gen)
    before, out = gen.stats, []
    cuda = gen.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time  # as timed_prefill measures
    if cuda:
        torch.cuda.synchronize(gen.device)
    t0 = clock()
    for a in range(0, len(prompts), window):
        out += gen.generate(prompts[a:a + window], 77, 0.9, 0.95, list(range(a, a + len(prompts[a:a + window]))))
    if cuda:
        torch.cuda.synchronize(gen.device)
    seconds = clock() - t0
    del gen._prefill
    return {"captions_per_s": len(prompts) / seconds, "seconds": seconds, "prefill_s": spent[0],
            "prefill_share": spent[0] / seconds, "prefilled": gen.stats["prefill_tokens"] - before["prefill_tokens"],
            "generated": gen.stats["generated_tokens"] - before["generated_tokens"], "out": out}


def throughput(a) -> dict:
    device = torch.device("cpu" if a.tiny else "cuda")
    args = ModelArgs(**SHAPES["tiny" if a.tiny else "7b"])
    dtype = torch.float32 if a.tiny else torch.float16
    model = random_model(args, device, dtype)
    gen = Generator(model, IdTokenizer(args.vocab_size), 512, a.batch, ParallelInfo.single(device))
    prompts = laclip_prompts(a.n, args.vocab_size)
    window = 4 * a.batch
    with forced_lengths():
        measure(gen, prompts[:a.batch], True, window)  # warm-up: kernels, allocator
        res = {share: measure(gen, prompts, share, window) for share in (False, True)}
    off, on = res[False], res[True]
    same = sum(x == y for x, y in zip(off.pop("out"), on.pop("out")))
    name = "CPU (--tiny)" if a.tiny else torch.cuda.get_device_name(device)
    summary = {"device": name, "shape": "tiny" if a.tiny else "LLaMA-7B", "dtype": str(dtype), "n": a.n,
               "batch": a.batch, "prompt_tokens": sum(map(len, prompts)) / a.n, "off": off, "on": on,
               "speedup": on["captions_per_s"] / off["captions_per_s"],
               "prefilled_ratio": on["prefilled"] / off["prefilled"], "identical": same}
    for k, r in (("off", off), ("on ", on)):
        print(f"sharing {k}: {r['captions_per_s']:8.1f} captions/s, prefill {r['prefill_s']:.2f} s = "
              f"{100 * r['prefill_share']:.0f}% of {r['seconds']:.2f} s, {r['prefilled']} rows x columns prefilled, "
              f"{r['generated']} tokens generated")
    print(f"| `gpu_check` | rewriting, {summary['shape']} shapes, random weights, {dtype}, batch {a.batch}, {a.n} "
          f"LaCLIP-shaped prompts ({summary['prompt_tokens']:.0f} tokens), stop after 20-40 tokens; prefix sharing "
          f"on vs off | off {off['captions_per_s']:.1f}, on {on['captions_per_s']:.1f} captions/s: "
          f"**{summary['speedup']:.2f}x**; prefilled columns {summary['prefilled_ratio']:.2f}x; prefill "
          f"{100 * off['prefill_share']:.0f}% -> {100 * on['prefill_share']:.0f}% of the time; texts identical "
          f"{same}/{a.n} | {name} | {time.strftime('%Y-%m')} | `python -m bench.gpu_check` |")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shape, no tests: checks this script's logic")
    ap.add_argument("--skip_tests", action="store_true")
    ap.add_argument("--n", type=int, default=800, help="captions per setting")
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args(argv)
    if a.tiny:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("gpu_check: no GPU visible; run with --tiny for the CPU dry run", file=sys.stderr)
        return 2
    rc = 0
    if not a.tiny and not a.skip_tests:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_llama_cuda.py"], cwd=ROOT).returncode
        print(f"CUDA tests: {'passed' if rc == 0 else f'FAILED (exit {rc})'}")
    summary = throughput(a)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps({**summary, "tests_rc": rc}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
