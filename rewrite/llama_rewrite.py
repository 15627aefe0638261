"""Rewrite every caption of a text file with LLaMA-v1 in-context learning (LaCLIP).

    torchrun --nproc_per_node 1 --master_port 12388 llama_rewrite.py \\
        --ckpt_dir $LLAMA_FOLDER/7b --tokenizer_path $LLAMA_FOLDER/7b/tokenizer.model \\
        --max_batch_size 100 --max_seq_len 400 --prompt_filename text/source.txt \\
        --output_filename text/target.txt --sample_mode chatgpt --temperature 0.9

Also runs as `python llama_rewrite.py ...` (one process) and from the repo root as
`rewrite/llama_rewrite.py`. README.md section 1 gives every flag, the resume rules
and the dry-run format.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, TypeVar

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `llama`, `prompts`, ... live beside this file
    sys.path.insert(0, str(HERE))

import fire  # noqa: E402

from cli_args import Config, launched_as_rank0, validate  # noqa: E402
from input_lines import offset_of_line, read_lines, scan_input, share_range  # noqa: E402
from output import STAT_KEYS, ShareWriter, add_stats, merge_parts, part_path, plan_run, record_path  # noqa: E402
from prompts import (Pool, TokenizerLike, build_prompt, choose_examples, finish_line, fit_prompt,  # noqa: E402
                     load_pool, longest_prefix_tokens, one_line, sampling_seed)

if TYPE_CHECKING:
    from llama import Generator, ParallelInfo, Tokenizer
    from input_lines import InputInfo

T = TypeVar("T")
WINDOW_BATCHES = 4  # batches handed to the engine per call: it sorts them by length; one commit each
MIN_ROOM = 16  # tokens a prompt needs beyond its examples: some caption (max_seq_len - 10 kept) + generation


def log(*args: object) -> None:
    if launched_as_rank0():
        print(*args, flush=True)


# ---------------------------------------------------------------- prompts of one line
def make_prompt(cfg: Config, examples: list[tuple[str, str]], tokenizer: Optional[TokenizerLike],
                caption: str) -> tuple[Optional[list[int]], str, bool]:
    """(tokens or None without a tokenizer, prompt text, truncated?) for a caption and its examples."""
    text = build_prompt(examples, one_line(caption))
    if tokenizer is None:
        return None, text, False
    return fit_prompt(text, tokenizer, cfg.max_seq_len)


def check_context(cfg: Config, pool: Pool, tokenizer: TokenizerLike) -> None:
    prefix = longest_prefix_tokens(pool, tokenizer)
    if cfg.max_seq_len < prefix + MIN_ROOM:
        raise ValueError(
            f"--max_seq_len {cfg.max_seq_len} is too small for the {cfg.sample_mode} examples"
            f"{' of --examples ' + cfg.examples if cfg.examples else ''}: the prompt text with the 3 longest "
            f"takes {prefix} tokens; give at least {prefix + MIN_ROOM} (room for a caption and its rewrite)")


def line_request(cfg: Config, pool: Pool, tokenizer: Optional[TokenizerLike], i: int,
                 caption: str) -> tuple:
    """(examples, prompt token ids or None without a tokenizer, prompt text, truncated,
    sampling seed) of input line i: built here for both the dry run and the run, so a
    dry run shows exactly what a run sends."""
    examples = choose_examples(pool, cfg.seed, cfg.sample_mode, i)
    tokens, text, truncated = make_prompt(cfg, examples, tokenizer, caption)
    return examples, tokens, text, truncated, sampling_seed(cfg.seed, cfg.sample_mode, i)


def write_dry_run(cfg: Config, pool: Pool) -> Path:
    """JSON Lines, one object per input line, so multi-line prompts stay unambiguous."""
    tokenizer = None
    if cfg.tokenizer_path:
        from llama import Tokenizer
        tokenizer = Tokenizer(cfg.tokenizer_path)
        check_context(cfg, pool, tokenizer)
    info = scan_input(cfg.prompt_filename)
    out = cfg.output_filename.with_name(cfg.output_filename.name + ".prompts.jsonl")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, caption, bad, _ in read_lines(cfg.prompt_filename, 0, 0, info.lines):
            row = {"line": i, "caption": caption, "undecodable": bad, "prompt": None,
                   "prompt_tokens": None, "truncated": False, "seed": None, "examples": None}
            if caption.strip():
                examples, tokens, text, truncated, seed = line_request(cfg, pool, tokenizer, i, caption)
                row.update(prompt=text, truncated=truncated, prompt_tokens=None if tokens is None else len(tokens),
                           seed=seed, examples=examples)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    log(f"dry run: {info.lines} prompts for {cfg.prompt_filename} written to {out}"
        + ("" if tokenizer else " (no --tokenizer_path: prompts are not truncated)"))
    return out


# ---------------------------------------------------------------- the run
def checkpoint_identity(cfg: Config) -> dict:
    """What identifies the weights without reading them: params.json and tokenizer
    content, shard names and sizes (moving the folder keeps a run resumable)."""
    from llama.checkpoint import shard_paths
    params = Path(cfg.ckpt_dir) / "params.json"
    if not params.is_file():
        raise ValueError(f"--ckpt_dir {cfg.ckpt_dir} has no params.json")
    return {"params": hashlib.sha256(params.read_bytes()).hexdigest()[:16],
            "shards": [[p.name, p.stat().st_size] for p in shard_paths(cfg.ckpt_dir)],
            "tokenizer": hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest()[:16]}


def settings_fingerprint(cfg: Config, pool: Pool, dtype: str) -> dict:
    """Every setting that changes the output lines (not batch size: it does not)."""
    return {"seed": cfg.seed, "sample_mode": cfg.sample_mode, "examples": pool.digest(),
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_seq_len": cfg.max_seq_len,
            "max_gen_len": cfg.max_gen_len, "dtype": dtype, "checkpoint": checkpoint_identity(cfg)}


def _windows(items: Iterable[T], size: int) -> Iterable[list[T]]:
    window: list[T] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def rewrite_window(cfg: Config, pool: Pool, generator: Generator, window: list) -> tuple[list[str], dict]:
    """Output lines (without newlines) and counts for a window of input lines."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["lines"] = len(window)
    out = [""] * len(window)
    prompts, seeds, where = [], [], []
    for k, (i, caption, bad, _) in enumerate(window):
        stats["undecodable"] += bad
        if not caption.strip():
            stats["empty"] += 1  # an empty line stays empty: nothing to rewrite
            continue
        _, tokens, _, truncated, seed = line_request(cfg, pool, generator.tokenizer, i, caption)
        stats["truncated"] += truncated
        prompts.append(tokens)
        seeds.append(seed)
        where.append(k)
    if prompts:
        results = generator.generate(prompts, cfg.max_gen_len, cfg.temperature, cfg.top_p, seeds)
        for k, ids in zip(where, results):
            out[k], fell_back = finish_line(window[k][1], generator.tokenizer.decode(ids))
            stats["fallbacks" if fell_back else "rewritten"] += 1
    return out, stats


