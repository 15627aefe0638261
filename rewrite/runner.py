"""A rewriting run over a caption file: the prompts of each line, the dry run, and the
run itself (prepare, rewrite this data-parallel group's share window by window,
gather the totals, merge the parts). Flags arrive checked, as a `Config`."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, TypeVar

import torch
from tqdm import tqdm

from common.distributed import launched_as_rank0, on_every_rank, on_rank0
from common.fileio import atomic_write
from common.locking import FileLock
from rewrite.cli_args import Config
from rewrite.input_lines import InputInfo, Line, offset_of_line, read_lines, scan_input, share_range
from rewrite.llama import (Generator, ParallelInfo, TokenizerBase, default_dtype, load_generator, load_tokenizer,
                           open_checkpoint)
from rewrite.launch import setup_parallel
from rewrite.output import STAT_KEYS, ShareWriter, add_stats, merge_parts, part_path, plan_run, record_path
from rewrite.prompts import (Pool, TokenizerLike, build_prompt, choose_examples, finish_line, fit_prompt,
                             longest_prefix_tokens, one_line, sampling_seed)

T = TypeVar("T")
WINDOW_BATCHES = 4  # batches handed to the engine per call: it sorts them by length; one commit each
MIN_ROOM = 16  # tokens a prompt needs beyond its examples: some caption (max_seq_len - 10 kept) + generation
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def log(*args: object) -> None:
    if launched_as_rank0():
        print(*args, flush=True)


# ---------------------------------------------------------------- prompts of one line
@dataclass
class LineRequest:
    """What is sent to the model for one input line (built the same for the dry run and the run)."""
    examples: list[tuple[str, str]]
    tokens: Optional[list[int]]  # prompt ids with BOS; None without a tokenizer (dry run)
    text: str  # the prompt text, after any truncation
    truncated: bool
    seed: int  # the line's sampling seed

    def dry_run_fields(self) -> dict:
        """The request as the dry run's JSON shows it (docs/formats.md, "Dry-run prompts")."""
        return {"prompt": self.text, "truncated": self.truncated, "seed": self.seed, "examples": self.examples,
                "prompt_tokens": None if self.tokens is None else len(self.tokens)}


def line_request(cfg: Config, pool: Pool, tokenizer: Optional[TokenizerLike], i: int | str,
                 caption: str) -> LineRequest:
    """The request of input line i (or of the sample with key i): a function of (seed, mode, i, caption) only."""
    examples = choose_examples(pool, cfg.seed, cfg.sample_mode, i)
    text = build_prompt(examples, one_line(caption))
    tokens, truncated = None, False
    if tokenizer is not None:
        tokens, text, truncated = fit_prompt(text, tokenizer, cfg.max_seq_len)
    return LineRequest(examples, tokens, text, truncated, sampling_seed(cfg.seed, cfg.sample_mode, i))


def check_context(cfg: Config, pool: Pool, tokenizer: TokenizerLike) -> None:
    prefix = longest_prefix_tokens(pool, tokenizer)
    if cfg.max_seq_len < prefix + MIN_ROOM:
        raise ValueError(
            f"--max_seq_len {cfg.max_seq_len} is too small for the {cfg.sample_mode} examples"
            f"{' of --examples ' + cfg.examples if cfg.examples else ''}: the prompt text with the 3 longest "
            f"takes {prefix} tokens; give at least {prefix + MIN_ROOM} (room for a caption and its rewrite)")


def write_dry_run(cfg: Config, pool: Pool) -> Path:
    """JSON Lines, one object per input line, so multi-line prompts stay unambiguous."""
    tokenizer = None
    if cfg.tokenizer_path:
        tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir)
        check_context(cfg, pool, tokenizer)
    info = scan_input(cfg.prompt_filename)
    out = cfg.output_filename.with_name(cfg.output_filename.name + ".prompts.jsonl")

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in read_lines(cfg.prompt_filename, 0, 0, info.lines):
                row = {"line": line.index, "caption": line.text, "undecodable": line.undecodable, "prompt": None,
                       "prompt_tokens": None, "truncated": False, "seed": None, "examples": None}
                if line.text.strip():
                    row.update(line_request(cfg, pool, tokenizer, line.index, line.text).dry_run_fields())
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(out, write)
    log(f"dry run: {info.lines} prompts for {cfg.prompt_filename} written to {out}"
        + ("" if tokenizer else " (no --tokenizer_path: prompts are not truncated)"))
    return out


