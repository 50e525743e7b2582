"""Store of pre-encoded MELODI long-term memory (written by `premem compress`, read at any window).

Layout (a local directory or ``gs://bucket/prefix``), in the style of the LUMEN store::

    manifest.json                   kind "melodi-longterm", model config, checkpoint fingerprint, dtype, totals
    plan.json                       which documents (ids, in input order) form each shard
    shards/NNNNN/increments/        Zarr v3 [windows of the shard, L, d]: the long-term increment of every window
                                    of every document of the shard, documents one after another (ragged; each
                                    document's first window is at its `offset`), one file, inner chunks of
                                    16 windows, zstd + crc32c
    shards/NNNNN/end_z/             Zarr v3 [documents, num_layers, S, d]: every layer's short-term memory
                                    after the document's last window (stores made with end_state)
    meta/shard-NNNNN.parquet        per document: doc_id, title, source, n_tokens, n_windows, offset, ...
    commits/shard-NNNNN.json        commit marker, written after the shard's data and metadata
    rejects.jsonl                   input records that are not documents, with their reason

The FIFO the long-term layer sees at the start of window k is the last Q_max increments before k, zeros in
front of the document's first window; the end state's FIFO is the FIFO at window n_windows, so it is not stored
twice. Only whole windows are compressed: a document keeps its real length (`n_tokens`), and the tokens after its
last whole window (`tail_tokens`, fewer than W) have no increment, since one computed on padding would put
into the FIFO what the model never read; a continuation from the end state re-reads them. A document shorter
than one window is a reject of `premem compress`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorstore as ts
import torch

from premem.storage import kv, layout
from premem.storage.commits import ShardCommits, StoreHandle
from premem.storage.errors import FingerprintMismatch, StoreError, one_line
from premem.storage.tensors import DTYPES, dtype_name, np_to_torch, to_numpy

META_SCHEMA = pa.schema([
    ("doc_id", pa.string()),
    ("title", pa.string()),
    ("source", pa.string()),
    ("position", pa.int64()),
    ("index", pa.int32()),       # position of the document in its shard (row of end_z)
    ("n_tokens", pa.int64()),
    ("n_windows", pa.int32()),   # whole windows: n_tokens // W
    ("offset", pa.int64()),      # first window of the document in the shard's increments array
    ("tail_tokens", pa.int32()),  # tokens after the last whole window (not compressed)
])


@dataclass
class LongTermBatch:
    """The FIFO of the long-term layer at the start of `windows` for a batch of documents."""

    fifo: torch.Tensor      # [B, Q_max*L, d], oldest first, zeros before the document start
    n_valid: torch.Tensor   # int64 [B]: windows of the FIFO that hold increments (min(window, Q_max))
    windows: torch.Tensor   # int64 [B]
    doc_ids: list[str]

    def __len__(self) -> int:
        return len(self.doc_ids)


@dataclass
class StoredState:
    """A document's recurrent state after its last window; MelodiState(z, fifo, n_valid) continues it."""

    z: torch.Tensor         # [num_layers, B, S, d]
    fifo: torch.Tensor      # [B, Q_max*L, d]
    n_valid: torch.Tensor   # int64 [B]
    n_tokens: torch.Tensor  # int64 [B] real tokens of each document
    n_windows: torch.Tensor  # int64 [B]; the continuation starts at token n_windows * W
    doc_ids: list[str]


