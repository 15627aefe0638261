"""A rewriting run over shards (img2dataset parquet files or webdataset tars): every
data-parallel group walks the shard list from its own starting point, claims the next
shard nobody has finished or holds, rewrites it in every sample mode, and moves on.

The group's writer (model-parallel rank 0) decides (claim, resume point) and sends it to
the group's other ranks, which read and generate the same lines in lock step; groups never
wait for each other until the final summary. Each caption's rewrite depends on (seed,
mode, sample key, caption) only (rewrite/prompts.py), so the shards come out the same
whatever the number of groups, runs, kills and resumes. Files: rewrite/shard_output.py.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from common.distributed import from_group_source, launched_as_rank0, on_every_rank, on_rank0
from common.fileio import atomic_write
from common.locking import FileLock
from rewrite.cli_args import Config
from rewrite.launch import flag_names, setup_parallel, teardown_parallel
from rewrite.llama import Generator, ParallelInfo, TokenizerBase, load_generator, load_tokenizer
from rewrite.output import STAT_KEYS, ShareWriter, add_stats
from rewrite.prompts import Pool, load_pool, normalize_sample_modes
from rewrite.runner import (TORCH_DTYPES, WINDOW_BATCHES, windows, check_context, line_request, log,
                            rewrite_window, run_dtype, settings_fingerprint)
from rewrite.shard_checks import check_finished, check_overwrite_keeps_one_setting, remembered_fingerprint
from rewrite.shard_input import ShardLines, expand_shards, shard_stem
from rewrite.shard_output import (check_run_record, claim, clear_for_overwrite, encode_row, output_path,
                                  part_path, remove_part, write_shard)


def mode_configs(cfg: Config) -> dict[str, Config]:
    """One Config per sample mode (what the text-file code paths take)."""
    return {m: dataclasses.replace(cfg, sample_mode=m) for m in normalize_sample_modes(cfg.sample_mode)}


@dataclass
class ShardRun:
    """Everything a group needs, made before the model is loaded."""
    parallel: ParallelInfo
    tokenizer: TokenizerBase
    shards: list[Path]
    configs: dict[str, Config]  # per mode
    pools: dict[str, Pool]  # per mode
    settings: dict
    dtype: torch.dtype


def prepare(cfg: Config) -> ShardRun:
    parallel = setup_parallel(cfg.ckpt_dir, cfg.model_parallel_size)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir)
    configs = mode_configs(cfg)
    pools = {m: load_pool(m, cfg.examples) for m in configs}
    for m in configs:
        check_context(configs[m], pools[m], tokenizer)
    dtype = run_dtype(cfg, parallel)
    first = next(iter(configs))
    settings = {**settings_fingerprint(configs[first], pools[first], dtype), "sample_mode": list(configs),
                "examples": {m: pools[m].digest() for m in configs}, "text_key": cfg.text_key}
    shards = expand_shards(cfg.prompt_filename)
    out_dir = cfg.output_filename

    def plan() -> None:
        out_dir.mkdir(exist_ok=True)
        pairs = [(p, output_path(out_dir, shard_stem(p))) for p in shards]
        if cfg.overwrite:
            check_overwrite_keeps_one_setting(out_dir, [out for _, out in pairs], settings)
            removed = clear_for_overwrite(out_dir, [shard_stem(p) for p in shards])
            log(f"--overwrite: removed {removed} finished shards of this input from {out_dir}")
        check_run_record(out_dir, settings, cfg.overwrite)
        check_finished(out_dir, pairs, settings)  # finished only for this input and these settings

    on_rank0(plan, parallel.rank)
    return ShardRun(parallel, tokenizer, shards, configs, pools, settings, TORCH_DTYPES[dtype])


def walk_order(n: int, dp_rank: int, dp_size: int) -> list[int]:
    """All shards, starting at this group's own share so groups rarely meet at a claim."""
    start = n * dp_rank // dp_size
    return list(range(start, n)) + list(range(start))


