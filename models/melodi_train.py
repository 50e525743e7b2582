"""Training MELODI on long documents with truncated BPTT over segments.

One document (book, play) per batch row, read as consecutive segments of `segment_windows` windows; the
recurrent state (short-term z of every layer, long-term FIFO) is carried from segment to segment of the same
row and reset where a row starts a new document. Gradients flow through the windows of a segment, never across
segments (MelodiLM detaches the state it returns). Targets are the next token, so a segment of T tokens reads
T+1 (the last target is the first token of the next segment); padding past a document's end is not scored.

Checkpoints (safetensors + config JSON, see melodi_ckpt) are written every `checkpoint_every` steps with the
optimizer, schedule, RNG and data-stream state, so `train(...)` on the same directory resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from premem.storage.errors import CheckpointError, InputError

from .melodi import MelodiConfig, MelodiLM, MelodiState
from .melodi_ckpt import CONFIG_FILE, ByteTokenizer, load_checkpoint, save_checkpoint

TRAINER_FILE = "trainer.json"
TRAINER_STATE_FILE = "trainer_state.pt"
IGNORE = -100


@dataclass
class TrainConfig:
    """Optimisation and data settings (the model's shape is the MelodiConfig)."""

    steps: int = 1000
    batch_size: int = 8
    segment_windows: int = 4  # windows per segment = truncated-BPTT length
    optimizer: str = "adamw"  # "adamw" or "adafactor"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = False  # autocast matmuls to bfloat16 (fp32 master weights)
    eval_every: int = 100
    eval_tokens_per_doc: int = 16384  # held-out tokens scored per document (from its start)
    checkpoint_every: int = 100
    seed: int = 0

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.segment_windows < 1:
            raise InputError("steps, batch_size and segment_windows must be >= 1")
        if self.optimizer not in ("adamw", "adafactor"):
            raise InputError(f"optimizer {self.optimizer!r}: use adamw or adafactor")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class BookStreams:
    """Per batch row, the position in the document it is reading; documents are dealt in a seeded random order,
    reshuffled every epoch. `state_dict`/`load_state_dict` make resumed training read the same segments."""

    docs: list[Tensor]
    batch_size: int
    seg_len: int
    seed: int = 0
    epoch: int = 0
    next_doc: int = 0
    rows: list[list[int]] = field(default_factory=list)  # [doc index, offset] per row; doc -1 = none yet

    def __post_init__(self) -> None:
        self.docs = [d for d in self.docs if len(d) >= 2]
        if not self.docs:
            raise InputError("no training document has 2 or more tokens")
        if not self.rows:
            self.rows = [[-1, 0] for _ in range(self.batch_size)]

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.docs), generator=g).tolist()

    def _deal(self) -> int:
        if self.next_doc >= len(self.docs):
            self.epoch, self.next_doc = self.epoch + 1, 0
        doc = self._order()[self.next_doc]
        self.next_doc += 1
        return doc

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs [B, T], targets [B, T] with IGNORE past the end, reset [B] bool: row starts a new document)."""
        B, T = self.batch_size, self.seg_len
        inputs = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        reset = torch.zeros(B, dtype=torch.bool)
        for r, row in enumerate(self.rows):
            if row[0] < 0 or row[1] >= len(self.docs[row[0]]) - 1:
                row[0], row[1] = self._deal(), 0
                reset[r] = True
            doc, off = self.docs[row[0]], row[1]
            x = doc[off : off + T]
            y = doc[off + 1 : off + T + 1]
            inputs[r, : len(x)] = x
            targets[r, : len(y)] = y
            row[1] = off + T
        return inputs, targets, reset

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_doc": self.next_doc, "rows": [list(r) for r in self.rows]}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.next_doc, self.rows = int(s["epoch"]), int(s["next_doc"]), [list(r) for r in s["rows"]]


# ------------------------------------------------------------------------------------------ evaluation


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: MelodiLM, docs: list[Tensor], *, tokens_per_doc: int, segment_windows: int, bf16: bool = False
) -> dict:
    """Held-out loss: every document read from its start (fresh state, one batch row each) for up to
    `tokens_per_doc` scored tokens, segment by segment with the state carried. Returns nats per token and
    perplexity over all scored tokens."""
    c = model.config
    was_training = model.training
    model.eval()
    docs = [d[: tokens_per_doc + 1] for d in docs if len(d) >= 2]
    if not docs:
        raise InputError("no held-out document has 2 or more tokens")
    T = segment_windows * c.W
    longest = max(len(d) - 1 for d in docs)
    n_seg = -(-longest // T)
    B = len(docs)
    device = next(model.parameters()).device
    full_in = torch.zeros(B, n_seg * T, dtype=torch.long)
    full_tg = torch.full((B, n_seg * T), IGNORE, dtype=torch.long)
    for i, d in enumerate(docs):
        full_in[i, : len(d) - 1] = d[:-1]
        full_tg[i, : len(d) - 1] = d[1:]
    state, nll, count = None, 0.0, 0
    for s in range(n_seg):
        x = full_in[:, s * T : (s + 1) * T].to(device)
        y = full_tg[:, s * T : (s + 1) * T].to(device)
        with _autocast(bf16):
            logits, state = model(x, state)
        state = state.to(torch.float32)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        nll += float(loss)
        count += int((y != IGNORE).sum())
    model.train(was_training)
    loss = nll / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


# --------------------------------------------------------------------------------------------- training


def _optimizer(model: MelodiLM, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "adafactor":
        # the paper's optimizer (decay 0.8 there); torch's Adafactor has no momentum term
        return torch.optim.Adafactor(model.parameters(), lr=tc.lr, beta2_decay=-0.8, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=tc.weight_decay)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = max(1, tc.steps - tc.warmup_steps)
    t = min(1.0, (step - tc.warmup_steps) / span)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    steps: int
    history: list[dict]
    final_heldout: dict | None
    fingerprint: str
    seconds: float


def train(
    config: MelodiConfig,
    tc: TrainConfig,
    train_docs: list[Tensor],
    heldout_docs: list[Tensor],
    out_dir: str | Path,
    *,
    data_info: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume training in `out_dir`) for `tc.steps` steps in all; returns the loss history.

    Resuming needs the same model config; `data_info` (e.g. the corpus files and split) is recorded and must
    match too, so a resumed run reads the same documents.
    """
    tc.check()
    out = Path(out_dir)
    log = log or (lambda _m: None)
    torch.manual_seed(tc.seed)
    streams = BookStreams(train_docs, tc.batch_size, tc.segment_windows * config.W, seed=tc.seed)
    meta_path = out / TRAINER_FILE
    history: list[dict] = []
    step = 0
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        old = MelodiConfig.from_json(out / CONFIG_FILE)
        if old != config:
            diff = [f"{k}={getattr(old, k)!r} (asked {getattr(config, k)!r})"
                    for k in old.to_dict() if getattr(old, k) != getattr(config, k)]
            raise CheckpointError(
                f"{out} holds a model with {', '.join(diff)}: use another --out, or the same config to resume")
        if data_info is not None and meta.get("data") not in (None, data_info):
            raise CheckpointError(f"{out} was trained on other data ({meta.get('data')}): use another --out")
        model = load_checkpoint(out).model.train()
        opt = _optimizer(model, tc)
        ts = torch.load(out / TRAINER_STATE_FILE, weights_only=False)
        opt.load_state_dict(ts["optimizer"])
        streams.load_state_dict(ts["streams"])
        state = MelodiState(ts["state"]["z"], ts["state"]["fifo"], ts["state"]["n_valid"])
        torch.set_rng_state(ts["rng"])
        step, history = int(meta["step"]), list(meta["history"])
        log(f"resuming {out} at step {step}")
    else:
        model = MelodiLM(config).train()
        opt = _optimizer(model, tc)
        state = model.initial_state(tc.batch_size)

    def save() -> str:
        fp = save_checkpoint(model, out, ByteTokenizer())
        torch.save({"optimizer": opt.state_dict(), "streams": streams.state_dict(), "rng": torch.get_rng_state(),
                    "state": dataclasses.asdict(state)}, out / (TRAINER_STATE_FILE + ".tmp"))
        (out / (TRAINER_STATE_FILE + ".tmp")).replace(out / TRAINER_STATE_FILE)
        meta = {"step": step, "train": dataclasses.asdict(tc), "data": data_info, "history": history,
                "params": sum(p.numel() for p in model.parameters()), "fingerprint": fp}
        (out / (TRAINER_FILE + ".tmp")).write_text(json.dumps(meta, indent=2) + "\n")
        (out / (TRAINER_FILE + ".tmp")).replace(meta_path)  # trainer.json last: it marks a complete checkpoint
        return fp

    t0 = time.perf_counter()
    window_loss, window_tokens, window_steps, t_last = 0.0, 0, 0, time.perf_counter()
    final = None
    while step < tc.steps:
        inputs, targets, reset = streams.next_batch()
        state = state.reset(reset)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with _autocast(tc.bf16):
            logits, state = model(inputs, state)
        state = state.to(torch.float32)  # carried memories stay fp32 between segments
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        window_loss += float(loss.detach())
        window_steps += 1
        window_tokens += int((targets != IGNORE).sum())
        last = step == tc.steps
        if step % tc.eval_every == 0 or last:
            entry = {"step": step, "train_loss": window_loss / window_steps,
                     "tokens_per_s": window_tokens / (time.perf_counter() - t_last)}
            if heldout_docs:
                ev = evaluate(model, heldout_docs, tokens_per_doc=tc.eval_tokens_per_doc,
                              segment_windows=tc.segment_windows, bf16=tc.bf16)
                entry.update(heldout_loss=ev["loss"], heldout_ppl=ev["ppl"], heldout_tokens=ev["tokens"])
                final = ev
            history.append(entry)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
            window_loss, window_tokens, window_steps, t_last = 0.0, 0, 0, time.perf_counter()
        if step % tc.checkpoint_every == 0 or last:
            save()
    fp = save() if not meta_path.is_file() else json.loads(meta_path.read_text())["fingerprint"]
    if final is None and history and "heldout_loss" in history[-1]:
        final = {"loss": history[-1]["heldout_loss"], "ppl": history[-1]["heldout_ppl"]}
    return TrainResult(step, history, final, fp, time.perf_counter() - t0)
