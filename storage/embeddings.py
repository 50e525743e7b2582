"""Retrieval embeddings inside a memory store: a Zarr v3 array ``embeddings/`` of shape [rows, e].

One chunk per corpus shard, written whole by the worker that encodes the shard, then a commit marker
``embedding-commits/shard-00000.json``; a shard's embeddings are readable only once its marker exists, so an
embedding-only run (a store encoded without ``--retriever``) resumes where it stopped.  The retriever that
made them (kind, checkpoint, pooling, max length, fingerprint) is recorded in ``manifest.json`` under
``retriever``; a store holds the embeddings of exactly one retriever.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorstore as ts

from premem.storage.store import (
    FingerprintMismatch,
    MemoryStore,
    StoreError,
    _dump_json,
    _kv_read,
    _kv_write,
    _now,
    _one_line,
    _parse_json,
    _parse_manifest,
    kvstore_spec,
)

EMBEDDINGS = "embeddings/"
COMMITS = "embedding-commits/"
_DTYPES = {"float32": np.float32, "float16": np.float16}


def _marker_key(shard: int) -> str:
    return f"{COMMITS}shard-{shard:05d}.json"


def retriever_info(store: MemoryStore) -> dict | None:
    """The manifest's record of the retriever whose embeddings the store holds (None: no embeddings)."""
    info = store.manifest.get("retriever")
    return dict(info) if info else None


def _write_manifest_key(store: MemoryStore, key: str, value: Any) -> None:
    """Set one top-level manifest key, re-reading the manifest first so other keys written meanwhile survive."""
    res = _kv_read(store._kv, "manifest.json", store.path)
    manifest = _parse_manifest(res.value, store.path) if res.state == "value" else dict(store.manifest)
    if value is None:
        manifest.pop(key, None)
    else:
        manifest[key] = value
    _kv_write(store._kv, "manifest.json", _dump_json(manifest), store.path)
    store.manifest = manifest


def prepare_embeddings(store: MemoryStore, info: dict, *, dtype: str = "float32") -> None:
    """Create ``embeddings/`` for retriever ``info`` (needs ``fingerprint`` and ``dim``), or check the one there.

    A store that already holds another retriever's embeddings is refused rather than mixed.
    """
    if store.read_only:
        raise StoreError(f"store {store.path} was opened read-only: open it with read_only=False to add embeddings")
    if dtype not in _DTYPES:
        raise StoreError(f"unsupported embedding dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    have = retriever_info(store)
    if have is not None:
        if have.get("fingerprint") != info["fingerprint"]:
            raise FingerprintMismatch(
                f"store {store.path} holds embeddings of retriever {have.get('checkpoint', have.get('kind'))} "
                f"(fingerprint {str(have.get('fingerprint'))[:12]}), this run's retriever is "
                f"{info.get('checkpoint', info.get('kind'))} ({info['fingerprint'][:12]}): pass the same --retriever, "
                f"--retriever none, or delete {store.path}/{EMBEDDINGS} and {COMMITS} to replace them")
        return
    dim = int(info["dim"])
    per_row = int(info.get("vectors_per_row", 1))
    shape, chunks = ([store.rows, dim], [store.shard_size, dim]) if per_row == 1 else \
        ([store.rows, per_row, dim], [store.shard_size, per_row, dim])
    try:
        store._kv.delete_range(ts.KvStore.KeyRange(COMMITS, COMMITS[:-1] + "0")).result()
        ts.open({
            "driver": "zarr3",
            "kvstore": kvstore_spec(store.path, EMBEDDINGS),
            "metadata": {
                "shape": shape,
                "data_type": dtype,
                "fill_value": 0,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                           {"name": "zstd", "configuration": {"level": 1}}, {"name": "crc32c"}],
                "dimension_names": ["row", "feature"] if per_row == 1 else ["row", "window", "feature"],
            },
        }, create=True, delete_existing=True).result()
    except Exception as e:
        raise StoreError(f"cannot create {EMBEDDINGS} in store {store.path}: {_one_line(e)}") from e
    _write_manifest_key(store, "retriever", {**info, "dtype": dtype, "array": EMBEDDINGS.rstrip("/"),
                                             "created_at": _now()})


def _array(store: MemoryStore) -> ts.TensorStore:
    cached = getattr(store, "_embeddings_array", None)
    if cached is not None and cached[0] == store._pid:
        return cached[1]
    if retriever_info(store) is None:
        raise StoreError(f"store {store.path} has no retrieval embeddings: add them with "
                         f"`premem encode SHARDS --store {store.path} --retriever minilm ...`")
    try:
        arr = ts.open({"driver": "zarr3", "kvstore": kvstore_spec(store.path, EMBEDDINGS)},
                      open=True, read=True, write=not store.read_only).result()
    except Exception as e:
        raise StoreError(f"store {store.path}: cannot open {EMBEDDINGS} ({_one_line(e)}): delete it and "
                         f"re-run `premem encode --retriever ...` to recompute the embeddings") from e
    store._embeddings_array = (store._pid, arr)
    return arr