@dataclass
class Task:
    index: int  # into ShardRun.shards
    start: int  # first line not yet committed
    lock: Optional[FileLock] = None  # writer only
    writer: Optional[ShareWriter] = None  # writer only


def claim_next(run: ShardRun, cfg: Config, order: Iterator[int]) -> Optional[Task]:
    """Writer only: the next shard that is neither finished nor held, claimed and opened."""
    for i in order:
        out = output_path(cfg.output_filename, shard_stem(run.shards[i]))
        if out.exists() and not part_path(out).exists():
            continue  # finished
        lock = claim(out)
        if lock is None:
            continue  # a live process holds it: it will finish it
        if out.exists():  # finished by another run after all, or a part left by a crash after the finish
            remove_part(out)
            lock.release()
            continue
        try:
            fingerprint = {"input": remembered_fingerprint(cfg.output_filename, run.shards[i]),
                           "settings": run.settings}
            writer = ShareWriter(part_path(out), fingerprint, {"shard": out.stem}, overwrite=False)
            state = writer.open(0, 0)
        except BaseException:
            lock.release()
            raise
        return Task(i, state.next_line, lock, writer)
    return None


def combine_mode_stats(per_mode: list[dict]) -> dict:
    """A window's counts over its modes: lines, empty and undecodable once; rewrites per mode."""
    first = per_mode[0]
    total = {k: sum(s[k] for s in per_mode) for k in ("rewritten", "fallbacks", "truncated")}
    return {**total, "lines": first["lines"], "empty": first["empty"], "undecodable": first["undecodable"]}


def rewrite_shard(run: ShardRun, cfg: Config, generator: Generator, task: Task) -> tuple[int, dict]:
    """Rewrite one claimed shard from task.start (every rank of the group); the writer commits
    each window and, at the end, writes OUT/NNNNN.parquet. Returns (lines done now, skipped counts)."""
    path = run.shards[task.index]
    reader = ShardLines(path, cfg.text_key)
    done = 0
    for window in windows(reader.read(task.start), WINDOW_BATCHES * cfg.max_batch_size):
        per_mode, stats = {}, []
        for mode, mode_cfg in run.configs.items():
            per_mode[mode], st = rewrite_window(mode_cfg, run.pools[mode], generator, window)
            stats.append(st)
        done += len(window)
        if task.writer is not None:
            rows = [encode_row(line.index, line.text, {m: per_mode[m][k] for m in per_mode})
                    for k, line in enumerate(window)]
            task.writer.commit(rows, next_line=window[-1].end, in_offset=window[-1].end,
                               stats=combine_mode_stats(stats))
    if task.writer is not None:
        task.writer.finish()
        out = output_path(cfg.output_filename, shard_stem(path))
        metadata = {"settings": run.settings, "input": task.writer.fingerprint["input"],
                    "stats": task.writer.state.stats, "skipped": dict(reader.skipped)}
        rows = write_shard(out, list(run.configs), metadata)
        task.lock.release()
        print(f"shard {path} -> {out}: {rows} rows" + (f", skipped {dict(reader.skipped)}" if reader.skipped
                                                         else ""), flush=True)
    return done, dict(reader.skipped)


@dataclass
class GroupTotals:
    shards: int = 0  # finished by this group now
    lines: int = 0
    stats: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(STAT_KEYS, 0))
    skipped: Counter = dataclasses.field(default_factory=Counter)


def run_group(run: ShardRun, cfg: Config, generator: Generator) -> GroupTotals:
    """This group's walk: claim, rewrite, repeat; the writer's decisions reach the other MP ranks."""
    p = run.parallel
    group = None
    if p.mp_size > 1:
        from fairscale.nn.model_parallel import initialize as fs
        group = fs.get_model_parallel_group()
    order = iter(walk_order(len(run.shards), p.dp_rank, p.dp_size))
    totals = GroupTotals()
    while True:
        claimed: list[Optional[Task]] = [None]

        def decide() -> Optional[tuple[int, int]]:  # on the writer; a failure reaches the whole group
            claimed[0] = claim_next(run, cfg, order)
            return None if claimed[0] is None else (claimed[0].index, claimed[0].start)

        sent = from_group_source(decide, p.is_writer, p.rank - p.mp_rank, group)
        if sent is None:
            return totals
        task = claimed[0] if p.is_writer else Task(*sent)
        try:
            lines, skipped = rewrite_shard(run, cfg, generator, task)
        finally:
            if task.writer is not None:
                task.writer.close()
            if task.lock is not None:
                task.lock.release()
        if p.is_writer:
            totals.shards += 1
            totals.lines += lines
            totals.stats = add_stats(totals.stats, task.writer.state.stats)
            totals.skipped.update(skipped)


