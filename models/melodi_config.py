"""MELODI hyper-parameters (MelodiConfig, the paper's named settings) and the paper's memory accounting."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from premem.storage.errors import InputError

__all__ = ["FIFO_SPAN_TOKENS", "MelodiConfig", "MemoryAccount", "memory_accounting"]

# The paper's FIFO spans 64K tokens whatever the window: Q_max = 128 windows of 512, 64 of 1024, 32 of 2048
# (which gives its 20.0M / 23.1M memory figures for the longer windows).
FIFO_SPAN_TOKENS = 65536


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
    # Initial per-head scale of the QK-normed scores. The reference starts at 1, so the logits start in about
    # [-1, 1] and attention is near uniform; that trains in the paper's 100k+ steps, but in a few hundred the
    # scale hardly moves (AdamW: at most lr per step, on a noisy gradient) and nothing is ever recalled from
    # memory. A larger start lets a short run learn sharp (copying) attention; see benchmarks/melodi_recall.py.
    attn_scale_init: float = 1.0
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
        "no-branching" are the base model with the ablation switch off. Keyword overrides are applied last; unless
        Q_max is given, the FIFO spans FIFO_SPAN_TOKENS tokens of the (possibly overridden) window W."""
        kw: dict[str, Any] = {"Q_max": FIFO_SPAN_TOKENS // max(1, int(overrides.get("W", cls.W)))}
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
