"""The LUMEN memory store: create or resume it, commit shards, read rows as training-ready tensors.

Layout and key names: storage/layout.py.  Every corpus shard is written by exactly one :class:`ShardWriter`
(storage/writer.py; one worker) inside one TensorStore transaction, so the shard's files are written once, at
commit; the marker is written afterwards (storage/commits.py) and a shard is readable only when it exists.  All
files go through TensorStore kvstores, so local paths and ``gs://`` behave the same.  :func:`open_store` opens a
store of either kind (this one, or a MELODI long-term store).
"""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorstore as ts
import torch

from premem.storage import kv, layout
from premem.storage.chunkread import ChunkReadError, RawChunkReader, RawLayout
from premem.storage.commits import ShardCommits, StoreHandle
from premem.storage.errors import FingerprintMismatch, StoreError, one_line
from premem.storage.faiss_index import SearchResult, search_store
from premem.storage.longterm import LongTermStore
from premem.storage.tensors import DTYPES, as_rows, dtype_name, np_to_torch, to_numpy
from premem.storage.writer import ShardWriter

# Reader-side TensorStore cache: keeps shard indexes (16 bytes per passage) and recently read
# passages.  Committed shards never change, so cached data is never rechecked.
_READ_CACHE_BYTES = 256 << 20
_META_CACHE_SHARDS = 4


@dataclass
class MemoryBatch:
    """Stored memory of a batch of passages, trimmed to the longest passage in the batch."""

    states: torch.Tensor | None  # [B, P_max, d] in the stored dtype; zeros past each length (None: decode=False)
    mask: torch.Tensor  # bool [B, P_max], True on real tokens (arange(P_max) < length)
    lengths: torch.Tensor  # int64 [B]
    rows: torch.Tensor  # int64 [B]
    codes: torch.Tensor | None = None  # read(decode=False) of a quantized store: [B, P_max, code bytes]
    scales: torch.Tensor | None = None  # int8 codes: float16 [B, P_max]

    def to(self, device, non_blocking: bool = False) -> MemoryBatch:
        return MemoryBatch(**{k: None if v is None else v.to(device, non_blocking=non_blocking)
                              for k, v in vars(self).items()})

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def open_store(path: str | os.PathLike, *, expected_fingerprint: str | None = None, read_only: bool = True,
               lease_token: str | None = None, **kwargs):
    """Open the store at ``path`` as its kind: a :class:`MemoryStore` (``premem encode``) or a
    :class:`~premem.storage.longterm.LongTermStore` (``premem compress``)."""
    path, manifest = _read_manifest(path, "run `premem encode` or `premem compress` first")
    cls = LongTermStore if manifest.get("kind") == layout.LONGTERM_KIND else MemoryStore
    return cls.open(path, expected_fingerprint=expected_fingerprint, read_only=read_only, lease_token=lease_token,
                    **kwargs)


def _memory_fingerprint(manifest: dict) -> str:
    q = manifest.get("quantize")
    return str(q.get("fingerprint") or f"{manifest['fingerprint']}+{q['codec']}-untrained") if q else \
        str(manifest["fingerprint"])


def _read_manifest(path: str | os.PathLike, fix: str) -> tuple[str, dict]:
    path = kv.normalize_path(path)
    kv.check_not_a_file(path)
    manifest = kv.read_json(kv.open_kv(path), layout.MANIFEST, path)
    if manifest is None:
        where = "" if kv.is_local(path) else "; or a bucket or path name is misspelt"
        raise StoreError(f"no premem store at {path} (manifest.json missing{where}): {fix}")
    return path, manifest


