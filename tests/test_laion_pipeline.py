"""The LAION workflow end to end on tiny shards, as real processes: img2dataset-style shards ->
rewrite with 2 data-parallel torchrun processes, killed and resumed (equal to one process) ->
train 2 epochs on 2 gloo processes from the shards with the rewrites, interrupted and resumed
(equal to an uninterrupted run) -> evaluate the checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import shard_fixtures as sf
from conftest import REWRITE_PAIRS, clean_dist_env, make_tiny_rewrite_setup
from rewrite import llama_rewrite
from common.rewrite_format import read_metadata
from testkit.paused_rewrite import ready_path
from testkit.processes import kill_tree, wait_until_paused
from train_fixtures import WNIDS, make_imagenet_root, read_log

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FLAGS = {"max_seq_len": 256, "max_gen_len": 6, "max_batch_size": 2, "sample_mode": "chatgpt,bard"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def env() -> dict:
    return {**clean_dist_env(), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """8 shards of 12 samples (a corrupt image, a sample without text, a row never downloaded,
    a cut-off tar), a tiny LLaMA, and the one-process rewrite of the parquet shards."""
    root = tmp_path_factory.mktemp("laion")
    shards = sf.make_shards(root / "shards", n_shards=8, per_shard=12)
    captions = [sf.caption_of(s, i) for s in range(8) for i in range(12)]
    tiny = make_tiny_rewrite_setup(root, captions, REWRITE_PAIRS)
    one_process_rewrite(**tiny, **FLAGS, prompt_filename=shards.parquets, output_filename=str(root / "one"))
    return {"root": root, "shards": shards, "tiny": tiny, "one": root / "one"}


def one_process_rewrite(**flags) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llama_rewrite.main(**flags)
    finally:
        torch.set_num_threads(before)


def rewrite_cmd(laion, out: Path) -> list[str]:
    flags = {**laion["tiny"], **FLAGS, "prompt_filename": laion["shards"].parquets, "output_filename": str(out)}
    return [*TORCHRUN, str(REPO / "rewrite" / "llama_rewrite.py"), *(f"--{k}={v}" for k, v in flags.items())]


def test_two_groups_killed_and_resumed_equal_one_process(laion, tmp_path):
    out, ready = tmp_path / "two", tmp_path / "paused"
    cmd = rewrite_cmd(laion, out)  # each rank stops after its first window, mid-shard (testkit/paused_rewrite.py)
    cmd = [*TORCHRUN, "-m", "testkit.paused_rewrite", "--pause-before-window=1", f"--ready={ready}", "--",
           *cmd[len(TORCHRUN) + 1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for rank in ("0", "1"):
            wait_until_paused(ready_path(ready, rank), proc)
    finally:
        kill_tree(proc)  # torchrun and both workers (each in a session of its own), as a node failure would
    assert not list(out.glob("*.parquet")) and len(list(out.glob("*.part"))) == 2  # one shard begun per rank
    done = subprocess.run(rewrite_cmd(laion, out), env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: 8 of 8 shards finished" in done.stdout, done.stdout
    names = sorted(p.name for p in laion["one"].glob("*.parquet"))
    # no part, lock or temp file; the inputs' remembered hashes (rewrite/shard_input.py)
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["rewrite.json", "input_fingerprints.jsonl",
                                                                        "manifest.json"])
    for name in names:
        assert pq.read_table(out / name).equals(pq.read_table(laion["one"] / name)), name
        assert read_metadata(out / name) == read_metadata(laion["one"] / name)


def test_one_model_parallel_group_agrees_on_every_shard(laion, tmp_path):
    """2 ranks of one model copy: the writer claims, the other rank follows its choice (greedy,
    since the split matmuls may round differently and sampling could amplify that)."""
    pattern = str(laion["shards"].folder / "{00000..00002}.parquet")
    greedy = {**laion["tiny"], **FLAGS, "prompt_filename": pattern, "temperature": 0}
    one_process_rewrite(**greedy, output_filename=str(tmp_path / "one"))
    flags = {**greedy, "output_filename": str(tmp_path / "mp2"), "model_parallel_size": 2}
    cmd = [*TORCHRUN, str(REPO / "rewrite" / "llama_rewrite.py"), *(f"--{k}={v}" for k, v in flags.items())]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 3 of 3 shards finished") == 1  # one summary, from rank 0
    assert done.stdout.count("-> ") == 3  # each shard written once, by the writer
    for name in ("00000.parquet", "00001.parquet", "00002.parquet"):
        assert pq.read_table(tmp_path / "mp2" / name).equals(pq.read_table(tmp_path / "one" / name)), name


def train_cmd(laion, out: Path, epochs: int, imagenet: str) -> list[str]:
    return [*TORCHRUN, "train.py", "--train-data", laion["shards"].tars, "--dataset-type", "webdataset",
            "--train-num-samples", "32", "--aug-text", "--rewrite-data", str(laion["one"] / "{00000..00007}.parquet"),
            "--output-dir", str(out), "--model", "CLIP_TINY", "--batch-size", "4", "--workers", "1",
            "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "1e-3", "--device", "cpu",
            "--imagenet-root", imagenet, "--eval-batch-size", "3"]


def run_train(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_train_two_processes_from_shards_resume_and_evaluate(laion, tmp_path):
    imagenet = make_imagenet_root(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train(train_cmd(laion, straight, 2, imagenet))
    run_train(train_cmd(laion, split, 1, imagenet))  # stopped after epoch 0 ...
    # ... and resumed from its checkpoint; --epochs grows, which --resume-override allows (the
    # 1-epoch warmup keeps epoch 0's learning rates the same for both lengths)
    run_train(train_cmd(laion, split, 2, imagenet) + ["--resume-override"])
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["data_state"] == b["data_state"]
    assert a["data_state"]["layout"] == [2, 1]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]
    lines = read_log(split)
    assert strip(read_log(straight)) == strip(lines)
    # 2 ranks x 4 batches of 4 per epoch; each pass meets the bad samples, counted over both ranks
    assert [x["train_samples"] for x in lines] == [32, 32]
    assert sum(x["skipped_images"] + x["skipped_no_text"] + x["shard_errors"] for x in lines) >= 1
    import eval_zeroshot_imagenet
    result = eval_zeroshot_imagenet.main(["--imagenet-root", imagenet, "--ckpt-path", str(split / "checkpoint.pt"),
                                          "--model", "CLIP_TINY", "--batch-size", "3", "--workers", "0",
                                          "--device", "cpu"])
    assert result["images"] == 2 * len(WNIDS) and result["top1"] == pytest.approx(lines[-1]["zeroshot_top1"])
