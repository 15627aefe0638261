"""The decode loop's device side: buffers allocated once, and one step function that eager and
compiled decoding share (gpt-fast's recipe, on the engine's own model code).

`Decoder` holds, for `max_batch_size` rows and `max_seq_len` columns: the KV cache, and per
row the token being fed, the RoPE positions, the key validity, the uniforms of the sampler
and the tokens generated. A micro-batch uses the top-left corner of them. `decode_step` feeds
one column and samples the next token, reading and writing only those buffers, with the
column and the step index held on the device: no host sync and no Python value in it that
changes from step to step. The host reads the generated tokens back every `sync_every` steps
(rows stop and finished rows are compacted there; generation.py).

Eager, each step sees exactly the rows still running and the columns written so far, as
before. Compiled (`torch.compile`, rows and key columns marked dynamic; on CUDA mode="reduce-overhead", CUDA graphs),
a step sees the rows rounded up to a batch bucket and the columns rounded up to a multiple of
LENGTH_BUCKET, columns past the current one masked: shapes change only when a bucket does, so
compaction and prompts of any length reuse one compiled graph (recompiles are counted).
Masked columns add exact zeros, but SDPA and inductor may sum in another order than the eager
kernels: equal texts are exact in float64, and in float32/fp16/bf16 equal up to rounding (a
near tie between two tokens may fall the other way), as with prefix sharing.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .model import KVCache, Transformer
from .sampling import sample

LENGTH_BUCKET = 64  # key columns a compiled step attends to, rounded up to this


def batch_bucket(n: int, max_batch: int) -> int:
    """Rows a compiled step runs for n live rows: a power of two up to 8, then a multiple of 8."""
    b = 1 << max(0, (n - 1).bit_length()) if n <= 8 else -(-n // 8) * 8
    return min(b, max_batch)


def decode_step(model: Transformer, tok: torch.Tensor, col: torch.Tensor, t: torch.Tensor,
                positions: torch.Tensor, key_valid: torch.Tensor, u: Optional[torch.Tensor],
                out: torch.Tensor, cache: KVCache, temperature, top_p) -> None:
    """Feed tok [B] at cache column col [1], sample token t [1] of every row into out[:, t] and
    tok, advance col and t. positions [B, S>col] (RoPE position per column), key_valid [B, L]
    (pad columns False), u [B, S] (the sampler's uniforms by step; None: greedy), cache views
    [B, H, L, D]; temperature and top_p floats, or 0-d tensors (compiled: one graph for greedy
    and sampled runs, see generation.sample). Everything in place, on the device."""
    B, L = key_valid.shape
    pos = positions.gather(1, col.expand(B, 1))
    valid = key_valid & (torch.arange(L, device=col.device) <= col)
    logits = model(tok[:, None], pos, valid, cache, col, last_only=True)
    draw = None if u is None else u.gather(1, t.expand(B, 1))[:, 0]
    nxt = sample(logits, temperature, top_p, draw)
    tok.copy_(nxt)
    out.index_copy_(1, t, nxt[:, None])
    col.add_(1)
    t.add_(1)


class Decoder:
    """Static decode buffers of one model, allocated on first use; `compile` picks the step."""

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, compile: bool = False):
        self.model, self.max_batch, self.max_len, self.compile = model, max_batch_size, max_seq_len, compile
        w = model.tok_embeddings.weight
        self.device, self.dtype = w.device, w.dtype
        self.sync_every = 4 if compile and self.device.type == "cuda" else 1
        self._step: Optional[Callable] = None
        self._views: dict[tuple[int, int], tuple] = {}
        self.compiles, self.compile_seconds, self.steps, self.compactions = 0, 0.0, 0, 0
        self.cache: KVCache = []

    def _allocate(self) -> None:
        m, d, S = self.max_batch, self.device, self.max_len
        self._views = {}
        self.cache = self.model.new_cache(m, S, d, self.dtype)
        self.tok = torch.zeros(m, dtype=torch.long, device=d)
        self.col = torch.zeros(1, dtype=torch.long, device=d)
        self.t = torch.zeros(1, dtype=torch.long, device=d)
        self.positions = torch.zeros(m, S, dtype=torch.long, device=d)
        self.key_valid = torch.ones(m, S, dtype=torch.bool, device=d)
        self.u = torch.zeros(m, S, device=d)
        self.out = torch.zeros(m, S, dtype=torch.long, device=d)
        self.temperature = torch.zeros((), device=d)  # the compiled step's sampling settings
        self.top_p = torch.ones((), device=d)
        self.model.reserve_rope(S, d)
        if self.compile and self._step is None:
            mode = "reduce-overhead" if d.type == "cuda" else None  # CUDA graphs; inductor on the CPU
            self._step = torch.compile(decode_step, mode=mode)  # rows and columns dynamic: _take
        if self.compile and d.type == "cuda":  # CUDA graphs may then write these in place instead of copying them
            for x in [self.tok, self.col, self.t, self.positions, self.key_valid, self.u, self.out,
                      self.temperature, self.top_p, *(z for kv in self.cache for z in kv)]:
                torch._dynamo.mark_static_address(x)

    def begin(self, positions: torch.Tensor, key_valid: Optional[torch.Tensor],
              u: Optional[torch.Tensor]) -> KVCache:
        """Lay out a micro-batch of B rows and C = P + G columns (positions [B, C], key_valid [B, C]
        or None, u [B, G] or None); returns the cache views [B, H, C, D] that its prefill fills."""
        B, C = positions.shape
        if not self.cache or C > self.max_len:  # rows of unequal prompts may reach past max_seq_len
            self.max_len = max(self.max_len, C)
            self._allocate()
        self.positions[:B, :C] = positions
        self.key_valid[:batch_bucket(B, self.max_batch)] = True  # bucket rows past B: never fully masked
        if key_valid is not None:
            self.key_valid[:B, :C] = key_valid
        if u is not None:
            self.u[:B, :u.shape[1]] = u
        return [(k[:B, :, :C], v[:B, :, :C]) for k, v in self.cache]

    def first(self, nxt: torch.Tensor, P: int) -> None:
        """Token 0 of every row (sampled from the prefill's logits); the next step feeds it at column P."""
        self.tok[:len(nxt)] = nxt
        self.out[:len(nxt), 0] = nxt
        self.col.fill_(P)
        self.t.fill_(1)

    def step(self, n: int, length: int, temperature: float, top_p: float, sampled: bool) -> None:
        """One decode step for the first n rows, whose keys fill columns [0, length)."""
        if self._step is None:
            B, L = n, length
            views = self._take(B, L, sampled)
            decode_step(self.model, *views, temperature, top_p)
        else:  # greedy runs draw too (u is zeros there): one graph for both
            B = batch_bucket(n, self.max_batch)
            L = min(-(-length // LENGTH_BUCKET) * LENGTH_BUCKET, self.max_len)
            if (B, L) not in self._views:
                self._views[(B, L)] = self._take(B, L, True)
            self.temperature.fill_(temperature)
            self.top_p.fill_(top_p)
            self._compiled(self._views[(B, L)], self.temperature, self.top_p)
        self.steps += 1

    def _compiled(self, views: tuple, temperature: torch.Tensor, top_p: torch.Tensor) -> None:
        from torch._dynamo.utils import counters
        before, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        self._step(self.model, *views, temperature, top_p)
        new = counters["stats"]["unique_graphs"] - before
        if new:  # this call compiled: its time is compile time (one step's run is noise beside it)
            self.compiles += new
            self.compile_seconds += time.perf_counter() - t0

    def _take(self, B: int, L: int, sampled: bool) -> tuple:
        views = (self.tok[:B], self.col, self.t, self.positions[:B], self.key_valid[:B, :L],
                 self.u[:B] if sampled else None, self.out[:B], [(k[:B, :, :L], v[:B, :, :L]) for k, v in self.cache])
        if self.compile:  # one graph for every bucket: rows (dim 0) and key columns symbolic, weights static
            kv = [z for pair in views[7] for z in pair]
            for x in [views[0], views[3], views[4], views[6], *kv] + ([views[5]] if sampled else []):
                torch._dynamo.maybe_mark_dynamic(x, 0)
                if self.device.type == "cuda":  # CUDA graphs write these in place instead of copying them
                    torch._dynamo.mark_static_address(x)
            for x in [views[4], *kv]:
                torch._dynamo.maybe_mark_dynamic(x, x.dim() - 2 if x.dim() == 4 else 1)
        return views

    def tokens(self, n: int, t0: int, t1: int) -> list[list[int]]:
        """Tokens t0..t1-1 of the first n rows (the host sync)."""
        return self.out[:n, t0:t1].tolist()

    def compact(self, keep: list[int], C: int) -> None:
        """Move rows `keep` (ascending) to the front of every buffer, over the micro-batch's C columns."""
        idx = torch.tensor(keep, device=self.device)
        n = len(keep)
        self.compactions += 1
        for x in [self.tok, self.positions, self.key_valid, self.u, self.out]:
            x[:n] = x.index_select(0, idx)
        for k, v in self.cache:
            k[:n, :, :C] = k[:, :, :C].index_select(0, idx)
            v[:n, :, :C] = v[:, :, :C].index_select(0, idx)
