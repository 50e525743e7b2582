"""Quantized memory: the codebook's first pass over a sample of shards, and `premem quantize` (one Beam element =
one shard of an existing store, re-written as codes).

Both the encode route (states from the encoder, as the workers will compute them) and the store route (states as
stored) collect the same seeded sample (storage.quantize.sample_shards / draw_sample), so `premem quantize` of a
store trains the same codebook and writes the same codes as `premem encode --quantize` of its corpus.
"""
from __future__ import annotations

import time

import apache_beam as beam
import numpy as np
import torch

from premem.models.retriever import MEMORY_MEAN, memory_mean
from premem.storage import MemoryStore, kv, layout
from premem.storage.embeddings import embeddings_committed, read_shard_embeddings, retriever_info, write_shard_embeddings
from premem.storage.quantize import QuantizeConfig, sample_shards, train_codec
from premem.storage.tensors import DTYPES, pad_sequences, to_numpy

_READ_ROWS = 256  # rows per read while a shard is quantized


def _real_tokens(states: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float32 [sum(lengths), d]: each row's real tokens, rows in the given order."""
    real = np.arange(states.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return states[real].astype(np.float32)


def encoder_sample(shards_dir: str, index: dict, config, spec: dict, dtype: str) -> tuple[np.ndarray, dict]:
    """The codebook sample from the corpus: the sample shards encoded as the workers encode them (same model, device,
    batches), cast to the stored ``dtype``; returns (vectors, the sample's record)."""
    from premem.models.encoder import token_budget_batches
    from premem.pipeline.shard import read_shard

    entries = {int(e["shard"]): e for e in index["shards"]}
    chosen = sample_shards({s: int(e["tokens"]) for s, e in entries.items()}, spec)
    encoder = config.load()
    pad_id = encoder.tokenizer.pad_token_id or 0
    device = config.resolved_device()
    parts = []
    with torch.inference_mode():
        for s in chosen:
            table = read_shard(shards_dir, entries[s])
            rows = table.column("row").to_numpy()
            lengths = table.column("length").to_numpy()
            token_ids = table.column("token_ids").to_pylist()
            by_row = {}
            for batch in token_budget_batches(lengths, config.tokens_per_batch):
                input_ids, mask = pad_sequences([token_ids[i] for i in batch], pad_id)
                states = to_numpy(encoder(input_ids.to(device), mask.to(device)).cpu(), DTYPES[dtype][0])
                for j, i in enumerate(batch):
                    by_row[int(rows[i])] = _real_tokens(states[j:j + 1], lengths[i:i + 1])
            parts += [by_row[r] for r in sorted(by_row)]
    del encoder
    return np.concatenate(parts), {"shards": chosen, "from": "encoder"}


def store_sample(store: MemoryStore, spec: dict) -> tuple[np.ndarray, dict]:
    """The codebook sample from a stored (unquantized) store: the same shards and tokens as encoder_sample."""
    tokens = {int(m["shard"]): int(m["tokens"]) for m in store.commits.read_all()}
    chosen = sample_shards(tokens, spec)
    parts = []
    for s in chosen:
        rng = store.shard_rows(s)
        for a in range(rng.start, rng.stop, _READ_ROWS):
            batch = store.read(np.arange(a, min(a + _READ_ROWS, rng.stop)))
            parts.append(_real_tokens(to_numpy(batch.states), batch.lengths.numpy()))
    return np.concatenate(parts), {"shards": chosen, "from": "store"}


def prepare_codec(store_path: str, d_model: int, request: QuantizeConfig, sample) -> tuple[dict, tuple | None]:
    """Before anything is written: the request checked against d, and the codec trained on ``sample(spec)`` (vectors,
    record) unless the store at ``store_path`` already holds its codebook (a resumed job reuses it, checked here).
    Returns (spec, (codec, fidelity, sample record) to store with MemoryStore.set_codec, or None)."""
    spec = request.resolve(d_model)
    path = kv.normalize_path(store_path)
    manifest = kv.read_json(kv.open_kv(path), layout.MANIFEST, path)
    if manifest is not None:
        had = manifest.get("quantize") or {}
        if (had.get("codec"), had.get("factory")) != (spec["codec"], spec["factory"]):
            return spec, None  # another codec than asked: MemoryStore.create says so
        if had.get("fingerprint"):
            _ = MemoryStore.open(path).codec  # a missing or damaged codebook is one line, before anything is written
            return spec, None
    vectors, record = sample(spec)
    codec, fidelity = train_codec(spec, vectors)
    return spec, (codec, fidelity, {**record, "tokens": int(len(vectors)), "seed": spec["seed"]})


class QuantizeShardFn(beam.DoFn):
    """Re-writes one committed shard of the source store as codes in the quantized store: memory through the
    store's writer (which encodes), metadata copied, retrieval embeddings copied (or, memory-mean, recomputed
    from the decoded memory).  Committed shards are skipped, so a rerun resumes."""

    def __init__(self, source: str, out: str, lease_token: str) -> None:
        self.source, self.out, self.lease_token = source, out, lease_token
        self.quantized = beam.metrics.Metrics.counter("premem", "shards_quantized")
        self.skipped = beam.metrics.Metrics.counter("premem", "shards_skipped")

    def setup(self):
        self.src = MemoryStore.open(self.source)
        self.dst = MemoryStore.open(self.out, read_only=False, lease_token=self.lease_token)
        self.embed = retriever_info(self.dst)

    def process(self, shard: int):
        memory_done = self.dst.is_committed(shard)
        embed = self.embed is not None and not embeddings_committed(self.dst, shard)
        if memory_done and not embed:
            self.skipped.inc()
            return
        self.dst.check_lease()
        started = time.perf_counter()
        rng = self.src.shard_rows(shard)
        if not memory_done:
            meta = self.src.read_key(layout.meta_key(shard))
            if meta.state == "value":
                self.dst.write_key(layout.meta_key(shard), bytes(meta.value))
            with self.dst.shard_writer(shard) as writer:
                for a in range(rng.start, rng.stop, _READ_ROWS):
                    batch = self.src.read(np.arange(a, min(a + _READ_ROWS, rng.stop)))
                    writer.write(batch.rows, batch.states, batch.lengths)
        if embed:
            if self.embed.get("kind") == MEMORY_MEAN:  # the mean of the memory the store now holds
                rows = np.arange(rng.start, rng.stop)
                vectors = np.concatenate([memory_mean(b.states, b.lengths) for b in
                                          (self.dst.read(rows[i:i + _READ_ROWS]) for i in range(0, len(rows), _READ_ROWS))])
            else:
                rows, vectors = read_shard_embeddings(self.src, shard)
            write_shard_embeddings(self.dst, shard, rows, vectors)
        self.quantized.inc()
        yield {"shard": shard, "passages": len(rng), "seconds": time.perf_counter() - started}


class QuantizeShards(beam.PTransform):
    def __init__(self, source: str, out: str, lease_token: str) -> None:
        super().__init__()
        self.fn = QuantizeShardFn(source, out, lease_token)

    def expand(self, shards):
        return shards | "SpreadShards" >> beam.Reshuffle() | "Quantize" >> beam.ParDo(self.fn)
