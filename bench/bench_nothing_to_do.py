"""A rewriting run with nothing to do (its output's only unit held by another live run) on
LLaMA-7B-sized Hugging Face folders: how long it takes to say so and end (from the call of the
rewriter's CLI to its return, in a fresh process; a run that loads the model builds it in
float32 on a CPU from sparse files, so the disk is not what is measured).

The folders hold LLaMA-7B's shapes (dim 4096, 11008 hidden, 32 heads) with N layers, and
sparse model.safetensors files of the right size (a real header, zero-filled tensors made with
truncate: no disk space). The vocabulary is the tiny test tokenizer's (a few hundred rows, not
32000: 0.52 GB less than LLaMA-7B at 32 layers). --layers takes several sizes, to show whether
the time depends on the model's size; --repo times another copy of the code (the rewriter as it
was before a change: `git archive COMMIT | tar -x -C DIR`). Each run has a cache of its own
($LACLIP_CACHE), empty: a machine that has never read these weights, the worst case for a code
that takes their identity first. The files are sparse, so such reads cost seeks in the page
cache, not the disk's: a real first read of sampled blocks is slower. A run that loads the model needs
float32 room in memory (0.81 GB per layer): 32 layers need ~27 GB.

    python -m bench.bench_nothing_to_do [--layers 1 4 32] [--repeats 3] [--repo DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HF_LAYER = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (4096, 4096),
            "self_attn.v_proj.weight": (4096, 4096), "self_attn.o_proj.weight": (4096, 4096),
            "mlp.gate_proj.weight": (11008, 4096), "mlp.up_proj.weight": (11008, 4096),
            "mlp.down_proj.weight": (4096, 11008), "input_layernorm.weight": (4096,),
            "post_attention_layernorm.weight": (4096,)}


def sparse_hf_folder(folder: Path, n_layers: int, vocab: int) -> int:
    """config.json + a sparse fp16 model.safetensors of LLaMA-7B's shapes; returns its size."""
    shapes = {"model.embed_tokens.weight": (vocab, 4096), "model.norm.weight": (4096,),
              "lm_head.weight": (vocab, 4096)}
    for i in range(n_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in HF_LAYER.items()})
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": n_layers,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "vocab_size": vocab, "torch_dtype": "float16"}))
    return path.stat().st_size


CHILD = """
import sys, time, json
from common.locking import FileLock
from rewrite import llama_rewrite
out = sys.argv[1]
with FileLock(__import__("pathlib").Path(out), "a first run"):
    t0 = time.perf_counter()
    rc = llama_rewrite.cli(sys.argv[2:])
    seconds = time.perf_counter() - t0
print(json.dumps({"rc": rc, "seconds": seconds}))
"""


def one_run(repo: Path, root: Path, ckpt: Path, tok: Path, src: Path, k: int) -> dict:
    out = root / f"out{k}.txt"
    flags = {"ckpt_dir": ckpt, "tokenizer_path": tok, "prompt_filename": src, "output_filename": out,
             "max_seq_len": 1024, "max_batch_size": 1}
    # a machine that never read these weights: nothing remembered of them (rewrite/weights_identity.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
           "LACLIP_CACHE": str(root / f"cache-{ckpt.name}-{k}")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), *(f"--{a}={v}" for a, v in flags.items())],
                          capture_output=True, text=True, env=env, cwd=repo)
    result = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    if result.get("rc") != 0:
        raise SystemExit(f"the run failed: {done.stderr[-2000:]}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[32], help="LLaMA-7B has 32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                   help="the copy of the code to time (default: this one)")
    args = p.parse_args(argv)
    from testkit.tiny_llama import make_tiny_llama
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captions = ["a dog on a beach", "two cups of tea"]
        tiny = make_tiny_llama(root / "tiny", captions + ["write image captions differently, =>"], dim=32,
                               n_layers=1, n_heads=2, vocab_size=300)
        from rewrite.llama import load_tokenizer
        vocab = load_tokenizer(str(tiny / "tokenizer.model")).n_words
        src = root / "src.txt"
        src.write_text("".join(f"{c}\n" for c in captions))
        for n in args.layers:
            ckpt = root / f"hf{n}"
            size = sparse_hf_folder(ckpt, n, vocab)
            runs = [one_run(args.repo.resolve(), root, ckpt, tiny / "tokenizer.model", src, k) for k in range(args.repeats)]
            secs = sorted(r["seconds"] for r in runs)
            print(f"{n} layers, {size / 1e9:.2f} GB of weights: run {secs[0]:.2f}-{secs[-1]:.2f} s "
                  f"(median {secs[len(secs) // 2]:.2f}) [{args.repo}]", flush=True)
            (ckpt / "model.safetensors").unlink()


if __name__ == "__main__":
    main()
