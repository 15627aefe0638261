"""LLaMA transformer (1, 2 and 3) for inference, with a batch KV cache and padded prefill.

Parameter names are the keys of Meta's `consolidated.*.pth` files, so a shard
loads with `load_state_dict` as is. The module is pure: no device moves, no
process-group queries at construction, no global dtype switch. With
`model_parallel_size > 1` the projections are split like fairscale's parallel
layers and communicate over fairscale's model-parallel group, which
`initialize_model_parallel` must have created before the first forward.

Shapes: B batch rows, T new tokens this call, S cached key columns,
H heads on this rank (H_kv key/value heads), D head dim, C model dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParallelError
from .rope import RopeScaling, apply_rope, rope_table

# One (k, v) pair per layer, each [B, H, S_max, D].
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ModelArgs:
    """A LLaMA architecture, in the names of Meta's params.json (LLaMA-7B values as defaults).

    Meta's FFN width rule (2/3 of 4*dim, times ffn_dim_multiplier, rounded up to
    multiple_of) applies unless hidden_dim gives the width outright (Hugging Face's
    intermediate_size). n_kv_heads < n_heads: grouped-query attention (LLaMA-2 70B, LLaMA-3).
    """
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: one key/value head per query head
    vocab_size: int = -1  # -1 in Meta's LLaMA-1/2 files: the tokenizer decides
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    hidden_dim: Optional[int] = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)  # 11008 for 7B after rounding
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


COLUMN = {"wq", "wk", "wv", "w1", "w3", "output"}  # output rows split across ranks: dim 0
ROW = {"wo", "w2", "tok_embeddings"}  # input / embedding dim split: dim 1


def split_dim(key: str) -> Optional[int]:
    """Dimension along which parameter `key` is split across model-parallel ranks; None if replicated."""
    name = key.rsplit(".", 2)[-2] if "." in key else key
    if name in COLUMN:
        return 0
    if name in ROW:
        return 1
    return None


class ParallelLinear(nn.Module):
    """Bias-free projection split over the fairscale model-parallel group.

    kind 'col': weight [n_out/mp, n_in], output stays split (wq, wk, wv, w1, w3);
    'out': the same, then all-gathered along the last dim (the vocabulary
    projection); 'row': weight [n_out, n_in/mp] on a split input, output
    all-reduced (wo, w2). Written here rather than taken from fairscale.layers
    because those allocate with the legacy `torch.Tensor(size)` (which ignores a
    `torch.device('meta')` context) and build a full-size master weight per layer.
    """

    def __init__(self, n_in: int, n_out: int, mp: int, kind: str):
        super().__init__()
        if (n_in if kind == "row" else n_out) % mp:
            raise ParallelError(f"a {kind}-parallel projection {n_in}->{n_out} does not split over {mp} ranks")
        self.kind = kind
        shape = (n_out, n_in // mp) if kind == "row" else (n_out // mp, n_in)
        self.weight = nn.Parameter(torch.empty(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.kind == "row":
            return _all_reduce(y)
        if self.kind == "out":
            return _gather_last(y)
        return y


def _all_reduce(y: torch.Tensor) -> torch.Tensor:
    """Sum over the model-parallel group: fairscale's mapping, or inside torch.compile the same
    collective in its traceable form, so a compiled step stays one graph."""
    from fairscale.nn.model_parallel import initialize, mappings
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol
        return funcol.all_reduce(y, "sum", initialize.get_model_parallel_group())
    return mappings.reduce_from_model_parallel_region(y)


def _gather_last(y: torch.Tensor) -> torch.Tensor:
    """The ranks' parts concatenated along the last dim (as `_all_reduce`, fairscale's or traceable)."""
    from fairscale.nn.model_parallel import initialize, mappings
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as funcol
        return funcol.all_gather_tensor(y, y.dim() - 1, initialize.get_model_parallel_group())
    return mappings.gather_from_model_parallel_region(y)


class ParallelEmbedding(nn.Module):
    """Embedding table [V, C/mp] split along the embedding dim, gathered after lookup."""

    def __init__(self, n_vocab: int, dim: int, mp: int):
        super().__init__()
        if dim % mp:
            raise ParallelError(f"dim={dim} is not divisible by model-parallel size {mp}")
        self.weight = nn.Parameter(torch.empty(n_vocab, dim // mp))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _gather_last(F.embedding(tokens, self.weight))


def _linear(n_in: int, n_out: int, mp: int, kind: str) -> nn.Module:
    # One process: a plain layer with the same parameter name, no process group needed.
    return nn.Linear(n_in, n_out, bias=False) if mp == 1 else ParallelLinear(n_in, n_out, mp, kind)


def _embedding(n_vocab: int, dim: int, mp: int) -> nn.Module:
    return nn.Embedding(n_vocab, dim) if mp == 1 else ParallelEmbedding(n_vocab, dim, mp)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 even for fp16 activations, as Meta computes them.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, mp: int):
        super().__init__()
        for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
            if n % mp:  # each rank holds whole query heads and whole key/value heads
                raise ParallelError(f"{what}={n} is not divisible by model-parallel size {mp}")
        if args.n_heads % args.kv_heads:
            raise ParallelError(f"n_heads={args.n_heads} is not a multiple of n_kv_heads={args.kv_heads}")
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = hd = args.head_dim
        self.wq = _linear(args.dim, args.n_heads * hd, mp, "col")
        self.wk = _linear(args.dim, args.kv_heads * hd, mp, "col")
        self.wv = _linear(args.dim, args.kv_heads * hd, mp, "col")
        self.wo = _linear(args.n_heads * hd, args.dim, mp, "row")
        # [wq; wk; wv] of this rank, set by fuse_projections, used by decode steps (T == 1) only: in a
        # prefill the split outputs cost a copy each in RoPE, more than two saved matmul calls (CPU: -5%)
        self.wqkv: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, cis: torch.Tensor, mask: Optional[torch.Tensor],
                cache: Optional[tuple[torch.Tensor, torch.Tensor]], start) -> torch.Tensor:
        B, T, _ = x.shape
        nq, nkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        if self.wqkv is not None and T == 1:  # a decode step: one matmul (fuse_projections), split in three
            q, k, v = F.linear(x, self.wqkv).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = q.view(B, T, nq, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        q, k = apply_rope(q, cis), apply_rope(k, cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            ck, cv = cache  # [B, H_kv, S, D]; columns [start, start+T) are this call's
            if isinstance(start, torch.Tensor):  # a decode step at a column held on the device (decode.py):
                ck.index_copy_(2, start, k)  # static shapes, attend to all S columns under the mask
                cv.index_copy_(2, start, v)
                k, v = ck, cv
            else:
                ck[:, :, start:start + T] = k
                cv[:, :, start:start + T] = v
                k, v = ck[:, :, :start + T], cv[:, :, :start + T]
        gqa = nkv != nq  # SDPA shares each K/V head among its queries
        if mask is None:  # no padding and no cached prefix: plain causal
            out = F.scaled_dot_product_attention(q, k, v, is_causal=(T > 1), enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, mp: int):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = _linear(args.dim, hidden, mp, "col")
        self.w2 = _linear(hidden, args.dim, mp, "row")
        self.w3 = _linear(args.dim, hidden, mp, "col")
        self.w13: Optional[torch.Tensor] = None  # [w1; w3] of this rank (fuse_projections), decode steps only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None and x.shape[1] == 1:
            gate, up = F.linear(x, self.w13).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)  # SwiGLU
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, mp: int):
        super().__init__()
        self.attention = Attention(args, mp)
        self.feed_forward = FeedForward(args, mp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cis, mask, cache, start):
        h = x + self.attention(self.attention_norm(x), cis, mask, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA. Build under `torch.device('meta')` and load with `assign=True` to skip init cost."""

    def __init__(self, args: ModelArgs, model_parallel_size: int = 1):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (params.json has -1: take it from the tokenizer)")
        self.args = args
        self.model_parallel_size = model_parallel_size
        mp = model_parallel_size
        self.tok_embeddings = _embedding(args.vocab_size, args.dim, mp)
        self.layers = nn.ModuleList(TransformerBlock(args, mp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = _linear(args.dim, args.vocab_size, mp, "out")

    def new_cache(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """Zeroed K/V buffers for `batch` rows of `length` key columns, on this rank's key/value heads."""
        n_heads = self.args.kv_heads // self.model_parallel_size
        shape = (batch, n_heads, length, self.args.head_dim)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in self.layers]

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                key_valid: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                start=0, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for tokens [B, T] placed at cache columns [start, start+T).

        positions [B, T]: RoPE positions per row (default start..start+T-1), at
        most the column; a left-padded row uses column - n_pad so its tokens keep
        positions 0, 1, ...
        key_valid [B, start+T] bool: False at pad columns, which no query may see.
        cache: from `new_cache`, filled in place; without it start must be 0.
        start: an int, or for one decode step (T == 1) a long tensor [1] on the device
        (decode.py): then the cache views hold S columns, all attended, key_valid [B, S] must
        hide those past start, positions must be given and `reserve_rope` must cover them.
        last_only: project only the last column to the vocabulary -> [B, V], else [B, T, V].
        """
        B, T = tokens.shape
        step = isinstance(start, torch.Tensor)  # nothing here may depend on its value: no host sync
        if cache is None and (step or start != 0):
            raise ValueError("start > 0 needs a KV cache")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        cis = (self._rope_table if step else self._rope(positions.shape[1] + start, positions.device))
        cis = cis[positions][:, :, None]  # [B, T, 1, D/2]
        mask = None  # None: SDPA's own causal mask (T > 1, no cached prefix) or no mask (T == 1)
        if step:
            mask = key_valid[:, None, None, :]
        elif key_valid is not None or (start > 0 and T > 1):
            mask = self._mask(B, T, start, key_valid, tokens.device)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cis, mask, None if cache is None else cache[i], start)
        if last_only:
            h = h[:, -1:]
        logits = self.output(self.norm(h)).float()
        return logits[:, 0] if last_only else logits

    def reserve_rope(self, n: int, device: torch.device) -> None:
        """Build the RoPE table for positions 0..n-1 now (a decode step cannot grow it)."""
        self._rope(n, device)

    def _rope(self, need: int, device: torch.device) -> torch.Tensor:
        """Rotations for positions 0..need-1 at least, from a table grown on demand (a plain
        attribute, not a buffer: the model may be built on the meta device and loaded with assign)."""
        table = getattr(self, "_rope_table", None)
        if table is None or table.shape[0] < need or table.device != device:
            n = max(need, 2 * (0 if table is None else table.shape[0]), 256)
            with torch.inference_mode(False):  # a normal tensor: the same model may later train
                table = rope_table(n, self.args.head_dim, device, self.args.rope_theta, self.args.rope_scaling)
            self._rope_table = table
        return table

    @staticmethod
    def _mask(B: int, T: int, start: int, key_valid: Optional[torch.Tensor], device) -> torch.Tensor:
        """Boolean attention mask [B, 1, T, start+T]: causal by column, pad keys hidden.

        A query always sees its own column, so a pad query row is never fully
        masked (SDPA would return NaN there, and NaN would leak through the cache).
        """
        if T == 1 and key_valid is not None:  # a decode step: its own column is always valid
            return key_valid[:, None, None, :]
        q_col = torch.arange(start, start + T, device=device)[:, None]
        k_col = torch.arange(start + T, device=device)[None, :]
        mask = (k_col <= q_col)[None]  # [1, T, S]
        if key_valid is not None:
            mask = (mask & key_valid[:, None, :]) | (k_col == q_col)[None]
        return mask.expand(B, T, start + T)[:, None]


def fuse_projections(model: Transformer) -> Transformer:
    """Give every layer one QKV and one gate/up weight: [wq; wk; wv] and [w1; w3] of this rank
    (all column-parallel, so a rank's rows concatenate with no communication), which decode
    steps (one new token) use: 2 matmul launches per layer instead of 5. The original
    parameters become views into the fused tensors, so memory is unchanged and state_dict keys
    and values stay those of the checkpoint. Call on a loaded model; returns it."""
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if att.wqkv is not None:  # already fused
            continue
        att.wqkv = _fuse(att.wq, att.wk, att.wv)
        ffn.w13 = _fuse(ffn.w1, ffn.w3)
    return model


def unfuse_projections(model: Transformer) -> Transformer:
    """Back to one matmul per projection (the parameters keep their values)."""
    for layer in model.layers:
        layer.attention.wqkv = layer.feed_forward.w13 = None
    return model


def _fuse(*linears: nn.Module) -> torch.Tensor:
    fused = torch.cat([m.weight.detach() for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused[row:row + n], requires_grad=m.weight.requires_grad)
        row += n
    return fused
