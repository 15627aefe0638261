"""A rewriting run over units of work (rewrite/units.py's `Units`): the line ranges of a caption
file (rewrite/units_text.py) or the shards of a pattern (rewrite/units_shards.py). Each data-parallel
group's writer (model-parallel rank 0) claims the next unit nobody has finished or holds and sends (unit, resume
point) to its group; the group rewrites it window by window in every sample mode, the writer
commits each window and finishes the unit. A caption's rewrite depends on (seed, mode, line or
key, caption) only (rewrite/prompts.py), so the output is the same whatever the number of groups,
jobs, kills and resumes. Flags arrive checked, as a `Config`. Details: docs/rewriting.md."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, TypeVar

import torch
from tqdm import tqdm

from common.distributed import from_group_source, launched_as_rank0, on_every_rank, on_rank0
from common import storage
from rewrite.cli_args import Config
from rewrite.launch import engine_errors_name_flags, load_vllm, setup_parallel, setup_vllm_processes, teardown_parallel
from rewrite.llama import (Generator, ParallelInfo, TokenizerBase, default_dtype, load_generator, load_tokenizer,
                           open_checkpoint)
from rewrite.prompts import (Pool, TokenizerLike, build_prompt, choose_examples, finish_line, fit_prompt, load_pool,
                             longest_prefix_tokens, normalize_sample_modes, one_line, sampling_seed)
from rewrite.planning import log, make_output_folder, plan_units
from rewrite.shard_input import ShardLines, expand_shards, is_shard_input, shard_stem
from rewrite.units import CONTENT, Line, RunTotals, UnitClaim, Units
from rewrite.units_text import mode_output, read_lines, scan_input
from rewrite.vllm_engine import check_supported
from rewrite.weights_identity import check_output_weights, content_hashes

T = TypeVar("T")
WINDOW_BATCHES = 4  # batches handed to the engine per call: it sorts them by length; one commit each
MIN_ROOM = 16  # tokens a prompt needs beyond its examples: some caption (max_seq_len - 10 kept) + generation
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
MAX_WARNINGS = 5  # undecodable lines named one by one; the summary counts them all


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


def mode_configs(cfg: Config) -> dict[str, Config]:
    """One Config per sample mode."""
    return {m: dataclasses.replace(cfg, sample_mode=m) for m in normalize_sample_modes(cfg.sample_mode)}


def write_dry_run(cfg: Config, tokenizer: Optional[TokenizerBase]) -> None:
    """JSON Lines, one object per input line (and mode), so multi-line prompts stay unambiguous: a
    caption file gives OUT.prompts.jsonl per mode, shards OUT/NNNNN.prompts.jsonl. No model."""
    configs = mode_configs(cfg)
    pools = {m: load_pool(m, cfg.examples) for m in configs}
    for m in configs if tokenizer else ():
        check_context(configs[m], pools[m], tokenizer)
    if is_shard_input(cfg.prompt_filename):
        make_output_folder(cfg.output_filename)
        files = [(storage.join(str(cfg.output_filename), f"{shard_stem(p)}.prompts.jsonl"), tuple(configs),
                  ShardLines(p, cfg.text_key).read, True) for p in expand_shards(cfg.prompt_filename)]
    else:
        n = scan_input(cfg.prompt_filename).lines
        outs = {m: mode_output(cfg.output_filename, m, tuple(configs)) for m in configs}
        files = [(o.with_name(o.name + ".prompts.jsonl"), (m,), lambda: read_lines(cfg.prompt_filename, 0, 0, n),
                  False) for m, o in outs.items()]
    for out, modes, lines, keyed in files:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in lines():
                    for m in modes:  # a shard's row names its mode; a caption file's its line's bytes
                        row = {"key": line.index, "caption": line.text, "mode": m, "prompt": None} if keyed else {
                            "line": line.index, "caption": line.text, "undecodable": line.undecodable, "prompt": None,
                            "prompt_tokens": None, "truncated": False, "seed": None, "examples": None}
                        if line.text.strip():
                            row.update(line_request(configs[m], pools[m], tokenizer, line.index, line.text)
                                       .dry_run_fields())
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")

        storage.write_atomic(str(out), write)
    log(f"dry run: prompts of {cfg.prompt_filename} written to "
        + (f"{cfg.output_filename}/NNNNN.prompts.jsonl" if is_shard_input(cfg.prompt_filename)
           else ", ".join(str(f[0]) for f in files))
        + ("" if tokenizer else " (no --tokenizer_path: prompts are not truncated)"))


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


@dataclass
class WindowPlan:
    """One mode's requests for a window of lines: which lines are asked (`where`), and each line's counts."""
    requests: list[LineRequest]
    where: list[int]
    counts: list[dict]


def plan_window(cfg: Config, pool: Pool, tokenizer: TokenizerLike, window: list[Line]) -> WindowPlan:
    plan = WindowPlan([], [], [{"lines": 1, "undecodable": int(line.undecodable)} for line in window])
    for k, line in enumerate(window):
        if not line.text.strip():
            plan.counts[k]["empty"] = 1  # an empty line stays empty: nothing to rewrite
            continue
        req = line_request(cfg, pool, tokenizer, line.index, line.text)
        plan.counts[k]["truncated"] = int(req.truncated)
        plan.requests.append(req)
        plan.where.append(k)
    return plan


def finish_window(plan: WindowPlan, window: list[Line], results: list[list[int]],
                  tokenizer: TokenizerLike) -> tuple[list[str], list[dict]]:
    """Output lines (without newlines) and each line's counts (STAT_KEYS)."""
    out = [""] * len(window)
    for k, ids in zip(plan.where, results):
        out[k], fell_back = finish_line(window[k].text, tokenizer.decode(ids))
        plan.counts[k]["fallbacks" if fell_back else "rewritten"] = 1
    return out, plan.counts


