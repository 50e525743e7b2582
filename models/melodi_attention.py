"""MELODI attention: one pre-norm and q/k/v projections per layer, QK-normed scores with a T5 relative bias.

Self-attention runs over the keys [z; x; u] of one window with a strictly causal mask; cross-attention (the
long-term layer only) runs over the K/V of the FIFO, unmasked and without position bias. Scores are
(cos(q, k) + bias) * |scale| per head, as in the reference (the absolute value keeps the temperature positive
if the learned scale crosses zero).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MelodiAttention", "RMSNorm", "build_attention_mask", "t5_relative_buckets"]


class RMSNorm(nn.Module):
    """Scale-only RMS norm (no mean subtraction, no bias)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def build_attention_mask(S: int, W: int, Su: int, device: Any = None) -> Tensor:
    """Who sees whom: bool [W+Su, S+W+Su], True = may attend. Queries are [x; u]; keys are [z; x; u].

    Strictly causal over the positions (z at 0..S-1, x at S..S+W-1, u after): query i sits at S+i and sees keys
    j < S+i. So every query sees all of z, x_i sees x_{<i} (not itself, not u), u_m sees all of x and u_{<m}.
    """
    q = torch.arange(W + Su, device=device).view(-1, 1) + S
    k = torch.arange(S + W + Su, device=device).view(1, -1)
    return k < q


def t5_relative_buckets(relative_position: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Unidirectional T5 buckets of (key_pos - query_pos); future positions fall into bucket 0."""
    n = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, n, large)


class MelodiAttention(nn.Module):
    """Pre-norm, q/k/v projections, learned per-head scale and relative bias of one layer (no output projection:
    the long-term layer gates self- and cross-attention before it)."""

    def __init__(self, *, d_model: int, num_heads: int, S: int, W: int, Su: int, num_buckets: int,
                 max_distance: int, dropout: float, scale_init: float, eps: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.norm = RMSNorm(d_model, eps)
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.scale = nn.Parameter(torch.full((num_heads,), float(scale_init)))
        self.rel_bias = nn.Embedding(num_buckets, num_heads)
        # flax's default embedding init, as the reference: variance scaling over the [heads, buckets] table,
        # std = 1/sqrt(buckets) (N(0, 1) would swamp the cosine scores at the start)
        nn.init.normal_(self.rel_bias.weight, std=num_buckets ** -0.5)
        # reference dropout placement: after the pre-attention norm and on the attention matrix
        self.drop = nn.Dropout(dropout)
        self.attn_drop = nn.Dropout(dropout)
        mask = build_attention_mask(S, W, Su)
        q_pos = torch.arange(W + Su).view(-1, 1) + S
        k_pos = torch.arange(S + W + Su).view(1, -1)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("has_key", mask.any(-1), persistent=False)
        self.register_buffer("buckets", t5_relative_buckets(k_pos - q_pos, num_buckets, max_distance), persistent=False)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def qkv(self, states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised queries, keys and values [..., n, H, Dh] of token states [..., n, d]."""
        h = self.drop(self.norm(states))
        q = F.normalize(self._heads(self.wq(h)), dim=-1)
        return q, F.normalize(self._heads(self.wk(h)), dim=-1), self._heads(self.wv(h))

    def kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised keys and values of memory token states (z, FIFO entries): recomputed, never stored."""
        h = self.drop(self.norm(states))
        return F.normalize(self._heads(self.wk(h)), dim=-1), self._heads(self.wv(h))

    def temperature(self) -> Tensor:
        return self.scale.abs().view(1, -1, 1, 1)

    def self_attend(self, q: Tensor, k: Tensor, v: Tensor, kz: Tensor, vz: Tensor) -> Tensor:
        """One window: q, k, v [B, W+Su, H, Dh] of [x; u], kz, vz [B, S, H, Dh] of z -> [B, W+Su, H, Dh]."""
        kk, vv = torch.cat([kz, k], dim=1), torch.cat([vz, v], dim=1)
        bias = self.rel_bias(self.buckets).permute(2, 0, 1)  # [H, Tq, Tk]
        s = (torch.einsum("bqhd,bkhd->bhqk", q, kk) + bias) * self.temperature()
        s = s.masked_fill(~self.mask, torch.finfo(s.dtype).min)
        p = self.attn_drop(torch.softmax(s, dim=-1) * self.has_key.view(1, 1, -1, 1))
        return torch.einsum("bhqk,bkhd->bqhd", p, vv)

    def cross_attend(self, q: Tensor, fk: Tensor, fv: Tensor) -> Tensor:
        """q [B, W+Su, H, Dh] over the FIFO's fk, fv [B, Q_max*L, H, Dh]: no mask (empty slots score 0), no bias."""
        p = self.attn_drop(torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, fk) * self.temperature(), dim=-1))
        return torch.einsum("bhqk,bkhd->bqhd", p, fv)
