"""MELODI long-term memory of the long-term layer: the FIFO of token states, its K/V, the gate and the update.

After every window the layer's outputs [x'; u'] are mixed over the token axis into an increment of L tokens
(no norm, no residual), appended to the FIFO while the oldest L fall out; the next window already reads it.
The FIFO keeps token states; their keys and values come from the layer's own pre-norm and k/v projections.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .melodi_mixing import TokenMixing

__all__ = ["LongTermMemory"]

KV = Callable[[Tensor], tuple[Tensor, Tensor]]


class LongTermMemory(nn.Module):
    """Gate [H, Dh] between self- and cross-attention, and the increment mixing; the FIFO itself is state."""

    def __init__(self, *, n_in: int, L: int, d_model: int, num_heads: int, gate_init_std: float, eps: float) -> None:
        super().__init__()
        self.L = L
        self.gate = nn.Parameter(torch.empty(num_heads, d_model // num_heads))
        nn.init.trunc_normal_(self.gate, std=gate_init_std, a=-2 * gate_init_std, b=2 * gate_init_std)
        self.mix = TokenMixing(n_in, L, d_model, norm_residual=False, eps=eps)

    def gate_alpha(self) -> Tensor:
        """sigma(g), [H, Dh]: the weight of self-attention (1 - it goes to the FIFO cross-attention)."""
        return torch.sigmoid(self.gate)

    def combine(self, a_self: Tensor, a_cross: Tensor) -> Tensor:
        alpha = self.gate_alpha()
        return alpha * a_self + (1.0 - alpha) * a_cross

    def update(self, fifo: Tensor, fk: Tensor, fv: Tensor, x: Tensor, u: Tensor, kv: KV
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Push the increment of this window's outputs x' [B, W, d], u' [B, Su, d]: returns the FIFO [B, Q*L, d]
        and its keys/values after the push, and the increment [B, L, d]. Gradients flow through the increment."""
        inc = self.mix(x, u)
        ik, iv = kv(inc)
        L = self.L
        return (torch.cat([fifo[:, L:], inc], 1), torch.cat([fk[:, L:], ik], 1), torch.cat([fv[:, L:], iv], 1), inc)
