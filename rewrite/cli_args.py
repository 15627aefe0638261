"""The flags of llama_rewrite.py, written once: `Config` lists each flag with its default
and help; the fire signature and help text of `llama_rewrite.main` are made from it. fire
parses argv; `check_names` refuses what it bound that is not a flag, and `validate` checks
every value at the edge (messages name the flag and the file) before any process group or
model exists."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from common.distributed import launched_as_rank0
from common.fileio import cannot_write_in
from rewrite.llama import TokenizerError, find_tokenizer
from rewrite.prompts import normalize_sample_modes
from rewrite.shard_input import check_shard_flags, is_shard_input

HERE = Path(__file__).resolve().parent
MAX_CONTEXT = 2048  # LLaMA-v1 was trained with 2048 positions
DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}


def _flag(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    """Every flag, in the original script's order first; values as `validate` normalises them."""
    ckpt_dir: Optional[str] = _flag(None, "LLaMA weights: Meta's folder (params.json, consolidated.*.pth) or "
                                          "Hugging Face's (config.json, *.safetensors / *.bin); required unless --dry_run.")
    tokenizer_path: Optional[str] = _flag(None, "tokenizer.model or tokenizer.json (default: the one in --ckpt_dir, "
                                                "or in its parent for Meta's LLaMA-1/2 downloads).")
    temperature: float = _flag(0.9, "sampling temperature, >= 0 (0: greedy).")
    top_p: float = _flag(0.95, "nucleus sampling mass, in (0, 1].")
    max_seq_len: int = _flag(512, "context for prompt + rewrite, 16..2048; longer prompts are truncated.")
    max_batch_size: int = _flag(32, "prompts per forward pass.")
    prompt_filename: Path = _flag(Path("text/source.txt"), "captions, one per line; or shards: a brace pattern of "
                                  "img2dataset .parquet files or webdataset .tar files ('laion/{00000..00099}.tar'), "
                                  "local or URLs (s3://bucket/laion/{00000..00099}.parquet, any fsspec URL).")
    output_filename: Path = _flag(Path("text/target.txt"), "rewrites, one per line, aligned with the captions; with "
                                  "shards a folder: one NNNNN.parquet per shard (key, caption, one column per mode), "
                                  "or an s3:// prefix (kept as a str).")
    sample_mode: str = _flag("chatgpt", "example pool: chatgpt, bard, mscoco (or coco), human; a comma list "
                             "(chatgpt,bard) rewrites in every mode in one pass (a text file: OUT.<mode>.txt each).")
    max_gen_len: int = _flag(77, "most new tokens per rewrite.")
    seed: int = _flag(1, "fixes the examples and the sampling of every line.")
    examples: Optional[str] = _flag(None, 'own pool: JSON {"pairs": ...} / {"groups": ...}, or the original utils.py.')
    dry_run: bool = _flag(False, "write OUTPUT.prompts.jsonl with the prompts; load no model.")
    overwrite: bool = _flag(False, "discard an earlier partial or finished output and start over.")
    model_parallel_size: Optional[int] = _flag(None, "ranks per model copy (default: the checkpoint's shard count).")
    dtype: Optional[str] = _flag(None, "fp16, bf16 or fp32 (default: on CUDA bf16 for weights stored in bf16, "
                                       "else fp16; fp32 on CPU).")
    text_key: Optional[str] = _flag(None, "with shards: the caption field (default: caption for .parquet, txt for .tar).")
    share_prefixes: bool = _flag(True, "compute the prompt prefixes (header, examples) shared in a batch once; "
                                       "--noshare_prefixes computes every prompt whole (same texts up to "
                                       "float rounding).")
    claim_timeout: float = _flag(300.0, "with an s3:// output: seconds without a heartbeat after which a shard's "
                                        "claim is taken to be a dead run's and taken over.")
    compile: bool = _flag(False, "torch.compile the one-token decode step (CUDA graphs on a GPU, inductor on the "
                                 "CPU): pays once a run outlasts its compile time (see bench/README.md).")
    engine: str = _flag("native", "native (this repository's LLaMA engine, torchrun + fairscale) or vllm (vLLM's "
                                  "offline engine: pip install -e '.[vllm]'); same units, outputs and records.")
    convert_dir: Optional[str] = _flag(None, "--engine vllm with a Meta folder: where its Hugging Face conversion is "
                                             "written once and reused (default: CKPT_NAME.hf beside a local output; "
                                             "for an s3:// output ~/.cache/laclip/hf/).")
    gpu_memory_utilization: Optional[float] = _flag(None, "--engine vllm: the share of GPU memory vLLM may take "
                                                          "(its CPU build: of RAM); default 0.9.")
    vllm_args: Optional[dict] = _flag(None, "--engine vllm: more LLM(...) arguments, e.g. "
                                            "'{\"kv_cache_dtype\": \"fp8\", \"enforce_eager\": True}' (recorded "
                                            "with the output: they may change its texts).")