class LongTermStore(StoreHandle):
    """Create/open a long-term memory store, write shards of documents, read FIFOs and end states."""

    def _reset_handles(self) -> None:
        super()._reset_handles()
        self._arrays: dict[str, ts.TensorStore] = {}
        self._index: dict[str, tuple[int, dict]] | None = None
        self._indexed: set[int] = set()
        self.commits = ShardCommits(self, layout.COMMITS)

    # --- properties ------------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """The MelodiConfig fields of the checkpoint that wrote the store (MelodiConfig(**store.config))."""
        return dict(self.manifest["config"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]

    @property
    def has_end_state(self) -> bool:
        return bool(self.manifest["end_state"])

    def _c(self, key: str) -> int:
        return int(self.manifest["config"][key])

    def __repr__(self) -> str:
        c = self.manifest["config"]
        return (f"LongTermStore({self.path!r}, W={c['W']}, L={c['L']}, Q_max={c['Q_max']}, d={c['d_model']}, "
                f"dtype={self.dtype}, fingerprint={self.fingerprint[:12]})")

    # --- create / open ---------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, config: dict, fingerprint: str, dtype: str = "float32",
               docs_per_shard: int, end_state: bool = True, checkpoint: dict | None = None,
               inputs: list[str] | None = None) -> LongTermStore:
        """Create a store, or reopen it for resuming when it was started with the same checkpoint and settings."""
        path = kv.normalize_path(path)
        kv.check_not_a_file(path)
        dtype = dtype_name(dtype)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError(f"cannot create store {path}: fingerprint must be a non-empty string")
        want = {"dtype": dtype, "docs_per_shard": int(docs_per_shard), "end_state": bool(end_state),
                "inputs": list(inputs or [])}
        store_kv = kv.open_kv(path)
        res = kv.read(store_kv, layout.MANIFEST, path)
        if res.state != "value":
            manifest = {
                "format_version": layout.LONGTERM_FORMAT_VERSION,
                "kind": layout.LONGTERM_KIND,
                "fingerprint": fingerprint,
                "config": dict(config),
                **want,
                "checkpoint": dict(checkpoint or {}),
                "layout": {"increments": "shards/NNNNN/increments [windows, L, d]",
                           "end_z": "shards/NNNNN/end_z [documents, num_layers, S, d]",
                           "windows_per_chunk": layout.WINDOWS_PER_CHUNK, "codec": "zarr3 sharding, zstd, crc32c"},
                "created_at": kv.now(),
                "complete": False,
            }
            gen = kv.write(store_kv, layout.MANIFEST, kv.dump_json(manifest), path, if_equal=res.stamp.generation)
            if gen.generation:
                return cls(path, manifest, read_only=False)
            res = kv.read(store_kv, layout.MANIFEST, path)  # another creator won: check against what it wrote
        manifest = kv.parse_json(res.value, f"{path}/{layout.MANIFEST}")
        layout.check_manifest(manifest, path, layout.LONGTERM_KIND)
        if manifest["fingerprint"] != fingerprint:
            raise FingerprintMismatch(
                f"store {path} holds long-term memory of checkpoint {manifest['fingerprint'][:12]}, this run's "
                f"checkpoint is {fingerprint[:12]}: use another --store or delete {path}")
        diff = [f"{k}={manifest.get(k)!r} (this run: {v!r})" for k, v in want.items() if manifest.get(k) != v]
        if diff:
            raise StoreError(f"store {path} was started with {', '.join(diff)}: use another --store or delete {path}")
        return cls(path, manifest, read_only=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, expected_fingerprint: str | None = None,
             read_only: bool = True, lease_token: str | None = None) -> LongTermStore:
        """Open a store; with `expected_fingerprint` (see melodi_ckpt.model_fingerprint) refuse another model's.
        ``lease_token``: the writer lease (taken by the job) that every commit through this handle checks first."""
        path = kv.normalize_path(path)
        kv.check_not_a_file(path)
        manifest = kv.read_json(kv.open_kv(path), layout.MANIFEST, path)
        if manifest is None:
            raise StoreError(f"no premem store at {path} (manifest.json missing): run `premem compress` first")
        layout.check_manifest(manifest, path, layout.LONGTERM_KIND)
        if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
            raise FingerprintMismatch(
                f"store {path} holds long-term memory of checkpoint {manifest['fingerprint'][:12]}, expected "
                f"{expected_fingerprint[:12]}: read it with the checkpoint that wrote it, or re-run `premem compress`")
        return cls(path, manifest, read_only=read_only, lease_token=lease_token)

    # --- plan ------------------------------------------------------------------------------------

    def write_plan(self, shards: list[list[str]]) -> dict:
        """Record which documents form each shard; a resumed run must come up with the same plan."""
        plan = {"num_shards": len(shards), "documents": sum(len(s) for s in shards), "shards": shards}
        old = self.read_plan()
        if old is not None:
            if old.get("shards") != shards:
                raise StoreError(f"store {self.path} was started on other documents ({old.get('documents')} in "
                                 f"{old.get('num_shards')} shards, now {plan['documents']} in {len(shards)}): use "
                                 f"another --store or delete {self.path}")
            return old
        self.write_key(layout.PLAN, kv.dump_json(plan))
        return plan

    def read_plan(self) -> dict | None:
        return self.read_json(layout.PLAN)

    # --- commits ---------------------------------------------------------------------------------

    def committed_shards(self) -> set[int]:
        return self.commits.committed()

    def is_committed(self, shard: int) -> bool:
        return self.commits.is_committed(shard)

    # --- writing ---------------------------------------------------------------------------------

    def shard_writer(self, shard: int, documents: list[dict]) -> LongTermShardWriter:
        """Writer of one shard; `documents` (in shard order): dicts with doc_id, title, source, position, n_tokens."""
        self.require_writable()
        if self.is_committed(shard):
            raise StoreError(f"shard {shard} of store {self.path} is already committed: skip it")
        return LongTermShardWriter(self, shard, documents)

    def finalize(self, rejected: int = 0) -> dict:
        self.require_writable("finalize")
        plan = self.read_plan() or {"num_shards": 0, "documents": 0}
        markers = self.commits.read_all()
        m = dict(self.manifest)
        m["num_shards"] = int(plan["num_shards"])
        m["shards"] = markers
        for k in ("documents", "tokens", "windows", "tail_tokens", "bytes"):
            m[k] = int(sum(int(x.get(k, 0)) for x in markers))
        m["rejected"] = int(rejected)
        m["complete"] = len(markers) == m["num_shards"]
        m["finalized_at"] = kv.now()
        self.write_key(layout.MANIFEST, kv.dump_json(m))
        self.manifest = m
        return m

    def summary(self) -> dict:
        plan = self.read_plan() or {"num_shards": 0}
        markers = self.commits.read_all()
        tot = {k: int(sum(int(x.get(k, 0)) for x in markers))
               for k in ("documents", "tokens", "windows", "tail_tokens", "bytes")}
        disk = kv.dir_bytes(self.path) if kv.is_local(self.path) else None
        return {"path": self.path, "kind": layout.LONGTERM_KIND, "num_shards": int(plan["num_shards"]),
                "committed_shards": len(markers), **tot,
                "bytes_per_token": tot["bytes"] / tot["tokens"] if tot["tokens"] else 0.0,
                "bytes_on_disk": disk, "dtype": self.dtype, "config": self.config, "end_state": self.has_end_state,
                "fingerprint": self.fingerprint, "complete": len(markers) == int(plan["num_shards"])}

    # --- reading ---------------------------------------------------------------------------------

    def _array(self, shard: int, name: str) -> ts.TensorStore:
        key = f"{shard}/{name}"
        if key not in self._arrays:
            prefix = layout.longterm_array(shard, name)
            spec = {"driver": "zarr3", "kvstore": kv.kvstore_spec(self.path, prefix),
                    "recheck_cached_data": False, "recheck_cached_metadata": False}
            try:
                self._arrays[key] = ts.open(spec, open=True, read=True).result()
            except Exception as e:
                raise StoreError(f"store {self.path}: cannot open {prefix} ({one_line(e)}): "
                                 f"delete {self.commits.key(shard)} and resume `premem compress` to rewrite "
                                 f"shard {shard}") from e
        return self._arrays[key]

    def _load_index(self) -> dict[str, tuple[int, dict]]:
        """doc_id -> (shard, metadata row) over the committed shards (re-listed when a doc is not found)."""
        if self._index is None:
            self._index = {}
        for s in sorted(self.committed_shards() - self._indexed):
            res = self.read_key(layout.meta_key(s))
            if res.state != "value":
                raise StoreError(f"store {self.path}: shard {s} is committed but {layout.meta_key(s)} is missing: the "
                                 f"store is damaged, delete {self.commits.key(s)} and resume `premem compress`")
            for row in pq.read_table(pa.BufferReader(res.value)).to_pylist():
                self._index[row["doc_id"]] = (s, row)
            self._indexed.add(s)
        return self._index

    def documents(self) -> list[dict]:
        """Metadata of every committed document (doc_id, title, n_tokens, n_windows, ...)."""
        return [dict(row, shard=s) for s, row in self._load_index().values()]

    def _lookup(self, doc_ids: Sequence[str]) -> list[tuple[int, dict]]:
        if isinstance(doc_ids, str):
            raise StoreError("doc_ids must be a list of document ids, not one string")
        index = self._load_index()
        out = []
        for d in doc_ids:
            if str(d) not in index:
                index = self._load_index()
                if str(d) not in index:
                    raise StoreError(f"document {d!r} is not in store {self.path} (or its shard is not committed "
                                     f"yet): check the id against store.documents(), or resume `premem compress`")
            out.append(index[str(d)])
        return out

    def long_term(self, doc_ids: Sequence[str], window: int | Sequence[int], *, device: Any = None,
                  dtype: torch.dtype | None = None) -> LongTermBatch:
        """The FIFO exactly as the long-term layer sees it at the start of `window` (one int, or one per
        document): [B, Q_max*L, d], increments of windows max(0, k-Q_max)..k-1 oldest first, zeros in front.

        Windows 0..n_windows are valid; window n_windows is the FIFO after the document's last window (what a
        continuation starts with). A larger window is an error that names the document's last valid window.
        """
        found = self._lookup(doc_ids)
        B = len(found)
        if isinstance(window, torch.Tensor):
            window = window.tolist()
        wins = np.full(B, int(window), dtype=np.int64) if np.isscalar(window) else np.asarray(window, dtype=np.int64)
        if wins.shape != (B,):
            raise StoreError(f"window must be one integer or one per document ({B}), got shape {list(wins.shape)}")
        L, Q, d = self._c("L"), self._c("Q_max"), self._c("d_model")
        for (_, row), k, doc in zip(found, wins.tolist(), doc_ids, strict=True):
            if not 0 <= k <= int(row["n_windows"]):
                raise StoreError(
                    f"window {k} is outside document {doc!r}, which has {row['n_windows']} windows "
                    f"({row['n_tokens']} tokens): use 0..{row['n_windows'] - 1}, or {row['n_windows']} for the "
                    f"memory after its end")
        out = np.zeros((B, Q * L, d), dtype=self.numpy_dtype)
        futs = []
        for b, ((s, row), k) in enumerate(zip(found, wins.tolist(), strict=True)):
            lo = max(0, k - Q)
            if k > lo:
                off = int(row["offset"])
                futs.append((b, k - lo, self._array(s, layout.INCREMENTS)[off + lo: off + k].read()))
        for b, n, f in futs:
            try:
                incs = f.result()
            except Exception as e:
                raise StoreError(
                    f"store {self.path}: cannot read the increments of {doc_ids[b]!r} ({one_line(e)})") from e
            out[b, (Q - n) * L:] = incs.reshape(n * L, d)
        fifo = np_to_torch(out)
        if dtype is not None:
            fifo = fifo.to(dtype)
        n_valid = torch.from_numpy(np.minimum(wins, Q))
        if device is not None:
            fifo, n_valid = fifo.to(device), n_valid.to(device)
        return LongTermBatch(fifo, n_valid, torch.from_numpy(wins.copy()), [str(d) for d in doc_ids])

    def end_state(self, doc_ids: Sequence[str], *, device: Any = None, dtype: torch.dtype | None = None) -> StoredState:
        """Each document's full recurrent state after its last window: continue the document with
        `model(next_tokens, MelodiState(s.z, s.fifo, s.n_valid))`, the next tokens starting at n_windows * W."""
        if not self.has_end_state:
            raise StoreError(f"store {self.path} was compressed with --no-end-state: re-run `premem compress` "
                             f"with --end-state into another store to continue documents")
        found = self._lookup(doc_ids)
        nl, S, d = self._c("num_layers"), self._c("S"), self._c("d_model")
        z = np.zeros((nl, len(found), S, d), dtype=self.numpy_dtype)
        if S > 0:
            futs = [(b, self._array(s, layout.END_Z)[int(row["index"])].read()) for b, (s, row) in enumerate(found)]
            for b, f in futs:
                try:
                    z[:, b] = f.result()
                except Exception as e:
                    raise StoreError(
                        f"store {self.path}: cannot read the end state of {doc_ids[b]!r} ({one_line(e)})") from e
        n_windows = [int(row["n_windows"]) for _, row in found]
        lt = self.long_term(doc_ids, n_windows, dtype=dtype)
        zt = np_to_torch(z)
        if dtype is not None:
            zt = zt.to(dtype)
        state = StoredState(zt, lt.fifo, lt.n_valid, torch.tensor([int(r["n_tokens"]) for _, r in found]),
                            torch.tensor(n_windows), lt.doc_ids)
        if device is not None:
            state.z, state.fifo, state.n_valid = state.z.to(device), state.fifo.to(device), state.n_valid.to(device)
        return state


