"""Result files in CLIP_benchmark's shape (written atomically) and the
paper-style table (checkpoints as rows, datasets as columns, the average of the downstream
datasets, ImageNet apart) gathered from many result files.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import string
from dataclasses import dataclass

from common.fileio import atomic_write
from evaluation.catalog import CATALOG, DOWNSTREAM, MEAN_PER_CLASS

OUTPUT_FIELDS = {"dataset", "pretrained", "pretrained_full_path", "model", "language", "task"}


def result_path(template: str, dataset: str, model: str, pretrained: str, task: str) -> str:
    """--output with CLIP_benchmark's placeholders filled ({pretrained} is the file's base name)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - OUTPUT_FIELDS
    if unknown:
        raise ValueError(f"--output {template!r}: unknown placeholder {{{sorted(unknown)[0]}}} "
                         f"(known: {', '.join(sorted(OUTPUT_FIELDS))})")
    return template.format(dataset=dataset.replace("/", "_"), model=model, language="en", task=task,
                           pretrained=os.path.basename(pretrained),
                           pretrained_full_path=pretrained.replace("/", "_"))


def write_result(path: str, record: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    atomic_write(path, write)


# ---- --table ----

@dataclass(frozen=True)
class Column:
    task: str
    dataset: str
    metric: str  # key in "metrics"
    title: str


def paper_metric(dataset: str) -> str:
    return CATALOG[dataset].metric if dataset in CATALOG else "acc1"


def columns_of(record: dict) -> list[tuple[str, Column]]:
    """(table name, column) pairs a result file fills: one table per task (and per few-shot k)."""
    task, dataset, metrics = record["task"], record["dataset"], record["metrics"]
    title = CATALOG[dataset].title if dataset in CATALOG else dataset
    metric = paper_metric(dataset)
    if task == "zeroshot_classification":
        return [(task, Column(task, dataset, metric, title))]
    if task == "linear_probe":
        return [(task, Column(task, dataset, f"lp_{metric}", title))]
    if task == "few_shot":
        ks = sorted({int(key.split("_shot_")[0]) for key in metrics if "_shot_" in key})
        return [(f"few_shot k={k}", Column(task, dataset, f"{k}_shot_{metric}", title)) for k in ks]
    if task == "zeroshot_retrieval":
        keys = sorted((k for k in metrics if "_retrieval_recall@" in k),
                      key=lambda k: (k[0] != "t", int(k.split("@")[1])))
        return [(task, Column(task, dataset, key, f"{title} {'I→T' if key[0] == 't' else 'T→I'} "
                                                  f"R@{key.split('@')[1]}")) for key in keys]
    return []


def load_results(paths: list[str]) -> list[dict]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*.json")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--table: {path!r} is neither a result file nor a folder")
    records = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            missing = {"dataset", "task", "metrics"} - set(record)
            if missing:
                raise KeyError(f"no {sorted(missing)[0]!r}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--table: {path!r} is not a result file of eval_benchmark.py ({err})") from err
        records.append(record)
    if not records:
        raise ValueError(f"--table: no result files in {', '.join(paths)}")
    return records


def build_tables(records: list[dict]) -> dict[str, tuple[list[str], list[str], list[list[str]]]]:
    """{table name: (header, row names, cells)}; cells in percent with one decimal."""
    values: dict[str, dict[str, dict[Column, float]]] = {}
    names = _row_names({(str(r.get("model", "?")), str(r.get("pretrained", ""))) for r in records})
    for record in records:
        row = names[(str(record.get("model", "?")), str(record.get("pretrained", "")))]
        for table, column in columns_of(record):
            value = record["metrics"].get(column.metric)
            if value is not None:
                values.setdefault(table, {}).setdefault(row, {})[column] = 100.0 * value
    tables = {}
    for table, rows in sorted(values.items(), key=lambda item: _TABLE_ORDER.index(item[0].split()[0])):
        cols = sorted({c for cells in rows.values() for c in cells}, key=_column_order)
        downstream = [c for c in cols if c.dataset in DOWNSTREAM]
        header, body = ["checkpoint"], []
        shown = [c for c in cols if c.dataset != "imagenet1k"]  # ImageNet after the average, as the paper
        header += [c.title for c in shown] + (["Average"] if downstream else [])
        header += [c.title for c in cols if c not in shown]
        for row, cells in rows.items():
            line = [row] + [_fmt(cells.get(c)) for c in shown]
            if downstream:
                present = [cells[c] for c in downstream if c in cells]
                mark = "" if len(present) == len(DOWNSTREAM) else f" ({len(present)}/{len(DOWNSTREAM)})"
                line.append(_fmt(sum(present) / len(present) if present else None) + mark)
            line += [_fmt(cells.get(c)) for c in cols if c not in shown]
            body.append(line)
        tables[table] = (header, list(rows), body)
    return tables


def _row_names(checkpoints: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """'<model> <file name>', or the whole path where two checkpoints share a file name
    (every training run writes checkpoint_best.pt)."""
    base = {key: f"{key[0]} {os.path.basename(key[1])}" for key in checkpoints}
    clash = {name for name in base.values() if list(base.values()).count(name) > 1}
    return {key: f"{key[0]} {key[1]}" if name in clash else name for key, name in base.items()}


_TABLE_ORDER = ["zeroshot_classification", "linear_probe", "few_shot", "zeroshot_retrieval"]


def _column_order(c: Column):
    names = list(CATALOG)
    return (names.index(c.dataset) if c.dataset in names else len(names), c.dataset, c.title)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_markdown(tables: dict) -> str:
    out = []
    for name, (header, _, body) in tables.items():
        out += [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in body] + [""]
    notes = ("Cells are percent; mean per-class accuracy for " +
             ", ".join(s.title for s in CATALOG.values() if s.metric == MEAN_PER_CLASS) +
             ", top-1 accuracy otherwise. Average: the downstream datasets (not ImageNet); "
             "(n/15) marks an average over only n of the 15.")
    return "\n".join(out + [notes, ""])


def render_csv(tables: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    for name, (header, _, body) in tables.items():
        writer.writerow(["table"] + header)
        writer.writerows([name] + line for line in body)
    return buf.getvalue()

