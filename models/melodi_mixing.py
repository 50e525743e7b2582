"""MELODI token mixing: a linear map over the token axis that compresses a window into memory tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .melodi_attention import RMSNorm

__all__ = ["TokenMixing"]


class TokenMixing(nn.Module):
    """Linear map over the token axis of [x'; u'] -> n_out tokens.

    With norm_residual: out = Lin([RMSNorm_a(x'); RMSNorm_b(u')]) + u'   (needs n_out == Su)
    Without:            out = Lin([x'; u'])
    """

    def __init__(self, n_in: int, n_out: int, d: int, norm_residual: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_residual = norm_residual
        self.n_out = n_out
        if norm_residual:
            self.norm_x = RMSNorm(d, eps)
            self.norm_u = RMSNorm(d, eps)
        self.lin = nn.Linear(n_in, n_out, bias=True)
        std = 1.0 / math.sqrt(n_in)  # variance scaling, fan-in, truncated normal
        nn.init.trunc_normal_(self.lin.weight, std=std, a=-2.0 * std, b=2.0 * std)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        """x [..., W, d], u [..., Su, d] -> [..., n_out, d]."""
        if self.norm_residual:
            if u.shape[-2] != self.n_out:
                raise ValueError(f"residual needs Su == n_out, got {u.shape[-2]} != {self.n_out}")
            c = torch.cat([self.norm_x(x), self.norm_u(u)], dim=-2)
        else:
            c = torch.cat([x, u], dim=-2)
        out = self.lin(c.transpose(-1, -2)).transpose(-1, -2)
        return out + u if self.norm_residual else out