FLAG_NAMES = tuple(f.name for f in fields(Config))
BOOL_FLAGS = tuple(f.name for f in fields(Config) if isinstance(f.default, bool))
HELP_FLAGS = ("-h", "--help")


def _typed(key: str, argv: Sequence[str]) -> str:
    """The flag as it was typed (--max-batchsize), for messages: fire hands over max_batchsize."""
    for arg in argv:
        name = arg.split("=", 1)[0]
        if arg.startswith("-") and name.lstrip("-").replace("-", "_") in (key, f"no{key}"):
            return name
    return f"--{key}"


def _unknown(typed: str) -> str:
    key = typed.lstrip("-").replace("-", "_")
    close = difflib.get_close_matches(key, FLAG_NAMES + tuple(f"no{b}" for b in BOOL_FLAGS), n=1, cutoff=0.6)
    hint = f"did you mean --{close[0]}?" if close else "the flags are --" + ", --".join(FLAG_NAMES)
    return f"unknown flag {typed}; {hint}"


def check_names(flags: dict[str, Any], stray: Sequence[Any] = (), argv: Sequence[str] = ()) -> dict[str, Any]:
    """What fire bound -> the flags by their Config names, refused before any work if a name is
    not a flag. fire itself binds the flags a function names, runs it with defaults for the rest
    and only complains about a leftover after it returns (a whole run with a mistyped flag
    ignored); so the CLI lets fire bind every flag (**flags) and stray value (*stray) and checks
    them here. Taking **flags turns off fire's -x shortcut (the one flag starting with x): done here."""
    if stray:
        raise ValueError(f"unexpected argument {stray[0]!r}: every value follows its flag "
                         "(--name value or --name=value)")
    named = {}
    for key, value in flags.items():
        matches = [name for name in FLAG_NAMES if name[0] == key] if len(key) == 1 else [key]
        if len(matches) > 1:
            raise ValueError(f"flag {_typed(key, argv)} is ambiguous: it could be --" + ", --".join(matches))
        if not matches or matches[0] not in FLAG_NAMES:
            raise ValueError(_unknown(_typed(key, argv)))
        named[matches[0]] = value
    return named


def signature() -> inspect.Signature:
    """main(*, ckpt_dir=None, ...): what fire reads to accept and list the flags (keyword-only,
    so fire passes them by name to main(**flags))."""
    return inspect.Signature([
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                          default=str(f.default) if isinstance(f.default, Path) else f.default)
        for f in fields(Config)])


def flags_help() -> str:
    """The docstring's Args section, which fire shows as each flag's help."""
    return "\n".join(f"    {f.name}: {f.metadata['help']}" for f in fields(Config))


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
    reason = cannot_write_in(path.parent)
    if reason:
        raise ValueError(f"--output_filename {value}: cannot write in {path.parent} ({reason})")
    return path


def _switch(flag: str, value: object) -> bool:
    if not isinstance(value, bool):  # fire binds the token after a bare switch to it
        raise ValueError(f"--{flag} is a switch: give it alone (or --{flag}=False), got {value!r}")
    return value


def _optional_str(value: object) -> Optional[str]:
    return None if value is None else str(value)


def _given(value: object) -> bool:
    return value is not None and value is not True and str(value) != ""


def _tokenizer_path(c: Config, dry_run: bool) -> Optional[str]:
    """--tokenizer_path as given, else (outside a dry run) the tokenizer --ckpt_dir comes with."""
    for flag, value in (("ckpt_dir", c.ckpt_dir), ("tokenizer_path", c.tokenizer_path)):
        if value is True or (value is not None and str(value) == ""):
            raise ValueError(f"--{flag} needs a path")
    if not dry_run and c.ckpt_dir is None:
        raise ValueError("--ckpt_dir is required (the LLaMA weights folder), except with --dry_run")
    if not dry_run and not Path(str(c.ckpt_dir)).is_dir():
        raise ValueError(f"--ckpt_dir: {c.ckpt_dir} is not a directory")
    if _given(c.tokenizer_path) or c.ckpt_dir is None:
        return _optional_str(c.tokenizer_path)
    try:
        found = find_tokenizer(str(c.ckpt_dir)) if Path(str(c.ckpt_dir)).is_dir() else None
    except TokenizerError as e:  # both tokenizer files, disagreeing
        raise ValueError(f"--ckpt_dir: {e} (--tokenizer_path)") from None
    if found is None and not dry_run:
        raise ValueError(f"--tokenizer_path is required: --ckpt_dir {c.ckpt_dir} has no tokenizer.model or "
                         "tokenizer.json (nor, for a Meta folder, its parent a tokenizer.model)")
    return found


