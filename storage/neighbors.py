"""The neighbours file: the top-k store rows per question, as `premem retrieve` writes it.

It is the join key between a question set and a memory store, so it carries
the store's fingerprint: a training reader refuses a file made against
another store.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from premem.storage.errors import FingerprintMismatch, StoreError
from premem.storage.kv import read_file, write_file

NEIGHBORS_FORMAT = 1
SCHEMA = pa.schema([
    ("question_id", pa.string()),
    ("question", pa.string()),
    ("rows", pa.list_(pa.int64())),
    ("scores", pa.list_(pa.float32())),
])
_META_FORMAT = b"premem.neighbors_format"
_META_STORE = b"premem.store"
_META_FINGERPRINT = b"premem.store_fingerprint"
_META_RETRIEVER = b"premem.retriever_fingerprint"


@dataclass
class Neighbors:
    """One neighbours file in memory: `rows[i]` and `scores[i]` are question i's top-k, best first."""

    question_ids: list[str]
    questions: list[str]
    rows: np.ndarray  # int64 [Q, k]
    scores: np.ndarray  # float32 [Q, k]
    store: str
    store_fingerprint: str
    retriever_fingerprint: str

    def __len__(self) -> int:
        return len(self.question_ids)

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])


def write_neighbors(path: str | os.PathLike, table: pa.Table, *, store: str, store_fingerprint: str,
                    retriever_fingerprint: str) -> None:
    """Writes `table` (columns of SCHEMA) with the store it was retrieved from recorded in the file."""
    table = table.select(SCHEMA.names).cast(SCHEMA)
    meta = {
        _META_FORMAT: str(NEIGHBORS_FORMAT).encode(),
        _META_STORE: store.encode(),
        _META_FINGERPRINT: store_fingerprint.encode(),
        _META_RETRIEVER: retriever_fingerprint.encode(),
    }
    buf = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    write_file(path, buf.getvalue().to_pybytes())


def read_neighbors(path: str | os.PathLike, *, expected_fingerprint: str | None = None) -> Neighbors:
    """Reads a neighbours file; with `expected_fingerprint`, refuses one made against another store."""
    data = read_file(path)
    if data is None:
        raise StoreError(f"neighbours file {path} does not exist: run `premem retrieve` first")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{path} is not a readable neighbours Parquet file ({e})") from e
    meta = table.schema.metadata or {}
    if _META_FINGERPRINT not in meta or not set(SCHEMA.names) <= set(table.column_names):
        raise StoreError(f"{path} is not a premem neighbours file (no store fingerprint or missing columns "
                         f"{SCHEMA.names}); make it with `premem retrieve`")
    fingerprint = meta[_META_FINGERPRINT].decode()
    store = meta.get(_META_STORE, b"").decode()
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise FingerprintMismatch(
            f"neighbours file {path} was retrieved against store {store} (fingerprint {fingerprint[:16]}), "
            f"not the store given (fingerprint {expected_fingerprint[:16]}): rerun `premem retrieve` "
            "against this store")
    ks = {len(r) for r in table.column("rows").to_pylist()}
    if len(ks) > 1:
        raise StoreError(f"neighbours file {path} has questions with different k ({sorted(ks)})")
    k = ks.pop() if ks else 0
    rows = np.asarray(table.column("rows").to_pylist(), dtype=np.int64).reshape(len(table), k)
    scores = np.asarray(table.column("scores").to_pylist(), dtype=np.float32).reshape(len(table), k)
    return Neighbors(
        question_ids=table.column("question_id").to_pylist(),
        questions=table.column("question").to_pylist(),
        rows=rows, scores=scores, store=store, store_fingerprint=fingerprint,
        retriever_fingerprint=meta.get(_META_RETRIEVER, b"").decode(),
    )
