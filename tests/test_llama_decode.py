"""The decode step (rewrite/llama/decode.py): fused projections, host reads every k steps, and the
compiled step against the eager one at MP 1 and 2, with compaction and prefix sharing.

torch.compile on this CPU takes 20 s or more per graph, so the compiled tests are few, tiny,
float64 (sampled texts equal exactly), and slow-marked; each process compiles one graph (greedy
and sampled runs share it).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testkit.net import free_port

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red old small vintage wooden dog cat boat house bridge car tree park river town harbor night".split()
HEADER = "write image captions differently, "


def make_case(root: Path) -> tuple[Path, list[str]]:
    """A tiny LLaMA and 400 prompts that share a header and one of a few example blocks (prefix
    sharing has work to do) before a caption of their own."""
    rng = random.Random(0)
    caption = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 9)))  # noqa: E731
    blocks = [" ".join(f"{caption()} => {caption()}." for _ in range(3)) for _ in range(4)]
    prompts = [f"{HEADER}{rng.choice(blocks)} {caption()} =>" for _ in range(400)]
    from testkit.tiny_llama import make_tiny_llama
    return make_tiny_llama(root / "m", prompts[:60], dim=32, n_layers=1, n_heads=4, vocab_size=300), prompts


def with_stops(gen, prompts: list[list[int]]) -> None:
    """Tokens the model emits often play newline and EOS, enough of them that about two rows in
    three stop early, at different steps: finished rows are compacted."""
    gen.tokenizer.eos_ids, gen.tokenizer.newline_ids, gen.tokenizer.newline_kept = frozenset(), frozenset(), frozenset()
    free = gen.generate(prompts[:50], 12, 0.9, 0.95, list(range(len(prompts[:50]))))
    counts: dict[int, int] = {}
    for seq in free:
        for t in set(seq[2:]):
            counts[t] = counts.get(t, 0) + 1
    stops: set[int] = set()
    for t in sorted(counts, key=lambda t: (-counts[t], t)):
        if sum(bool(stops & set(seq[2:])) for seq in free) >= 2 * len(free) // 3:
            break
        stops.add(t)
    nl = min(stops)
    gen.tokenizer.eos_ids, gen.tokenizer.newline_ids = frozenset(stops - {nl}), frozenset({nl})


def test_fused_projections_keep_the_checkpoint(tmp_path):
    from rewrite.llama import ParallelInfo, load_model, load_tokenizer
    from rewrite.llama.model import unfuse_projections
    d, prompts = make_case(tmp_path)
    tok = load_tokenizer(str(d / "tokenizer.model"), str(d))
    model = load_model(str(d), tok, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)
    stored = torch.load(d / "consolidated.00.pth")
    state = model.state_dict()
    assert set(state) == set(stored) - {"rope.freqs"}  # the checkpoint's names, nothing derived
    for k, v in state.items():
        assert torch.equal(v, stored[k].double()), k
    att = model.layers[0].attention
    assert att.wqkv is not None and att.wk.weight.untyped_storage().data_ptr() == att.wqkv.untyped_storage().data_ptr()
    tokens = torch.tensor([tok.encode(p, bos=True, eos=False)[:20] for p in prompts[:3]])

    def step(m):  # a prefill, then a decode step: the fused weights serve one-token calls
        cache = m.new_cache(3, 20, torch.device("cpu"), torch.float64)
        m(tokens[:, :19], cache=cache)
        return m(tokens[:, 19:], cache=cache, start=19)
    with torch.inference_mode():
        fused = step(model)
        plain = step(unfuse_projections(model))
    torch.testing.assert_close(fused, plain)


def test_reading_tokens_every_few_steps_changes_nothing(tmp_path):
    from rewrite.llama import ParallelInfo, load_generator
    from rewrite.llama.decode import batch_bucket
    d, texts = make_case(tmp_path)
    gen = load_generator(str(d), None, 256, 16, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts[:48]]
    with_stops(gen, prompts)
    want = gen.generate(prompts, 12, 0.9, 0.95, list(range(48)))
    gen.decoder.sync_every = 5  # finished rows run a few steps more; their tokens are not kept
    assert gen.generate(prompts, 12, 0.9, 0.95, list(range(48))) == want
    assert any(len(w) < 12 for w in want) and gen.decoder.compactions
    assert [batch_bucket(n, 100) for n in (1, 3, 5, 8, 9, 17, 99, 100)] == [1, 4, 8, 8, 16, 24, 100, 100]


def test_the_compile_flag_reaches_the_decode_step(tmp_path, monkeypatch, capsys):
    """--compile through the CLI: the step goes through torch.compile (a spy that returns it as is,
    so no compile time here) and the texts are the uncompiled run's."""
    from conftest import REWRITE_PAIRS, make_tiny_rewrite_setup
    from rewrite import llama_rewrite
    setup = make_tiny_rewrite_setup(tmp_path, ["a dog on a boat", "two red cars"], REWRITE_PAIRS)
    src = tmp_path / "src.txt"
    src.write_text("a dog on a boat\ntwo red cars\nold bridge\n")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    outs = []
    for flag in (False, True):
        out = tmp_path / f"out{flag}.txt"
        llama_rewrite.main(**setup, prompt_filename=str(src), output_filename=str(out), max_seq_len=256,
                           max_gen_len=6, max_batch_size=2, compile=flag)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and compiled == [{"mode": None}]
    assert "decode step compiled: 0 graphs" in capsys.readouterr().out