def _generate(cfg: Config, generator: Generator, requests: list[LineRequest]) -> list[list[int]]:
    if not requests:
        return []
    return generator.generate([r.tokens for r in requests], cfg.max_gen_len, cfg.temperature, cfg.top_p,
                              [r.seed for r in requests])


def rewrite_window(cfg: Config, pool: Pool, generator: Generator, window: list[Line]) -> tuple[list[str], list[dict]]:
    """Output lines and counts for a window of input lines in one mode."""
    plan = plan_window(cfg, pool, generator.tokenizer, window)
    return finish_window(plan, window, _generate(cfg, generator, plan.requests), generator.tokenizer)


def rewrite_modes(job: "Job", generator: Generator, window: list[Line]) -> dict[str, tuple[list[str], list[dict]]]:
    """A window in every mode: one engine call per mode, or one for all where the engine schedules
    whole queues (vLLM: more prompts in flight, and prefixes shared across modes' calls alike).
    The modes differ only in their examples, so one call's sampling settings serve them all."""
    if not getattr(generator, "joins_modes", False) or len(job.configs) == 1:
        return {m: rewrite_window(c, job.pools[m], generator, window) for m, c in job.configs.items()}
    plans = {m: plan_window(c, job.pools[m], generator.tokenizer, window) for m, c in job.configs.items()}
    results = _generate(next(iter(job.configs.values())), generator, [r for p in plans.values() for r in p.requests])
    per_mode, at = {}, 0
    for m, plan in plans.items():
        per_mode[m] = finish_window(plan, window, results[at:at + len(plan.requests)], generator.tokenizer)
        at += len(plan.requests)
    return per_mode


