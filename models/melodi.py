"""MELODI (Chen et al., "MELODI: Exploring Memory Compression for Long Contexts") in PyTorch.

A decoder-only LM that reads a document as consecutive context windows of W tokens. Every layer keeps a
short-term memory z (S token states) that is recurrently rewritten after each window; one layer in the middle
(the long-term layer) also keeps a FIFO of Q_max*L token states, to which it appends L new tokens per window.

Per layer l and window k (see /work/shared/notes/melodi.md):
  * queries are [x; u] (W context tokens, Su summary tokens), keys/values are [z; x; u] with one pre-norm and
    one set of q/k/v projections; the mask is strictly causal over the positions [z | x | u] (a token never
    sees itself; context tokens never see the window's summary tokens; every query sees all of z);
  * scores = (cos(q, k) + T5 relative bias) * per-head learned scale (QK-norm);
  * h = [x; u] + W_o attn,  out = h + FFN(RMSNorm(h)),  split into x' and u';
  * two token-mixing branches (linear maps over the token axis of [x'; u']): one gives the summary u of the
    next layer (same window), the other gives z of the same layer for the next window;
  * the long-term layer also cross-attends (same queries, no mask, no bias) to its FIFO, gates the two
    attention outputs per head and channel, and after every window pushes an increment of L tokens
    (token-axis linear of [x'; u']) into the FIFO, evicting the oldest L.

Layers are run layer-major (every window of layer l, then layer l+1): layer l at window k only depends on layer
l-1 at window k and on layer l at window k-1, so this is the same computation as window-major and makes
`forward_until_long_term` simply "stop after the long-term layer".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from premem.storage.errors import InputError

__all__ = [
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


# --------------------------------------------------------------------------------------------------- config


@dataclass
class MelodiConfig:
    """Hyper-parameters. Names follow melodi.md: W window, S short-term tokens, Su summary tokens, L long-term
    tokens per window, Q_max FIFO depth in windows."""

    num_layers: int = 12
    d_model: int = 1024
    num_heads: int = 8
    d_ff: int = 4096
    W: int = 512
    S: int = 192
    Su: int = 192
    L: int = 32
    Q_max: int = 128
    long_term_layer: int = 6
    vocab_size: int = 32128  # T5 sentencepiece vocabulary (as padded in the T5 checkpoints)
    dropout: float = 0.05
    use_long_term: bool = True  # ablation "no long-term memory": the long-term layer becomes a short-term one
    use_branching: bool = True  # ablation "no branching": u' is passed both up and on (needs S == Su)
    rel_num_buckets: int = 32
    rel_max_distance: int = 128
    summary_init_std: float = 0.25
    gate_init_std: float = 0.25
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise InputError(f"d_model {self.d_model} is not a multiple of num_heads {self.num_heads}")
        if not 0 <= self.long_term_layer < self.num_layers:
            raise InputError(f"long_term_layer {self.long_term_layer} outside [0, {self.num_layers})")
        if min(self.W, self.Su) < 1 or min(self.S, self.L, self.Q_max) < 0:
            raise InputError("need W >= 1, Su >= 1 and S, L, Q_max >= 0")
        if not self.use_branching and self.S not in (0, self.Su):
            raise InputError(f"use_branching=False passes u' on as z, so it needs S == Su (S={self.S}, Su={self.Su})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def long_term_enabled(self) -> bool:
        return self.use_long_term and self.L > 0 and self.Q_max > 0

    @property
    def fifo_len(self) -> int:
        return self.Q_max * self.L

    # ---- named settings
    _NAMED_RE = re.compile(r"^S(\d+)\+L(\d+)$")

    @classmethod
    def names(cls) -> list[str]:
        """Some names `named` accepts (any "S<n>+L<m>" works, on the paper's 12-layer base shape)."""
        return ["base", "S192+L32", "S128+L64", "S192+L96", "no-long-term", "no-branching"]

    @classmethod
    def named(cls, name: str, **overrides: Any) -> MelodiConfig:
        """The paper's settings. "base" is S192+L32 (12x1024, 8 heads, FFN 4096, W=512, Q_max=128, layer 6);
        "S<n>+L<m>" sets S = Su = n and L = m (L0 switches the long-term memory off); "no-long-term" and
        "no-branching" are the base model with the ablation switch off. Keyword overrides are applied last."""
        kw: dict[str, Any] = {}
        if name == "base":
            pass
        elif name == "no-long-term":
            kw["use_long_term"] = False
        elif name == "no-branching":
            kw["use_branching"] = False
        else:
            m = cls._NAMED_RE.match(name.replace(" ", ""))
            if m is None:
                raise KeyError(f"unknown MELODI setting {name!r}; try one of {cls.names()}")
            s, l_ = int(m.group(1)), int(m.group(2))
            kw.update(S=s, Su=s, L=l_, use_long_term=l_ > 0)
        kw.update(overrides)
        return cls(**kw)

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MelodiConfig:
        """From a JSON string or a path to a JSON file. Unknown keys are an error."""
        s = str(text_or_path)
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown MelodiConfig keys: {sorted(unknown)}")
        return cls(**data)

    def memory_accounting(self) -> MemoryAccount:
        return memory_accounting(
            "melodi" if self.long_term_enabled else "melodi-short",
            num_layers=self.num_layers, d_model=self.d_model, W=self.W, S=self.S, L=self.L, Q_max=self.Q_max,
        )


# --------------------------------------------------------------------------------------- memory accounting


@dataclass(frozen=True)
class MemoryAccount:
    """Memory size in stored numbers (floats) per sequence. `short`/`long` are exact counts."""

    short: int
    long: int

    @property
    def total(self) -> int:
        return self.short + self.long

    def paper_millions(self) -> tuple[float, float, float]:
        """(short, long, all) in millions as the paper's table prints them: each part rounded to 0.1M and the
        total the sum of the rounded parts (S192+L32: 2.4M + 8.4M = 10.8M, while the exact total is 10.75M)."""
        s = round(self.short / 1e6, 1)
        l_ = round(self.long / 1e6, 1)
        return s, l_, round(s + l_, 1)


def memory_accounting(
    arch: str = "melodi",
    *,
    num_layers: int = 12,
    d_model: int = 1024,
    W: int = 512,
    S: int = 0,
    L: int = 0,
    Q_max: int = 128,
    knn_size: int = 65536,
) -> MemoryAccount:
    """The paper's memory-size accounting.

    transformer-xl:  short = layers * W * 2 * d  (the cached K and V of the previous window, every layer)
    memorizing:      transformer-xl + long = knn_size * 2 * d  (K and V of the kNN memory, one layer)
    melodi:          short = layers * S * d  (z kept as d-dim token states, K/V recomputed)
                     long  = Q_max * L * 2 * d  (K and V of the FIFO, one layer)
    melodi-short:    melodi with long = 0.
    """
    if arch in ("transformer-xl", "xl"):
        return MemoryAccount(num_layers * W * 2 * d_model, 0)
    if arch in ("memorizing", "memorizing-transformer"):
        return MemoryAccount(num_layers * W * 2 * d_model, knn_size * 2 * d_model)
    if arch == "melodi":
        return MemoryAccount(num_layers * S * d_model, Q_max * L * 2 * d_model)
    if arch == "melodi-short":
        return MemoryAccount(num_layers * S * d_model, 0)
    raise InputError(f"unknown arch {arch!r}")


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


# ----------------------------------------------------------------------------------------------- building blocks


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


class MelodiLayer(nn.Module):
    """One MELODI layer (short-term; plus the long-term FIFO when `long_term`), run over all windows."""

    def __init__(self, config: MelodiConfig, long_term: bool) -> None:
        super().__init__()
        c = self.config = config
        d, H = c.d_model, c.num_heads
        self.long_term = long_term
        self.norm_attn = RMSNorm(d, c.norm_eps)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(H))  # per-head scale of the QK-normed scores
        self.rel_bias = nn.Embedding(c.rel_num_buckets, H)
        self.norm_ffn = RMSNorm(d, c.norm_eps)
        self.ff1 = nn.Linear(d, c.d_ff, bias=True)
        self.ff2 = nn.Linear(c.d_ff, d, bias=True)
        # reference dropout placement: after the pre-attention norm, on the attention matrix, after the FFN
        self.drop = nn.Dropout(c.dropout)
        self.attn_drop = nn.Dropout(c.dropout)
        n_in = c.W + c.Su
        self.branching = c.use_branching and c.S > 0
        if self.branching:
            self.mix_summary = TokenMixing(n_in, c.Su, d, norm_residual=True, eps=c.norm_eps)
            self.mix_short = TokenMixing(n_in, c.S, d, norm_residual=c.S == c.Su, eps=c.norm_eps)
        if long_term:
            self.gate = nn.Parameter(torch.empty(H, c.head_dim))
            nn.init.trunc_normal_(self.gate, std=c.gate_init_std, a=-2 * c.gate_init_std, b=2 * c.gate_init_std)
            self.mix_long = TokenMixing(n_in, c.L, d, norm_residual=False, eps=c.norm_eps)
        mask = build_attention_mask(c.S, c.W, c.Su)
        q_pos = torch.arange(c.W + c.Su).view(-1, 1) + c.S
        k_pos = torch.arange(c.S + c.W + c.Su).view(1, -1)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("has_key", mask.any(-1), persistent=False)
        self.register_buffer(
            "buckets", t5_relative_buckets(k_pos - q_pos, c.rel_num_buckets, c.rel_max_distance), persistent=False
        )

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.config.num_heads, self.config.head_dim))

    def _kv(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised keys and values [..., n, H, Dh] of token states [..., n, d] (this layer's norm/projections)."""
        h = self.drop(self.norm_attn(states))  # pre-attention dropout, as in the reference config
        return F.normalize(self._heads(self.wk(h)), dim=-1), self._heads(self.wv(h))

    def gate_alpha(self) -> Tensor:
        """sigma(g), [H, Dh]: the weight of self-attention (1 - it goes to the FIFO cross-attention)."""
        return torch.sigmoid(self.gate)

    def forward(
        self, x: Tensor, u: Tensor, z: Tensor, fifo: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """x [B, n, W, d], u [B, n, Su, d], z [B, S, d], fifo [B, Q_max*L, d] (long-term layer only).

        Returns (x' [B, n, W, d], u for the next layer [B, n, Su, d], z after the last window [B, S, d],
        fifo after the last window, increments [B, n, L, d]); the last two are None for a short-term layer.
        """
        c = self.config
        B, n, W, _ = x.shape
        h = torch.cat([x, u], dim=2)  # [B, n, W+Su, d]
        hn = self.drop(self.norm_attn(h))
        q = F.normalize(self._heads(self.wq(hn)), dim=-1)
        k = F.normalize(self._heads(self.wk(hn)), dim=-1)
        v = self._heads(self.wv(hn))
        bias = self.rel_bias(self.buckets).permute(2, 0, 1)  # [H, Tq, Tk]
        scale = self.attn_scale.view(1, -1, 1, 1)
        neg = torch.finfo(q.dtype).min
        if self.long_term:
            assert fifo is not None
            fk, fv = self._kv(fifo)
            alpha = self.gate_alpha()
        xs, us, incs = [], [], []
        for w in range(n):
            kz, vz = self._kv(z)
            kk = torch.cat([kz, k[:, w]], dim=1)
            vv = torch.cat([vz, v[:, w]], dim=1)
            s = (torch.einsum("bqhd,bkhd->bhqk", q[:, w], kk) + bias) * scale
            p = torch.softmax(s.masked_fill(~self.mask, neg), dim=-1) * self.has_key.view(1, 1, -1, 1)
            p = self.attn_drop(p)
            a = torch.einsum("bhqk,bkhd->bqhd", p, vv)
            if self.long_term:
                pc = self.attn_drop(torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q[:, w], fk) * scale, dim=-1))
                ac = torch.einsum("bhqk,bkhd->bqhd", pc, fv)
                a = alpha * a + (1.0 - alpha) * ac
            hh = h[:, w] + self.wo(a.flatten(-2))
            out = hh + self.drop(self.ff2(F.relu(self.ff1(self.norm_ffn(hh)))))
            xo, uo = out[:, :W], out[:, W:]
            if self.long_term:
                inc = self.mix_long(xo, uo)  # [B, L, d]
                fifo = torch.cat([fifo[:, c.L :], inc], dim=1)
                ik, iv = self._kv(inc)
                fk = torch.cat([fk[:, c.L :], ik], dim=1)
                fv = torch.cat([fv[:, c.L :], iv], dim=1)
                incs.append(inc)
            if self.branching:
                z = self.mix_short(xo, uo)
                uo = self.mix_summary(xo, uo)
            elif c.S > 0:
                z = uo
            xs.append(xo)
            us.append(uo)
        incs_t = torch.stack(incs, dim=1) if self.long_term else None
        return torch.stack(xs, dim=1), torch.stack(us, dim=1), z, fifo if self.long_term else None, incs_t


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
