"""`premem train-lumen`: fine-tune a LUMEN from a T5 checkpoint on questions, stored memory and neighbours.

The loop never runs the frozen memory layers: every step reads its questions' k neighbours' memory from the
store (one TensorStore read per batch, prefetched in the background) and trains the question encoder, live
encoder and decoder.  `k=0` trains the same model without retrieval (the question alone), as a baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import time
from collections.abc import Callable
from pathlib import Path

import torch

from premem.models.lumen import LumenModel
from premem.storage import MemoryStore
from premem.storage.errors import InputError
from premem.storage.reader import LumenDataset, Prefetcher, make_loader


@dataclasses.dataclass
class TrainConfig:
    """Everything one fine-tuning run needs; `memory_layers` defaults to the store's K."""

    checkpoint: str
    store: str
    questions: str
    neighbors: str
    out: str
    eval_questions: str | None = None
    eval_neighbors: str | None = None
    memory_layers: int | None = None
    k: int | None = None  # None: all neighbours in the file; 0: no retrieval
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    seed: int = 0
    num_workers: int = 0
    prefetch: int = 2
    device: str = "auto"
    log_every: int = 20
    eval_every: int = 0  # 0: only at the end
    max_answer_tokens: int = 16
    save_model: bool = True
    accept_codec: str | None = None  # a quantized store's codec ("int8", "pq"): train on its decoded memory


def normalize_answer(text: str) -> str:
    """SQuAD/NQ-style exact-match normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def train_lumen(config: TrainConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Fine-tunes, evaluates exact match on the eval set, writes `out/metrics.json` (and the model); returns metrics."""
    torch.manual_seed(config.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    if config.steps < 1 or config.batch_size < 1:
        raise InputError(f"--steps ({config.steps}) and --batch-size ({config.batch_size}) must be at least 1")
    store = MemoryStore.open(config.store)
    memory_layers = config.memory_layers
    if memory_layers is None:
        memory_layers = int(store.encoder.get("memory_layers", 0))
    if memory_layers < 1:
        raise InputError("LUMEN reads stored memory of K >= 1 frozen layers (α = 1 is FiD, which reads passages as "
                         "text): encode the store with --memory-layers K >= 1 and pass the same K here")
    model = LumenModel.from_pretrained(config.checkpoint, memory_layers=memory_layers,
                                       template=store.encoder.get("template") or "title: {title} context: {text}")
    # The store must hold exactly this checkpoint's layers [0, K): checked by fingerprint, not by name.
    store = MemoryStore.open(config.store, expected_fingerprint=model.memory_fingerprint,
                             accept_codec=config.accept_codec)
    model._memory_encoder = None  # only needed for the fingerprint; training never runs the frozen layers
    model.to(device)

    def dataset(questions: str, neighbors: str) -> tuple[LumenDataset, dict]:
        return LumenDataset.from_files(store, questions, neighbors, tokenize_questions=model.question_ids,
                                       tokenize_answers=model.label_ids, k=config.k)

    train_set, train_report = dataset(config.questions, config.neighbors)
    eval_set = None
    if config.eval_questions:
        eval_set, _ = dataset(config.eval_questions, config.eval_neighbors or config.neighbors)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup_steps, config.steps))
    curve, evals = [], []
    step, window, started = 0, [], time.perf_counter()
    compute_seconds, wait_seconds = 0.0, 0.0
    epoch = 0
    model.train()
    while step < config.steps:
        loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed + epoch,
                             num_workers=config.num_workers, pin_memory=device.type == "cuda", drop_last=True)
        if len(loader) == 0:
            raise InputError(f"{len(train_set)} training questions make no full batch of {config.batch_size}: "
                             "lower --batch-size")
        batches = Prefetcher(loader, device=device, depth=config.prefetch)
        for batch in batches:
            t0 = time.perf_counter()
            out = model(batch.question_ids, batch.question_mask, batch.memory, batch.memory_mask, labels=batch.labels)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compute_seconds += time.perf_counter() - t0
            step += 1
            window.append(float(out.loss.detach()))
            if step % config.log_every == 0 or step == config.steps:
                point = {"step": step, "loss": sum(window) / len(window), "seconds": time.perf_counter() - started}
                curve.append(point)
                window = []
                if progress:
                    progress(point)
            if eval_set is not None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                evals.append({"step": step, **evaluate(model, eval_set, config, device)})
                model.train()
            if step >= config.steps:
                break
        wait_seconds += batches.wait_seconds
        epoch += 1
    result = {
        "config": dataclasses.asdict(config),
        "memory_layers": memory_layers,
        "live_fraction": model.live_fraction,
        "k": train_set.k,
        "train": train_report | {"rejects": train_report["rejects"][:5]},
        "curve": curve,
        "steps": step,
        "seconds": time.perf_counter() - started,
        "step_seconds": compute_seconds / step,
        "data_wait_share": wait_seconds / max(wait_seconds + compute_seconds, 1e-9),
    }
    if eval_set is not None:
        evals.append({"step": step, **evaluate(model, eval_set, config, device)})
        result["eval"] = evals
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.save_model:
        model.save_pretrained(out_dir / "model")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: LumenModel, dataset: LumenDataset, config: TrainConfig, device: torch.device) -> dict:
    """Greedy answers for every eval question; exact match (normalised) against any reference answer."""
    model.eval()
    hits, total, losses, examples = 0, 0, [], []
    for batch in Prefetcher(make_loader(dataset, 64, shuffle=False), device=device, depth=config.prefetch):
        losses.append(float(model(batch.question_ids, batch.question_mask, batch.memory, batch.memory_mask,
                                  labels=batch.labels).loss) * len(batch))
        ids = model.generate(batch.question_ids, batch.question_mask, batch.memory, batch.memory_mask,
                             max_new_tokens=config.max_answer_tokens)
        answers = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, answer in zip(batch.index.tolist(), answers, strict=True):
            question = dataset.questions[i]
            ok = normalize_answer(answer) in {normalize_answer(a) for a in question.answers}
            hits += ok
            total += 1
            if len(examples) < 5:
                examples.append({"question": question.question, "answer": answer, "reference": question.answers[0]})
    return {"exact_match": hits / total, "loss": sum(losses) / total, "questions": total, "examples": examples}
