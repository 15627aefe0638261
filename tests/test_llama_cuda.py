"""The GPU path of the engine and the CLI (CUDA, fp16 / bf16, NCCL), which the other tests cannot reach.

The engine tests run on 'cpu' everywhere (so this file's code is itself exercised)
and on 'cuda' where a GPU is visible; the torchrun tests are collected once per visible GPU
count (1 and 2), and not at all on a machine without one.
On a GPU machine: `python -m pytest -q tests/test_llama_cuda.py` (about a minute).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewrite.llama import ParallelInfo, load_generator
from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama
from conftest import clean_dist_env

ROOT = Path(__file__).resolve().parents[1]
# The CUDA cases are collected only where a GPU is visible (nothing is skipped elsewhere).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GPU_PROCS = [n for n in (1, 2) if n <= torch.cuda.device_count()]
TEXTS = TINY_TEXTS[:5] + ["dog", "two cats", "a photo of a dog"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory) -> Path:
    """Two shards: every load below merges them on the target device."""
    return make_tiny_llama(tmp_path_factory.mktemp("cuda"), TINY_TEXTS, dim=32, n_layers=2, n_heads=4, mp=2, seed=1)


def gen_on(ckpt: Path, device: str, dtype: torch.dtype, batch: int = 3):
    return load_generator(str(ckpt), None, 48, batch,
                          ParallelInfo.single(torch.device(device)), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_tensors_live_on_the_device(ckpt2, device):
    """float64 on the device: masks, RoPE table, positions, cache and the sampling draws must all
    be made there (a CPU tensor among CUDA ones raises), and the texts equal the CPU's."""
    g = gen_on(ckpt2, device, torch.float64)
    assert {(p.device.type, p.dtype) for p in g.model.parameters()} == {(device, torch.float64)}
    ref = gen_on(ckpt2, "cpu", torch.float64, batch=1)
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
    seeds = list(range(len(prompts)))
    for temperature in (0.0, 0.9):
        got = g.generate(prompts, 12, temperature, 0.95, seeds, stop_at_newline=False)
        assert got == ref.generate(prompts, 12, temperature, 0.95, seeds, stop_at_newline=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 0.03), (torch.bfloat16, 0.15)])
def test_half_precision_padded_prefill(ckpt2, device, dtype, atol):
    """fp16 / bf16: left-padded prefill with the boolean mask (SDPA's masked kernels) and a cached
    decode step stay finite and close to float64 each-prompt-alone; generation runs."""
    g, ref = gen_on(ckpt2, device, dtype), gen_on(ckpt2, "cpu", torch.float64)
    assert {(p.device.type, p.dtype) for p in g.model.parameters()} == {(device, dtype)}
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS[:3]]
    P, dev = max(map(len, prompts)), torch.device(device)
    tokens = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p)
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)
    col = torch.arange(P + 1, device=dev)
    positions, valid = (col[None] - pad[:, None]).clamp(min=0), col[None] >= pad[:, None]
    with torch.inference_mode():
        cache = g.model.new_cache(len(prompts), P + 1, dev, dtype)
        last = g.model(tokens.to(dev), positions[:, :P], valid[:, :P], cache, 0, last_only=True)
        step = g.model(torch.full((len(prompts), 1), 7, device=dev), positions[:, P:], valid, cache, P,
                       last_only=True)
        assert last.dtype == torch.float32 and torch.isfinite(last).all() and torch.isfinite(step).all()
        for i, p in enumerate(prompts):
            alone = ref.model(torch.tensor([p + [7]]))[0]
            torch.testing.assert_close(last[i].cpu(), alone[-2], atol=atol, rtol=0)
            torch.testing.assert_close(step[i].cpu(), alone[-1], atol=atol, rtol=0)
    out = g.generate([g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS], 10, 0.9, 0.95,
                     list(range(len(TEXTS))))
    assert all(0 <= t < g.tokenizer.n_words for o in out for t in o)