# ---------------------------------------------------------------- one window of lines
def windows(items: Iterable[T], size: int) -> Iterable[list[T]]:
    window: list[T] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def rewrite_window(cfg: Config, pool: Pool, generator: Generator, window: list[Line]) -> tuple[list[str], dict]:
    """Output lines (without newlines) and counts for a window of input lines."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["lines"] = len(window)
    out = [""] * len(window)
    requests, where = [], []
    for k, line in enumerate(window):
        stats["undecodable"] += line.undecodable
        if not line.text.strip():
            stats["empty"] += 1  # an empty line stays empty: nothing to rewrite
            continue
        req = line_request(cfg, pool, generator.tokenizer, line.index, line.text)
        stats["truncated"] += req.truncated
        requests.append(req)
        where.append(k)
    if requests:
        results = generator.generate([r.tokens for r in requests], cfg.max_gen_len, cfg.temperature, cfg.top_p,
                                     [r.seed for r in requests])
        for k, ids in zip(where, results):
            out[k], fell_back = finish_line(window[k].text, generator.tokenizer.decode(ids))
            stats["fallbacks" if fell_back else "rewritten"] += 1
    return out, stats


# ---------------------------------------------------------------- the run
@dataclass
class Prepared:
    """Everything cheap that can fail, done before the model is loaded."""
    parallel: ParallelInfo
    tokenizer: TokenizerBase
    info: InputInfo  # the caption file's scan (rank 0's, sent to all)
    fingerprint: dict  # input + settings: what a resumed run must match
    complete: bool  # the output is already finished for this fingerprint
    dtype: torch.dtype
    locks: list[FileLock]  # held by this process for the run: OUT on rank 0, its part on a writer


@dataclass
class Share:
    """This data-parallel group's lines and where it resumes."""
    writer: Optional[ShareWriter]  # None on the group's other model-parallel ranks
    start: int
    end: int
    next_line: int
    offset: int  # byte offset of next_line in the input


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def checkpoint_identity(cfg: Config) -> dict:
    """What identifies the weights without reading them: the config's and tokenizer's content,
    weight file names and sizes (moving the folder keeps a run resumable). A Meta folder keeps
    the record runs before Hugging Face support wrote (params, shards), so those still resume."""
    ckpt = open_checkpoint(cfg.ckpt_dir)
    files = [[p.name, p.stat().st_size] for p in ckpt.weight_files]
    if ckpt.kind == "meta":
        identity = {"params": _digest(ckpt.config_file), "shards": files}
    else:  # the files that can name BOS / EOS count too
        extra = [ckpt.path / n for n in ("generation_config.json", "tokenizer_config.json")]
        identity = {"config": _digest(ckpt.config_file), "weights": files,
                    "specials": {p.name: _digest(p) for p in extra if p.is_file()}}
    identity["tokenizer"] = _digest(Path(cfg.tokenizer_path))
    return identity


def settings_fingerprint(cfg: Config, pool: Pool, dtype: str) -> dict:
    """Every setting that changes the output lines (not batch size: it does not). Prefix sharing
    changes none in float64 and can flip a near-tied token in fp32/fp16; it is recorded only when
    switched off, so records written before the switch existed still resume."""
    settings = {"seed": cfg.seed, "sample_mode": cfg.sample_mode, "examples": pool.digest(),
                "temperature": cfg.temperature, "top_p": cfg.top_p, "max_seq_len": cfg.max_seq_len,
                "max_gen_len": cfg.max_gen_len, "dtype": dtype, "checkpoint": checkpoint_identity(cfg)}
    return settings if cfg.share_prefixes else {**settings, "share_prefixes": False}


