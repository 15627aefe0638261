"""The flags of llama_rewrite.py, written once: `Config` lists each flag with its default
and help; the fire signature and help text of `llama_rewrite.main` are made from it. fire
parses argv; rewrite/flags.py's `check_names` refuses what it bound that is not a flag, and
`validate` checks every value at the edge (messages name the flag and the file) before any
process group or model exists."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from common.distributed import launched_as_rank0
from common.fileio import cannot_write_in
from rewrite.flags import as_float, as_int, as_optional_str, as_switch, check_names, flag
from rewrite.llama import TokenizerError, find_tokenizer
from rewrite.prompts import normalize_sample_modes
from rewrite.shard_input import check_shard_flags, is_shard_input

HERE = Path(__file__).resolve().parent
MAX_CONTEXT = 2048  # LLaMA-v1 was trained with 2048 positions
DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class Config:
    """Every flag, in the original script's order first; values as `validate` normalises them."""
    ckpt_dir: Optional[str] = flag(None, "LLaMA weights: Meta's folder (params.json, consolidated.*.pth) or "
                                         "Hugging Face's (config.json, *.safetensors / *.bin); required unless --dry_run.")
    tokenizer_path: Optional[str] = flag(None, "tokenizer.model or tokenizer.json (default: the one in --ckpt_dir, "
                                               "or in its parent for Meta's LLaMA-1/2 downloads).")
    temperature: float = flag(0.9, "sampling temperature, >= 0 (0: greedy).")
    top_p: float = flag(0.95, "nucleus sampling mass, in (0, 1].")
    max_seq_len: int = flag(512, "context for prompt + rewrite, 16..2048; longer prompts are truncated.")
    max_batch_size: int = flag(32, "prompts per forward pass.")
    prompt_filename: Path = flag(Path("text/source.txt"), "captions, one per line; or shards: a brace pattern of "
                                 "img2dataset .parquet files or webdataset .tar files ('laion/{00000..00099}.tar'), "
                                 "local or URLs (s3://bucket/laion/{00000..00099}.parquet, any fsspec URL).")
    output_filename: Path = flag(Path("text/target.txt"), "rewrites, one per line, aligned with the captions; with "
                                 "shards a folder: one NNNNN.parquet per shard (key, caption, one column per mode), "
                                 "or an s3:// prefix (kept as a str).")
    sample_mode: str = flag("chatgpt", "example pool: chatgpt, bard, mscoco (or coco), human; a comma list "
                            "(chatgpt,bard) rewrites in every mode in one pass (a text file: OUT.<mode>.txt each).")
    max_gen_len: int = flag(77, "most new tokens per rewrite.")
    seed: int = flag(1, "fixes the examples and the sampling of every line.")
    examples: Optional[str] = flag(None, 'own pool: JSON {"pairs": ...} / {"groups": ...}, or the original utils.py.')
    dry_run: bool = flag(False, "write OUTPUT.prompts.jsonl with the prompts; load no model.")
    overwrite: bool = flag(False, "discard an earlier partial or finished output and start over.")
    model_parallel_size: Optional[int] = flag(None, "ranks per model copy (default: the checkpoint's shard count).")
    dtype: Optional[str] = flag(None, "fp16, bf16 or fp32 (default: on CUDA bf16 for weights stored in bf16, "
                                      "else fp16; fp32 on CPU).")
    text_key: Optional[str] = flag(None, "with shards: the caption field (default: caption for .parquet, txt for .tar).")
    share_prefixes: bool = flag(True, "compute the prompt prefixes (header, examples) shared in a batch once; "
                                      "--noshare_prefixes computes every prompt whole (same texts up to "
                                      "float rounding).")
    claim_timeout: float = flag(300.0, "with an s3:// output: seconds without a heartbeat after which a shard's "
                                       "claim is taken to be a dead run's and taken over.")
    compile: bool = flag(False, "torch.compile the one-token decode step (CUDA graphs on a GPU, inductor on the "
                                "CPU): pays once a run outlasts its compile time (see bench/README.md).")
    engine: str = flag("native", "native (this repository's LLaMA engine, torchrun + fairscale) or vllm (vLLM's "
                                 "offline engine: pip install -e '.[vllm]'); same units, outputs and records.")
    convert_dir: Optional[str] = flag(None, "--engine vllm with a Meta folder: where its Hugging Face conversion is "
                                            "written once and reused (default: CKPT_NAME.hf beside a local output; "
                                            "for an s3:// output ~/.cache/laclip/hf/).")
    gpu_memory_utilization: Optional[float] = flag(None, "--engine vllm: the share of GPU memory vLLM may take "
                                                         "(its CPU build: of RAM); default 0.9.")
    vllm_args: Optional[dict] = flag(None, "--engine vllm: more LLM(...) arguments, e.g. "
                                           "'{\"kv_cache_dtype\": \"fp8\", \"enforce_eager\": True}' (recorded "
                                           "with the output: they may change its texts).")


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


