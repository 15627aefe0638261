"""The gathered loss on 2 gloo processes equals one process on the global batch (loss and
gradients), and train.py runs under torchrun with only rank 0 writing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import clean_dist_env
from train_fixtures import make_train_data, read_log, train_argv
from common.distributed import cleanup_distributed
from training.loss import clip_loss

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, WORLD = 8, 2


class TwoTowers(nn.Module):
    """Stand-in for CLIP with the same output contract, small enough to check gradients exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(16, 8)
        self.text = nn.Linear(12, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x_img, x_txt):
        return {"image_embed": self.image(x_img), "text_embed": self.text(x_txt),
                "logit_scale": self.logit_scale.exp()}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 12, generator=g)


def loss_and_grads(model, x_img, x_txt) -> tuple[float, dict[str, torch.Tensor]]:
    out = model(x_img, x_txt)
    loss = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])["loss"]
    loss.backward()
    module = getattr(model, "module", model)
    return loss.item(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _worker(rank: int, store_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(TwoTowers())
        x_img, x_txt = global_batch()
        rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        loss, grads = loss_and_grads(model, x_img[rows], x_txt[rows])  # DDP averages the grads
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        cleanup_distributed()  # train.py's teardown: exiting right after a DDP backward must not abort


@pytest.mark.slow
def test_gathered_loss_and_grads_match_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    loss, grads = loss_and_grads(TwoTowers(), *global_batch())
    # The global loss is the mean of the ranks' losses over their own rows.
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(loss, abs=1e-6)
    for r in ranks:
        for name, g in grads.items():
            assert torch.allclose(r["grads"][name], g, atol=1e-6), name


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """lr 0 keeps the weights fixed, so both runs see the same global batches with the same
    model: equal epoch loss, and corrupt images counted over both ranks."""
    data = make_train_data(tmp_path, n=8, corrupt=(2,), missing=(6,))
    fixed = ["--epochs", "1", "--lr", "0", "--lr-start", "0", "--lr-end", "0"]
    single, double = tmp_path / "one", tmp_path / "two"
    env = clean_dist_env()
    cmd = [sys.executable, "train.py", *train_argv(data, single, *fixed)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    argv = train_argv(data, double, *fixed)
    argv[argv.index("--batch-size") + 1] = "2"  # 2 processes x 2 = the single run's 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "train.py", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (one,), (two,) = read_log(single), read_log(double)  # one line: only rank 0 writes
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert two["train_samples"] == one["train_samples"] == 8
    assert two["skipped_images"] == one["skipped_images"] == 2
    ckpt = torch.load(double / "checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_two_ranks_on_a_locked_output_dir_both_stop(tmp_path):
    """Rank 0 holds --output-dir's lock; when it is taken, rank 1 learns of the refusal too
    (through the process group) instead of waiting for rank 0 at the first collective. The two
    ranks are started by hand, not by torchrun, whose agent would kill rank 1 as soon as rank 0
    exits and so hide whether rank 1 knew."""
    from common.locking import FileLock
    from testkit.net import free_port
    from training.output_dir import lock_target
    data = make_train_data(tmp_path, n=8)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "train.py", *train_argv(data, out, "--batch-size", "2")]
    base = {**clean_dist_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1"}
    with FileLock(lock_target(str(out)), "a first run"):
        procs = [subprocess.Popen(cmd, cwd=REPO, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
        results = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode != 0, rank
        refusals = [line for line in err.splitlines() if line.startswith("error: --output-dir")]
        assert len(refusals) == 1 and f"in use by process {os.getpid()}" in refusals[0], (rank, err[-2000:])
    assert os.listdir(out) == []