# ---------------------------------------------------------------- the run
@dataclass
class Job:
    """Everything cheap that can fail, done before the model is loaded."""
    parallel: ParallelInfo
    tokenizer: TokenizerBase
    checkpoint: object  # rewrite.llama's Checkpoint, opened once
    configs: dict[str, Config]  # per mode
    pools: dict[str, Pool]  # per mode
    units: Units
    dtype: torch.dtype
    todo: bool  # False: every output is already complete


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def checkpoint_identity(ckpt, tokenizer_path: str) -> dict:
    """What identifies the weights: the config's and tokenizer's content, weight file names and
    sizes, and each weight file's content hash from sampled blocks (rewrite/weights_identity.py;
    remembered by stat, so a repeat start reads none of it). Moving the folder keeps a run
    resumable. A Meta folder keeps the keys runs before Hugging Face support wrote (params,
    shards), so those still resume."""
    files = [[p.name, p.stat().st_size] for p in ckpt.weight_files]
    if ckpt.kind == "meta":
        identity = {"params": _digest(ckpt.config_file), "shards": files}
    else:  # the files that can name BOS / EOS count too
        extra = [ckpt.path / n for n in ("generation_config.json", "tokenizer_config.json")]
        identity = {"config": _digest(ckpt.config_file), "weights": files,
                    "specials": {p.name: _digest(p) for p in extra if p.is_file()}}
    identity["tokenizer"] = _digest(Path(tokenizer_path))
    identity[CONTENT] = content_hashes(list(ckpt.weight_files))
    return identity


def settings_fingerprint(cfg: Config, pool: Pool, dtype: str, identity: dict) -> dict:
    """Every setting that changes the output lines (not batch size: it does not). Prefix sharing
    changes none in float64 and can flip a near-tied token in fp32/fp16; it is recorded only when
    switched off, so records written before the switch existed still resume. --compile likewise,
    recorded only when on."""
    settings = {"seed": cfg.seed, "sample_mode": cfg.sample_mode, "examples": pool.digest(),
                "temperature": cfg.temperature, "top_p": cfg.top_p, "max_seq_len": cfg.max_seq_len,
                "max_gen_len": cfg.max_gen_len, "dtype": dtype, "checkpoint": identity}
    if not cfg.share_prefixes:
        settings["share_prefixes"] = False
    if cfg.compile:
        settings["compile"] = True
    if cfg.engine != "native":  # recorded only for vLLM, so native records written before still resume
        from rewrite.vllm_engine import vllm_version
        settings["engine"] = f"{cfg.engine} {vllm_version()}"
        if cfg.vllm_args:
            settings["vllm_args"] = cfg.vllm_args
    return settings


