"""Validation of llama_rewrite.py's flags, at the edge: every message names the flag
(and the file), before any process group or model exists."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prompts import normalize_sample_mode

HERE = Path(__file__).resolve().parent
MAX_CONTEXT = 2048  # LLaMA-v1 was trained with 2048 positions
DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class Config:
    ckpt_dir: Optional[str]
    tokenizer_path: Optional[str]
    temperature: float
    top_p: float
    max_seq_len: int
    max_batch_size: int
    prompt_filename: Path
    output_filename: Path
    sample_mode: str  # normalised: chatgpt, bard, mscoco or human
    max_gen_len: int
    seed: int
    examples: Optional[str]
    dry_run: bool
    overwrite: bool
    model_parallel_size: Optional[int]
    dtype: Optional[str]  # fp16, bf16, fp32, or None for the device's default


def _int(flag: str, value: object, low: int, high: Optional[int] = None) -> int:
    # fire hands over whatever was typed: "abc" stays a str, a bare flag is True
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"--{flag} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"--{flag} must be {bound}, got {value}")
    return value


def _float(flag: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--{flag} must be a number, got {value!r}")
    return float(value)


def launched_as_rank0() -> bool:
    """Global rank 0 under torchrun, or a plain single process; readable before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def _beside_script(path: Path, exists) -> Path:
    """A relative path as typed, against the current directory; if it does not fit
    there but does relative to rewrite/, that one (so the README's command, with
    text/source.txt, also works from the repo root)."""
    if path.is_absolute() or exists(path) or not exists(HERE / path):
        return path
    if launched_as_rank0():
        print(f"note: {path} taken relative to {HERE}")
    return HERE / path


def _input_file(value: object) -> Path:
    path = _beside_script(Path(str(value)), Path.exists)
    if not path.is_file():
        raise ValueError(f"--prompt_filename {value}: file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"--prompt_filename {value}: the file is empty, there is nothing to rewrite")
    return path


def _output_file(value: object, prompt: Path) -> Path:
    path = _beside_script(Path(str(value)), lambda p: p.parent.is_dir())
    if path.is_dir():
        raise ValueError(f"--output_filename {value} is a directory; give a file name")
    if not path.parent.is_dir():
        raise ValueError(f"--output_filename {value}: directory {path.parent} does not exist")
    if path.resolve() == prompt.resolve():
        raise ValueError(f"--output_filename {value} is the --prompt_filename; give another file")
    return path


def validate(ckpt_dir, tokenizer_path, temperature, top_p, max_seq_len, max_batch_size, prompt_filename,
             output_filename, sample_mode, max_gen_len, seed, examples, dry_run, overwrite,
             model_parallel_size, dtype) -> Config:
    mode = normalize_sample_mode(sample_mode)
    if not dry_run:
        for flag, value in (("ckpt_dir", ckpt_dir), ("tokenizer_path", tokenizer_path)):
            if value is None or value is True or str(value) == "":
                raise ValueError(f"--{flag} is required (the LLaMA weights folder and its tokenizer.model), "
                                 "except with --dry_run")
    temperature = _float("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = _float("top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose fp16, bf16 or fp32")
    if model_parallel_size is not None:
        model_parallel_size = _int("model_parallel_size", model_parallel_size, 1)
    max_seq_len = _int("max_seq_len", max_seq_len, 16, MAX_CONTEXT)
    max_batch_size = _int("max_batch_size", max_batch_size, 1)
    max_gen_len = _int("max_gen_len", max_gen_len, 1)
    seed = _int("seed", seed, -(1 << 62), 1 << 62)
    prompt = _input_file(prompt_filename)
    return Config(
        ckpt_dir=None if ckpt_dir is None else str(ckpt_dir),
        tokenizer_path=None if tokenizer_path is None else str(tokenizer_path),
        temperature=temperature, top_p=top_p,
        max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        prompt_filename=prompt, output_filename=_output_file(output_filename, prompt),
        sample_mode=mode, max_gen_len=max_gen_len, seed=seed,
        examples=None if examples is None else str(examples),
        dry_run=bool(dry_run), overwrite=bool(overwrite), model_parallel_size=model_parallel_size,
        dtype=None if dtype is None else DTYPES[str(dtype).lower()])
