"""Seeded nucleus sampling: the uniform draws of a prompt's tokens, and the sampling rule, shared
by the decode step (decode.py, eager or compiled) and the first token after the prefill.

Sampling draws one uniform number per (prompt, step) from a counter-based hash of (seed, step),
so a prompt's text does not depend on the batch it lands in (generation.py).
"""
from __future__ import annotations

from typing import Optional

import torch

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def uniforms(seed: int, n: int) -> list[float]:
    """Uniform numbers in [0, 1) for steps 0..n-1; step t's depends only on (seed, t)."""
    base = splitmix64(seed & _M64)
    return [(splitmix64(base ^ t) >> 11) / float(1 << 53) for t in range(n)]


def _sorted_probs(probs: torch.Tensor, top_p: float, k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [b, V] sorted descending, ties by token id (as a stable sort): values and ids.

    Only the head matters to the nucleus: when the k-1 most likely tokens of
    every row already pass top_p, the top k replace a full sort of V (cheap
    where V is 32000); ranks past k are simply absent.
    """
    if k < probs.shape[-1]:
        p, idx = probs.topk(k, dim=-1)
        if bool((p[:, :k - 1].sum(-1) > top_p).all()):
            idx, order = idx.sort(dim=-1)  # topk leaves tie order open: id order, then stable by value
            p = p.gather(-1, order)
            p, order = p.sort(dim=-1, descending=True, stable=True)
            return p, idx.gather(-1, order)
    return probs.sort(dim=-1, descending=True, stable=True)


def sample(logits: torch.Tensor, temperature, top_p, u: Optional[torch.Tensor]) -> torch.Tensor:
    """Next token per row from logits [b, V] (float32): greedy if temperature <= 0, else nucleus.

    Nucleus: the smallest set of most likely tokens whose mass reaches top_p
    (Meta's rule), renormalised, sampled by inverting its CDF at u [b].
    temperature and top_p as 0-d float32 tensors (a compiled step): no branch on their values,
    both rules computed and one chosen, with a full sort (the same tokens as the floats give).
    """
    static = isinstance(temperature, torch.Tensor)
    if not static and temperature <= 0:
        return logits.argmax(-1)
    if static:
        hot = temperature > 0
        probs = torch.softmax(logits / torch.where(hot, temperature, 1.0), dim=-1)
        p, idx = probs.sort(dim=-1, descending=True, stable=True)
    else:
        p, idx = _sorted_probs(torch.softmax(logits / temperature, dim=-1), top_p)
    p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)
    cdf = p.cumsum(-1)
    k = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    k = torch.minimum(k, (p > 0).sum(-1) - 1)  # rounding must not pick a dropped token
    token = idx.gather(-1, k[:, None])[:, 0]
    return torch.where(hot, token, logits.argmax(-1)) if static else token