def rewrite_share(cfg: Config, pool: Pool, generator: Generator, writer: Optional[ShareWriter],
                  share: tuple[int, int], resume: tuple[int, int], show_bar: bool) -> int:
    """Rewrite lines resume[0]..share[1]-1 of the share (the first one at byte
    resume[1]), committing per window; returns the number of lines done now."""
    from tqdm import tqdm
    (start, end), (first, offset) = share, resume
    bar = tqdm(total=end - start, initial=first - start, unit="line", disable=not show_bar, dynamic_ncols=True)
    lines = read_lines(cfg.prompt_filename, offset, first, end)
    warned = 0
    for window in _windows(lines, WINDOW_BATCHES * cfg.max_batch_size):
        out, stats = rewrite_window(cfg, pool, generator, window)
        for i, _, bad, _ in window:
            if bad and warned < 5 and writer is not None:
                warned += 1
                print(f"warning: {cfg.prompt_filename} line {i + 1} is not valid UTF-8; "
                      "undecodable bytes were replaced by U+FFFD", file=sys.stderr)
        if writer is not None:
            writer.commit(out, next_line=window[-1][0] + 1, in_offset=window[-1][3], stats=stats)
        bar.update(len(window))
    bar.close()
    return end - first


def _prepare(cfg: Config, pool: Pool) -> tuple[ParallelInfo, Tokenizer, InputInfo, dict, bool, "torch.dtype"]:
    """Process groups, tokenizer and context check, and the input scan + plan on
    rank 0: everything cheap that can fail, before the model is loaded."""
    import torch
    from llama import Tokenizer, setup_parallel
    from llama.parallel import on_rank0
    parallel = setup_parallel(cfg.ckpt_dir, cfg.model_parallel_size)
    tokenizer = Tokenizer(cfg.tokenizer_path)
    check_context(cfg, pool, tokenizer)
    dtype = cfg.dtype or ("fp16" if parallel.device.type == "cuda" else "fp32")
    settings = settings_fingerprint(cfg, pool, dtype)

    def scan_and_plan():
        info = scan_input(cfg.prompt_filename)
        fingerprint = {"input": info.fingerprint(), "settings": settings}
        return info, fingerprint, plan_run(cfg.output_filename, parallel.dp_size, fingerprint, cfg.overwrite)

    info, fingerprint, complete = on_rank0(scan_and_plan, parallel.rank)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return parallel, tokenizer, info, fingerprint, complete, torch_dtype


