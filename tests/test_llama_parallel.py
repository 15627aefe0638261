"""Model parallel on 2 processes (torchrun, gloo, CPU) matches one process.

One launch checks: MP=2 from a 2-shard checkpoint, from a 1-shard one (each
rank cuts its half) and from a 4-shard one (each rank merges two): the same
logits, greedy and sampled tokens as MP=1 on one process, on both ranks; and
that ranks handed different seeds fail loudly instead of writing different text.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [11, 12, 13, 14, 15]


def run_all(ckpt: Path, parallel, dirs: dict[str, Path]) -> dict:
    """What both sides compute: per checkpoint, logits and generations."""
    from rewrite.llama import load_generator
    out = {}
    for name, d in dirs.items():
        g = load_generator(str(d), str(ckpt / "tokenizer.model"), 40, 2, parallel, dtype=torch.float64)
        prompts = [g.tokenizer.encode(t, bos=True, eos=False) for t in TEXTS]
        with torch.inference_mode():
            logits = g.model(torch.tensor([prompts[0]]))
        out[name] = {
            "logits": logits,
            "greedy": g.generate(prompts, 10, 0.0, 0.95, SEEDS, stop_at_newline=False),
            "sampled": g.generate(prompts, 10, 0.9, 0.95, SEEDS),
        }
    return out


TEXTS = ["a photo of a dog running on the beach", "two cats", "old wooden boat tied to the pier at sunrise",
         "aerial view", "person holding a cup of coffee in the morning"]


def worker(out_dir: str, ckpt_root: str) -> None:
    from rewrite.llama import load_generator, setup_parallel
    root = Path(ckpt_root)
    dirs = {f"mp{n}": root / f"mp{n}" for n in (1, 2, 4)}
    info = setup_parallel(str(dirs["mp2"]), device="cpu")
    res = run_all(dirs["mp1"], info, dirs)
    res["info"] = (info.rank, info.world_size, info.mp_size, info.mp_rank, info.dp_size, info.dp_rank,
                   info.is_writer)
    # Ranks that disagree on seeds must raise rather than silently diverge.
    g = load_generator(str(dirs["mp2"]), str(dirs["mp1"] / "tokenizer.model"), 40, 2, info)
    g.tokenizer.eos_id = -1  # no stop token: both ranks run the same number of steps
    prompt = [g.tokenizer.encode(TEXTS[0], bos=True, eos=False)]
    try:
        g.generate(prompt, 6, 0.9, 0.95, [100 + info.rank], stop_at_newline=False)
        res["diverged"] = "no error"
    except RuntimeError as e:
        res["diverged"] = str(e)
    torch.save(res, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer vanished mid-exchange
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_model_parallel_two_processes_match_one(tmp_path):
    from rewrite.llama import ParallelInfo, make_tiny_llama
    from rewrite.llama.tiny import TINY_TEXTS
    one = make_tiny_llama(tmp_path / "mp1", TINY_TEXTS, dim=32, n_heads=4, seed=4)
    state = {k: v.float() for k, v in torch.load(one / "consolidated.00.pth").items() if k != "rope.freqs"}
    for mp in (2, 4):
        make_tiny_llama(tmp_path / f"mp{mp}", TINY_TEXTS, dim=32, n_heads=4, mp=mp, state_dict=state)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(tmp_path), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    want = run_all(one, ParallelInfo.single(torch.device("cpu")), {"mp1": one})["mp1"]
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["info"] == (rank, 2, 2, rank, 1, 0, rank == 0)
        assert "model-parallel ranks generated different tokens" in res["diverged"]
        for name in ("mp1", "mp2", "mp4"):
            got = res[name]
            torch.testing.assert_close(got["logits"], want["logits"])
            assert got["greedy"] == want["greedy"], (rank, name)
            assert got["sampled"] == want["sampled"], (rank, name)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