def take_lock(path: Path, what: str, locks: list[FileLock]) -> None:
    """Lock `path` for the run (LockHeld names the holder), kept in `locks` for release()."""
    lock = FileLock(path, f"--output_filename {what}")
    try:
        locks.append(lock.acquire())  # LockHeld (a ValueError) names the holder
    except OSError as e:
        raise ValueError(f"--output_filename {path}: cannot create its lock {lock.path} ({e.strerror or e})") from None


def release(prep: Prepared) -> None:
    while prep.locks:
        prep.locks.pop().release()


def run_dtype(cfg: Config, parallel: ParallelInfo) -> str:
    """--dtype, else the device's default for the weights as stored (fp16 or bf16 on CUDA, fp32 on CPU)."""
    return cfg.dtype or DTYPE_NAMES[default_dtype(parallel.device, open_checkpoint(cfg.ckpt_dir).stored_dtype())]


def prepare(cfg: Config, pool: Pool) -> Prepared:
    """Process groups, tokenizer and context check; on rank 0 the output's lock, the
    input scan and the plan (a second run on the same output stops there, on every rank)."""
    parallel = setup_parallel(cfg.ckpt_dir, cfg.model_parallel_size)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir)
    check_context(cfg, pool, tokenizer)
    dtype = run_dtype(cfg, parallel)
    settings = settings_fingerprint(cfg, pool, dtype)
    locks: list[FileLock] = []

    def scan_and_plan():
        take_lock(cfg.output_filename, str(cfg.output_filename), locks)
        info = scan_input(cfg.prompt_filename)
        fingerprint = {"input": info.fingerprint(), "settings": settings}
        return info, fingerprint, plan_run(cfg.output_filename, parallel.dp_size, fingerprint, cfg.overwrite)

    try:
        info, fingerprint, complete = on_rank0(scan_and_plan, parallel.rank)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return Prepared(parallel, tokenizer, info, fingerprint, complete, TORCH_DTYPES[dtype], locks)


def open_share(cfg: Config, prep: Prepared) -> Share:
    """Only the group's writer reads its progress record; the other model-parallel ranks
    of the group continue from the line it reports."""
    parallel = prep.parallel
    start, end = share_range(prep.info.lines, parallel.dp_size, parallel.dp_rank)
    out = cfg.output_filename
    if parallel.dp_size > 1:
        out = part_path(out, parallel.dp_rank, parallel.dp_size)
    writer = None
    if parallel.is_writer:
        writer = ShareWriter(out, prep.fingerprint, {"dp_size": parallel.dp_size, "share": [start, end]},
                             cfg.overwrite)

    def resume_point():
        if writer is None:
            return None
        if parallel.dp_size > 1:  # rank 0 holds OUT's lock; each group's writer holds its part's
            take_lock(out, f"part {out}", prep.locks)
        state = writer.open(start, offset_of_line(cfg.prompt_filename, prep.info, start))
        return parallel.dp_rank, state.next_line, state.in_offset

    opened = on_every_rank(resume_point, parallel.world_size)
    _, next_line, offset = next(o for o in opened if o is not None and o[0] == parallel.dp_rank)
    return Share(writer, start, end, next_line, offset)


def rewrite_share(cfg: Config, pool: Pool, generator: Generator, share: Share, show_bar: bool) -> int:
    """Rewrite the share's lines from its resume point, committing per window; returns the lines done now."""
    lines = read_lines(cfg.prompt_filename, share.offset, share.next_line, share.end)
    warned = 0
    with tqdm(total=share.end - share.start, initial=share.next_line - share.start, unit="line",
              disable=not show_bar, dynamic_ncols=True) as bar:  # closed before any message of an error
        for window in windows(lines, WINDOW_BATCHES * cfg.max_batch_size):
            out, stats = rewrite_window(cfg, pool, generator, window)
            if share.writer is not None:
                for line in window:
                    if line.undecodable and warned < 5:
                        warned += 1
                        print(f"warning: {cfg.prompt_filename} line {line.index + 1} is not valid UTF-8; "
                              "undecodable bytes were replaced by U+FFFD", file=sys.stderr)
                share.writer.commit(out, next_line=window[-1].index + 1, in_offset=window[-1].end, stats=stats)
            bar.update(len(window))
    return share.end - share.next_line