class LongTermShardWriter:
    """Collects one shard's increments (and end states) in memory; on clean exit writes the arrays, the metadata
    and then the commit marker. Every document must be written exactly once."""

    def __init__(self, store: LongTermStore, shard: int, documents: list[dict]) -> None:
        self.store, self.shard = store, shard
        c = store.manifest["config"]
        self.W, self.L, self.d, self.S, self.nl = c["W"], c["L"], c["d_model"], c["S"], c["num_layers"]
        self.docs = [dict(doc) for doc in documents]
        offset = 0
        for i, doc in enumerate(self.docs):
            n = int(doc["n_tokens"])
            if n < self.W:
                raise StoreError(f"document {doc['doc_id']!r} has {n} tokens, shorter than one window (W={self.W}): "
                                 f"such documents are rejected, not stored")
            doc["index"], doc["n_windows"], doc["offset"] = i, n // self.W, offset
            doc["tail_tokens"] = n - doc["n_windows"] * self.W
            offset += doc["n_windows"]
        dt = store.numpy_dtype
        self.increments = np.zeros((offset, self.L, self.d), dtype=dt)
        self.end_z = np.zeros((len(self.docs), self.nl, self.S, self.d), dtype=dt) if store.has_end_state else None
        self._written = np.zeros(len(self.docs), dtype=bool)
        self.marker: dict | None = None

    def __enter__(self) -> LongTermShardWriter:
        return self

    def write(self, index: int, increments: Any, end_z: Any = None) -> None:
        """Document `index` of the shard: increments [n_windows, L, d]; end_z [num_layers, S, d] (end-state stores)."""
        doc = self.docs[index]
        if self._written[index]:
            raise StoreError(f"document {doc['doc_id']!r} written twice to shard {self.shard}")
        x = to_numpy(increments, self.store.numpy_dtype)
        if x.shape != (doc["n_windows"], self.L, self.d):
            raise StoreError(f"increments of {doc['doc_id']!r} must be [{doc['n_windows']}, {self.L}, {self.d}], "
                             f"got {list(x.shape)}")
        self.increments[doc["offset"]: doc["offset"] + doc["n_windows"]] = x
        if self.end_z is not None:
            if end_z is None:
                raise StoreError(f"store {self.store.path} keeps end states: pass end_z for {doc['doc_id']!r}")
            z = to_numpy(end_z, self.store.numpy_dtype)
            if z.shape != (self.nl, self.S, self.d):
                raise StoreError(
                    f"end_z of {doc['doc_id']!r} must be [{self.nl}, {self.S}, {self.d}], got {list(z.shape)}")
            self.end_z[index] = z
        self._written[index] = True

    def _create(self, name: str, data: np.ndarray, inner: list[int], dims: list[str]) -> None:
        st = self.store
        # one outer chunk (one file) holding the whole array, a whole number of inner chunks
        outer = [-(-data.shape[0] // inner[0]) * inner[0], *data.shape[1:]]
        spec = layout.zarr_spec(kv.kvstore_spec(st.path, layout.longterm_array(self.shard, name)), shape=list(data.shape),
                                dtype=st.dtype, chunk_shape=outer, codecs=layout.sharded_codecs(inner, 3),
                                dimension_names=dims)
        arr = ts.open(spec, create=True, delete_existing=True).result()
        arr.write(data).result()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            return False
        if not self._written.all():
            first = self.docs[int(np.argmin(self._written))]["doc_id"]
            raise StoreError(f"shard {self.shard}: {int((~self._written).sum())} documents were never written "
                             f"(first: {first!r}); nothing committed")
        self.marker = self.store.commits.commit(self.shard, self._write_data)
        return False

    def _write_data(self) -> dict:
        st = self.store
        try:
            n = self.increments.shape[0]
            self._create(layout.INCREMENTS, self.increments, [min(layout.WINDOWS_PER_CHUNK, n), self.L, self.d],
                         ["window", "token", "feature"])
            if self.end_z is not None and self.S > 0:
                self._create(layout.END_Z, self.end_z, [1, self.nl, self.S, self.d],
                             ["document", "layer", "token", "feature"])
        except Exception as e:
            raise StoreError(
                f"store {st.path}: writing shard {self.shard} failed ({one_line(e)}): resume `premem compress`") from e
        rows = [{k: doc.get(k) for k in META_SCHEMA.names} for doc in self.docs]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=META_SCHEMA), buf, compression="zstd")
        st.write_key(layout.meta_key(self.shard), buf.getvalue())
        return {
            "documents": len(self.docs),
            "tokens": int(sum(int(doc["n_tokens"]) for doc in self.docs)),
            "windows": int(self.increments.shape[0]),
            "tail_tokens": int(sum(doc["tail_tokens"] for doc in self.docs)),
            "bytes": int(self.increments.nbytes + (self.end_z.nbytes if self.end_z is not None else 0)),
            "fingerprint": st.fingerprint,
        }
