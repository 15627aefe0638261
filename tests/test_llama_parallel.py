"""Model parallel on 2 processes (torchrun, gloo, CPU) matches one process.

One launch checks: MP=2 from a 2-shard checkpoint, from a 1-shard one (each
rank cuts its half) and from a 4-shard one (each rank merges two): the same
logits, greedy and sampled tokens as MP=1 on one process, on both ranks; the
same logits, bit for bit, with fairscale's own ColumnParallelLinear /
RowParallelLinear / ParallelEmbedding in place of the engine's layers; and
that ranks handed different seeds fail loudly instead of writing different text.
In-process (one gloo process): the process group's timeout and the teardown.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testkit.net import free_port

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


def fairscale_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an MP>1 model whose parallel layers are fairscale's, holding the same rank-local
    weights (a shape mismatch would fail the copy): what Meta's code would run."""
    import copy

    from fairscale.nn.model_parallel import layers as fs

    from rewrite.llama.model import ParallelEmbedding, ParallelLinear, unfuse_projections
    twin, mp = unfuse_projections(copy.deepcopy(model)), model.model_parallel_size  # each layer its own matmul
    keep = lambda x: x  # noqa: E731  (no init: the weights are copied in)
    for name, mod in list(twin.named_modules()):
        w = getattr(mod, "weight", None)
        if isinstance(mod, ParallelEmbedding):
            new = fs.ParallelEmbedding(w.shape[0], w.shape[1] * mp, init_method=keep)
        elif isinstance(mod, ParallelLinear) and mod.kind == "row":
            new = fs.RowParallelLinear(w.shape[1] * mp, w.shape[0], bias=False, input_is_parallel=True,
                                       init_method=keep)
        elif isinstance(mod, ParallelLinear):
            new = fs.ColumnParallelLinear(w.shape[1], w.shape[0] * mp, bias=False,
                                          gather_output=mod.kind == "out", init_method=keep)
        else:
            continue
        new = new.to(w.dtype).requires_grad_(False)
        new.weight.copy_(w)
        parent, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, attr, new)
    return twin


def worker(out_dir: str, ckpt_root: str) -> None:
    from rewrite.launch import setup_parallel, teardown_parallel
    from rewrite.llama import load_generator
    root = Path(ckpt_root)
    dirs = {f"mp{n}": root / f"mp{n}" for n in (1, 2, 4)}
    info = setup_parallel(str(dirs["mp2"]), device="cpu")
    res = run_all(dirs["mp1"], info, dirs)
    g2 = load_generator(str(dirs["mp2"]), str(dirs["mp1"] / "tokenizer.model"), 40, 2, info, dtype=torch.float64)
    tokens = torch.tensor([g2.tokenizer.encode(t, bos=True, eos=False)[:5] for t in (TEXTS[0], TEXTS[2])])
    with torch.inference_mode():
        res["fairscale_equal"] = torch.equal(g2.model(tokens), fairscale_twin(g2.model)(tokens))
    res["info"] = (info.rank, info.world_size, info.mp_size, info.mp_rank, info.dp_size, info.dp_rank,
                   info.is_writer)
    # Ranks that disagree on seeds must raise rather than silently diverge.
    g = load_generator(str(dirs["mp2"]), str(dirs["mp1"] / "tokenizer.model"), 40, 2, info)
    g.tokenizer.eos_ids = frozenset()  # no stop token: both ranks run the same number of steps
    prompt = [g.tokenizer.encode(TEXTS[0], bos=True, eos=False)]
    try:
        g.generate(prompt, 6, 0.9, 0.95, [100 + info.rank], stop_at_newline=False)
        res["diverged"] = "no error"
    except RuntimeError as e:
        res["diverged"] = str(e)
    torch.save(res, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()  # leave together: gloo aborts a rank whose peer vanished mid-exchange
    teardown_parallel()
    from fairscale.nn.model_parallel import initialize as fs
    assert not fs.model_parallel_is_initialized() and not torch.distributed.is_initialized()


@pytest.mark.slow
def test_model_parallel_two_processes_match_one(tmp_path):
    from conftest import make_sharded_tiny_llamas  # here: this file also runs as torchrun's script
    from rewrite.llama import ParallelInfo
    one = make_sharded_tiny_llamas(tmp_path, seed=4)[1]
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
        assert res["fairscale_equal"], rank
        for name in ("mp1", "mp2", "mp4"):
            got = res[name]
            torch.testing.assert_close(got["logits"], want["logits"])
            assert got["greedy"] == want["greedy"], (rank, name)
            assert got["sampled"] == want["sampled"], (rank, name)


@pytest.fixture
def one_process_group(monkeypatch, tmp_path):
    """torchrun's variables for a world of one, and what init_process_group was given."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    calls = []
    real = torch.distributed.init_process_group

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.distributed, "init_process_group", spy)
    yield calls
    if torch.distributed.is_initialized():  # a failed test must not leave the group to the next one
        torch.distributed.destroy_process_group()


def test_setup_and_teardown_in_one_process(tmp_path, one_process_group):
    """The group waits as long as CONTROL_TIMEOUT, not the backend default (NCCL: 10 min),
    and teardown drops fairscale's groups before the process group."""
    from fairscale.nn.model_parallel import initialize as fs

    from common.distributed import on_every_rank, on_rank0
    from rewrite.launch import CONTROL_TIMEOUT, setup_parallel, teardown_parallel
    from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama
    d = make_tiny_llama(tmp_path / "t", TINY_TEXTS, dim=32, n_heads=4)
    info = setup_parallel(str(d), device="cpu")
    assert torch.distributed.is_initialized() and (info.world_size, info.mp_size) == (1, 1)
    assert one_process_group[0][1]["timeout"] == CONTROL_TIMEOUT > torch.distributed.default_pg_timeout
    assert on_rank0(lambda: 7, 0) == 7 and on_every_rank(lambda: 8, 1) == [8]
    with pytest.raises(ValueError, match="bad flag"):
        on_rank0(lambda: (_ for _ in ()).throw(ValueError("bad flag")), 0)
    fs.initialize_model_parallel(1)  # as an MP run would have it
    teardown_parallel()
    assert not fs.model_parallel_is_initialized() and not torch.distributed.is_initialized()
    teardown_parallel()  # nothing left to tear down: a no-op


def test_more_processes_than_gpus_is_a_clear_error(tmp_path, one_process_group, monkeypatch):
    from rewrite.launch import setup_parallel
    from testkit.tiny_llama import TINY_TEXTS, make_tiny_llama
    d = make_tiny_llama(tmp_path / "t", TINY_TEXTS, dim=32, n_heads=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="LOCAL_RANK 0: this node has 0 visible GPUs"):
        setup_parallel(str(d), device="cuda")
    assert not one_process_group  # refused before any process group was made


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