def _given(value: object) -> bool:
    return value is not None and value is not True and str(value) != ""


def _tokenizer_path(c: Config, dry_run: bool) -> Optional[str]:
    """--tokenizer_path as given, else (outside a dry run) the tokenizer --ckpt_dir comes with."""
    for name, value in (("ckpt_dir", c.ckpt_dir), ("tokenizer_path", c.tokenizer_path)):
        if value is True or (value is not None and str(value) == ""):
            raise ValueError(f"--{name} needs a path")
    if not dry_run and c.ckpt_dir is None:
        raise ValueError("--ckpt_dir is required (the LLaMA weights folder), except with --dry_run")
    if not dry_run and not Path(str(c.ckpt_dir)).is_dir():
        raise ValueError(f"--ckpt_dir: {c.ckpt_dir} is not a directory")
    if _given(c.tokenizer_path) or c.ckpt_dir is None:
        return as_optional_str(c.tokenizer_path)
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
    c = Config(**check_names(Config, raw))
    modes = normalize_sample_modes(c.sample_mode)
    dry_run = as_switch("dry_run", c.dry_run)
    tokenizer_path = _tokenizer_path(c, dry_run)
    temperature = as_float("temperature", c.temperature)
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    top_p = as_float("top_p", c.top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")
    if c.dtype is not None and str(c.dtype).lower() not in DTYPES:
        raise ValueError(f"--dtype {c.dtype!r} is not supported; choose fp16, bf16 or fp32")
    mp = None if c.model_parallel_size is None else as_int("model_parallel_size", c.model_parallel_size, 1)
    numbers = {"max_seq_len": as_int("max_seq_len", c.max_seq_len, 16, MAX_CONTEXT),
               "max_batch_size": as_int("max_batch_size", c.max_batch_size, 1),
               "max_gen_len": as_int("max_gen_len", c.max_gen_len, 1),
               "seed": as_int("seed", c.seed, -(1 << 62), 1 << 62)}
    if is_shard_input(c.prompt_filename) or isinstance(c.prompt_filename, (list, tuple)):
        prompt, output, text_key = check_shard_flags(c.prompt_filename, c.output_filename, c.text_key)
    else:
        if c.text_key is not None:
            raise ValueError("--text_key names the caption field of .parquet / .tar shards; "
                             f"--prompt_filename {c.prompt_filename} is a text file")
        prompt, text_key = _input_file(c.prompt_filename), None
        output = _output_file(c.output_filename, prompt)
    return Config(
        ckpt_dir=as_optional_str(c.ckpt_dir), tokenizer_path=tokenizer_path,
        temperature=temperature, top_p=top_p, prompt_filename=prompt, output_filename=output,
        sample_mode=",".join(modes), examples=as_optional_str(c.examples), dry_run=dry_run,
        overwrite=as_switch("overwrite", c.overwrite), model_parallel_size=mp,
        dtype=None if c.dtype is None else DTYPES[str(c.dtype).lower()], text_key=text_key,
        share_prefixes=as_switch("share_prefixes", c.share_prefixes), compile=as_switch("compile", c.compile),
        claim_timeout=_claim_timeout(c.claim_timeout), **numbers, **_engine_flags(c, dry_run))


def _claim_timeout(value: object) -> float:
    seconds = as_float("claim_timeout", value)
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
    memory = None if c.gpu_memory_utilization is None else as_float("gpu_memory_utilization", c.gpu_memory_utilization)
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
    return {"engine": engine, "convert_dir": as_optional_str(c.convert_dir), "gpu_memory_utilization": memory,
            "vllm_args": args}