def embedding_committed_shards(store: MemoryStore) -> set[int]:
    """Shards whose embeddings are committed (marker present)."""
    return store.marked_shards(COMMITS)


def embeddings_committed(store: MemoryStore, shard: int) -> bool:
    return _kv_read(store._kv, _marker_key(shard), store.path).state == "value"


def write_shard_embeddings(store: MemoryStore, shard: int, rows: np.ndarray, vectors: np.ndarray) -> dict:
    """Write the embeddings of every row of ``shard`` (rows in any order), then its commit marker."""
    info = retriever_info(store)
    if info is None:
        raise StoreError(f"store {store.path} has no embeddings array: call prepare_embeddings first")
    rng = store.shard_rows(shard)
    rows = np.asarray(rows, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    per_row = int(info.get("vectors_per_row", 1))
    want = (len(rows), int(info["dim"])) if per_row == 1 else (len(rows), per_row, int(info["dim"]))
    if vectors.shape != want:
        raise StoreError(f"embeddings for shard {shard} must have shape {list(want)}, got {list(vectors.shape)}")
    local = rows - rng.start
    if len(rows) != len(rng) or np.any(local < 0) or np.any(local >= len(rng)) or len(np.unique(local)) != len(rng):
        raise StoreError(f"embeddings for shard {shard} must cover its rows {rng.start}..{rng.stop - 1} exactly once")
    if not np.all(np.isfinite(vectors)):
        raise StoreError(f"embeddings for shard {shard} contain NaN/inf: the retriever diverged, check its weights")
    full = np.empty((len(rng), *vectors.shape[1:]), dtype=_DTYPES[info.get("dtype", "float32")])
    full[local] = vectors
    try:
        _array(store)[rng.start:rng.stop].write(full).result()
    except Exception as e:
        raise StoreError(f"store {store.path}: writing the embeddings of shard {shard} failed ({_one_line(e)})") from e
    marker = {"shard": shard, "start": rng.start, "stop": rng.stop, "retriever_fingerprint": info["fingerprint"],
              "committed_at": _now()}
    _kv_write(store._kv, _marker_key(shard), _dump_json(marker), store.path)
    return marker


def read_shard_embeddings(store: MemoryStore, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64, vectors float32 [n, e], or [n, m, e] with m windows per row) of one committed shard."""
    res = _kv_read(store._kv, _marker_key(shard), store.path)
    if res.state != "value":
        raise StoreError(f"the embeddings of shard {shard} of store {store.path} are not committed: resume "
                         f"`premem encode ... --retriever ...` to compute them")
    marker = _parse_json(res.value, f"{store.path}/{_marker_key(shard)}")
    info = retriever_info(store) or {}
    if marker.get("retriever_fingerprint") != info.get("fingerprint"):
        raise FingerprintMismatch(f"the embeddings of shard {shard} of store {store.path} come from another "
                                  f"retriever than the manifest records: delete {EMBEDDINGS} and {COMMITS} and "
                                  f"re-run `premem encode --retriever ...`")
    rng = store.shard_rows(shard)
    try:
        vectors = _array(store)[rng.start:rng.stop].read().result()
    except Exception as e:
        raise StoreError(f"store {store.path}: the embeddings of shard {shard} are unreadable ({_one_line(e)}): "
                         f"delete {_marker_key(shard)} and resume `premem encode --retriever ...`") from e
    return np.arange(rng.start, rng.stop, dtype=np.int64), np.asarray(vectors, dtype=np.float32)


def read_embeddings(store: MemoryStore, rows: Any) -> np.ndarray:
    """Embeddings of arbitrary committed rows, float32 [len(rows), e] (or [len(rows), m, e] with windows)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= store.rows):
        raise StoreError(f"rows out of range: store {store.path} has rows 0..{store.rows - 1}")
    done = embedding_committed_shards(store)
    missing = sorted(set((rows // store.shard_size).tolist()) - done)
    if missing:
        raise StoreError(f"the embeddings of shard {missing[0]} of store {store.path} are not committed: resume "
                         f"`premem encode ... --retriever ...`")
    try:
        return np.asarray(_array(store).oindex[rows].read().result(), dtype=np.float32)
    except Exception as e:
        raise StoreError(f"store {store.path}: reading embeddings failed ({_one_line(e)})") from e


def vectors_per_row(store: MemoryStore) -> int:
    return int((retriever_info(store) or {}).get("vectors_per_row", 1))


def flatten_vectors(rows: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors [n', e]) for the index: ids are rows, or row * m + window with m windows per row
    (empty window slots, all zeros, are left out)."""
    if vectors.ndim == 2:
        return np.asarray(rows, dtype=np.int64), vectors
    n, m, dim = vectors.shape
    ids = (np.asarray(rows, dtype=np.int64)[:, None] * m + np.arange(m)[None, :]).reshape(-1)
    flat = vectors.reshape(n * m, dim)
    keep = np.any(flat != 0, axis=1)
    return ids[keep], flat[keep]
