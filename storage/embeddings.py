"""Retrieval embeddings inside a memory store: a Zarr v3 array ``embeddings/`` of shape [rows, e].

One chunk per corpus shard, written whole by the worker that encodes the shard, then a commit marker
``embedding-commits/shard-00000.json``; a shard's embeddings are readable only once its marker exists, so an
embedding-only run (a store encoded without ``--retriever``) resumes where it stopped.  The retriever that
made them (kind, checkpoint, pooling, max length, fingerprint) is recorded in ``manifest.json`` under
``retriever``; a store holds the embeddings of exactly one retriever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import tensorstore as ts

from premem.storage import kv, layout
from premem.storage.commits import ShardCommits
from premem.storage.errors import FingerprintMismatch, StoreError, one_line

if TYPE_CHECKING:
    from premem.storage.store import MemoryStore

_DTYPES = {"float32": np.float32, "float16": np.float16}
_EMBEDDINGS = layout.array_prefix(layout.EMBEDDINGS)


def retriever_info(store: MemoryStore) -> dict | None:
    """The manifest's record of the retriever whose embeddings the store holds (None: no embeddings)."""
    info = store.manifest.get("retriever")
    return dict(info) if info else None


def embedding_commits(store: MemoryStore) -> ShardCommits:
    return ShardCommits(store, layout.EMBEDDING_COMMITS, store.num_shards)


def prepare_embeddings(store: MemoryStore, info: dict, *, dtype: str = "float32") -> None:
    """Create ``embeddings/`` for retriever ``info`` (needs ``fingerprint`` and ``dim``), or check the one there.

    A store that already holds another retriever's embeddings is refused rather than mixed.
    """
    store.require_writable("add embeddings")
    if dtype not in _DTYPES:
        raise StoreError(f"unsupported embedding dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    have = retriever_info(store)
    if have is not None:
        if have.get("fingerprint") != info["fingerprint"]:
            raise FingerprintMismatch(
                f"store {store.path} holds embeddings of retriever {have.get('checkpoint', have.get('kind'))} "
                f"(fingerprint {str(have.get('fingerprint'))[:12]}), this run's retriever is "
                f"{info.get('checkpoint', info.get('kind'))} ({info['fingerprint'][:12]}): pass the same --retriever, "
                f"--retriever none, or delete {store.path}/{_EMBEDDINGS} and {layout.EMBEDDING_COMMITS} to replace them")
        return
    dim = int(info["dim"])
    per_row = int(info.get("vectors_per_row", 1))
    shape, chunks = ([store.rows, dim], [store.shard_size, dim]) if per_row == 1 else \
        ([store.rows, per_row, dim], [store.shard_size, per_row, dim])
    embedding_commits(store).forget_all()
    try:
        ts.open(layout.zarr_spec(kv.kvstore_spec(store.path, _EMBEDDINGS), shape=shape, dtype=dtype, chunk_shape=chunks,
                                 codecs=layout.chunk_codecs(1),
                                 dimension_names=["row", "feature"] if per_row == 1 else ["row", "window", "feature"]),
                create=True, delete_existing=True).result()
    except Exception as e:
        raise StoreError(f"cannot create {_EMBEDDINGS} in store {store.path}: {one_line(e)}") from e
    store.update_manifest("retriever", {**info, "dtype": dtype, "array": layout.EMBEDDINGS, "created_at": kv.now()})


def _array(store: MemoryStore) -> ts.TensorStore:
    if retriever_info(store) is None:
        raise StoreError(f"store {store.path} has no retrieval embeddings: add them with "
                         f"`premem encode SHARDS --store {store.path} --retriever minilm ...`")
    try:
        return store.array(layout.EMBEDDINGS)
    except StoreError as e:
        raise StoreError(f"{e}; or delete {_EMBEDDINGS} and re-run `premem encode --retriever ...` to recompute the "
                         f"embeddings") from e


def embedding_committed_shards(store: MemoryStore) -> set[int]:
    """Shards whose embeddings are committed (marker present)."""
    return embedding_commits(store).committed()


def embeddings_committed(store: MemoryStore, shard: int) -> bool:
    return embedding_commits(store).is_committed(shard)


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

    def write() -> dict:
        try:
            _array(store)[rng.start:rng.stop].write(full).result()
        except Exception as e:
            raise StoreError(f"store {store.path}: writing the embeddings of shard {shard} failed ({one_line(e)})") from e
        return {"start": rng.start, "stop": rng.stop, "retriever_fingerprint": info["fingerprint"]}

    return embedding_commits(store).commit(shard, write)


def discard_shard_embeddings(store: MemoryStore, shard: int) -> None:
    """Forget one shard's embeddings (marker first, then its chunk) so that they are computed again."""
    embedding_commits(store).forget(shard)
    per_row = int((retriever_info(store) or {}).get("vectors_per_row", 1))
    store.write_key(layout.chunk_key(layout.EMBEDDINGS, shard, 2 if per_row == 1 else 3), None)


def read_shard_embeddings(store: MemoryStore, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64, vectors float32 [n, e], or [n, m, e] with m windows per row) of one committed shard."""
    commits = embedding_commits(store)
    marker = commits.read(shard)
    if marker is None:
        raise StoreError(f"the embeddings of shard {shard} of store {store.path} are not committed: resume "
                         f"`premem encode ... --retriever ...` to compute them")
    info = retriever_info(store) or {}
    if marker.get("retriever_fingerprint") != info.get("fingerprint"):
        raise FingerprintMismatch(f"the embeddings of shard {shard} of store {store.path} come from another "
                                  f"retriever than the manifest records: delete {_EMBEDDINGS} and "
                                  f"{layout.EMBEDDING_COMMITS} and re-run `premem encode --retriever ...`")
    rng = store.shard_rows(shard)
    try:
        vectors = _array(store)[rng.start:rng.stop].read().result()
    except Exception as e:
        raise StoreError(f"store {store.path}: the embeddings of shard {shard} are unreadable ({one_line(e)}): "
                         f"delete {commits.key(shard)} and resume `premem encode --retriever ...`") from e
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
        raise StoreError(f"store {store.path}: reading embeddings failed ({one_line(e)})") from e


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
