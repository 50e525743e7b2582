"""MELODI (Chen et al., "MELODI: Exploring Memory Compression for Long Contexts") in PyTorch.

A decoder-only LM that reads a document as consecutive context windows of W tokens. Every layer keeps a
short-term memory z (S token states) that is recurrently rewritten after each window; one layer in the middle
(the long-term layer) also keeps a FIFO of Q_max*L token states, to which it appends L new tokens per window.

Per layer l and window k (as in the authors' JAX code, google-research/meliad, transformer/memory2/):
  * queries are [x; u] (W context tokens, Su summary tokens), keys/values are [z; x; u] with one pre-norm and
    one set of q/k/v projections; the mask is strictly causal over the positions [z | x | u] (a token never
    sees itself; context tokens never see the window's summary tokens; every query sees all of z);
  * scores = (cos(q, k) + T5 relative bias) * |per-head learned scale| (QK-norm);
  * h = [x; u] + W_o attn,  out = h + FFN(RMSNorm(h)),  split into x' and u';
  * two token-mixing branches (linear maps over the token axis of [x'; u']): one gives the summary u of the
    next layer (same window), the other gives z of the same layer for the next window;
  * the long-term layer also cross-attends (same queries, no mask, no bias) to its FIFO, gates the two
    attention outputs per head and channel, and after every window pushes an increment of L tokens
    (token-axis linear of [x'; u']) into the FIFO, evicting the oldest L.

Layers are run layer-major (every window of layer l, then layer l+1): layer l at window k only depends on layer
l-1 at window k and on layer l at window k-1, so this is the same computation as window-major and makes
`forward_until_long_term` simply "stop after the long-term layer".

The parts live in their own modules, as the reference keeps them: melodi_attention (norm, q/k/v, masked
self-attention over [z; x; u], cross-attention to the FIFO), melodi_mixing (token mixing), melodi_memory (the
long-term FIFO, its gate and update), melodi_layer (the layer composing them) and melodi_config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .melodi_attention import RMSNorm, build_attention_mask, t5_relative_buckets
from .melodi_config import FIFO_SPAN_TOKENS, MelodiConfig, MemoryAccount, memory_accounting
from .melodi_layer import MelodiLayer
from .melodi_mixing import TokenMixing

__all__ = [
    "FIFO_SPAN_TOKENS",
    "MemoryAccount",
    "MelodiConfig",
    "MelodiLM",
    "MelodiLayer",
    "MelodiState",
    "TokenMixing",
    "build_attention_mask",
    "memory_accounting",
    "t5_relative_buckets",
]


# -------------------------------------------------------------------------------------------------- state


@dataclass
class MelodiState:
    """Recurrent state carried between segments.

    z:       [num_layers, B, S, d]  short-term memory of every layer (token states; zeros at document start)
    fifo:    [B, Q_max*L, d]        long-term FIFO of the long-term layer, oldest first (zeros at start)
    n_valid: [B] long               how many windows of the FIFO hold real increments (<= Q_max)
    """

    z: Tensor
    fifo: Tensor
    n_valid: Tensor

    @classmethod
    def zeros(cls, config: MelodiConfig, batch_size: int, device: Any = None, dtype: Any = None) -> MelodiState:
        dtype = dtype or torch.get_default_dtype()
        c = config
        return cls(
            z=torch.zeros(c.num_layers, batch_size, c.S, c.d_model, device=device, dtype=dtype),
            fifo=torch.zeros(batch_size, c.fifo_len, c.d_model, device=device, dtype=dtype),
            n_valid=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.fifo.shape[0]

    def detach(self) -> MelodiState:
        return MelodiState(self.z.detach(), self.fifo.detach(), self.n_valid.detach())

    def to(self, *args: Any, **kwargs: Any) -> MelodiState:
        """Like Tensor.to for z and fifo; n_valid only follows the device."""
        z, fifo = self.z.to(*args, **kwargs), self.fifo.to(*args, **kwargs)
        return MelodiState(z, fifo, self.n_valid.to(fifo.device))

    def reset(self, rows: Tensor) -> MelodiState:
        """Zero the memories of the batch rows where `rows` (bool [B]) is True, e.g. where a new book starts."""
        keep = (~rows).to(self.fifo.dtype)
        return MelodiState(
            self.z * keep.view(1, -1, 1, 1), self.fifo * keep.view(-1, 1, 1), self.n_valid * (~rows).long()
        )


# -------------------------------------------------------------------------------------------------- model


class MelodiLM(nn.Module):
    """MELODI language model over segments of several windows, with explicit recurrent state."""

    def __init__(self, config: MelodiConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.summary = nn.Parameter(torch.empty(c.Su, c.d_model))
        nn.init.trunc_normal_(self.summary, std=c.summary_init_std, a=-2 * c.summary_init_std, b=2 * c.summary_init_std)
        self.layers = nn.ModuleList(
            MelodiLayer(c, long_term=c.long_term_enabled and i == c.long_term_layer) for i in range(c.num_layers)
        )
        self.final_norm = RMSNorm(c.d_model, c.norm_eps)
        self.final_drop = nn.Dropout(c.dropout)

    def initial_state(self, batch_size: int) -> MelodiState:
        p = self.embed.weight
        return MelodiState.zeros(self.config, batch_size, device=p.device, dtype=p.dtype)

    def _run(
        self, tokens: Tensor, state: MelodiState | None, last_layer: int
    ) -> tuple[Tensor, MelodiState, Tensor | None]:
        c = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0 or T % c.W:
            raise ValueError(f"segment length {T} is not a positive multiple of the window W={c.W}")
        n = T // c.W
        if state is None:
            state = self.initial_state(B)
        if state.batch_size != B:
            raise ValueError(f"state has batch {state.batch_size}, tokens have {B}")
        x = self.embed(tokens).view(B, n, c.W, c.d_model)
        u = self.summary.expand(B, n, c.Su, c.d_model)
        zs = list(state.z.unbind(0))
        fifo, n_valid, incs = state.fifo, state.n_valid, None
        for i in range(last_layer + 1):
            layer = self.layers[i]
            x, u, zs[i], f, inc = layer(x, u, zs[i], fifo if layer.long_term else None)
            if layer.long_term:
                fifo, incs = f, inc
                n_valid = (n_valid + n).clamp(max=c.Q_max)
        new_state = MelodiState(torch.stack(zs, 0), fifo, n_valid).detach()
        return x.reshape(B, T, c.d_model), new_state, incs

    def forward(
        self, tokens: Tensor, state: MelodiState | None = None, return_increments: bool = False
    ) -> tuple[Tensor, MelodiState] | tuple[Tensor, MelodiState, Tensor | None]:
        """tokens [B, n*W] -> (logits [B, T, V], new state detached[, increments [B, n, L, d] or None]).

        Gradients flow across the windows of the segment (z recurrence, both mixing branches, FIFO increments);
        the returned state is detached (truncated BPTT at segment boundaries). Position i's logits predict
        token i+1 (the caller shifts targets within the segment).
        """
        h, new_state, incs = self._run(tokens, state, self.config.num_layers - 1)
        logits = self.final_drop(self.final_norm(h)) @ self.embed.weight.t() / math.sqrt(self.config.d_model)
        return (logits, new_state, incs) if return_increments else (logits, new_state)

    def advance(
        self, tokens: Tensor, state: MelodiState | None = None, *, full_state: bool = True
    ) -> tuple[Tensor | None, MelodiState]:
        """Read windows without the output head: (increments [B, n, L, d] or None, new state detached).

        full_state=True runs every layer, so the returned state continues the document exactly as a longer
        forward would; full_state=False is `forward_until_long_term` (only the layers the FIFO depends on).
        """
        if not full_state:
            return self.forward_until_long_term(tokens, state)
        _, new_state, incs = self._run(tokens, state, self.config.num_layers - 1)
        return incs, new_state

    def forward_until_long_term(self, tokens: Tensor, state: MelodiState | None = None) -> tuple[Tensor, MelodiState]:
        """Run layers 0..long_term_layer only: (increments [B, n, L, d], new state detached).

        The increments are exactly those of a full forward. In the returned state the z of the layers above the
        long-term layer are NOT advanced (copied from the input state); fifo, n_valid and the lower z are.
        """
        if not self.config.long_term_enabled:
            raise ValueError("this model has no long-term memory (use_long_term=False or L == 0)")
        _, new_state, incs = self._run(tokens, state, self.config.long_term_layer)
        assert incs is not None
        return incs, new_state
