"""Meta -> Hugging Face conversion for vLLM (rewrite.llama.export_hf), against copying the same
bytes (the I/O floor), in the same run.

A synthetic Meta folder shaped like LLaMA-3.2-1B's layers (dim 2048, 16 layers, 32 query and 8
key/value heads, FFN 8192; a tiny SentencePiece vocabulary, so ~0.97B parameters) in bf16, split
into 2 model-parallel shards, is converted in a child process; its wall time and peak anonymous
memory (sampled from /proc every 20 ms: the memory-mapped shards' pages are page cache, not the
converter's) are printed beside a plain copy of the shards. Sizes are flags (--help).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rewrite.llama import export_hf
from rewrite.llama.model import ModelArgs, Transformer
from testkit.tiny_llama import TINY_TEXTS, train_tokenizer


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n_layers", type=int, default=16)
    p.add_argument("--n_heads", type=int, default=32)
    p.add_argument("--n_kv_heads", type=int, default=8)
    p.add_argument("--mp", type=int, default=2, help="model-parallel shards of the synthetic folder")
    p.add_argument("--max_file_gb", type=float, default=4.0, help="largest output safetensors file")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed after)")
    p.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "MAX_BYTES"), help=argparse.SUPPRESS)
    return p


def make_folder(out: Path, a: argparse.Namespace) -> int:
    """params.json, tokenizer.model and mp shards of random bf16 weights; returns their bytes."""
    out.mkdir(parents=True)
    import sentencepiece as spm
    proto = train_tokenizer(TINY_TEXTS, 384)
    vocab = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    if vocab % a.mp:  # the output projection's rows split over the shards
        proto = train_tokenizer(TINY_TEXTS, vocab - vocab % a.mp)
        vocab = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    (out / "tokenizer.model").write_bytes(proto)
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-5, "vocab_size": -1}
    (out / "params.json").write_text(json.dumps(params))
    args = ModelArgs(**{**params, "vocab_size": vocab})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args, a.mp).state_dict().items()}
    for s in range(a.mp):  # each shard made and saved alone: the full model is never in memory
        shard = {k: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02) for k, shape in shapes.items()}
        torch.save(shard, out / f"consolidated.{s:02d}.pth")
        del shard
    return sum(p.stat().st_size for p in out.glob("consolidated.*.pth"))


def child(src: str, out: str, max_bytes: str) -> None:
    """Convert, sampling RssAnon; print one JSON line."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            done.wait(0.02)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    export_hf(src, out, max_file_bytes=int(max_bytes))
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    print(json.dumps({"seconds": seconds, "peak_anon_bytes": peak[0]}))


def main(argv: list[str] | None = None) -> None:
    a = get_args_parser().parse_args(argv)
    if a.child:
        return child(*a.child)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        src = work / "meta"
        start = time.perf_counter()
        size = make_folder(src, a)
        print(f"synthetic Meta folder: {size / 1e9:.2f} GB in {a.mp} shards, made in "
              f"{time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        (work / "copy").mkdir()
        for p in sorted(src.glob("consolidated.*.pth")):
            shutil.copyfile(p, work / "copy" / p.name)
        copy_s = time.perf_counter() - start
        shutil.rmtree(work / "copy")
        run = subprocess.run([sys.executable, "-m", "bench.bench_convert", "--child", str(src), str(work / "hf"),
                              str(int(a.max_file_gb * 1e9))], check=True, capture_output=True, text=True)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        files = sorted(p.name for p in (work / "hf").glob("*.safetensors"))
        print(f"copy of the shards: {copy_s:.1f} s ({size / 1e9 / copy_s:.2f} GB/s)")
        print(f"export_hf: {got['seconds']:.1f} s ({size / 1e9 / got['seconds']:.2f} GB/s), "
              f"{got['seconds'] / copy_s:.2f}x the copy; peak anonymous memory "
              f"{got['peak_anon_bytes'] / 1e9:.2f} GB; {len(files)} safetensors file(s)")
    finally:
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