def validate(raw: dict[str, Any]) -> Config:
    """The flags as typed (names of Config, as fire passes them) -> a checked Config."""
    c = Config(**check_names(raw))
    modes = normalize_sample_modes(c.sample_mode)
    dry_run = _switch("dry_run", c.dry_run)
    tokenizer_path = _tokenizer_path(c, dry_run)
    temperature = _float("temperature", c.temperature)
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = _float("top_p", c.top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if c.dtype is not None and str(c.dtype).lower() not in DTYPES:
        raise ValueError(f"--dtype {c.dtype!r} is not supported; choose fp16, bf16 or fp32")
    mp = None if c.model_parallel_size is None else _int("model_parallel_size", c.model_parallel_size, 1)
    numbers = {"max_seq_len": _int("max_seq_len", c.max_seq_len, 16, MAX_CONTEXT),
               "max_batch_size": _int("max_batch_size", c.max_batch_size, 1),
               "max_gen_len": _int("max_gen_len", c.max_gen_len, 1),
               "seed": _int("seed", c.seed, -(1 << 62), 1 << 62)}
    if is_shard_input(c.prompt_filename) or isinstance(c.prompt_filename, (list, tuple)):
        prompt, output, text_key = check_shard_flags(c.prompt_filename, c.output_filename, c.text_key)
    else:
        if c.text_key is not None:
            raise ValueError("--text_key names the caption field of .parquet / .tar shards; "
                             f"--prompt_filename {c.prompt_filename} is a text file")
        prompt, text_key = _input_file(c.prompt_filename), None
        output = _output_file(c.output_filename, prompt)
    return Config(
        ckpt_dir=_optional_str(c.ckpt_dir), tokenizer_path=tokenizer_path,
        temperature=temperature, top_p=top_p, prompt_filename=prompt, output_filename=output,
        sample_mode=",".join(modes), examples=_optional_str(c.examples), dry_run=dry_run,
        overwrite=_switch("overwrite", c.overwrite), model_parallel_size=mp,
        dtype=None if c.dtype is None else DTYPES[str(c.dtype).lower()], text_key=text_key,
        share_prefixes=_switch("share_prefixes", c.share_prefixes), compile=_switch("compile", c.compile),
        claim_timeout=_claim_timeout(c.claim_timeout), **numbers, **_engine_flags(c, dry_run))


def _claim_timeout(value: object) -> float:
    seconds = _float("claim_timeout", value)
    if seconds <= 0:
        raise ValueError(f"--claim_timeout must be > 0 seconds, got {seconds:g}")
    return seconds


ENGINES = ("native", "vllm")
VLLM_ONLY = ("convert_dir", "gpu_memory_utilization", "vllm_args")
# LLM(...) arguments the flags set: a --vllm_args key among them is refused, naming the flag to use
VLLM_FROM_FLAGS = {"model": "ckpt_dir", "tokenizer": "tokenizer_path", "skip_tokenizer_init": "engine",
                   "dtype": "dtype", "max_model_len": "max_seq_len", "max_num_seqs": "max_batch_size",
                   "tensor_parallel_size": "model_parallel_size", "seed": "seed",
                   "gpu_memory_utilization": "gpu_memory_utilization", "enable_prefix_caching": "share_prefixes"}


def _engine_flags(c: Config, dry_run: bool) -> dict:
    """--engine and the flags that only vLLM reads, checked (vLLM imported only for a run with it)."""
    engine = str(c.engine).lower()
    if engine not in ENGINES:
        raise ValueError(f"--engine {c.engine!r} is not an engine; choose native or vllm")
    given = [f for f in VLLM_ONLY if getattr(c, f) is not None]
    if engine == "native" and given:
        raise ValueError(f"--{given[0]} is read by --engine vllm only (this run uses --engine native)")
    if engine == "vllm" and c.compile:
        raise ValueError("--compile is the native engine's: vLLM compiles and captures CUDA graphs by default "
                         "(--vllm_args '{\"enforce_eager\": True}' turns that off)")
    memory = None if c.gpu_memory_utilization is None else _float("gpu_memory_utilization", c.gpu_memory_utilization)
    if memory is not None and not 0 < memory <= 1:
        raise ValueError(f"--gpu_memory_utilization must be in (0, 1], got {memory:g}")
    args = c.vllm_args
    if args is not None:
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise ValueError(f"--vllm_args must be a dict of LLM(...) arguments, e.g. "
                             f"'{{\"enforce_eager\": True}}', got {args!r}")
        taken = sorted(set(args) & set(VLLM_FROM_FLAGS))
        if taken:
            raise ValueError(f"--vllm_args {taken[0]!r} is set by --{VLLM_FROM_FLAGS[taken[0]]}; give that flag instead")
    if engine == "vllm" and not dry_run:
        from rewrite.vllm_engine import vllm_version
        vllm_version()  # not installed: one line naming the install command
    return {"engine": engine, "convert_dir": _optional_str(c.convert_dir), "gpu_memory_utilization": memory,
            "vllm_args": args}
