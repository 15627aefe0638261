"""train.py's downstream evaluation: any eval_benchmark.py task on any of its datasets every N
epochs, on the main process while the other ranks wait; the metrics go into log.txt.

    python train.py ... --eval-benchmark cifar10=/data/cifar10 flickr30k=/data/flickr30k \
        --eval-tasks zeroshot_classification zeroshot_retrieval --eval-every 5

Each task runs on the datasets it applies to ('auto': retrieval for caption datasets, zero-shot
classification otherwise). Features are computed afresh each time (the weights changed) and
kept in memory only; unreadable images are skipped and counted, as in the ImageNet evaluation.
The flags are training/params.py's.
"""
from __future__ import annotations

import argparse

from evaluation.catalog import RETRIEVAL, get_spec
from evaluation.features import FeatureCache, RunOptions
from evaluation.models import PRESET, EvalModel, eval_transform
from evaluation.jobs import RETRIEVE, Settings, plan_job, run_job
from evaluation.tasks import ClassifierCache


def _dataset_roots(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = []
    for item in args.eval_benchmark:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise ValueError(f"--eval-benchmark {item!r}: expected DATASET=ROOT, e.g. cifar10=/data/cifar10")
        pairs.append((name, root))
    return pairs


def plan_jobs(args: argparse.Namespace) -> list:
    """(dataset, task) jobs: every task on the datasets it applies to; layouts are checked here."""
    jobs = []
    for name, root in _dataset_roots(args):
        kind = get_spec(name).kind
        for task in args.eval_tasks:
            if task != "auto" and (task == RETRIEVE) != (kind == RETRIEVAL):
                continue
            jobs.append(plan_job(name, task, root, PRESET, Settings()))
    applied = {job.task for job in jobs}
    unused = [t for t in args.eval_tasks if t != "auto" and t not in applied]
    if unused:
        raise ValueError(f"--eval-tasks {unused[0]}: none of the --eval-benchmark datasets is of its kind")
    return jobs


def run_benchmarks(args: argparse.Namespace, model, tokenizer, rank: int, device, epoch: int, amp: bool) -> dict | None:
    """{'<dataset>/<task>': metrics or {'error': ...}} on rank 0 when due, else None (call on every
    rank; the caller's barrier follows). A failing dataset is reported and training goes on."""
    due = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
    if not args.eval_benchmark or not due or rank != 0:
        return None
    em = EvalModel(model, tokenizer, eval_transform(), args.model, None, PRESET)
    opts = RunOptions(args.eval_batch_size, args.workers, device, amp, skip_bad_images=True, progress=False)
    cache, classifiers, out = FeatureCache(None), ClassifierCache(em, opts), {}
    was_training = model.training
    model.eval()
    try:
        for job in plan_jobs(args):
            key = f"{job.dataset}/{job.task}"
            try:
                record = run_job(job, em, cache, classifiers, opts, Settings())
                out[key] = {**record["metrics"], "skipped_images": record["skipped_images"]}
            except (OSError, ValueError, RuntimeError) as err:
                print(f"=> --eval-benchmark {key} failed: {err}")
                out[key] = {"error": str(err)}
    except (OSError, ValueError) as err:  # a folder went away since the start
        print(f"=> --eval-benchmark failed: {err}")
        out["error"] = str(err)
    finally:
        model.train(was_training)
    return out