def summary(run: ShardRun, cfg: Config, everyone: list, seconds: float, tokens: int) -> str:
    shards = sum(t.shards for t in everyone if t)
    lines = sum(t.lines for t in everyone if t)
    stats: dict = dict.fromkeys(STAT_KEYS, 0)
    skipped: Counter = Counter()
    for t in everyone:
        if t:
            stats = add_stats(stats, t.stats)
            skipped.update(t.skipped)
    finished = sum(output_path(cfg.output_filename, shard_stem(p)).exists() for p in run.shards)
    left = len(run.shards) - finished
    rate = f"{lines / seconds:.2f} samples/s, {tokens / seconds:.1f} generated tokens/s" if lines and seconds else ""
    return (f"done: {finished} of {len(run.shards)} shards finished in {cfg.output_filename}"
            + (f" ({left} still held by another run or unfinished: rerun the same command to complete them)"
               if left else "")
            + f". This run: {shards} shards, {lines} samples x {len(run.configs)} modes: {stats['rewritten']} "
              f"rewritten, {stats['fallbacks']} fell back to the caption, {stats['empty']} empty captions, "
              f"{stats['truncated']} prompts truncated, {stats['undecodable']} with undecodable bytes; skipped "
              f"{dict(skipped) or 'none'}; {seconds:.1f} s{', ' + rate if rate else ''}")


def run_shards(cfg: Config) -> None:
    run = prepare(cfg)
    generator = load_generator(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size,
                               run.parallel, run.dtype, run.tokenizer, cfg.share_prefixes)
    t0 = time.perf_counter()
    mine = run_group(run, cfg, generator)
    seconds = time.perf_counter() - t0
    tokens = generator.stats["generated_tokens"] if run.parallel.is_writer else 0
    everyone = on_every_rank(lambda: (mine if run.parallel.is_writer else None, tokens), run.parallel.world_size)
    log(summary(run, cfg, [t for t, _ in everyone], seconds, sum(n for _, n in everyone)))


def write_shard_dry_run(cfg: Config) -> None:
    """OUT/NNNNN.prompts.jsonl per shard: one object per sample and mode, no model loaded."""
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir) if cfg.tokenizer_path else None
    configs = mode_configs(cfg)
    pools = {m: load_pool(m, cfg.examples) for m in configs}
    cfg.output_filename.mkdir(exist_ok=True)
    for path in expand_shards(cfg.prompt_filename):
        out = cfg.output_filename / f"{shard_stem(path)}.prompts.jsonl"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in ShardLines(path, cfg.text_key).read():
                    for mode, mode_cfg in configs.items():
                        row = {"key": line.index, "caption": line.text, "mode": mode, "prompt": None}
                        if line.text.strip():
                            req = line_request(mode_cfg, pools[mode], tokenizer, line.index, line.text)
                            row.update(req.dry_run_fields())
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")

        atomic_write(out, write)
    log(f"dry run: prompts of {cfg.prompt_filename} written to {cfg.output_filename}/NNNNN.prompts.jsonl")


def run_shard_cli(cfg: Config) -> None:
    """The shard path of llama_rewrite.main: the dry run or the run, with engine errors naming flags."""
    with flag_names(cfg.ckpt_dir, cfg.tokenizer_path, cfg.model_parallel_size):
        if cfg.dry_run:
            if launched_as_rank0():
                write_shard_dry_run(cfg)
            return
        try:
            run_shards(cfg)
        finally:
            teardown_parallel()