@pytest.fixture(scope="module")
def hf_gqa(tmp_path_factory) -> Path:
    """A LLaMA-3-style Hugging Face folder: grouped-query attention, rope_theta 500000, bf16 weights,
    a byte-level BPE tokenizer.json."""
    from rewrite.llama import load_tokenizer
    from testkit.hf_llama import byte_bpe_tokenizer_json, llama_config, random_llama, write_hf
    root = tmp_path_factory.mktemp("hf_gqa")
    tok_file = byte_bpe_tokenizer_json(TINY_TEXTS * 4, 400, root / "tok")
    tok = load_tokenizer(str(tok_file))
    model = random_llama(llama_config("llama3", tok.n_words, tok.bos_id, tok.eos_id)).to(torch.bfloat16)
    return write_hf(model, root / "hf", [tok_file])


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_query_checkpoint_on_the_device(hf_gqa, device):
    """SDPA with shared key/value heads on the device: float64 texts equal the CPU's; the default
    dtype (bf16 weights: bf16 on a GPU that has it, float32 on the CPU) generates finite logits."""
    from rewrite.llama import default_dtype
    g, ref = gen_on(hf_gqa, device, torch.float64), gen_on(hf_gqa, "cpu", torch.float64, batch=1)
    prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
    for temperature in (0.0, 0.9):
        got = g.generate(prompts, 12, temperature, 0.95, list(range(len(prompts))), stop_at_newline=False)
        assert got == ref.generate(prompts, 12, temperature, 0.95, list(range(len(prompts))), stop_at_newline=False)
    dev = torch.device(device)
    g = load_generator(str(hf_gqa), None, 48, 3, ParallelInfo.single(dev))
    assert g.dtype == default_dtype(dev, torch.bfloat16)
    with torch.inference_mode():
        assert torch.isfinite(g.model(torch.tensor([prompts[0]], device=dev))).all()


def torchrun_cli(tmp_path: Path, ckpt: Path, nproc: int, **flags) -> subprocess.CompletedProcess:
    src = tmp_path / "src.txt"
    if not src.exists():
        src.write_text("".join(f"{t} {i}\n" for i in range(4) for t in TEXTS) + "\n" + TEXTS[0])
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"pairs": [[t, t.capitalize() + "."] for t in TINY_TEXTS[:4]]}))
    args = dict(ckpt_dir=ckpt, tokenizer_path=ckpt / "tokenizer.model", examples=pool, prompt_filename=src,
                max_seq_len=256, max_gen_len=8, max_batch_size=4, **flags)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "rewrite" / "llama_rewrite.py"), *(f"--{k}={v}" for k, v in args.items())]
    return subprocess.run(cmd, env={**clean_dist_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


if GPU_PROCS:  # defined only where there is a GPU to launch on
    @pytest.mark.slow
    @pytest.mark.parametrize("nproc", GPU_PROCS)
    def test_cli_under_torchrun_on_gpus(tmp_path, ckpt2, nproc):
        """NCCL group, fp16 by default, MP = nproc (the 2 shards merged on one GPU, or one per GPU):
        aligned output, one summary, a clean exit; and fp32 greedy text the same for MP=1 and MP=2."""
        out = tmp_path / "fp16.txt"
        done = torchrun_cli(tmp_path, ckpt2, nproc, output_filename=out, model_parallel_size=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "terminate called" not in done.stderr and done.stdout.count("done: ") == 1
        record = json.loads(out.with_name(out.name + ".progress.json").read_text())
        assert record["complete"] and record["fingerprint"]["settings"]["dtype"] == "fp16"
        assert len(out.read_text().split("\n")) - 1 == len(TEXTS) * 4 + 2
        greedy = {}
        for n in sorted({1, nproc}):
            path = tmp_path / f"fp32-mp{n}.txt"
            done = torchrun_cli(tmp_path, ckpt2, n, output_filename=path, model_parallel_size=n, dtype="fp32",
                                temperature=0)
            assert done.returncode == 0, done.stderr[-3000:]
            greedy[n] = path.read_bytes()
        assert greedy[nproc] == greedy[1]


if torch.cuda.is_available():  # CUDA graphs: defined only where there is a GPU
    def test_compiled_decode_step_with_cuda_graphs(ckpt2):
        """--compile on CUDA (mode="reduce-overhead"): float64 texts equal the eager ones, greedy and
        sampled (host reads every 4 steps); one graph for both; fp16 runs too."""
        device = "cuda"
        from rewrite.llama import Generator
        g = gen_on(ckpt2, device, torch.float64, batch=4)
        c = Generator(g.model, g.tokenizer, g.max_seq_len, 4, g.parallel, compile=True)
        prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
        seeds = list(range(len(prompts)))
        for temperature in (0.9, 0.0):
            want = g.generate(prompts, 12, temperature, 0.95, seeds)
            assert c.generate(prompts, 12, temperature, 0.95, seeds) == want
        assert c.stats["compiles"] == 1, c.stats
        h = gen_on(ckpt2, device, torch.float16, batch=4)
        hc = Generator(h.model, h.tokenizer, h.max_seq_len, 4, h.parallel, compile=True)
        out = hc.generate(prompts, 12, 0.9, 0.95, seeds)
        assert len(out) == len(prompts) and all(0 <= t < h.tokenizer.n_words for o in out for t in o)