@dataclass
class Totals:
    stats: dict  # whole-file statistics (STAT_KEYS)
    lines_now: int  # lines rewritten by this run
    tokens_now: int  # tokens generated by this run


def gather_totals(parallel: ParallelInfo, writer: Optional[ShareWriter], lines_now: int,
                  generator: Generator) -> Totals:
    """Summed over the writers (the other ranks of a group did the same work)."""
    mine = (writer.state.stats, lines_now, generator.stats["generated_tokens"]) if writer else (None, 0, 0)
    total = Totals(dict.fromkeys(STAT_KEYS, 0), 0, 0)
    for s, n, t in on_every_rank(lambda: mine, parallel.world_size):
        total = Totals(add_stats(total.stats, s or {}), total.lines_now + n, total.tokens_now + t)
    return total


class Interrupted(Exception):
    """Ctrl-C during the run, with what was kept (the committed lines stay; rerun to resume)."""


def interrupted(cfg: Config, prep: Prepared, share: Share) -> Interrupted:
    if share.writer is None or share.writer.state is None:
        return Interrupted("interrupted; committed lines are kept, rerun the same command to resume")
    where = cfg.output_filename if prep.parallel.dp_size == 1 else share.writer.out_path
    done, total = share.writer.state.next_line - share.start, share.end - share.start
    return Interrupted(f"interrupted; {done} of {total} lines of {where} committed, "
                       "rerun the same command to resume")


def rewrite_all(cfg: Config, pool: Pool, prep: Prepared) -> None:
    """Open this group's share (its part locked), load the model, rewrite, merge."""
    share = open_share(cfg, prep)
    try:
        generator = load_generator(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size,
                                   prep.parallel, prep.dtype, prep.tokenizer, cfg.share_prefixes, cfg.compile)
        t0 = time.perf_counter()
        done = rewrite_share(cfg, pool, generator, share, prep.parallel.rank == 0)
    except KeyboardInterrupt:
        raise interrupted(cfg, prep, share) from None
    finally:
        if share.writer is not None:
            share.writer.close()
    seconds = time.perf_counter() - t0
    if share.writer is not None:
        share.writer.finish()
    totals = gather_totals(prep.parallel, share.writer, done, generator)
    if prep.parallel.dp_size > 1 and prep.parallel.rank == 0:  # every writer has finished: gather_totals synced
        merge_parts(cfg.output_filename, prep.parallel.dp_size, prep.fingerprint, totals.stats)
    log(summary(cfg, totals, seconds) + generator.compile_note())


def run(cfg: Config, pool: Pool) -> None:
    prep = prepare(cfg, pool)
    try:
        if prep.complete:
            log(f"{cfg.output_filename} is already complete ({prep.info.lines} lines; record "
                f"{record_path(cfg.output_filename).name}); nothing to do. Pass --overwrite to redo it.")
            return
        rewrite_all(cfg, pool, prep)
    finally:
        release(prep)


def summary(cfg: Config, totals: Totals, seconds: float) -> str:
    stats, lines_now = totals.stats, totals.lines_now
    rate = f"{lines_now / seconds:.2f} captions/s, {totals.tokens_now / seconds:.1f} generated tokens/s" \
        if seconds > 0 and lines_now else "no lines left to do"
    return (f"done: {cfg.output_filename} has {stats['lines']} lines: {stats['rewritten']} rewritten, "
            f"{stats['fallbacks']} fell back to the original caption, {stats['empty']} empty; "
            f"{stats['truncated']} prompts truncated, {stats['undecodable']} lines with undecodable bytes "
            f"(replaced by U+FFFD). This run: {lines_now} lines in {seconds:.1f} s, {rate}")
