"""`premem index`: a faiss index over the store's retrieval embeddings, trained on a sample, filled shard by shard.

1. choose the factory (``auto``: from the row count and the memory budget), sample the training vectors the
   factory needs, train once in the driver and store the trained empty index;
2. a Beam job (premem.pipeline.index): each element is one shard; it loads the trained index, adds that shard's
   embeddings with their store rows as ids and writes the part (``index/parts/``);
3. the driver merges the parts one at a time (in memory, or ``--on-disk`` into one memory-mapped ivfdata file),
   tunes nprobe / efSearch to the target recall against exact search on a sample, and records everything in
   the manifest.  HNSW graphs cannot merge: their shards are added one after another in the driver.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import apache_beam as beam
import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from premem.jobs.remote import dry_run_if_asked, index_job
from premem.jobs.run import pipeline_options
from premem.models.retriever import text_embedder
from premem.pipeline.index import AddShardsToIndex
from premem.storage import MemoryStore, kv, layout
from premem.storage import faiss_index as fx
from premem.storage.embeddings import (
    embedding_committed_shards,
    flatten_vectors,
    read_embeddings,
    read_shard_embeddings,
    retriever_info,
)
from premem.storage.errors import RetrievalError, StoreError
from premem.storage.lease import StoreLease

TUNE_SPAN_WORDS = 10  # about one line of verse or a short question


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    factory: str = fx.AUTO
    max_memory: int | None = None  # bytes for the index's codes (auto factory choice)
    train_size: int | None = None  # None: what the factory needs (39-256 points per centroid)
    on_disk: bool = False  # IVF only: inverted lists merged into one mmap'ed file (local stores)
    target_recall: float = fx.TARGET_RECALL
    tune_queries: int = fx.TUNE_QUERIES
    seed: int = 0


def _sample_rows(store: MemoryStore, size: int, seed: int) -> np.ndarray:
    """Sorted uniform sample of rows (every shard's embeddings are committed: build_index checks)."""
    if size >= store.rows:
        return np.arange(store.rows)
    return np.sort(np.random.default_rng(seed).choice(store.rows, size=size, replace=False))


def build_index(store_path: str, config: IndexConfig = IndexConfig(), pipeline_args: list[str] | None = None,
                log=lambda message: None, force_unlock: bool = False) -> dict:
    """Builds and stores the index; returns the manifest's ``index`` record.

    Holds the store's writer lease while it runs, so it never runs beside an encode job of the same store.
    """
    dry_run_if_asked(pipeline_args, index_job(store_path))
    with StoreLease(store_path, job="premem index", force=force_unlock) as lease:
        return _build_index(store_path, config, pipeline_args, log, lease.token)


def _build_index(store_path: str, config: IndexConfig, pipeline_args: list[str] | None, log, lease_token: str) -> dict:
    started = time.perf_counter()
    store = MemoryStore.open(store_path, read_only=False, lease_token=lease_token)
    rinfo = retriever_info(store)
    if rinfo is None:
        raise RetrievalError(f"store {store.path} has no retrieval embeddings: add them with `premem encode SHARDS "
                                f"--store {store.path} ... --retriever minilm` (memory is not re-encoded)")
    shards = sorted(embedding_committed_shards(store))
    missing = sorted(set(range(store.num_shards)) - set(shards))
    if missing:
        raise RetrievalError(f"{len(missing)} of {store.num_shards} shards of store {store.path} have no committed "
                                f"embeddings (first: shard {missing[0]}): resume `premem encode ... --retriever "
                                f"{rinfo.get('checkpoint', rinfo.get('kind'))}` first")
    dim, per_row = int(rinfo["dim"]), int(rinfo.get("vectors_per_row", 1))
    rows = store.rows * per_row  # vectors to index (windows: at most m per row)
    factory = fx.auto_factory(rows, dim, config.max_memory) if config.factory == fx.AUTO else config.factory
    needs = fx.training_needs(fx.new_index(factory, dim))
    train_size = min(rows, config.train_size or needs.recommended or 0)
    if config.train_size is not None and config.train_size < needs.minimum:
        raise RetrievalError(f"--train-size {config.train_size} is below the {needs.minimum} vectors factory "
                                f"{factory!r} needs to train")
    log(f"factory {factory} for {rows} vectors of dim {dim}; training on {train_size} sampled vectors")

    t0 = time.perf_counter()
    sampled = _sample_rows(store, -(-train_size // per_row), config.seed)
    sample = flatten_vectors(sampled, read_embeddings(store, sampled))[1][:train_size] if train_size else \
        np.zeros((0, dim), np.float32)
    trained = fx.train_index(factory, sample, rows)
    train_seconds = time.perf_counter() - t0
    store.write_key(layout.INDEX_TRAINED, fx.serialize(trained))

    t0 = time.perf_counter()
    mergeable = fx.is_mergeable(trained)
    if config.on_disk and not (fx.is_ivf(trained) and kv.is_local(store.path)):
        raise RetrievalError("--on-disk needs an IVF factory and a local store: drop --on-disk or pick an IVF "
                                "factory")
    if mergeable:
        log(f"adding {len(shards)} shards in parallel (Beam), one index part each")
        with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
            _ = pipeline | "Shards" >> beam.Create(shards) | "AddShards" >> AddShardsToIndex(store.path, lease_token)
        add_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = _merge(store, trained, shards, config.on_disk)
    else:
        log(f"factory {factory} cannot merge parts (HNSW graph): adding the {len(shards)} shards in order here")
        index = faiss.clone_index(trained)
        for shard in shards:
            fx.add_rows(index, *flatten_vectors(*read_shard_embeddings(store, shard)))
        add_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
    merge_seconds = time.perf_counter() - t0
    if (per_row == 1 and index.ntotal != rows) or index.ntotal < store.rows:
        raise RetrievalError(f"the merged index holds {index.ntotal} vectors, the store {rows}: rebuild with "
                                f"`premem index {store.path}`")

    t0 = time.perf_counter()
    if factory.replace(" ", "") == "Flat":  # exact search: nothing to tune
        params = {"tuned_recall_at_k": 1.0, "tuned_k": min(10, int(index.ntotal))}
    elif config.target_recall <= 0:  # no tuning pass (it streams every embedding once): nprobe = nlist / 64
        params = {"nprobe": max(1, faiss.extract_index_ivf(index).nlist // 64)} if fx.is_ivf(index) else {}
        fx.set_search_params(index, params)
        params.update(tuned_recall_at_k=None, tuned_k=None)
    else:
        params = _tune(store, index, sample, shards, config, rinfo)
    tune_seconds = time.perf_counter() - t0

    if config.on_disk:
        store.check_lease()
        faiss.write_index(index, os.path.join(store.path, fx.MERGED))
        files = {key: fx.file_digest(os.path.join(store.path, key)) for key in (fx.MERGED, fx.IVFDATA)}
    else:
        data = fx.serialize(index)
        store.check_lease()
        store.write_key(fx.MERGED, data)
        files = {fx.MERGED: fx.file_digest(data)}
    size = sum(f["bytes"] for f in files.values())
    kv.delete_prefix(store.kv, layout.INDEX_PARTS, store.path)
    record = {
        "factory": factory,
        "requested_factory": config.factory,
        "metric": "inner_product",
        "dim": dim,
        "rows": store.rows,
        "vectors_per_row": per_row,
        "ntotal": int(index.ntotal),
        "shards": len(shards),
        "train_size": int(len(sample)),
        "training_needs": {"minimum": needs.minimum, "recommended": needs.recommended},
        "max_memory": config.max_memory,
        "mergeable": mergeable,
        "on_disk": config.on_disk,
        "search_params": {k2: v for k2, v in params.items() if k2 in ("nprobe", "efSearch")},
        "tuned_recall_at_k": params["tuned_recall_at_k"],
        "tuned_k": params["tuned_k"],
        "tuned_on": params.get("tuned_on"),
        "target_recall": config.target_recall,
        "bytes": int(size),
        "build_seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(train_seconds, 3),
        "add_seconds": round(add_seconds, 3),
        "merge_seconds": round(merge_seconds, 3),
        "tune_seconds": round(tune_seconds, 3),
        "retriever": {k2: rinfo.get(k2) for k2 in ("kind", "checkpoint", "pooling", "max_length", "template",
                                                   "window_words", "fingerprint", "memory_fingerprint")
                      if k2 in rinfo},
        "file": fx.MERGED,
        "files": files,  # size and crc32c of each index file: `premem verify` and loading check them
        "built_at": kv.now(),
    }
    store.update_manifest("index", record)
    return record


def _tune(store: MemoryStore, index: faiss.Index, sample: np.ndarray, shards: list[int], config: IndexConfig,
          rinfo: dict) -> dict:
    """nprobe / efSearch for the target recall@10 against exact search (one streamed pass over the embeddings)."""
    queries, source = _tuning_queries(store, sample, config, rinfo)
    k = min(10, int(index.ntotal))
    _, exact_rows = fx.exact_top_k(queries, (flatten_vectors(*read_shard_embeddings(store, s)) for s in shards), k)
    return {**fx.tune_search_params(index, queries, exact_rows, k, config.target_recall), "tuned_on": source}


def _tuning_queries(store: MemoryStore, sample: np.ndarray, config: IndexConfig, rinfo: dict) -> tuple[np.ndarray, str]:
    """Queries like a user's: spans of TUNE_SPAN_WORDS words from random passages, encoded by the store's text
    retriever.  Stored vectors as queries sit closer to the index than text does and promise too much recall
    (demo store: 0.969 on them, while lines then found their passage 11 points less often than with exact search);
    they are the fallback for memory-mean embeddings or a store without passage text."""
    rng = np.random.default_rng(config.seed + 1)
    if rinfo.get("kind") == "checkpoint":
        rows = np.sort(rng.choice(store.rows, size=min(config.tune_queries, store.rows), replace=False))
        try:
            texts = store.read_metadata(rows).column("text").to_pylist()
        except (StoreError, KeyError):
            texts = []
        spans = []
        for text in texts:
            words = (text or "").split()
            if len(words) >= 4:
                start = int(rng.integers(0, max(1, len(words) - TUNE_SPAN_WORDS + 1)))
                spans.append(" ".join(words[start:start + TUNE_SPAN_WORDS]))
        if spans:
            embedder = text_embedder(rinfo)
            if embedder.fingerprint == rinfo.get("fingerprint"):
                return embedder.embed(spans, what="query").astype(np.float32), f"{len(spans)} passage text spans"
    if len(sample):
        return sample[: config.tune_queries], "stored vectors"
    rows = np.arange(min(store.rows, config.tune_queries))
    return flatten_vectors(rows, read_embeddings(store, rows))[1], "stored vectors"


def _merge(store: MemoryStore, trained: faiss.Index, shards: list[int], on_disk: bool) -> faiss.Index:
    if not on_disk:
        def parts():
            for shard in shards:
                yield fx.deserialize(fx.read_index_bytes(store, layout.index_part_key(shard)))
        return fx.merge_parts(trained, parts())
    index = faiss.clone_index(trained)
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for shard in shards:  # merge_ondisk reads parts from files
            name = os.path.join(tmp, f"{shard}.faiss")
            with open(name, "wb") as handle:
                handle.write(fx.read_index_bytes(store, layout.index_part_key(shard)))
            names.append(name)
        merge_ondisk(index, names, os.path.join(store.path, fx.IVFDATA))
    return index