class MemoryStore(StoreHandle):
    """A premem memory store: create/open, write shards through ``shard_writer``, read rows."""

    def __init__(self, path: str, manifest: dict, *, read_only: bool, cache_bytes: int | None = None,
                 lease_token: str | None = None) -> None:
        self.cache_bytes = _READ_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        super().__init__(path, manifest, read_only=read_only, lease_token=lease_token)

    # --- handles (dropped on pickling / fork; reopened lazily) ---------------------------------

    def _reset_handles(self) -> None:
        super()._reset_handles()
        self._read_ctx: ts.Context | None = None
        self._arrays: dict[str, ts.TensorStore] = {}
        self._chunk_reader: RawChunkReader | None | bool = False  # False: not looked at yet; None: not a raw store
        self.commits = ShardCommits(self, layout.COMMITS, int(self.manifest["num_shards"]))
        self._lengths_cache: dict[int, np.ndarray] = {}
        self._meta_cache: OrderedDict[int, tuple[pa.Table, np.ndarray]] = OrderedDict()

    def close(self) -> None:
        """Unmap the shard files a raw store's reads mapped (their pages can then leave the page cache); the store
        stays usable and maps them again on the next read."""
        if isinstance(self._chunk_reader, RawChunkReader):
            self._chunk_reader.close()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["manifest"], read_only=state["read_only"],
                      cache_bytes=state.get("cache_bytes"), lease_token=state.get("lease_token"))

    def array(self, name: str, *, txn: ts.Transaction | None = None) -> ts.TensorStore:
        """One of the store's Zarr arrays (layout.MEMORY, LENGTHS, EMBEDDINGS), opened once per process.  Readers
        share a cache that never rechecks (committed shards are immutable)."""
        self._check_pid()
        if name not in self._arrays:
            spec: dict[str, Any] = {"driver": "zarr3", "kvstore": kv.kvstore_spec(self.path, layout.array_prefix(name))}
            ctx = None
            if self.read_only:
                if self._read_ctx is None:
                    self._read_ctx = ts.Context({"cache_pool": {"total_bytes_limit": self.cache_bytes}})
                spec["recheck_cached_data"] = False
                spec["recheck_cached_metadata"] = False
                ctx = self._read_ctx
            try:
                self._arrays[name] = ts.open(spec, open=True, read=True, write=not self.read_only, context=ctx).result()
            except Exception as e:
                raise StoreError(
                    f"store {self.path}: cannot open its {name}/ array ({one_line(e)}): "
                    f"the store is damaged, delete it and run `premem encode` again"
                ) from e
        arr = self._arrays[name]
        return arr.with_transaction(txn) if txn is not None else arr

    # --- create / open -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        rows: int,
        max_tokens: int,
        d_model: int,
        dtype: str = "bfloat16",
        shard_size: int,
        fingerprint: str,
        encoder: dict,
        codec: str = "raw",
        token_chunk: int = layout.TOKEN_CHUNK,
        zstd_level: int = 1,
        extra: dict | None = None,
        quantize: dict | None = None,
    ) -> MemoryStore:
        """Create a store (complete=False), or reopen it for resuming if it already holds the same encoder's memory.

        ``codec``: "raw" (bytes + crc32c: ~1.07x the real tokens' bytes on disk, fastest to read) or "zstd"
        (smaller on disk, e.g. for buckets; every read decompresses).  ``token_chunk``: tokens per inner chunk.
        ``quantize``: a storage.quantize spec (QuantizeConfig.resolve): the store holds codes instead of states.
        """
        path = kv.normalize_path(path)
        kv.check_not_a_file(path)
        for name, v in (("rows", rows), ("max_tokens", max_tokens), ("d_model", d_model), ("shard_size", shard_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
                raise StoreError(f"cannot create store {path}: {name} must be a positive integer, got {v!r}")
        rows, max_tokens, d_model, shard_size = int(rows), int(max_tokens), int(d_model), int(shard_size)
        dtype = dtype_name(dtype)
        if not isinstance(fingerprint, str) or not fingerprint:
            raise StoreError(f"cannot create store {path}: fingerprint must be a non-empty string")
        if not isinstance(zstd_level, (int, np.integer)) or not -7 <= int(zstd_level) <= 22:
            raise StoreError(f"cannot create store {path}: zstd_level must be an integer in -7..22, got {zstd_level!r}")
        zstd_level = int(zstd_level)
        if codec not in layout.CODECS:
            raise StoreError(f"cannot create store {path}: codec must be one of {', '.join(layout.CODECS)}, got {codec!r}")
        if isinstance(token_chunk, bool) or not isinstance(token_chunk, (int, np.integer)) or int(token_chunk) < 1:
            raise StoreError(f"cannot create store {path}: token_chunk must be a positive integer, got {token_chunk!r}")
        token_chunk = min(int(token_chunk), max_tokens)
        tokens_per_shard = -(-max_tokens // token_chunk) * token_chunk  # the outer chunk holds whole token chunks

        store_kv = kv.open_kv(path)
        res = kv.read(store_kv, layout.MANIFEST, path)
        if res.state == "value":
            return cls._resume(path, kv.parse_json(res.value, f"{path}/{layout.MANIFEST}"), rows, max_tokens, d_model,
                               dtype, shard_size, fingerprint, codec, token_chunk, quantize)

        # Fresh store.  Stale pieces of an earlier attempt that never got a manifest are removed.
        for prefix in (layout.COMMITS, layout.META, layout.array_prefix(layout.MEMORY), layout.array_prefix(layout.LENGTHS),
                       layout.array_prefix(layout.CODES), layout.array_prefix(layout.SCALES), layout.CODEBOOK):
            kv.delete_prefix(store_kv, prefix, path)
        width = int(quantize["code_width"]) if quantize else d_model
        mem_chunks = [shard_size, tokens_per_shard, width]
        mem_codecs = layout.memory_codecs(token_chunk, width, codec, zstd_level)
        len_codecs = layout.chunk_codecs(zstd_level)
        try:
            ts.open(layout.zarr_spec(kv.kvstore_spec(path, layout.array_prefix(layout.CODES if quantize else layout.MEMORY)),
                                     shape=[rows, max_tokens, width], dtype=quantize["code_dtype"] if quantize else dtype,
                                     chunk_shape=mem_chunks, codecs=mem_codecs,
                                     dimension_names=["row", "token", "code" if quantize else "feature"]),
                    create=True, delete_existing=True).result()
            if quantize and quantize["codec"] == "int8":  # one float16 scale per token
                ts.open(layout.zarr_spec(kv.kvstore_spec(path, layout.array_prefix(layout.SCALES)),
                                         shape=[rows, max_tokens], dtype="float16", chunk_shape=mem_chunks[:2],
                                         codecs=layout.sharded_codecs([1, token_chunk], zstd_level if codec == "zstd" else None),
                                         dimension_names=["row", "token"]),
                        create=True, delete_existing=True).result()
            ts.open(layout.zarr_spec(kv.kvstore_spec(path, layout.array_prefix(layout.LENGTHS)), shape=[rows],
                                     dtype="int32", chunk_shape=[shard_size], codecs=len_codecs,
                                     dimension_names=["row"]),
                    create=True, delete_existing=True).result()
        except Exception as e:
            raise StoreError(f"cannot create store {path}: {one_line(e)}") from e

        manifest = {
            "format_version": layout.FORMAT_VERSION,
            "kind": layout.KIND,
            "rows": rows,
            "max_tokens": max_tokens,
            "d_model": d_model,
            "dtype": dtype,
            "shard_size": shard_size,
            "num_shards": -(-rows // shard_size),
            "fingerprint": fingerprint,
            "encoder": dict(encoder or {}),
            "codec": {
                "format": "zarr3",
                "name": codec,
                "memory": {"chunk_shape": mem_chunks, "inner_chunk_shape": [1, token_chunk, d_model], "codecs": mem_codecs},
                "lengths": {"dtype": "int32", "chunk_shape": [shard_size], "codecs": len_codecs},
                "zstd_level": zstd_level,
                "checksum": "crc32c",
            },
            "created_at": kv.now(),
            "shards": [],
            "passages": 0,
            "tokens": 0,
            "bytes": 0,
            "complete": False,
            "extra": dict(extra or {}),
        }
        if quantize:  # the codebook, its fidelity and the memory's fingerprint are set by set_codec
            manifest["quantize"] = {**quantize, "codebook": None, "fidelity": None, "fingerprint": None}
        # Only one creator wins; a loser reopens what the winner wrote.
        gen = kv.write(store_kv, layout.MANIFEST, kv.dump_json(manifest), path, if_equal=res.stamp.generation)
        if not gen.generation:
            return cls._resume(path, kv.read_json(store_kv, layout.MANIFEST, path), rows, max_tokens, d_model, dtype,
                               shard_size, fingerprint, codec, token_chunk, quantize)
        return cls(path, manifest, read_only=False)

    @classmethod
    def _resume(cls, path, manifest, rows, max_tokens, d_model, dtype, shard_size, fingerprint, codec,
                token_chunk, quantize=None) -> MemoryStore:
        layout.check_manifest(manifest, path, layout.KIND)
        if manifest["fingerprint"] != fingerprint:
            enc = manifest.get("encoder") or {}
            raise FingerprintMismatch(
                f"store {path} holds memory of encoder {manifest['fingerprint'][:12]}, this run's encoder is "
                f"{fingerprint[:12]}: use another --store or delete {path} to start over, or finish the store with "
                f"the encoder it was made with ({enc.get('checkpoint')}, K={enc.get('memory_layers')}); the "
                f"checkpoint's weights, K, tokenizer or template changed since, and memory of two encoders never mixes"
            )
        want = {"rows": rows, "max_tokens": max_tokens, "d_model": d_model, "dtype": dtype, "shard_size": shard_size}
        diff = [f"{k}={manifest.get(k)!r} (this run: {v!r})" for k, v in want.items() if manifest.get(k) != v]
        stored = manifest.get("codec") or {}
        if "name" in stored:  # stores made before the codec choice existed are zstd with one chunk per passage
            chunk = stored["memory"]["inner_chunk_shape"][1]
            diff += [f"{k}={a!r} (this run: {b!r})" for k, a, b in (("codec", stored["name"], codec),
                                                                  ("token_chunk", chunk, token_chunk)) if a != b]
        had = manifest.get("quantize") or {}
        asked = quantize or {}
        diff += [f"{k}={had.get(k)!r} (this run: {asked.get(k)!r})" for k in ("codec", "factory", "code_width")
                 if had.get(k) != asked.get(k)]
        if diff:
            raise StoreError(
                f"store {path} was created with {', '.join(diff)}: use another --store or delete {path}"
            )
        store = cls(path, manifest, read_only=False)
        for name in (*store.memory_arrays, layout.LENGTHS):
            store.array(name)
        return store

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expected_fingerprint: str | None = None,
        read_only: bool = True,
        cache_bytes: int | None = None,
        lease_token: str | None = None,
        accept_codec: str | bool | None = None,
    ) -> MemoryStore:
        """Open an existing store (read-only by default).

        ``cache_bytes``: TensorStore cache of a read-only store (shard indexes + recently read passages),
        default 256 MiB.  Committed shards never change, so cached data is never revalidated.
        ``lease_token``: the writer lease (taken by the job) that every commit through this handle checks first.
        ``accept_codec``: a reader given the unquantized encoder's fingerprint reads a quantized store only when it
        accepts that codec ("int8", "pq" or True: any); a writer (read_only=False) is the job writing that store.
        """
        path, manifest = _read_manifest(path, "run `premem encode` first")
        layout.check_manifest(manifest, path, layout.KIND)
        quant = manifest.get("quantize")
        if expected_fingerprint is not None and expected_fingerprint != _memory_fingerprint(manifest):
            if not (quant and expected_fingerprint == manifest["fingerprint"]):
                raise FingerprintMismatch(
                    f"store {path} holds memory of encoder {manifest['fingerprint'][:12]}, expected encoder "
                    f"{expected_fingerprint[:12]}: use the store encoded with this encoder or re-encode with `premem encode`"
                )
            if read_only and accept_codec not in (True, quant["codec"]):  # the encoder's states, quantized
                raise FingerprintMismatch(
                    f"store {path} holds {quant['codec']}-quantized memory ({quant.get('factory') or 'int8'}, "
                    f"{quant['bytes_per_token']} B/token) of encoder {expected_fingerprint[:12]}, not the encoder's "
                    f"own states: accept the codec (accept_codec={quant['codec']!r}, --accept-codec {quant['codec']}) "
                    f"or read an unquantized store"
                )
        return cls(path, manifest, read_only=read_only, cache_bytes=cache_bytes, lease_token=lease_token)

    # --- properties ----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def max_tokens(self) -> int:
        return int(self.manifest["max_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def fingerprint(self) -> str:
        """The memory's fingerprint: the encoder's, or for a quantized store the encoder's + codec + codebook."""
        return _memory_fingerprint(self.manifest)

    @property
    def encoder_fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def quantize(self) -> dict | None:
        """The manifest's quantization record (codec, factory, code width, codebook digest, fidelity), or None."""
        q = self.manifest.get("quantize")
        return dict(q) if q else None

    @property
    def memory_arrays(self) -> tuple[str, ...]:
        """The arrays that hold the memory: memory/, or codes/ (+ scales/ for int8)."""
        q = self.manifest.get("quantize")
        if not q:
            return (layout.MEMORY,)
        return (layout.CODES, layout.SCALES) if q["codec"] == "int8" else (layout.CODES,)

    @property
    def codec(self):
        """The store's codec (storage/quantize.py), loaded once per handle; its codebook checked against the manifest."""
        return self.memo("codec", self._load_codec)

    def _load_codec(self):
        from premem.storage.quantize import codebook_digest, load_codec

        q = self.quantize
        if q is None:
            raise StoreError(f"store {self.path} is not quantized: it holds states, read them with read()")
        data = None
        if q["codec"] != "int8":
            fix = f"the codes cannot be decoded without it: delete {self.path} and encode (or quantize) it again"
            if not q.get("codebook"):
                raise StoreError(f"store {self.path} has no trained codebook yet (its quantized encode never got "
                                 f"past training): resume `premem encode` or `premem quantize`")
            res = self.read_key(layout.CODEBOOK)
            if res.state != "value":
                raise StoreError(f"store {self.path}: its codebook {layout.CODEBOOK} is missing: {fix}")
            data = bytes(res.value)
            if codebook_digest(data) != {k: q["codebook"][k] for k in ("bytes", "crc32c", "sha256")}:
                raise StoreError(f"store {self.path}: its codebook {layout.CODEBOOK} is damaged (size or checksum "
                                 f"differ from the manifest's): {fix}")
        try:
            return load_codec(q, data)
        except Exception as e:
            raise StoreError(f"store {self.path}: its codebook {layout.CODEBOOK} cannot be loaded ({one_line(e)})") from e

    def set_codec(self, codec, fidelity: dict, sample: dict) -> None:
        """Store a trained codec (the codebook before any shard is written) and the fingerprint that names it."""
        from premem.storage.quantize import codebook_digest, memory_fingerprint

        self.require_writable("store a codebook")
        q = dict(self.manifest["quantize"])
        digest = None
        if q["codec"] != "int8":
            data = codec.to_bytes()
            self.write_key(layout.CODEBOOK, data)
            digest = {"key": layout.CODEBOOK, **codebook_digest(data)}
        q.update(codebook=digest, fidelity=fidelity, sample=sample,
                 fingerprint=memory_fingerprint(self.encoder_fingerprint, q, digest and digest["sha256"]))
        self.update_manifest("quantize", q)
        self._memo.pop("codec", None)

    @property
    def encoder(self) -> dict:
        return dict(self.manifest.get("encoder") or {})

    def __repr__(self) -> str:
        return (
            f"MemoryStore({self.path!r}, rows={self.rows}, max_tokens={self.max_tokens}, d_model={self.d_model}, "
            f"dtype={self.dtype}, shard_size={self.shard_size}, fingerprint={self.fingerprint[:12]})"
        )

    # --- shards --------------------------------------------------------------------------------

    def shard_of(self, row: int) -> int:
        row = int(row)
        if not 0 <= row < self.rows:
            raise StoreError(f"row {row} out of range: store {self.path} has rows 0..{self.rows - 1}")
        return row // self.shard_size

    def shard_rows(self, shard: int) -> range:
        shard = self._check_shard(shard)
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.rows))

    def _check_shard(self, shard: int) -> int:
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)):
            raise StoreError(f"shard must be an integer, got {shard!r}")
        shard = int(shard)
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range: store {self.path} has shards 0..{self.num_shards - 1}")
        return shard

    def committed_shards(self) -> set[int]:
        """Shards whose memory is committed (lists ``commits/``)."""
        return self.commits.committed()

    def is_committed(self, shard: int) -> bool:
        return self.commits.is_committed(self._check_shard(shard))

    def read_marker(self, shard: int) -> dict | None:
        return self.commits.read(self._check_shard(shard))

    def _require_committed(self, rows: np.ndarray, shards: np.ndarray) -> None:
        for s in np.unique(shards).tolist():
            if not self.is_committed(s):
                r = int(rows[np.argmax(shards == s)])
                raise StoreError(
                    f"row {r} is in shard {s} of store {self.path}, which is not committed: run/resume `premem encode`"
                )

    def _check_rows(self, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        rows = as_rows(rows)
        bad = (rows < 0) | (rows >= self.rows)
        if bad.any():
            r = int(rows[np.argmax(bad)])
            raise StoreError(f"row {r} out of range: store {self.path} has rows 0..{self.rows - 1}")
        shards = rows // self.shard_size
        self._require_committed(rows, shards)
        return rows, shards

    # --- writing -------------------------------------------------------------------------------

    def shard_keys(self, shard: int) -> list[str]:
        """Every key that holds part of one shard's memory: data, lengths, metadata (not the commit marker)."""
        shard = self._check_shard(shard)
        return [*(layout.chunk_key(name, shard, 2 if name == layout.SCALES else 3) for name in self.memory_arrays),
                layout.chunk_key(layout.LENGTHS, shard, 1), layout.meta_key(shard)]

    def partial_shards(self) -> set[int]:
        """Uncommitted shards that left data behind (a crash or failure before their commit marker)."""
        found: set[int] = set()
        for name in (*self.memory_arrays, layout.LENGTHS):
            prefix = layout.array_prefix(name)
            found |= {s for key in kv.list_keys(self.kv, prefix, self.path)
                      if (s := layout.chunk_shard(name, prefix + key)) is not None}
        found |= {s for s in range(self.num_shards) if layout.meta_key(s).removeprefix(layout.META)
                  in set(kv.list_keys(self.kv, layout.META, self.path))}
        return {s for s in found if s < self.num_shards} - self.committed_shards()

    def discard_shard(self, shard: int) -> None:
        """Forget one shard's memory: its marker first (it is uncommitted from then on), then its data."""
        self.require_writable()
        shard = self._check_shard(shard)
        self.commits.forget(shard)
        for key in self.shard_keys(shard):
            self.write_key(key, None)
        self._lengths_cache.pop(shard, None)
        self._meta_cache.pop(shard, None)

    def shard_writer(self, shard: int) -> ShardWriter:
        self.require_writable()
        shard = self._check_shard(shard)
        if self.is_committed(shard):
            raise StoreError(
                f"shard {shard} of store {self.path} is already committed: skip it, or delete "
                f"{self.commits.key(shard)} to encode it again"
            )
        return ShardWriter(self, shard)

    def write_metadata(self, shard: int, table: pa.Table) -> None:
        """Store the passage metadata table of one shard (needs an int ``row`` column inside the shard)."""
        self.require_writable()
        shard = self._check_shard(shard)
        if not isinstance(table, pa.Table):
            raise StoreError(f"write_metadata needs a pyarrow.Table, got {type(table).__name__}")
        if "row" not in table.column_names:
            raise StoreError(f"metadata table for shard {shard} has no 'row' column (columns: {table.column_names})")
        rows = as_rows(table.column("row").to_numpy(zero_copy_only=False), "metadata rows")
        rng = self.shard_rows(shard)
        bad = (rows < rng.start) | (rows >= rng.stop)
        if bad.any():
            raise StoreError(
                f"metadata row {int(rows[np.argmax(bad)])} is not in shard {shard} (rows {rng.start}..{rng.stop - 1})"
            )
        if len(np.unique(rows)) != len(rows):
            raise StoreError(f"metadata table for shard {shard} has duplicate rows")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_key(layout.meta_key(shard), buf.getvalue())
        self._meta_cache.pop(shard, None)

    def read_metadata(self, rows: Any) -> pa.Table:
        """Metadata rows (``meta/``) in the requested order; duplicates allowed."""
        rows = as_rows(rows)
        bad = (rows < 0) | (rows >= self.rows)
        if bad.any():
            raise StoreError(f"row {int(rows[np.argmax(bad)])} out of range: store {self.path} has rows 0..{self.rows - 1}")
        shards = rows // self.shard_size
        uniq = np.unique(shards).tolist()
        tables, offsets, off = [], {}, 0
        take = np.empty(len(rows), dtype=np.int64)
        for s in uniq:
            table, pos = self._meta_shard(s)
            sel = shards == s
            idx = pos[rows[sel] - s * self.shard_size]
            if (idx < 0).any():
                r = int(rows[sel][np.argmax(idx < 0)])
                raise StoreError(f"row {r} has no metadata in {self.path}/{layout.meta_key(s)}: re-encode shard {s}")
            take[sel] = idx + off
            offsets[s] = off
            off += table.num_rows
            tables.append(table)
        if not tables:
            return pa.table({"row": pa.array([], pa.int64())})
        full = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        return full.take(pa.array(take))

    def _meta_shard(self, shard: int) -> tuple[pa.Table, np.ndarray]:
        if shard in self._meta_cache:
            self._meta_cache.move_to_end(shard)
            return self._meta_cache[shard]
        res = self.read_key(layout.meta_key(shard))
        if res.state != "value":
            raise StoreError(
                f"no passage metadata for shard {shard} in store {self.path} ({layout.meta_key(shard)} missing): "
                f"encode with metadata enabled"
            )
        try:
            table = pq.read_table(pa.BufferReader(res.value))
        except Exception as e:
            raise StoreError(f"store {self.path}: {layout.meta_key(shard)} is not a readable parquet file ({one_line(e)})") from e
        pos = np.full(self.shard_size, -1, dtype=np.int64)
        trow = table.column("row").to_numpy(zero_copy_only=False).astype(np.int64)
        pos[trow - shard * self.shard_size] = np.arange(len(trow))
        self._meta_cache[shard] = (table, pos)
        while len(self._meta_cache) > _META_CACHE_SHARDS:
            self._meta_cache.popitem(last=False)
        return table, pos

    # --- reading -------------------------------------------------------------------------------

    def _shard_lengths(self, shard: int) -> np.ndarray:
        got = self._lengths_cache.get(shard)
        if got is None:
            rng = self.shard_rows(shard)
            try:
                got = self.array(layout.LENGTHS)[rng.start:rng.stop].read().result()
            except Exception as e:
                what = "is corrupt" if kv.is_corruption(e) else "cannot be read"
                raise StoreError(
                    f"store {self.path} {what}: the lengths of rows {rng.start}..{rng.stop - 1} (shard {shard}, "
                    f"{layout.chunk_key(layout.LENGTHS, shard, 1)}) are unreadable ({one_line(e)}): run `premem verify "
                    f"{self.path}`, then `premem encode ... --repair` re-encodes shard {shard}"
                ) from e
            self._lengths_cache[shard] = got
        return got

    def _lengths_np(self, rows: np.ndarray, shards: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=np.int32)
        for s in np.unique(shards).tolist():
            sel = shards == s
            out[sel] = self._shard_lengths(s)[rows[sel] - s * self.shard_size]
        return out

    def lengths(self, rows: Any) -> np.ndarray:
        """Token counts (int32) of committed rows, in the requested order."""
        rows, shards = self._check_rows(rows)
        return self._lengths_np(rows, shards)

    def read(self, rows: Any, *, device=None, non_blocking: bool = False, pin_memory: bool | None = None,
             decode: bool = True) -> MemoryBatch:
        """Stored memory of ``rows`` (any order, duplicates allowed), trimmed to the batch's longest passage.

        For a CUDA ``device`` (or ``pin_memory=True``) the states are read into page-locked memory and copied from
        there, ``non_blocking`` if asked.  A quantized store's codes are moved to ``device`` and decoded there (in the
        stored dtype, zeros past each length); ``decode=False`` returns the codes (+ scales) instead, with
        ``store.codec`` to decode them."""
        rows, shards = self._check_rows(rows)
        lengths = self._lengths_np(rows, shards)
        p_max = int(lengths.max()) if len(rows) else 0
        dev = torch.device(device) if device is not None else None
        pin = (dev is not None and dev.type == "cuda") if pin_memory is None else bool(pin_memory)
        quant = self.manifest.get("quantize")
        if quant:
            tensors = [self._read_states(rows, lengths, p_max, pin_memory=pin, name=layout.CODES)]
            if quant["codec"] == "int8":
                tensors.append(np_to_torch(self._read_states_ts(rows, p_max, name=layout.SCALES)))
        else:
            tensors = [self._read_states(rows, lengths, p_max, pin_memory=pin)]
        lengths_t = torch.from_numpy(lengths.astype(np.int64))
        rows_t = torch.from_numpy(rows.copy())
        if dev is not None and dev.type != "cpu":
            tensors, lengths_t, rows_t = ([t.to(dev, non_blocking=non_blocking) for t in tensors],
                                          *(t.to(dev, non_blocking=non_blocking) for t in (lengths_t, rows_t)))
        mask = torch.arange(p_max, device=lengths_t.device)[None, :] < lengths_t[:, None]
        if not quant:
            return MemoryBatch(states=tensors[0], mask=mask, lengths=lengths_t, rows=rows_t)
        codes, scales = tensors[0], (tensors[1] if len(tensors) > 1 else None)
        if not decode:
            return MemoryBatch(states=None, mask=mask, lengths=lengths_t, rows=rows_t, codes=codes, scales=scales)
        states = torch.zeros((*codes.shape[:2], self.d_model), dtype=self.torch_dtype, device=codes.device)
        states[mask] = self.codec.decode(codes[mask], None if scales is None else scales[mask], dtype=self.torch_dtype)
        return MemoryBatch(states=states, mask=mask, lengths=lengths_t, rows=rows_t)

    def as_stored(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` [..., d] as a read of this store gives them back: in the stored dtype, and for a quantized store
        encoded and decoded (so memory-mean vectors are the same whether taken in-pass or read back)."""
        stored = states.to(self.torch_dtype)
        if not self.quantize:
            return stored
        codes, scales = self.codec.encode(to_numpy(stored.reshape(-1, self.d_model)).astype(np.float32))
        shape = stored.shape[:-1]
        return self.codec.decode(torch.from_numpy(codes).reshape(*shape, -1),
                                 None if scales is None else torch.from_numpy(scales).reshape(shape), dtype=self.torch_dtype)

    def _raw_reader(self) -> RawChunkReader | None:
        """The direct chunk reader of a local read-only raw store; None: read through TensorStore."""
        self._check_pid()
        if self._chunk_reader is False:
            self._chunk_reader = None
            if self.read_only and kv.is_local(self.path):
                memory_dir = os.path.join(self.path, self.memory_arrays[0])
                try:
                    with open(os.path.join(memory_dir, "zarr.json"), encoding="utf-8") as handle:
                        raw = RawLayout.from_zarr_json(json.load(handle))
                except (OSError, ValueError):
                    raw = None  # TensorStore's open reports what is wrong with the array
                if raw is not None:
                    self._chunk_reader = RawChunkReader(memory_dir, raw)
        return self._chunk_reader

    def _read_states(self, rows: np.ndarray, lengths: np.ndarray, p_max: int, *, pin_memory: bool,
                     name: str = layout.MEMORY) -> torch.Tensor:
        """[B, p_max, width] of array ``name``: memory/ (states) or codes/ (a quantized store's codes)."""
        if name == layout.CODES:
            width, np_dtype = int(self.manifest["quantize"]["code_width"]), np.dtype(self.manifest["quantize"]["code_dtype"])
            torch_dtype = torch.int8 if np_dtype == np.int8 else torch.uint8
        else:
            width, np_dtype, torch_dtype = self.d_model, self.numpy_dtype, self.torch_dtype
        shape = (len(rows), p_max, width)
        if len(rows) == 0 or p_max == 0:
            return torch.zeros(shape, dtype=torch_dtype)
        reader = self._raw_reader()
        if reader is not None:
            if pin_memory:
                states = torch.empty(shape, dtype=torch_dtype, pin_memory=True)
                out = states.view(torch.uint8).numpy().reshape(len(rows), -1)
            else:  # a buffer no earlier batch uses any more, or a fresh numpy one (numpy asks for huge pages)
                out = reader.buffers.take(len(rows) * p_max * width * np_dtype.itemsize)
                out = out.reshape(len(rows), -1)
                states = torch.from_numpy(out).view(torch_dtype).view(shape)
            try:
                reader.read_into(out, rows, lengths)
            except ChunkReadError as e:
                raise self._unreadable(e.row, e, corrupt=e.corrupt) from e
            return states
        states = np_to_torch(self._read_states_ts(rows, p_max, name=name))
        if pin_memory:
            states = states.pin_memory()
        return states

    def _read_states_ts(self, rows: np.ndarray, p_max: int, name: str = layout.MEMORY) -> np.ndarray:
        arr = self.array(name)
        try:
            return arr.oindex[rows, :p_max].read().result()
        except Exception:
            pass
        # Find the first unreadable row so the message names it.
        for r in np.unique(rows).tolist():
            try:
                arr[r, :p_max].read().result()
            except Exception as e:
                raise self._unreadable(r, e, corrupt=kv.is_corruption(e)) from e
        try:  # every row read fine one by one: the batched failure was transient
            return arr.oindex[rows, :p_max].read().result()
        except Exception as e:
            raise StoreError(f"store {self.path}: reading {len(rows)} rows failed: {one_line(e)}") from e

    def _unreadable(self, row: int, e: BaseException, *, corrupt: bool) -> StoreError:
        s = row // self.shard_size
        if corrupt:
            return StoreError(
                f"store {self.path} is corrupt: row {row} (shard {s}, {layout.chunk_key(self.memory_arrays[0], s, 3)}) is "
                f"unreadable "
                f"({one_line(e)}): run `premem verify {self.path}`, then `premem encode ... --repair` "
                f"re-encodes shard {s}"
            )
        return StoreError(f"store {self.path}: cannot read row {row} (shard {s}): {one_line(e)}")

    # --- retrieval -----------------------------------------------------------------------------

    def search(self, queries: Any, k: int = 10, *, encoder: Any = None, nprobe: int | None = None,
               ef_search: int | None = None) -> SearchResult:
        """Top-k rows of the store's faiss index: a SearchResult with ``scores`` float32 [Q, k] and ``rows`` int64
        [Q, k], best first.  ``queries``: [Q, e] vectors, or texts with ``encoder`` the store's query encoder
        (``premem.models.retriever.query_encoder(store.manifest)``; storage runs no model itself)."""
        return search_store(self, queries, k, encoder=encoder, nprobe=nprobe, ef_search=ef_search)

    # --- manifest ------------------------------------------------------------------------------

    def finalize(self) -> dict:
        """Record the committed shards and totals in manifest.json; ``complete`` when every shard is committed."""
        self.require_writable("finalize")
        markers = self.commits.read_all()
        manifest = dict(self.manifest)
        manifest["shards"] = markers
        manifest["passages"] = int(sum(int(m.get("passages", 0)) for m in markers))
        manifest["tokens"] = int(sum(int(m.get("tokens", 0)) for m in markers))
        manifest["bytes"] = int(sum(int(m.get("bytes", 0)) for m in markers))
        manifest["complete"] = len(markers) == self.num_shards
        manifest["finalized_at"] = kv.now()
        self.write_key(layout.MANIFEST, kv.dump_json(manifest))
        self.manifest = manifest
        return manifest

    def summary(self) -> dict:
        """What the store holds now (reads the commit markers; sizes on disk only for local stores)."""
        markers = self.commits.read_all()
        tokens = int(sum(int(m.get("tokens", 0)) for m in markers))
        passages = int(sum(int(m.get("passages", 0)) for m in markers))
        committed_rows = int(sum(int(m["stop"]) - int(m["start"]) for m in markers))
        logical = int(sum(int(m.get("bytes", 0)) for m in markers))
        disk = memory_disk = None
        if kv.is_local(self.path):
            disk = kv.dir_bytes(self.path)
            memory_disk = sum(kv.dir_bytes(os.path.join(self.path, name)) for name in self.memory_arrays)
        return {
            "path": self.path,
            "rows": self.rows,
            "max_tokens": self.max_tokens,
            "d_model": self.d_model,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "committed_shards": len(markers),
            "committed_rows": committed_rows,
            "passages": passages,
            "tokens": tokens,
            "logical_bytes": logical,
            "bytes_on_disk": disk,
            "memory_bytes_on_disk": memory_disk,
            "bytes_per_token": (memory_disk / tokens) if (memory_disk is not None and tokens) else None,
            "logical_bytes_per_token": int(self.quantize["bytes_per_token"]) if self.quantize else
            self.d_model * self.numpy_dtype.itemsize,
            "quantize": self.quantize,
            "codec": (self.manifest.get("codec") or {}).get("name", "zstd"),  # stores before the raw codec: zstd
            "complete": len(markers) == self.num_shards,
            "encoder": self.encoder,
            "fingerprint": self.fingerprint,
        }


