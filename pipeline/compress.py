"""The compress step: documents -> per-window MELODI long-term increments (+ end states) in a LongTermStore.

One Beam element is one shard of documents. Shards are planned deterministically (documents in input order,
`docs_per_shard` per shard), so a rerun finds the same shards and skips the committed ones.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import apache_beam as beam
import torch
from apache_beam.utils.shared import Shared

from premem.models.melodi import MelodiLM, MelodiState
from premem.models.melodi_ckpt import load_checkpoint, load_tokenizer
from premem.pipeline.objects import WriteLines
from premem.pipeline.read import Document, FieldNames, ReadCorpus, Reject
from premem.storage.errors import CheckpointError
from premem.storage.longterm import LongTermStore


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    checkpoint: str
    fingerprint: str
    W: int = 1  # the checkpoint's window: shorter documents are set aside
    docs_per_shard: int = 16
    docs_per_batch: int = 8
    end_state: bool = True
    device: str = "cpu"
    lease_token: str | None = None  # the job's writer lease: checked before each shard is committed


@torch.inference_mode()
def compress_documents(
    model: MelodiLM, docs: list[torch.Tensor], *, docs_per_batch: int = 8, end_state: bool = True,
    segment_windows: int = 8,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Yields (document index, increments [n_windows, L, d], z after the last window [num_layers, S, d] or None).

    Only whole windows are read: the tokens after a document's last whole window (fewer than W) are not run, so
    no increment is ever computed from padding; the store records them as the document's tail, and a
    continuation from the end state re-reads them. Documents run side by side, longest first, from a zero state,
    up to `segment_windows` windows per call; a call never runs past the last window of the shortest document
    still in the batch, which then leaves the batch, so every document sees only its own windows and its end
    state is taken right after its last window. end_state=False runs only the layers up to the long-term layer.
    """
    c = model.config
    device = next(model.parameters()).device
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    for start in range(0, len(order), docs_per_batch):
        idx = order[start:start + docs_per_batch]
        n_windows = [len(docs[i]) // c.W for i in idx]
        if min(n_windows) < 1:
            raise ValueError(f"a document of {min(len(docs[i]) for i in idx)} tokens is shorter than one window "
                             f"(W={c.W}): reject it before compressing")
        tokens = torch.zeros(len(idx), n_windows[0] * c.W, dtype=torch.long)
        for b, (i, n) in enumerate(zip(idx, n_windows, strict=True)):
            tokens[b, :n * c.W] = docs[i][:n * c.W]
        tokens = tokens.to(device)
        state = model.initial_state(len(idx))
        incs: list[list[torch.Tensor]] = [[] for _ in idx]
        w = 0
        while w < n_windows[0]:
            active = sum(n > w for n in n_windows)  # a prefix: rows are sorted by length
            stop = min(n_windows[active - 1], w + segment_windows)
            state = MelodiState(state.z[:, :active], state.fifo[:active], state.n_valid[:active])
            inc, state = model.advance(tokens[:active, w * c.W:stop * c.W], state, full_state=end_state)
            for b in range(active):
                incs[b].append(inc[b])
                if n_windows[b] == stop:
                    yield idx[b], torch.cat(incs[b]).cpu(), state.z[:, b].cpu() if end_state else None
                    incs[b] = []
            w = stop


def plan_shards(keys: list[tuple[int, int, str]], docs_per_shard: int) -> list[list[str]]:
    """(file index, position, doc id) of every document -> doc ids per shard, in input order."""
    ordered = [k[2] for k in sorted(keys)]
    return [ordered[i:i + docs_per_shard] for i in range(0, len(ordered), docs_per_shard)]


class _Loaded:
    def __init__(self, loaded):
        self.loaded = loaded


class WritePlanFn(beam.DoFn):
    """Records the plan in the store (a resumed run must plan the same shards) and emits doc id -> shard."""

    def __init__(self, store_path: str, docs_per_shard: int):
        self.store_path = store_path
        self.docs_per_shard = docs_per_shard

    def process(self, keys: list):
        shards = plan_shards([tuple(k) for k in keys], self.docs_per_shard)
        LongTermStore.open(self.store_path, read_only=False).write_plan(shards)
        yield {doc_id: s for s, ids in enumerate(shards) for doc_id in ids}


class CompressShardFn(beam.DoFn):
    """(shard, documents) -> the shard's increments and end states, committed; committed shards are skipped."""

    def __init__(self, store_path: str, config: CompressConfig):
        self.store_path = store_path
        self.config = config
        self._shared = Shared()
        self.documents = beam.metrics.Metrics.counter("premem", "documents_compressed")
        self.windows = beam.metrics.Metrics.counter("premem", "windows_compressed")
        self.tokens = beam.metrics.Metrics.counter("premem", "tokens_compressed")
        self.tail = beam.metrics.Metrics.counter("premem", "tail_tokens_not_compressed")
        self.skipped = beam.metrics.Metrics.counter("premem", "shards_skipped")

    def setup(self):
        cfg = self.config
        self.loaded = self._shared.acquire(lambda: _Loaded(load_checkpoint(cfg.checkpoint, cfg.device)),
                                           tag=cfg.fingerprint + cfg.device).loaded
        if self.loaded.fingerprint != cfg.fingerprint:
            raise CheckpointError(f"worker loaded checkpoint {self.loaded.fingerprint[:12]} but the store expects "
                               f"{cfg.fingerprint[:12]}: the checkpoint at {cfg.checkpoint} changed during the job")
        self.store = LongTermStore.open(self.store_path, expected_fingerprint=cfg.fingerprint, read_only=False,
                                        lease_token=cfg.lease_token)

    def process(self, element: tuple[int, list[Document]]):
        shard, docs = element
        if self.store.is_committed(shard):
            self.skipped.inc()
            return
        started = time.perf_counter()
        docs = sorted(docs, key=lambda d: (d.file_index, d.position))
        tok = self.loaded.tokenizer
        tokens = [tok.encode_tensor(d.text) for d in docs]
        meta = [{"doc_id": d.doc_id, "title": d.title, "source": d.source, "position": d.position,
                 "n_tokens": len(t)} for d, t in zip(docs, tokens, strict=True)]
        with self.store.shard_writer(shard, meta) as writer:
            for i, incs, end_z in compress_documents(
                    self.loaded.model, tokens, docs_per_batch=self.config.docs_per_batch,
                    end_state=self.config.end_state):
                writer.write(i, incs, end_z)
        marker = writer.marker
        self.documents.inc(marker["documents"])
        self.windows.inc(marker["windows"])
        self.tokens.inc(marker["tokens"])
        self.tail.inc(marker["tail_tokens"])
        yield {**marker, "seconds": time.perf_counter() - started}


class SetAsideShortFn(beam.DoFn):
    """Documents shorter than one window go to the rejects with their reason: there is no whole window to
    compress (the tail of a longer document is recorded, not compressed)."""

    SHORT = "short"

    def __init__(self, checkpoint: str, W: int):
        self.checkpoint, self.W = checkpoint, W

    def setup(self):
        self.tokenizer = load_tokenizer(self.checkpoint)

    def process(self, doc: Document):
        n = len(self.tokenizer.encode(doc.text))
        if n >= self.W:
            yield doc
        else:
            yield beam.pvalue.TaggedOutput(self.SHORT, Reject(
                doc.source, doc.position, f"document {doc.doc_id!r} has {n} tokens, shorter than one window "
                f"(W={self.W}): give longer documents or use a checkpoint with a smaller W", doc.text[:80]))


class CompressDocuments(beam.PTransform):
    """Input files -> committed long-term memory shards; rejected records (with reasons) go to `rejects_path`."""

    def __init__(self, files: list[str], store_path: str, config: CompressConfig, rejects_path: str,
                 fields: FieldNames | None = None, max_doc_chars: int = 64 << 20):
        super().__init__()
        self.files, self.store_path, self.config = files, store_path, config
        self.rejects_path, self.fields, self.max_doc_chars = rejects_path, fields or FieldNames(), max_doc_chars

    def expand(self, pbegin):
        docs, read_rejects = pbegin | "Read" >> ReadCorpus(self.files, self.fields, self.max_doc_chars)
        split = docs | "SetAsideShort" >> beam.ParDo(SetAsideShortFn(self.config.checkpoint, self.config.W)
                                                      ).with_outputs(SetAsideShortFn.SHORT, main="docs")
        docs = split.docs
        _ = ((read_rejects, split[SetAsideShortFn.SHORT]) | "AllRejects" >> beam.Flatten()
             | "RejectJson" >> beam.Map(Reject.to_json) | "WriteRejects" >> WriteLines(self.rejects_path))
        plan = (docs
                | "Keys" >> beam.Map(lambda d: (d.file_index, d.position, d.doc_id))
                | "AllKeys" >> beam.combiners.ToList()
                | "Plan" >> beam.ParDo(WritePlanFn(self.store_path, self.config.docs_per_shard)))
        return (docs
                | "AssignShard" >> beam.Map(lambda d, p: (p[d.doc_id], d), p=beam.pvalue.AsSingleton(plan))
                | "GroupShards" >> beam.GroupByKey()
                | "SpreadShards" >> beam.Reshuffle()
                | "CompressShards" >> beam.ParDo(CompressShardFn(self.store_path, self.config)))