def run_both(gen, prompts: list[list[int]]) -> dict:
    """Eager, then compiled with the same weights: texts sampled over two calls of 200 captions
    (batch 100), then greedy over 100, and the graphs compiled after each call."""
    from rewrite.llama import Generator
    compiled = Generator(gen.model, gen.tokenizer, gen.max_seq_len, 100, gen.parallel, compile=True)
    out: dict = {"compiles": []}
    for temperature, calls in ((0.9, (prompts[:200], prompts[200:])), (0.0, (prompts[:100],))):
        for name, g in (("eager", gen), ("compiled", compiled)):
            texts = []
            for half in calls:
                texts += g.generate(half, 12, temperature, 0.95, list(range(len(texts), len(texts) + len(half))))
                if name == "compiled":
                    out["compiles"].append(g.stats["compiles"])
            out[name, temperature] = texts
    out["compactions"], out["stats"] = compiled.decoder.compactions, compiled.stats
    return out


def check(out: dict) -> None:
    assert out["eager", 0.9] == out["compiled", 0.9]
    assert out["eager", 0.0] == out["compiled", 0.0]
    # one graph, greedy and sampled, collectives included (MP 2): compaction, prefix sharing and new
    # prompt lengths recompile nothing
    assert out["compiles"] == [1, 1, 1], out["compiles"]
    assert out["compactions"] > 0 and out["stats"]["prefill_tokens"] < out["stats"]["prompt_tokens"]
    assert any(len(t) < 12 for t in out["compiled", 0.9]) and any(len(t) == 12 for t in out["compiled", 0.9])


@pytest.mark.slow
def test_compiled_step_matches_eager_one_process(tmp_path, one_thread):
    from rewrite.llama import ParallelInfo, load_generator
    d, texts = make_case(tmp_path)
    gen = load_generator(str(d), None, 256, 100, ParallelInfo.single(torch.device("cpu")), dtype=torch.float64)
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    with_stops(gen, prompts)
    check(run_both(gen, prompts))


def worker(root: str) -> None:
    from rewrite.launch import setup_parallel, teardown_parallel
    from rewrite.llama import load_generator
    d = Path(root) / "mp2"
    info = setup_parallel(str(d), device="cpu")
    gen = load_generator(str(d), str(Path(root) / "m" / "tokenizer.model"), 256, 100, info, dtype=torch.float64)
    texts = (Path(root) / "prompts.txt").read_text().splitlines()
    prompts = [gen.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    with_stops(gen, prompts)
    torch.save(run_both(gen, prompts), Path(root) / f"rank{info.rank}.pt")
    torch.distributed.barrier()
    teardown_parallel()


@pytest.mark.slow
def test_compiled_step_matches_eager_two_processes(tmp_path):
    from testkit.tiny_llama import make_tiny_llama
    d, texts = make_case(tmp_path)
    state = {k: v.float() for k, v in torch.load(d / "consolidated.00.pth").items() if k != "rope.freqs"}
    make_tiny_llama(tmp_path / "mp2", texts[:60], dim=32, n_layers=1, n_heads=4, vocab_size=300, mp=2,
                    state_dict=state)
    (tmp_path / "prompts.txt").write_text("\n".join(texts))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for out in ranks:
        check(out)
    assert ranks[0]["compiled", 0.9] == ranks[1]["compiled", 0.9]


if __name__ == "__main__":
    worker(sys.argv[1])
