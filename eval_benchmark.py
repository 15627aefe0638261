"""The paper's downstream evaluation of any checkpoint this project loads or trains, spelled as
CLIP_benchmark's `eval`: zero-shot classification, linear probe, few-shot, retrieval.

    python eval_benchmark.py --dataset food101 cifar10 cifar100 --dataset_root '/data/{dataset}' \
        --task zeroshot_classification linear_probe --model CLIP_VITB16 --pretrained cc12m_laclip.pt \
        --output 'results/{dataset}_{pretrained}_{task}.json'
    python eval_benchmark.py --table results/          # markdown table: checkpoints x datasets

--model is a preset (CLIP_VITS16, CLIP_VITB16, CLIP_VITL16) or an open_clip name (ViT-B-32,
add --quickgelu for files trained with it). docs/benchmark.md has every dataset's layout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from common.distributed import resolve_device
from common.locking import FileLock
from evaluation import results
from evaluation.catalog import CATALOG
from evaluation.content_keys import checkpoint_sha256
from evaluation.features import FeatureCache, RunOptions
from evaluation.models import load_for_eval
from evaluation.jobs import FEWSHOT_K, TASKS, Settings, plan_job, resolve_task, run_job
from evaluation.tasks import ClassifierCache
from models import open_clip_arch


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LaCLIP downstream evaluation (CLIP_benchmark's flags)")
    add = p.add_argument
    add("--dataset", nargs="+", default=[], help=f"one or more of {', '.join(CATALOG)}")
    add("--dataset_root", default="root", help="dataset folder; '{dataset}' is replaced by each dataset's name")
    add("--task", nargs="+", default=["auto"], choices=(*TASKS, "auto"),
        help="auto: zeroshot_retrieval for caption datasets, zeroshot_classification otherwise")
    add("--model", default=None, help="a preset (CLIP_VITB16, ...) or an open_clip model name (ViT-B-32, ...)")
    add("--pretrained", default=None, help="the checkpoint file to evaluate")
    add("--quickgelu", action="store_true", help="open_clip models: QuickGELU activations (files trained with them)")
    add("--output", default="{dataset}_{pretrained}_{model}_{language}_{task}.json",
        help="result file; placeholders {dataset} {pretrained} {pretrained_full_path} {model} {language} {task}")
    add("--batch_size", type=int, default=64, help="images per batch")
    add("--workers", "-j", "--num_workers", dest="num_workers", type=int, default=4,
        help="data loading processes (--num_workers: CLIP_benchmark's spelling)")
    add("--split", default=None, help="test split (default: CLIP_benchmark's for zero-shot, 'test' otherwise)")
    add("--train_split", default=None, help="linear probe / few-shot training split (default: the dataset's)")
    add("--val_split", default=None, help="split that chooses the regularisation (default: the dataset's, if any)")
    add("--val_proportion", type=float, default=0.2,
        help="without a validation split: this share of each class of the train split is held out")
    add("--recall_k", type=int, nargs="+", default=[1, 5, 10], help="retrieval: the k of recall@k")
    add("--fewshot_k", type=int, nargs="+", default=None,
        help="linear_probe: one k (examples per class; -1 = all, the default); few_shot: the ks (default 1 2 4 8 16)")
    add("--seed", type=int, default=0, help="few-shot draw and validation hold-out")
    add("--normalize", type=_bool, default=False,
        help="L2-normalise features for the linear probe (CLIP: false; CLIP_benchmark: true)")
    add("--feature_root", default="features", help="image-feature cache folder ('' keeps none)")
    add("--annotation_file", default=None, help="retrieval captions (default: the dataset's under --dataset_root)")
    add("--language", default="en", choices=["en"], help="class names and prompts: CLIP's English ones")
    add("--custom_classname_file", default=None, help="JSON {dataset: [class names]} replacing CLIP's")
    add("--custom_template_file", default=None, help="JSON {dataset: [templates with {}]} replacing CLIP's")
    add("--precision", choices=("amp", "fp32"), default="amp",
        help="amp: fp16 autocast on CUDA (the default); fp32: float32 on CUDA too (the CPU always uses float32)")
    add("--no_amp", dest="precision", action="store_const", const="fp32", help="= --precision fp32 (the old spelling)")
    add("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    add("--skip_bad_images", action="store_true", help="leave unreadable images out (counted and reported)")
    add("--trust-checkpoint", "--trust_checkpoint", dest="trust_checkpoint", action="store_true",
        help="allow a --pretrained file that pickles more than weights (it can run code: only for files you trust)")
    add("--skip_existing", action="store_true", help="skip a job whose --output exists")
    add("--quiet", dest="verbose", action="store_false", help="no progress bars")
    add("--table", nargs="+", default=None, metavar="RESULT",
        help="instead of evaluating: gather result files/folders into tables (to --output .md/.csv, or stdout)")
    return p


def _json_map(path: str | None, flag: str) -> dict:
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag}: cannot read {path!r} as JSON ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{flag}: {path!r} must map dataset names to lists")
    if flag == "--custom_template_file":
        bad = [t for v in data.values() for t in v if str(t).count("{}") != 1]
        if bad:
            raise ValueError(f"{flag}: each template needs exactly one '{{}}'; got {bad[0]!r}")
    return data


def settings_from(args: argparse.Namespace) -> Settings:
    for name, low in (("batch_size", 1), ("num_workers", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 < args.val_proportion < 1:
        raise ValueError(f"--val_proportion must be between 0 and 1, got {args.val_proportion}")
    if min(args.recall_k) < 1:
        raise ValueError(f"--recall_k values must be >= 1, got {args.recall_k}")
    if args.fewshot_k and (0 in args.fewshot_k or min(args.fewshot_k) < -1):
        raise ValueError(f"--fewshot_k values must be >= 1 (or -1 for all), got {args.fewshot_k}")
    # With few_shot among the tasks, --fewshot_k is its sweep and linear_probe uses all of train;
    # otherwise linear_probe takes one k, as CLIP_benchmark's linear_probe does.
    sweep = "few_shot" in args.task
    if args.fewshot_k and sweep and -1 in args.fewshot_k:
        raise ValueError("--fewshot_k -1 (all) is --task linear_probe, not few_shot")
    if args.fewshot_k and not sweep and len(args.fewshot_k) > 1:
        raise ValueError("--fewshot_k: linear_probe takes one k; use --task few_shot for a sweep")
    probe_k = args.fewshot_k[0] if args.fewshot_k and not sweep else -1
    return Settings(args.split, args.train_split, args.val_split, args.val_proportion, tuple(args.recall_k),
                    tuple(args.fewshot_k or FEWSHOT_K), probe_k, args.seed, args.normalize,
                    args.annotation_file, _json_map(args.custom_classname_file, "--custom_classname_file"),
                    _json_map(args.custom_template_file, "--custom_template_file"))


def plan_all(args: argparse.Namespace, settings: Settings, model_kind: str) -> list:
    """Every (dataset, task) job, checked and given its --output, before the model is loaded."""
    jobs, outputs = [], {}
    for dataset in args.dataset:
        root = args.dataset_root.replace("{dataset}", dataset)
        for task in dict.fromkeys(resolve_task(dataset, t) for t in args.task):
            out = results.result_path(args.output, dataset, args.model, args.pretrained, task)
            if out in outputs:
                raise ValueError(f"--output {args.output!r}: {outputs[out]} and {dataset}/{task} would both "
                                 f"write {out!r}; add {{dataset}} and {{task}} to it")
            outputs[out] = f"{dataset}/{task}"
            if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
                raise FileNotFoundError(f"--output: folder of {out!r} does not exist")
            if args.skip_existing and os.path.exists(out) and _same_checkpoint(out, args):
                print(f"=> {out} exists: skipped (--skip_existing)")
                continue
            job = plan_job(dataset, task, root, model_kind, settings)
            job.output = out
            jobs.append(job)
    return jobs


def _same_checkpoint(out: str, args: argparse.Namespace) -> bool:
    """--skip_existing skips only a result of this very checkpoint (by content: every training
    run writes checkpoint_best.pt, so {pretrained} alone cannot tell two runs apart)."""
    digest = checkpoint_sha256(args.pretrained, args.feature_root or None)
    try:
        with open(out, encoding="utf-8") as f:
            held = json.load(f).get("pretrained_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"--skip_existing: {out!r} exists but is not a result file ({err}); remove it") from err
    if held == digest:
        return True
    what = f"checkpoint sha256 {held[:12]}..." if isinstance(held, str) else "no checkpoint hash (an older result)"
    raise ValueError(f"--skip_existing: {out!r} holds a result of {what}, not of --pretrained {args.pretrained!r} "
                     f"(sha256 {digest[:12]}...); remove it, or give --output a name per checkpoint "
                     f"({{pretrained_full_path}})")


def write_table(args: argparse.Namespace) -> str:
    tables = results.build_tables(results.load_results(args.table))
    out = args.output if args.output != get_args_parser().get_default("output") else None
    text = results.render_csv(tables) if out and out.endswith(".csv") else results.render_markdown(tables)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    return text


def main(argv: list[str] | None = None) -> list[dict] | str:
    args = get_args_parser().parse_args(argv)
    if args.table is not None:
        return write_table(args)
    if not args.dataset or not args.model or not args.pretrained:
        raise ValueError("--dataset, --model and --pretrained are needed (or --table to gather results)")
    if not os.path.isfile(args.pretrained):
        raise FileNotFoundError(f"--pretrained: checkpoint file {args.pretrained!r} does not exist")
    settings = settings_from(args)
    model_kind = open_clip_arch.kind(args.model)
    jobs = plan_all(args, settings, model_kind)
    device = resolve_device(args.device)
    with contextlib.ExitStack() as locks:  # a second run on the same result stops here, at once
        for job in jobs:
            locks.enter_context(FileLock(Path(job.output), f"--output {job.output}"))
        em = load_for_eval(args.model, args.pretrained, args.quickgelu, device, trust=args.trust_checkpoint)
        opts = RunOptions(args.batch_size, args.num_workers, device, args.precision == "amp", args.skip_bad_images, args.verbose)
        cache, classifiers, records = FeatureCache(args.feature_root), ClassifierCache(em, opts), []
        for job in jobs:
            record = run_job(job, em, cache, classifiers, opts, settings)
            record["pretrained_sha256"] = cache.checkpoint_sha256(args.pretrained)  # what --skip_existing checks
            results.write_result(job.output, record)
            report(record, job.output)
            records.append(record)
        return records


def report(record: dict, output: str) -> None:
    shown = {k: round(v, 4) for k, v in record["metrics"].items()
             if isinstance(v, float) and ("acc" in k or "recall" in k)}
    cached = " (features from cache)" if record["features_from_cache"] else ""
    print(f"=> {record['dataset']} {record['task']}: {json.dumps(shown)}{cached} -> {output}")
    if record["skipped_images"]:
        print(f"   skipped {record['skipped_images']} unreadable images: {', '.join(record['skipped_files'][:5])}")
    for note in record["notes"]:
        print(f"   note: {note}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # FileNotFoundError, PermissionError included
        sys.exit(f"error: {err}")