def open_share(cfg: Config, parallel: ParallelInfo, info: InputInfo, fingerprint: dict
               ) -> tuple[Optional[ShareWriter], tuple[int, int], tuple[int, int]]:
    """(writer or None, this group's share, where it resumes). Only the group's
    writer reads its progress record; the other model-parallel ranks of the group
    continue from the line it reports."""
    from llama.parallel import on_every_rank
    start, end = share_range(info.lines, parallel.dp_size, parallel.dp_rank)
    out = cfg.output_filename
    if parallel.dp_size > 1:
        out = part_path(out, parallel.dp_rank, parallel.dp_size)
    writer = None
    if parallel.is_writer:
        writer = ShareWriter(out, fingerprint, {"dp_size": parallel.dp_size, "share": [start, end]}, cfg.overwrite)

    def resume_point():
        if writer is None:
            return None
        state = writer.open(start, offset_of_line(cfg.prompt_filename, info, start))
        return parallel.dp_rank, state.next_line, state.in_offset

    opened = on_every_rank(resume_point, parallel.world_size)
    _, next_line, offset = next(o for o in opened if o is not None and o[0] == parallel.dp_rank)
    return writer, (start, end), (next_line, offset)


def gather_totals(parallel: ParallelInfo, writer: Optional[ShareWriter], lines_now: int,
                  generator: Generator) -> tuple[dict, int, int]:
    """Whole-file statistics and this run's lines and generated tokens, summed over
    the writers (the other ranks of a group did the same work)."""
    from llama.parallel import on_every_rank
    mine = (writer.state.stats, lines_now, generator.stats["generated_tokens"]) if writer else (None, 0, 0)
    stats, lines, tokens = dict.fromkeys(STAT_KEYS, 0), 0, 0
    for s, n, t in on_every_rank(lambda: mine, parallel.world_size):
        stats, lines, tokens = add_stats(stats, s or {}), lines + n, tokens + t
    return stats, lines, tokens


