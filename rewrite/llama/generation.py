"""Batched text generation with a KV cache: padded one-pass prefill, early stop, seeded sampling.

Schedule of one `generate` call: prompts are sorted (by token ids with prefix sharing,
else by length) and taken in micro-batches of at most `max_batch_size`. A micro-batch is
left-padded so all prompts end at the same cache column P (each row keeps its own RoPE
positions 0, 1, ...; pad keys are masked), prefilled in one forward pass (with prefix
sharing: the prefixes rows share once, then the rest; prefix.py) into the decoder's static
cache (decode.py), then decoded one column per step by `decode.decode_step`, eager or
compiled. A row stops at its first stop token (EOS, and '\n' when asked) or its length limit;
the host checks that when it reads the tokens back, and drops finished rows from the batch
once a quarter of the live rows are done (COMPACT_BELOW), so the long tail of a batch steps
only its stragglers.

Sampling draws one uniform number per (prompt, step) from a counter-based hash
of (seed, step), so a prompt's text does not depend on the batch it lands in,
on the batch size, on the process count or on the other prompts (up to
floating-point differences between batch shapes: exact in float64).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import prefix
from .decode import Decoder
from .model import KVCache, Transformer
from .parallel import ParallelInfo
from .sampling import sample, splitmix64, uniforms
from .sentencepiece_tokenizer import TokenizerBase

Stops = tuple[set[int], set[int]]  # (ids that end a row, those of them that still belong to its text)

# Finished rows leave the cache once the live rows fall to this fraction of its rows. A module
# constant, not a Generator argument: no caller has a reason to tune it (0.5 to 0.9 time the same,
# see bench/README.md); bench/bench_rewrite.py --ablation sets it to 0 (never compact) to time it.
COMPACT_BELOW = 0.75


class Generator:
    """Generates continuations with a loaded `Transformer` (see `checkpoint.load_generator`)."""

    def __init__(self, model: Transformer, tokenizer: TokenizerBase, max_seq_len: int, max_batch_size: int,
                 parallel: Optional[ParallelInfo] = None, share_prefixes: bool = True, min_shared_gain: int = 16,
                 compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.parallel = parallel or ParallelInfo.single(model.tok_embeddings.weight.device)
        self.share_prefixes = share_prefixes  # compute prompt prefixes shared in a micro-batch once (prefix.py)
        self.min_shared_gain = min_shared_gain  # ... when that saves at least this many token computations
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        self.compile = compile
        self.max_batch_size = max_batch_size  # makes the decoder
        self._stats = {"prompts": 0, "generated_tokens": 0, "prompt_tokens": 0, "prefill_tokens": 0,
                       "seconds": 0.0, "batches": 0}

    @property
    def max_batch_size(self) -> int:
        return self.decoder.max_batch

    @max_batch_size.setter
    def max_batch_size(self, n: int) -> None:
        """Static buffers for n rows x max_seq_len columns and the step, compiled if asked (decode.py);
        allocated on first use."""
        if getattr(self, "decoder", None) is None or self.decoder.max_batch != n:
            self.decoder = Decoder(self.model, n, self.max_seq_len, self.compile)

    @property
    def stats(self) -> dict:
        """Cumulative over all `generate` calls: prompts, generated_tokens, prompt_tokens, seconds,
        batches (micro-batches run), prefill_tokens (rows x columns the prefills fed, padding
        included, shared prefixes once), decode_steps; with compile, compiles (graphs compiled:
        the first, and recompiles) and compile_seconds (included in seconds)."""
        d = self.decoder
        extra = {"compiles": d.compiles, "compile_seconds": d.compile_seconds} if d.compile else {}
        return {**self._stats, "decode_steps": d.steps, **extra}

    def compile_note(self) -> str:
        """For a run's log line: '' without compile, else the graphs compiled and their time, and
        whether the run was too short to repay them."""
        d = self.decoder
        if not d.compile:
            return ""
        note = f"; decode step compiled: {d.compiles} graphs (first and recompiles) in {d.compile_seconds:.1f} s"
        if d.compile_seconds > 0.5 * self._stats["seconds"]:
            note += ", more than half of this run: too short to repay compiling (leave --compile off)"
        return note

    def _check(self, prompts: list[list[int]], seeds: list[int], max_gen_len: int) -> None:
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty (it should start with BOS)")
            if len(p) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than max_seq_len={self.max_seq_len}")
            if min(p) < 0 or max(p) >= self.tokenizer.n_words:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.tokenizer.n_words})")

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float, top_p: float,
                 seeds: list[int], stop_at_newline: bool = True) -> list[list[int]]:
        """Generated ids per prompt, in input order, without the stop token (but with a
        token that merges text and a newline, like LLaMA-3's '.\\n': its text is part of the output).

        prompt_tokens include BOS. A row stops at any EOS id, at its first token holding a newline when
        stop_at_newline, after max_gen_len tokens, or when prompt + generation
        reaches max_seq_len (a prompt longer than max_seq_len - max_gen_len is
        cut short there, not rejected). temperature 0: greedy.
        """
        self._check(prompt_tokens, seeds, max_gen_len)
        t0 = time.perf_counter()
        tok = self.tokenizer
        stop = set(tok.eos_ids) | (set(tok.newline_ids) if stop_at_newline else set())
        keep = set(tok.newline_kept) if stop_at_newline else set()  # e.g. '.\n': its '.' is text
        rows = [_Row(p, s, min(max_gen_len, self.max_seq_len - len(p))) for p, s in zip(prompt_tokens, seeds)]
        # By length, so a micro-batch pads little; with prefix sharing by token ids, so prompts that
        # start alike share a micro-batch (prefix.py feeds the unshared rests by length).
        order = (lambda r: r.prompt) if self.share_prefixes else (lambda r: len(r.prompt))
        todo = sorted((r for r in rows if r.limit > 0), key=order)
        for b in range(0, len(todo), self.max_batch_size):
            self._batch(todo[b:b + self.max_batch_size], temperature, top_p, (stop, keep))
            self._stats["batches"] += 1
        out = [r.out for r in rows]
        self._check_agreement(out)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        s = self._stats
        s["prompts"] += len(prompt_tokens)
        s["prompt_tokens"] += sum(len(p) for p in prompt_tokens)
        s["generated_tokens"] += sum(len(o) for o in out)
        s["seconds"] += time.perf_counter() - t0
        return out

    def _batch(self, rows: list["_Row"], temperature: float, top_p: float, stop: Stops) -> None:
        """One micro-batch: prompts right-aligned to end at column P, prefilled into the decoder's
        cache over P + (most tokens allowed) columns, then decoded until every row stops."""
        share = self._plan(rows)
        if share is not None:  # sorted by what is left to prefill, longest first (prefix.prefill_shared)
            order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt) - share.shared(i), reverse=True)
            rows, share = [rows[i] for i in order], share.permuted(order)
        dev = self.device
        lens = [len(r.prompt) for r in rows]
        P, G = max(lens), max(r.limit for r in rows)
        positions, key_valid = _layout(lens, P + G, dev)
        u = None
        if temperature > 0:  # [B, G]: row i's draw for its k-th token depends on (seed_i, k) only
            u = torch.tensor([uniforms(r.seed, G) for r in rows], device=dev)
        cache = self.decoder.begin(positions, key_valid, u)
        logits = self._prefill(rows, cache, P, positions, key_valid, share)
        self.decoder.first(sample(logits, temperature, top_p, None if u is None else u[:, 0]), P)
        self._decode(rows, P, G, temperature, top_p, stop)

    def _plan(self, rows: list["_Row"]) -> Optional[prefix.Plan]:
        """Which prefixes the prompts share (None: nothing worth sharing, or sharing is off)."""
        if not self.share_prefixes or len(rows) < 2:
            return None
        share = prefix.plan([r.prompt for r in rows], self.min_shared_gain)
        return share if share.levels else None

    def _prefill(self, rows: list["_Row"], cache: KVCache, P: int, positions: torch.Tensor,
                 key_valid: Optional[torch.Tensor], share: Optional[prefix.Plan]) -> torch.Tensor:
        """Fill cache columns [0, P) and return next-token logits [B, V]: in one pass, or the
        shared prefixes once and the rest in chunks."""
        if share is not None:
            logits, fed = prefix.prefill_shared(self.model, cache, [r.prompt for r in rows], share, P, positions,
                                                key_valid)
            self._stats["prefill_tokens"] += fed
            return logits
        tokens = torch.zeros(len(rows), P, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, P - len(r.prompt):] = torch.tensor(r.prompt)
        self._stats["prefill_tokens"] += len(rows) * P
        return self.model(tokens.to(self.device), positions[:, :P], None if key_valid is None else key_valid[:, :P],
                          cache, 0, last_only=True)

    def _decode(self, rows: list["_Row"], P: int, G: int, temperature: float, top_p: float, stop: Stops) -> None:
        """Token 0 is sampled; feed one column per step until every row stops. The host reads the
        tokens every `sync_every` steps: rows stop there and finished rows leave the batch."""
        dec, live, t = self.decoder, list(range(len(rows))), 1  # live: batch row of each decoder row
        read = 0  # tokens of the live rows read so far
        while True:
            for i, toks in zip(live, dec.tokens(len(live), read, t)):
                for tok in toks:
                    rows[i].push(tok, stop)
            read = t
            keep = [j for j, i in enumerate(live) if not rows[i].done]
            if not keep or t >= G:
                return
            if len(keep) < len(live) and len(keep) <= COMPACT_BELOW * len(live):
                dec.compact(keep, P + G)
                live = [live[j] for j in keep]
            for _ in range(min(dec.sync_every, G - t)):
                dec.step(len(live), P + t, temperature, top_p, temperature > 0)
                t += 1

    def _check_agreement(self, out: list[list[int]]) -> None:
        """MP ranks sample independently from identical logits; fail loudly if they ever diverge."""
        if self.parallel.mp_size == 1:
            return
        import torch.distributed as dist
        from fairscale.nn.model_parallel.initialize import get_model_parallel_group
        h = 0
        for o in out:
            for tok in o:
                h = splitmix64(h ^ tok)
            h = splitmix64(h ^ 0xFFFF)
        x = torch.tensor([h >> 12, -(h >> 12)], dtype=torch.long, device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=get_model_parallel_group())
        if x[0].item() != -x[1].item():
            raise RuntimeError("model-parallel ranks generated different tokens; "
                               "they must receive identical prompts and seeds")


@dataclass
class _Row:
    """One prompt's generation state."""
    prompt: list[int]
    seed: int
    limit: int  # tokens it may generate (max_gen_len, or less near max_seq_len)
    out: list[int] = field(default_factory=list)
    done: bool = False

    def push(self, tok: int, stops: Stops) -> None:
        if self.done:
            return  # finished, still in the batch until it is compacted: ignore
        stop, keep = stops
        if tok in stop:
            self.done = True
            if tok in keep:  # a newline merged after text ('.\n'): the text is the rewrite's
                self.out.append(tok)
        else:
            self.out.append(tok)
            self.done = len(self.out) >= self.limit


def _layout(lens: list[int], cols: int, dev: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """For prompts right-aligned to end at column max(lens): row-local RoPE positions
    [B, cols] and key validity [B, cols] (None when nothing is padded)."""
    P = max(lens)
    pad = torch.tensor([P - n for n in lens], device=dev)
    col = torch.arange(cols, device=dev)
    positions = (col[None] - pad[:, None]).clamp(min=0)
    key_valid = col[None] >= pad[:, None] if min(lens) < P else None
    return positions, key_valid
