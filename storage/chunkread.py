"""Training-shaped reads of a local store's raw passage chunks, copied straight into the batch.

A store written with ``codec="raw"`` keeps every passage as token chunks ``[1, T, d]``, each stored as its bytes
followed by their crc32c, inside one Zarr shard file per corpus shard with the shard index at the end of the file
(standard Zarr v3 ``sharding_indexed``: TensorStore reads it like any Zarr array).  On disk a chunk's bytes *are*
the activations, so a batch needs no decode step: the shard index says where each passage's chunks lie, the kernel
is asked to start reading all of them at once (``MADV_WILLNEED``: a deep queue is what random reads need to reach
the disk's sequential speed), and the chunks are copied from the mapped shard files into the batch while each
chunk's checksum is checked.  Only chunks that hold real tokens are read: at most T - 1 padding tokens per passage.

TensorStore decodes every chunk into its cache and copies it again into the output, and ``preadv`` copies through
the kernel at half the speed of a user-space copy on the machines measured; ``benchmarks/reader.py`` compares.
Any other layout or codec, and object stores, keep reading through TensorStore.

Shard files are mapped read-only for the reader's lifetime (one mapping per shard file touched; the pages are the
page cache's, so they show in RSS but are not process memory).  Committed shards are never rewritten in place:
``premem encode --repair`` replaces a shard file, which leaves existing mappings on the old file.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import crc32c
import numpy as np

_MISSING = np.uint64(2**64 - 1)  # shard index entry of a chunk that is not stored (all fill value)
_CRC_RESIDUE = 0x48674BC7  # crc32c of any bytes followed by their own little-endian crc32c
_PAGE = mmap.PAGESIZE


class ChunkReadError(RuntimeError):
    """A chunk that fails its checksum (``corrupt``) or cannot be read; ``row`` names it (and so its shard)."""

    def __init__(self, message: str, *, row: int, corrupt: bool):
        super().__init__(message)
        self.row, self.corrupt = row, corrupt


@dataclass(frozen=True)
class RawLayout:
    """Where a raw store's passage chunks lie, read from ``memory/zarr.json``."""

    shard_rows: int  # rows per Zarr shard (= corpus shard)
    token_chunk: int  # T: tokens per inner chunk
    chunks_per_row: int  # inner chunks along the token axis of one shard (the last may reach past max_tokens)
    token_bytes: int  # d * itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.token_chunk * self.token_bytes

    @property
    def index_bytes(self) -> int:
        return self.shard_rows * self.chunks_per_row * 16 + 4

    @classmethod
    def from_zarr_json(cls, meta: dict) -> RawLayout | None:
        """The layout when the array is raw (bytes + crc32c inner chunks of one row, index at the end), else None."""
        if sys.byteorder != "little":
            return None
        try:
            outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
            (codec,) = meta["codecs"]
            conf = codec["configuration"]
            inner = conf["chunk_shape"]
            names = [(c["name"], (c.get("configuration") or {}).get("endian", "little")) for c in conf["codecs"]]
            index = [(c["name"], (c.get("configuration") or {}).get("endian", "little")) for c in conf["index_codecs"]]
            itemsize = {"bfloat16": 2, "float16": 2, "float32": 4, "uint8": 1, "int8": 1}[meta["data_type"]]
            ok = (codec["name"] == "sharding_indexed" and conf.get("index_location", "end") == "end"
                  and names == [("bytes", "little"), ("crc32c", "little")] and index == names
                  and len(outer) == 3 and inner[0] == 1 and inner[2] == outer[2] == meta["shape"][2]
                  and outer[1] % inner[1] == 0)
        except (KeyError, TypeError, ValueError):
            return None
        if not ok:
            return None
        return cls(int(outer[0]), int(inner[1]), int(outer[1]) // int(inner[1]), int(outer[2]) * itemsize)


class BatchBuffers:
    """Hands out batch buffers, reusing one once nothing refers to it any more: faulting in a fresh 200 MB buffer
    costs about as much as the copy into it.  Every array, view and tensor made from a buffer keeps the buffer
    alive, so a buffer whose only reference is this pool is free; at most ``keep`` buffers are kept."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._buffers: list[np.ndarray] = []
        self._unused = np.empty(0, dtype=np.uint8)  # referred to by the pool alone: the refcount of a free buffer
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 array of ``nbytes`` (contents undefined)."""
        with self._lock:
            counts = [sys.getrefcount(b) for b in (self._unused, *self._buffers)]
            free = [b for b, c in zip(self._buffers, counts[1:]) if c == counts[0]]
            fits = [b for b in free if b.nbytes >= nbytes]
            if fits:
                return min(fits, key=lambda b: b.nbytes)[:nbytes]
            buffer = np.empty(nbytes, dtype=np.uint8)
            if len(self._buffers) >= self.keep and free:  # make room: forget the smallest free buffer
                smallest = min(free, key=lambda b: b.nbytes)
                self._buffers = [b for b in self._buffers if b is not smallest]
            if len(self._buffers) < self.keep:
                self._buffers.append(buffer)
            return buffer[:nbytes]

    def clear(self) -> None:
        with self._lock:
            self._buffers = []


@dataclass
class _Shard:
    """One shard file: per row, the offset of its first chunk and how many chunks follow back to back from token 0
    (rows whose stored chunks lie any other way keep their full index entries in ``irregular``), and the file's
    mapping while it is mapped."""

    path: str
    size: int
    start: np.ndarray  # int64 [S]
    count: np.ndarray  # int64 [S]
    irregular: dict[int, np.ndarray]  # local row -> uint64 [chunks_per_row, 2] (offset, nbytes)
    mapping: mmap.mmap | None = None
    data: np.ndarray | None = None  # uint8 view of the mapping


class RawChunkReader:
    """Reads rows of a raw store under a local ``memory/`` directory; thread-safe, one per process."""

    def __init__(self, memory_dir: str, layout: RawLayout, *, threads: int | None = None):
        self.memory_dir = memory_dir
        self.layout = layout
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._shards: dict[int, _Shard] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.buffers = BatchBuffers()

    def shard_file(self, shard: int) -> str:
        return os.path.join(self.memory_dir, "c", str(shard), "0", "0")

    def close(self) -> None:
        """Unmap the shard files, so that their pages can leave the page cache; the parsed shard indexes stay, and
        the next read maps the files again.  Idle batch buffers are freed too."""
        self.buffers.clear()
        with self._lock:
            for shard in self._shards.values():
                mapping, shard.mapping, shard.data = shard.mapping, None, None
                if mapping is not None:
                    try:
                        mapping.close()
                    except BufferError:  # a read in another thread still uses it: unmapped when it is done
                        pass

    # --- shard files -----------------------------------------------------------------------------

    def _shard(self, shard: int) -> _Shard:
        found = self._shards.get(shard)
        if found is None or found.data is None:
            with self._lock:
                found = self._shards.get(shard)
                if found is None or found.data is None:
                    found = self._map(shard, found)
                    self._shards[shard] = found
        return found

    def _map(self, shard: int, known: _Shard | None) -> _Shard:
        lay, path = self.layout, self.shard_file(shard)
        first_row = shard * lay.shard_rows
        try:
            with open(path, "rb") as handle:
                mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ChunkReadError(f"cannot map {path} ({e})", row=first_row, corrupt=False) from e
        data = np.frombuffer(mapping, dtype=np.uint8)
        if known is not None and known.size == len(data):  # mapped again after close(): the index is known
            known.mapping, known.data = mapping, data
            return known
        if len(data) < lay.index_bytes:
            raise ChunkReadError(f"{path} is {len(data)} bytes, shorter than its shard index ({lay.index_bytes} bytes)",
                                 row=first_row, corrupt=True)
        if crc32c.crc32c(data[len(data) - lay.index_bytes:]) != _CRC_RESIDUE:
            raise ChunkReadError(f"the shard index at the end of {path} fails its crc32c checksum", row=first_row,
                                 corrupt=True)
        entries = data[len(data) - lay.index_bytes:-4].view("<u8").reshape(lay.shard_rows, lay.chunks_per_row, 2)
        offsets, nbytes = entries[..., 0], entries[..., 1]
        stored = offsets != _MISSING
        bad = stored & ((nbytes != lay.chunk_bytes + 4) | (offsets + nbytes > len(data) - lay.index_bytes))
        if bad.any():
            r = first_row + int(np.argwhere(bad)[0, 0])
            raise ChunkReadError(f"the shard index of {path} points outside the file or at a chunk of the wrong size "
                                 f"(row {r})", row=r, corrupt=True)
        count = np.cumprod(stored, axis=1).sum(axis=1)  # stored chunks from token 0 on
        k = np.arange(lay.chunks_per_row, dtype=np.uint64)
        in_place = offsets == offsets[:, :1] + k[None, :] * np.uint64(lay.chunk_bytes + 4)
        regular = np.where(k[None, :] < count[:, None], in_place, ~stored).all(axis=1)
        return _Shard(path=path, size=len(data), start=np.where(count > 0, offsets[:, 0], 0).astype(np.int64),
                      count=count.astype(np.int64), irregular={int(r): entries[r].copy() for r in np.flatnonzero(~regular)},
                      mapping=mapping, data=data)

    # --- batch reads -----------------------------------------------------------------------------

    def read_into(self, out: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> None:
        """Fill ``out`` (uint8 [B, p_max * token_bytes], C-contiguous) with the rows' first p_max tokens; what no
        stored chunk covers reads as zeros (the fill value)."""
        lay = self.layout
        cb = lay.chunk_bytes
        want = np.minimum(-(-lengths.astype(np.int64) // lay.token_chunk), -(-out.shape[1] // cb))
        shards = rows // lay.shard_rows
        # (mapped file, its path, out slot, offset of the first chunk, chunks, irregular index entries); holding the
        # mapped array keeps the mapping alive through a concurrent close()
        plan: list[tuple[np.ndarray, str, int, int, int, np.ndarray | None]] = []
        for s in np.unique(shards).tolist():
            shard = self._shard(s)
            data, mapping = shard.data, shard.mapping
            for slot in np.flatnonzero(shards == s).tolist():
                local = int(rows[slot]) - s * lay.shard_rows
                entries = shard.irregular.get(local)
                n = int(want[slot]) if entries is not None else min(int(want[slot]), int(shard.count[local]))
                start = int(shard.start[local])
                plan.append((data, shard.path, slot, start, n, entries))
                if n and entries is None:  # the kernel starts reading every range now, ahead of the copies
                    page = start - start % _PAGE
                    mapping.madvise(mmap.MADV_WILLNEED, page, start + n * (cb + 4) - page)
        if len(plan) < 64 or self.threads == 1:
            self._copy(out, rows, plan)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="premem-read")
            pool = self._pool
        parts = [pool.submit(self._copy, out, rows, plan[i::self.threads]) for i in range(self.threads)]
        errors = [f.exception() for f in parts]
        for error in errors:
            if error is not None:
                raise error

    def _copy(self, out: np.ndarray, rows: np.ndarray, plan: list) -> None:
        """Copy planned rows and check their chunks (numpy's copies release the GIL: copy threads run in parallel)."""
        cb, row_bytes = self.layout.chunk_bytes, out.shape[1]
        for data, path, slot, start, n, entries in plan:
            dest = out[slot]
            if entries is None:
                chunks = data[start:start + n * (cb + 4)].reshape(n, cb + 4)
            else:  # chunks stored out of order or with holes: one at a time, missing ones are zeros
                dest[:] = 0
                chunks = np.zeros((n, cb + 4), dtype=np.uint8)
                for c in range(n):
                    if entries[c, 0] != _MISSING:
                        chunks[c] = data[int(entries[c, 0]):int(entries[c, 0]) + cb + 4]
            whole = min(n, row_bytes // cb)
            dest[:whole * cb].reshape(whole, cb)[...] = chunks[:whole, :cb]
            if whole < n:  # the batch ends inside this chunk
                dest[whole * cb:] = chunks[whole, :row_bytes - whole * cb]
            elif n * cb < row_bytes:
                dest[n * cb:] = 0
            for c in range(n):
                if (entries is None or entries[c, 0] != _MISSING) and crc32c.crc32c(chunks[c], 0, 0) != _CRC_RESIDUE:
                    r = int(rows[slot])
                    raise ChunkReadError(f"row {r}: its chunk of tokens {c * self.layout.token_chunk}.."
                                         f"{(c + 1) * self.layout.token_chunk - 1} fails its crc32c checksum in "
                                         f"{path}", row=r, corrupt=True)