def run(cfg: Config, pool: Pool) -> None:
    from llama import load_generator
    parallel, tokenizer, info, fingerprint, complete, dtype = _prepare(cfg, pool)
    if complete:
        log(f"{cfg.output_filename} is already complete ({info.lines} lines; record "
            f"{record_path(cfg.output_filename).name}); nothing to do. Pass --overwrite to redo it.")
        return
    generator = load_generator(cfg.ckpt_dir, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size,
                               parallel, dtype, tokenizer)
    writer, share, resume = open_share(cfg, parallel, info, fingerprint)
    t0 = time.perf_counter()
    try:
        done = rewrite_share(cfg, pool, generator, writer, share, resume, parallel.rank == 0)
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    if writer is not None:
        writer.finish()
    stats, lines_now, tokens_now = gather_totals(parallel, writer, done, generator)
    if parallel.dp_size > 1 and parallel.rank == 0:  # every writer has finished: gather_totals synced
        merge_parts(cfg.output_filename, parallel.dp_size, fingerprint, stats)
    log(summary(cfg, stats, lines_now, tokens_now, seconds))


def summary(cfg: Config, stats: dict, lines_now: int, tokens_now: int, seconds: float) -> str:
    rate = f"{lines_now / seconds:.2f} captions/s, {tokens_now / seconds:.1f} generated tokens/s" \
        if seconds > 0 and lines_now else "no lines left to do"
    return (f"done: {cfg.output_filename} has {stats['lines']} lines: {stats['rewritten']} rewritten, "
            f"{stats['fallbacks']} fell back to the original caption, {stats['empty']} empty; "
            f"{stats['truncated']} prompts truncated, {stats['undecodable']} lines with undecodable bytes "
            f"(replaced by U+FFFD). This run: {lines_now} lines in {seconds:.1f} s, {rate}")


def main(ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None, temperature: float = 0.9,
         top_p: float = 0.95, max_seq_len: int = 512, max_batch_size: int = 32,
         prompt_filename: str = "text/source.txt", output_filename: str = "text/target.txt",
         sample_mode: str = "chatgpt", max_gen_len: int = 77, seed: int = 1, examples: Optional[str] = None,
         dry_run: bool = False, overwrite: bool = False, model_parallel_size: Optional[int] = None,
         dtype: Optional[str] = None) -> None:
    """Rewrite each line of --prompt_filename into the same line of --output_filename.

    Details: README.md, section 1.

    Args:
        ckpt_dir: LLaMA-v1 folder (params.json, consolidated.*.pth); required unless --dry_run.
        tokenizer_path: SentencePiece tokenizer.model; required unless --dry_run.
        temperature: sampling temperature, >= 0 (0: greedy).
        top_p: nucleus sampling mass, in (0, 1].
        max_seq_len: context for prompt + rewrite, 16..2048; longer prompts are truncated.
        max_batch_size: prompts per forward pass.
        prompt_filename: captions, one per line.
        output_filename: rewrites, one per line, aligned with the captions.
        sample_mode: example pool: chatgpt, bard, mscoco (or coco), human.
        max_gen_len: most new tokens per rewrite.
        seed: fixes the examples and the sampling of every line.
        examples: own pool: JSON {"pairs": ...} / {"groups": ...}, or the original utils.py.
        dry_run: write OUTPUT.prompts.jsonl with the prompts; load no model.
        overwrite: discard an earlier partial or finished output and start over.
        model_parallel_size: ranks per model copy (default: the checkpoint's shard count).
        dtype: fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 on CPU).
    """
    cfg = validate(**locals())
    pool = load_pool(cfg.sample_mode, cfg.examples)
    if cfg.dry_run:
        if launched_as_rank0():  # prompts need no model and no other process
            write_dry_run(cfg, pool)
        return
    from llama import teardown_parallel
    try:
        run(cfg, pool)
    finally:
        teardown_parallel()


def cli(argv: Optional[list[str]] = None) -> int:
    """fire entry point; bad flags and files end with one clear line, exit status 2."""
    try:
        fire.Fire(main, command=argv, name="llama_rewrite.py")
    except (ValueError, OSError) as e:
        print(f"llama_rewrite.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
