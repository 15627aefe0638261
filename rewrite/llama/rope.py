"""Rotary position embedding (RoPE) in Meta's layout: pairs (0,1), (2,3), ... of a head
rotate together, by angle pos * inv_freq[j].

inv_freq[j] = theta^(-2j/D) (theta 10000 for LLaMA-1/2, 500000 for LLaMA-3), and for
LLaMA-3.1 and later it is rescaled as Meta's and Hugging Face's `llama3` rope type do:
wavelengths shorter than original_context / high_freq_factor are kept, those longer
than original_context / low_freq_factor are divided by `factor`, and the band in
between is interpolated linearly in original_context / wavelength. All in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's frequency rescaling (Meta's constants as defaults)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_frequencies(head_dim: int, device: Optional[torch.device] = None, theta: float = 10000.0,
                     scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """inv_freq: float32 [D/2] (Meta's LLaMA-1 files store the unscaled one as rope.freqs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return inv_freq
    old = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, out)


def rope_table(n: int, head_dim: int, device: torch.device, theta: float = 10000.0,
               scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """Rotations e^(i * pos * inv_freq) for positions 0..n-1: complex64 [n, D/2] (Meta's freqs_cis)."""
    inv_freq = rope_frequencies(head_dim, device, theta, scaling)
    angles = torch.outer(torch.arange(n, device=device).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (0,1), (2,3), ... of x [B, T, H, D] as complex numbers
    by cis [B, T, 1, D/2], in float32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)


def interleave_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection from Hugging Face's rotate-half layout (per head: the first
    halves of all pairs, then the second halves) to Meta's interleaved one (pairs adjacent).
    w: [n_heads * head_dim, ...] holding whole heads."""
    rest = w.shape[1:]
    return w.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def rotate_half_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of interleave_heads: rows of a q/k projection from Meta's interleaved layout
    to Hugging Face's rotate-half one (what a Meta -> Hugging Face conversion writes)."""
    rest = w.shape[1:]
    return w.reshape(-1, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)