def prepare(cfg: Config) -> Job:
    """The checkpoint folder and tokenizer (opened once), process groups, context checks, and
    on rank 0 the plan of the units (sent to every rank)."""
    ckpt = open_checkpoint(cfg.ckpt_dir)  # its errors get the flag's name in run_cli
    if cfg.engine == "vllm":
        parallel = setup_vllm_processes()
    else:
        parallel = setup_parallel(ckpt, cfg.model_parallel_size)
    tokenizer = load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir)
    configs = mode_configs(cfg)
    pools = {m: load_pool(m, cfg.examples) for m in configs}
    for m in configs:
        check_context(configs[m], pools[m], tokenizer)
    dtype = cfg.dtype or DTYPE_NAMES[default_dtype(parallel.device, ckpt.stored_dtype)]  # asked only on a GPU
    if cfg.engine == "vllm":  # what vLLM cannot run, before the plan binds the output to these settings
        args = ckpt.model_args()
        check_supported(args.dim // args.n_heads, TORCH_DTYPES[dtype], f"--ckpt_dir {cfg.ckpt_dir}")

    def settings() -> dict[str, dict]:  # on global rank 0: the identity of --ckpt_dir, whatever the engine loads
        identity = checkpoint_identity(ckpt, cfg.tokenizer_path)
        if not cfg.overwrite:
            note = check_output_weights(cfg.output_filename, cfg.prompt_filename, tuple(configs), identity,
                                        cfg.ckpt_dir)
            if note:
                log(note)
        return {m: settings_fingerprint(configs[m], pools[m], dtype, identity) for m in configs}

    units, todo = on_rank0(lambda: plan_units(cfg, tuple(configs), settings, parallel.dp_size), parallel.rank)
    return Job(parallel, tokenizer, ckpt, configs, pools, units, TORCH_DTYPES[dtype], todo)


def walk_order(n: int, dp_rank: int, dp_size: int) -> list[int]:
    """All units, starting at this group's own share so groups rarely meet at a claim."""
    start = n * dp_rank // dp_size
    return list(range(start, n)) + list(range(start))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run, with what was kept (the committed lines stay; rerun to resume)."""


def rewrite_unit(job: Job, generator: Generator, claim: UnitClaim, bar: tqdm, warned: list[int]) -> int:
    """Rewrite one claimed unit from its resume point in every mode (every rank of the group);
    the writer commits each window and finishes the unit. Returns the lines done."""
    done, writer = 0, bool(claim.writers)
    some_cfg = next(iter(job.configs.values()))
    batches = getattr(generator, "window_batches", WINDOW_BATCHES)
    for window in windows(job.units.lines(claim), batches * some_cfg.max_batch_size):
        per_mode = rewrite_modes(job, generator, window)
        if writer:
            for line in window:
                if line.undecodable and warned[0] < MAX_WARNINGS:
                    warned[0] += 1
                    print(f"warning: {job.units.where(claim, line)} is not valid UTF-8; "
                          "undecodable bytes were replaced by U+FFFD", file=sys.stderr)
            job.units.commit(claim, window, per_mode)
        done += len(window)
        bar.update(len(window))
    if writer:
        job.units.finish(claim)
    return done


def run_group(job: Job, generator: Generator) -> RunTotals:
    """This group's walk: claim, rewrite, repeat; the writer's decisions reach the other MP ranks."""
    p = job.parallel
    group = None
    if p.mp_size > 1:
        from fairscale.nn.model_parallel import initialize as fs
        group = fs.get_model_parallel_group()
    order, totals, warned = iter(walk_order(job.units.count, p.dp_rank, p.dp_size)), RunTotals(), [0]
    with tqdm(total=job.units.total_lines, unit="line", disable=p.rank != 0 or not job.units.total_lines,
              dynamic_ncols=True) as bar:  # closed before any error's message; shards print a line each
        while True:
            claimed: list[Optional[UnitClaim]] = [None]

            def decide() -> Optional[tuple[int, int, int]]:  # on the writer; a failure reaches the whole group
                claimed[0] = next((c for c in map(job.units.claim, order) if c is not None), None)
                return None if claimed[0] is None else (claimed[0].unit, claimed[0].start, claimed[0].offset)

            sent = from_group_source(decide, p.is_writer, p.rank - p.mp_rank, group)
            if sent is None:
                return totals
            claim = claimed[0] if p.is_writer else UnitClaim(*sent)
            try:
                lines = rewrite_unit(job, generator, claim, bar, warned)
            except KeyboardInterrupt:
                kept = job.units.progress(claim) if claim.writers else "committed lines are kept"
                raise Interrupted(f"interrupted; {kept}, rerun the same command to resume") from None
            finally:
                claim.close()
            if p.is_writer:
                totals.add(lines, claim)


def run(cfg: Config) -> None:
    job = prepare(cfg)
    if not job.todo:
        return
    if cfg.engine == "vllm":
        generator = load_vllm(cfg, job.checkpoint, job.tokenizer, job.dtype, job.parallel)
    else:
        generator = load_generator(job.checkpoint, cfg.tokenizer_path, cfg.max_seq_len, cfg.max_batch_size,
                                   job.parallel, job.dtype, job.tokenizer, cfg.share_prefixes, cfg.compile)
    t0 = time.perf_counter()
    mine = run_group(job, generator)
    seconds = time.perf_counter() - t0
    mine.tokens = generator.stats["generated_tokens"] if job.parallel.is_writer else 0
    everyone = on_every_rank(lambda: mine, job.parallel.world_size)  # every group has finished
    if job.parallel.rank == 0:
        print(job.units.conclude(RunTotals.sum(everyone), seconds) + generator.compile_note(), flush=True)


def run_cli(cfg: Config) -> None:
    """llama_rewrite.main after the flags: the dry run or the run, with engine errors naming flags."""
    with engine_errors_name_flags(cfg.ckpt_dir, cfg.tokenizer_path, cfg.model_parallel_size):
        if cfg.dry_run:
            if launched_as_rank0():  # prompts need no model and no other process
                write_dry_run(cfg, load_tokenizer(cfg.tokenizer_path, cfg.ckpt_dir) if cfg.tokenizer_path else None)
            return
        try:
            run(cfg)
        finally:
            teardown_parallel()
