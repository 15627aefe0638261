"""One (dataset, task) evaluation: planned from the flags before any model is loaded (so a bad
folder or split stops the run in seconds), then run on shared caches of features and classifiers."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from evaluation import probe, tasks
from evaluation.retrieval_captions import CaptionSet, read_captions
from evaluation.catalog import RETRIEVAL, get_spec, templates_for
from evaluation.features import FeatureCache, Features, RunOptions
from evaluation.models import EvalModel
from evaluation.readers import SplitData, read_split

ZEROSHOT, RETRIEVE, LINEAR_PROBE, FEW_SHOT = "zeroshot_classification", "zeroshot_retrieval", "linear_probe", "few_shot"
TASKS = (ZEROSHOT, RETRIEVE, LINEAR_PROBE, FEW_SHOT)
FEWSHOT_K = (1, 2, 4, 8, 16)


@dataclass
class Settings:
    """The task flags, as eval_benchmark.py and train.py pass them."""
    split: str | None = None         # None: the dataset's (see catalog.DatasetSpec)
    train_split: str | None = None
    val_split: str | None = None
    val_proportion: float = 0.2
    recall_k: tuple[int, ...] = (1, 5, 10)
    fewshot_k: tuple[int, ...] = FEWSHOT_K  # few_shot: the examples per class of each run
    probe_k: int = -1                        # linear_probe: examples per class, -1 = all of train
    seed: int = 0
    normalize: bool = False
    annotation_file: str | None = None
    classnames: dict = field(default_factory=dict)  # --custom_classname_file: {dataset: [names]}
    templates: dict = field(default_factory=dict)   # --custom_template_file: {dataset: [templates]}


@dataclass
class Job:
    dataset: str
    task: str
    test: SplitData | CaptionSet
    train: SplitData | None = None
    val: SplitData | None = None
    templates: list[str] = field(default_factory=list)
    output: str | None = None


def resolve_task(dataset: str, task: str) -> str:
    spec = get_spec(dataset)
    if task == "auto":
        return RETRIEVE if spec.kind == RETRIEVAL else ZEROSHOT
    if (task == RETRIEVE) != (spec.kind == RETRIEVAL):
        kind = "image-caption" if spec.kind == RETRIEVAL else "classification"
        raise ValueError(f"--task {task} does not apply to --dataset {dataset} (a {kind} dataset)")
    return task


def _custom_names(split: SplitData, settings: Settings) -> None:
    names = settings.classnames.get(split.dataset)
    if names is None:
        return
    if len(names) != len(split.classnames):
        raise ValueError(f"--custom_classname_file: {len(names)} names for {split.dataset}, which has "
                         f"{len(split.classnames)} classes")
    split.classnames = list(names)


def plan_job(dataset: str, task: str, root: str, model_kind: str, settings: Settings) -> Job:
    """Read every split the job needs (listing only) and check them against each other."""
    spec = get_spec(dataset)
    task = resolve_task(dataset, task)
    if task == RETRIEVE:
        return Job(dataset, task, read_captions(dataset, root, settings.split or "test", settings.annotation_file))
    test_split = settings.split or (spec.zeroshot_split if task == ZEROSHOT else spec.test_split)
    job = Job(dataset, task, read_split(dataset, root, test_split))
    job.templates = list(settings.templates.get(dataset) or templates_for(dataset, model_kind))
    if task != ZEROSHOT:
        if test_split == "all":
            raise ValueError(f"--split all: {task} needs a test split apart from the training images "
                             f"(one of {', '.join(s for s in spec.splits if s != 'all')})")
        job.train = read_split(dataset, root, settings.train_split or spec.train_split, "--train_split")
        val_split = settings.val_split or spec.val_split
        job.val = read_split(dataset, root, val_split, "--val_split") if val_split else None
        _check_apart(job)
    _custom_names(job.test, settings)
    return job


def _check_apart(job: Job) -> None:
    """One label space, and no image in two of train / val / test (trainval with val, say)."""
    named = [(job.test, "--split"), (job.train, "--train_split"), (job.val, "--val_split")]
    named = [(s, flag) for s, flag in named if s is not None]
    for i, (a, flag_a) in enumerate(named):
        for b, flag_b in named[i + 1:]:
            if a.classnames != b.classnames:
                raise ValueError(f"--dataset_root: the {a.split} and {b.split} splits of {job.dataset} name "
                                 f"different classes; the linear probe needs one label space")
            shared = (a.split == b.split or (a.listing.paths is not None and b.listing.paths is not None
                                             and not set(a.listing.paths).isdisjoint(b.listing.paths)))
            if shared:
                raise ValueError(f"{flag_b} {b.split}: shares images with {flag_a} {a.split}; the splits of a "
                                 f"probe must be apart")


def _probe(job: Job, em: EvalModel, cache: FeatureCache, opts: RunOptions,
           settings: Settings) -> tuple[dict, list[Features], list[str]]:
    metric = get_spec(job.dataset).metric
    feats = [cache.features(em.model, em.identity(), em.transform, s, opts) for s in (job.train, job.test)]
    train, test = (probe.probe_data(f, settings.normalize) for f in feats)
    if job.val is not None:
        feats.append(cache.features(em.model, em.identity(), em.transform, job.val, opts))
        val = probe.probe_data(feats[-1], settings.normalize)
    else:
        train, val = probe.holdout(train, settings.val_proportion, settings.seed, job.train.split)
    common = {"seed": settings.seed, "normalized": settings.normalize}
    if job.task == LINEAR_PROBE:
        k = settings.probe_k
        subset = probe.few_shot(train, k, settings.seed) if k > 0 else train
        metrics = probe.linear_probe(subset, val, test, metric, refit_on_val=k <= 0)
        return {**metrics, "fewshot_k": k, **common}, feats, []
    metrics, notes = {}, []
    for k in settings.fewshot_k:
        try:
            subset = probe.few_shot(train, k, settings.seed)
        except ValueError as err:  # e.g. Flowers-102 has 10 training images a class: no 16-shot
            notes.append(f"{k}-shot not run: {err}")
            metrics.update({f"{k}_shot_{m}": None for m in ("acc1", "acc5", "mean_per_class_recall")})
            continue
        metrics.update(probe.linear_probe(subset, val, test, metric, refit_on_val=False, prefix=f"{k}_shot_"))
    return {**metrics, **common}, feats, notes


def run_job(job: Job, em: EvalModel, cache: FeatureCache, classifiers: tasks.ClassifierCache, opts: RunOptions,
        settings: Settings) -> dict:
    """The result record of one job, in CLIP_benchmark's shape plus what was read and skipped."""
    start = time.time()
    notes = [n for s in (job.test, job.train, job.val) if s is not None for n in s.notes]
    if job.task == ZEROSHOT:
        metrics, feats = tasks.zeroshot_classification(em, job.test, job.templates, cache, classifiers, opts)
        feats = [feats]
    elif job.task == RETRIEVE:
        metrics, feats = tasks.zeroshot_retrieval(em, job.test, cache, opts, settings.recall_k)
        feats = [feats]
    else:
        metrics, feats, probe_notes = _probe(job, em, cache, opts, settings)
        notes += probe_notes
    skipped = [p for f in feats for p in f.skipped]
    record = {
        "dataset": job.dataset, "model": em.name, "pretrained": em.checkpoint, "task": job.task,
        "metrics": metrics, "language": "en",
        "split": job.test.split, "images": len(feats[0].labels) if job.task in (ZEROSHOT, RETRIEVE) else
        {s.split: len(f.labels) for s, f in zip((job.train, job.test, job.val), feats)},
        "skipped_images": len(skipped), "skipped_files": skipped, "notes": notes + cache.notes,
        "features_from_cache": all(f.cached for f in feats), "seconds": round(time.time() - start, 2),
    }
    if job.task == ZEROSHOT:
        record["templates"] = len(job.templates)
    if job.train is not None:
        record["train_split"] = job.train.split
        record["val_split"] = job.val.split if job.val else f"{settings.val_proportion:g} of {job.train.split} held out"
    if isinstance(job.test, CaptionSet):
        record["annotation_file"] = os.path.abspath(job.test.annotation_file)
    cache.notes.clear()
    return record
