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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from premem.storage.errors import CheckpointError, InputError

from .melodi import MelodiConfig, MelodiLM, MelodiState
from .melodi_ckpt import CONFIG_FILE, ByteTokenizer, Tokenizer, load_checkpoint, load_tokenizer, save_checkpoint

TRAINER_FILE = "trainer.json"
TRAINER_STATE_FILE = "trainer_state.pt"
IGNORE = -100


@dataclass
class TrainConfig:
    """Optimisation and data settings (the model's shape is the MelodiConfig)."""

    steps: int = 1000
    batch_size: int = 8
    segment_windows: int = 4  # windows per segment = truncated-BPTT length
    optimizer: str = "adamw"  # "adamw" or "adafactor" (the paper's: decay 0.8, momentum 0.9)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine from lr down to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = False  # autocast matmuls to bfloat16 (fp32 master weights)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each process its LOCAL_RANK's GPU)
    eval_every: int = 100
    eval_tokens_per_doc: int | None = None  # held-out tokens scored per document (None: whole documents)
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


WINDOW_BUCKETS = ((0, 0), (1, 3), (4, 15), (16, 63), (64, None))  # window positions, as "0", "1-3", ... "64+"


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else str(lo) if lo == hi else f"{lo}-{hi}"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """--device: auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N."""
    spec = str(spec or "auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"--device {spec}: no CUDA GPU is visible here: use --device cpu (or auto)")
        if (dev.index or 0) >= n:
            raise InputError(f"--device {spec}: only {n} CUDA GPU(s) visible (cuda:0..cuda:{n - 1})")
    elif dev.type != "cpu":
        raise InputError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    return dev


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: MelodiLM, docs: list[Tensor], *, segment_windows: int, tokens_per_doc: int | None = None,
    bf16: bool = False, batch_size: int = 8,
) -> dict:
    """Held-out loss on whole documents: each read from its start with a fresh state, segment by segment with
    the state carried, `batch_size` documents side by side (up to `tokens_per_doc` scored tokens each when set).

    Returns nats per token and perplexity over all scored tokens, and the same per bucket of window position
    (the window of the predicting token: 0, 1-3, 4-15, 16-63, 64+), so that the long-term memory's benefit shows
    where it should: late in long documents.
    """
    c = model.config
    was_training = model.training
    model.eval()
    docs = [d if tokens_per_doc is None else d[: tokens_per_doc + 1] for d in docs if len(d) >= 2]
    if not docs:
        raise InputError("no held-out document has 2 or more tokens")
    T = segment_windows * c.W
    device = next(model.parameters()).device
    n_buckets = len(WINDOW_BUCKETS)
    edges = torch.tensor([lo for lo, _ in WINDOW_BUCKETS[1:]])
    nll = torch.zeros(n_buckets, dtype=torch.float64)
    count = torch.zeros(n_buckets, dtype=torch.long)
    docs = sorted(docs, key=len, reverse=True)
    for start in range(0, len(docs), batch_size):
        part = docs[start:start + batch_size]
        n_seg = -(-(len(part[0]) - 1) // T)
        B = len(part)
        full_in = torch.zeros(B, n_seg * T, dtype=torch.long)
        full_tg = torch.full((B, n_seg * T), IGNORE, dtype=torch.long)
        for i, d in enumerate(part):
            full_in[i, : len(d) - 1] = d[:-1]
            full_tg[i, : len(d) - 1] = d[1:]
        window_bucket = torch.bucketize(torch.arange(n_seg * T) // c.W, edges, right=True)
        state = None
        for s in range(n_seg):
            x = full_in[:, s * T : (s + 1) * T].to(device)
            y = full_tg[:, s * T : (s + 1) * T]
            with _autocast(device, bf16):
                logits, state = model(x, state)
            state = state.to(torch.float32)
            tok = F.cross_entropy(logits.float().flatten(0, 1).cpu(), y.flatten(), ignore_index=IGNORE,
                                  reduction="none").view(B, T)
            keep = y != IGNORE
            wb = window_bucket[s * T : (s + 1) * T].expand(B, T)[keep]
            nll += torch.zeros(n_buckets, dtype=torch.float64).index_add_(0, wb, tok[keep].double())
            count += torch.bincount(wb, minlength=n_buckets)
    model.train(was_training)
    total = float(nll.sum()) / int(count.sum())
    buckets = {bucket_name(lo, hi): {"loss": float(nll[i]) / int(count[i]), "ppl": math.exp(float(nll[i]) / int(count[i])),
                                     "tokens": int(count[i])}
               for i, (lo, hi) in enumerate(WINDOW_BUCKETS) if count[i]}
    return {"loss": total, "ppl": math.exp(total), "tokens": int(count.sum()), "documents": len(docs),
            "buckets": buckets}


# --------------------------------------------------------------------------------------------- training


# The paper's schedule with --optimizer adafactor: lr 0.01, 1000 warm-up steps, cosine down to 0.001.
PAPER_OPTIMIZER = {"optimizer": "adafactor", "lr": 0.01, "warmup_steps": 1000, "min_lr_ratio": 0.1}


def _optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "adafactor":
        # the paper's Adafactor: second-moment decay t^-0.8, momentum 0.9, updates scaled by the parameter's RMS,
        # our schedule's lr (torch's own Adafactor has no momentum term)
        from transformers.optimization import Adafactor

        return Adafactor(model.parameters(), lr=tc.lr, decay_rate=-0.8, beta1=0.9, weight_decay=tc.weight_decay,
                         scale_parameter=True, relative_step=False, warmup_init=False)
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


# Dense bf16 peak of common GPUs, TFLOP/s (vendor figures, no sparsity), for the share printed per evaluation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) the process group is started here if it is not yet,
    with gloo on CPUs and nccl on GPUs."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train(
    config: MelodiConfig,
    tc: TrainConfig,
    train_docs: list[Tensor],
    heldout_docs: list[Tensor],
    out_dir: str | Path,
    *,
    data_info: dict | None = None,
    log: Callable[[str], None] | None = None,
    tokenizer: Tokenizer | None = None,
) -> TrainResult:
    """Train (or resume training in `out_dir`) for `tc.steps` steps in all; returns the loss history.

    Resuming needs the same model config; `data_info` (e.g. the corpus files and split) is recorded and must
    match too, so a resumed run reads the same documents. Under torchrun every process reads the same global
    batch of `tc.batch_size` rows and trains on its share of the rows (DistributedDataParallel); the loss is
    the mean over the global batch's tokens, so N processes follow one process's loss curve. Rank 0 evaluates,
    logs and writes the checkpoints.
    """
    import torch.distributed as dist

    tc.check()
    out = Path(out_dir)
    log = log or (lambda _m: None)
    tokenizer = tokenizer or ByteTokenizer()
    device = resolve_device(tc.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and tc.device in ("auto", "cuda"):
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank, world = _distributed(device)
    if tc.batch_size % world:
        raise InputError(f"batch size {tc.batch_size} is not a multiple of the {world} processes")
    rows = slice(rank * tc.batch_size // world, (rank + 1) * tc.batch_size // world)
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
        had = load_tokenizer(out).to_dict()
        if had != tokenizer.to_dict():
            raise CheckpointError(f"{out} was trained with tokenizer {had}, this run's is {tokenizer.to_dict()}: use "
                                  f"another --out, or the checkpoint's tokenizer to resume")
        if data_info is not None and meta.get("data") not in (None, data_info):
            raise CheckpointError(f"{out} was trained on other data ({meta.get('data')}): use another --out")
        model = load_checkpoint(out, device).model.train()
        opt = _optimizer(model, tc)
        ts = torch.load(out / TRAINER_STATE_FILE, weights_only=False, map_location=device)
        opt.load_state_dict(ts["optimizer"])
        streams.load_state_dict(ts["streams"])
        state = MelodiState(ts["state"]["z"], ts["state"]["fifo"], ts["state"]["n_valid"]).to(device)
        state = MelodiState(state.z[:, rows], state.fifo[rows], state.n_valid[rows])
        torch.set_rng_state(ts["rng"].cpu())
        step, history = int(meta["step"]), list(meta["history"])
        log(f"resuming {out} at step {step}")
    else:
        model = MelodiLM(config).to(device).train()
        opt = _optimizer(model, tc)
        state = model.initial_state(rows.stop - rows.start)
    net: torch.nn.Module = model
    if world > 1:
        # the last layer's summary mixing (and, with one window per segment, the recurrent mixers) feed nothing
        # inside a segment, so some parameters get no gradient
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def gather_state() -> MelodiState:
        if world == 1:
            return state
        parts = [torch.zeros_like(t) for t in (state.z, state.fifo, state.n_valid) for _ in range(world)]
        for i, t in enumerate((state.z, state.fifo, state.n_valid)):
            dist.all_gather(parts[i * world:(i + 1) * world], t.contiguous())
        return MelodiState(torch.cat(parts[:world], 1), torch.cat(parts[world:2 * world]), torch.cat(parts[2 * world:]))

    def save() -> str:
        full = gather_state()  # every rank takes part; rank 0 writes
        if rank:
            return ""
        fp = save_checkpoint(model, out, tokenizer)
        torch.save({"optimizer": opt.state_dict(), "streams": streams.state_dict(), "rng": torch.get_rng_state(),
                    "state": dataclasses.asdict(full.to("cpu"))}, out / (TRAINER_STATE_FILE + ".tmp"))
        (out / (TRAINER_STATE_FILE + ".tmp")).replace(out / TRAINER_STATE_FILE)
        meta = {"step": step, "train": dataclasses.asdict(tc), "data": data_info, "history": history,
                "params": sum(p.numel() for p in model.parameters()), "fingerprint": fp, "processes": world}
        (out / (TRAINER_FILE + ".tmp")).write_text(json.dumps(meta, indent=2) + "\n")
        (out / (TRAINER_FILE + ".tmp")).replace(meta_path)  # trainer.json last: it marks a complete checkpoint
        return fp

    n_params, peak = sum(p.numel() for p in model.parameters()), bf16_peak_tflops(device)
    t0 = time.perf_counter()
    window_loss, window_tokens, window_steps, t_last = 0.0, 0, 0, time.perf_counter()
    final = None
    while step < tc.steps:
        inputs, targets, reset = streams.next_batch()
        n_tokens = int((targets != IGNORE).sum())  # of the global batch
        inputs, targets = inputs[rows].to(device, non_blocking=True), targets[rows].to(device, non_blocking=True)
        state = state.reset(reset[rows].to(device))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with _autocast(device, tc.bf16):
            logits, state = net(inputs, state)
        state = state.to(torch.float32)  # carried memories stay fp32 between segments
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        # mean over the global batch's tokens; DDP averages gradients over the processes, hence the * world
        loss = nll * world / max(1, n_tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        batch_loss = nll.detach()
        if world > 1:
            dist.all_reduce(batch_loss)
        window_loss += float(batch_loss) / max(1, n_tokens)
        window_steps += 1
        window_tokens += n_tokens
        last = step == tc.steps
        if step % tc.eval_every == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            entry = {"step": step, "train_loss": window_loss / window_steps,
                     "tokens_per_s": window_tokens / (time.perf_counter() - t_last)}
            if device.type == "cuda":  # 6 FLOPs per parameter and token (attention over the window not counted)
                entry["tflops"] = 6 * n_params * entry["tokens_per_s"] / 1e12
                if peak:
                    entry["bf16_peak_share"] = entry["tflops"] / peak
            if heldout_docs and rank == 0:
                ev = evaluate(model, heldout_docs, tokens_per_doc=tc.eval_tokens_per_doc,
                              segment_windows=tc.segment_windows, bf16=tc.bf16)
                entry.update(heldout_loss=ev["loss"], heldout_ppl=ev["ppl"], heldout_tokens=ev["tokens"],
                             heldout_buckets={k: round(v["ppl"], 4) for k, v in ev["buckets"].items()})
                final = ev
            history.append(entry)
            if rank == 0:
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                             ) + f" device={device}" + (f" processes={world}" if world > 1 else ""))
            window_loss, window_tokens, window_steps, t_last = 0.0, 0, 0, time.perf_counter()
        if step % tc.checkpoint_every == 0 or last:
            save()
            if world > 1:
                dist.barrier()
    fp = save() if not meta_path.is_file() else json.loads(meta_path.read_text())["fingerprint"]
    if final is None and history and "heldout_loss" in history[-1]:
        final = {"loss": history[-1]["heldout_loss"], "ppl": history[-1]["heldout_ppl"]}
    return TrainResult(step, history, final, fp, time.perf_counter() - t0)
