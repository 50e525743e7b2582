"""One MELODI layer over the windows of a segment: attention, FFN, token mixing, and (in the long-term layer)
the FIFO. It composes melodi_attention, melodi_mixing and melodi_memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .melodi_attention import MelodiAttention, RMSNorm
from .melodi_config import MelodiConfig
from .melodi_memory import LongTermMemory
from .melodi_mixing import TokenMixing

__all__ = ["MelodiLayer"]


class MelodiLayer(nn.Module):
    """One MELODI layer (short-term; plus the long-term FIFO when `long_term`), run over all windows."""

    def __init__(self, config: MelodiConfig, long_term: bool) -> None:
        super().__init__()
        c = self.config = config
        d = c.d_model
        self.attn = MelodiAttention(d_model=d, num_heads=c.num_heads, S=c.S, W=c.W, Su=c.Su,
                                    num_buckets=c.rel_num_buckets, max_distance=c.rel_max_distance,
                                    dropout=c.dropout, scale_init=c.attn_scale_init, eps=c.norm_eps)
        self.wo = nn.Linear(d, d, bias=False)
        self.norm_ffn = RMSNorm(d, c.norm_eps)
        self.ff1 = nn.Linear(d, c.d_ff, bias=True)
        self.ff2 = nn.Linear(c.d_ff, d, bias=True)
        self.drop = nn.Dropout(c.dropout)  # after the FFN
        n_in = c.W + c.Su
        # the reference mixes the summary in every layer that has a short-term memory, and in the long-term layer
        # even without one (S = 0); z is mixed only when S > 0
        self.mix_summary = (TokenMixing(n_in, c.Su, d, norm_residual=True, eps=c.norm_eps)
                            if c.use_branching and (c.S > 0 or long_term) else None)
        self.mix_short = (TokenMixing(n_in, c.S, d, norm_residual=c.S == c.Su, eps=c.norm_eps)
                          if c.use_branching and c.S > 0 else None)
        self.memory = (LongTermMemory(n_in=n_in, L=c.L, d_model=d, num_heads=c.num_heads,
                                      gate_init_std=c.gate_init_std, eps=c.norm_eps) if long_term else None)

    @property
    def long_term(self) -> bool:
        return self.memory is not None

    def forward(
        self, x: Tensor, u: Tensor, z: Tensor, fifo: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """x [B, n, W, d], u [B, n, Su, d], z [B, S, d], fifo [B, Q_max*L, d] (long-term layer only).

        Returns (x' [B, n, W, d], u for the next layer [B, n, Su, d], z after the last window [B, S, d],
        fifo after the last window, increments [B, n, L, d]); the last two are None for a short-term layer.
        """
        c = self.config
        W = x.shape[2]
        h = torch.cat([x, u], dim=2)  # [B, n, W+Su, d]: q/k/v of every window at once
        q, k, v = self.attn.qkv(h)
        if self.memory is not None:
            assert fifo is not None
            fk, fv = self.attn.kv(fifo)
        xs, us, incs = [], [], []
        for w in range(x.shape[1]):
            kz, vz = self.attn.kv(z)
            a = self.attn.self_attend(q[:, w], k[:, w], v[:, w], kz, vz)
            if self.memory is not None:
                a = self.memory.combine(a, self.attn.cross_attend(q[:, w], fk, fv))
            hh = h[:, w] + self.wo(a.flatten(-2))
            out = hh + self.drop(self.ff2(F.relu(self.ff1(self.norm_ffn(hh)))))
            xo, uo = out[:, :W], out[:, W:]
            if self.memory is not None:
                fifo, fk, fv, inc = self.memory.update(fifo, fk, fv, xo, uo, self.attn.kv)
                incs.append(inc)
            if self.mix_short is not None:
                z = self.mix_short(xo, uo)
            elif c.S > 0:
                z = uo  # no branching: u' is passed on as z (S == Su)
            if self.mix_summary is not None:
                uo = self.mix_summary(xo, uo)
            xs.append(xo)
            us.append(uo)
        incs_t = torch.stack(incs, dim=1) if incs else None
        return torch.stack(xs, dim=1), torch.stack(us, dim=1), z, fifo, incs_t
