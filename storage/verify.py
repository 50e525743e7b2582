"""Prove a store is whole: its manifest against its arrays, every commit marker, every chunk's checksum.

``verify_store(path)`` reads everything a store holds and returns a :class:`VerifyReport` that names each
bad shard and row.  What is checked depends on the store kind in ``manifest.json`` (a verifier per kind,
:func:`register_verifier`); every Zarr array of the store that no kind-specific verifier read (retrieval
embeddings, arrays of later store kinds) is still read chunk by chunk, so a corrupt chunk anywhere is found.
Re-encoding a sample of rows needs the encoder, so it lives in ``premem.jobs.recheck``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorstore as ts

from premem.storage import kv, layout
from premem.storage.errors import StoreError, one_line
from premem.storage.faiss_index import file_digest
from premem.storage.store import MemoryStore

# bytes of decoded memory read at once while checking
_BLOCK_BYTES = 64 << 20


@dataclass
class Problem:
    """One thing wrong with a store: what, and where (shard, rows, key)."""

    kind: str  # manifest | structure | uncommitted | checksum | lengths | padding | metadata | values
    what: str
    shard: int | None = None
    rows: list[int] = field(default_factory=list)
    key: str | None = None

    def line(self) -> str:
        where = []
        if self.shard is not None:
            where.append(f"shard {self.shard}")
        if self.rows:
            shown = ", ".join(map(str, self.rows[:8]))
            if len(self.rows) > 8:
                shown += f", ... ({len(self.rows)} rows)"
            where.append(f"row{'s' if len(self.rows) > 1 else ''} {shown}")
        if self.key:
            where.append(self.key)
        return f"[{self.kind}] " + (f"{'; '.join(where)}: " if where else "") + self.what


@dataclass
class VerifyReport:
    """What ``verify_store`` checked and every problem it found (``ok`` when none)."""

    path: str
    kind: str = "?"
    num_shards: int = 0
    committed_shards: list[int] = field(default_factory=list)
    uncommitted_shards: list[int] = field(default_factory=list)
    checked_rows: int = 0
    checked_chunks: int = 0
    checked_arrays: list[str] = field(default_factory=list)
    sample: dict | None = None
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> list[int]:
        return sorted({p.shard for p in self.problems if p.shard is not None})

    @property
    def bad_rows(self) -> list[int]:
        return sorted({r for p in self.problems for r in p.rows})

    def add(self, kind: str, what: str, *, shard: int | None = None, rows=(), key: str | None = None) -> None:
        self.problems.append(Problem(kind, what, shard, [int(r) for r in rows], key))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, bad_shards=self.bad_shards, bad_rows=self.bad_rows)
        return d


Verifier = Callable[..., set]  # (path, manifest, report, progress=None) -> names of the arrays it read
_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(kind: str) -> Callable[[Verifier], Verifier]:
    """Register the checks of one store kind: ``fn(path, manifest, report, progress=None) -> arrays it read``.

    A verifier adds a :class:`Problem` per bad shard / row to ``report`` and never raises for damage.
    """

    def deco(fn: Verifier) -> Verifier:
        _VERIFIERS[kind] = fn
        return fn

    return deco


def verify_store(path, *, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check the store at ``path`` completely (reads every chunk once); never raises for a damaged store.

    Raises :class:`StoreError` only when there is no store at ``path`` at all.
    ``progress(done, total)`` is called per shard of the kind-specific check.
    """
    t0 = time.perf_counter()
    path = kv.normalize_path(path)
    kv.check_not_a_file(path)
    report = VerifyReport(path=path)
    store_kv = kv.open_kv(path)
    res = kv.read(store_kv, layout.MANIFEST, path)
    if res.state != "value":
        raise StoreError(f"no premem store at {path} (manifest.json missing): pass a store made by premem")
    try:
        manifest = kv.parse_json(res.value, f"{path}/{layout.MANIFEST}")
    except StoreError as e:
        report.add("manifest", str(e), key=layout.MANIFEST)
        report.seconds = time.perf_counter() - t0
        return report
    report.kind = str(manifest.get("kind", "?"))
    verifier = _VERIFIERS.get(report.kind)
    done: set = set()
    if verifier is not None:
        done = verifier(path, manifest, report, progress=progress)
    for name in sorted(_zarr_arrays(store_kv, path) - set(done)):  # arrays no kind-specific check read
        _scan_array(path, name, manifest, report)
    _check_index_files(store_kv, path, manifest, report)
    report.seconds = time.perf_counter() - t0
    return report


def _check_index_files(store_kv: ts.KvStore, path: str, manifest: dict, report: VerifyReport) -> None:
    """The faiss index files against the size and crc32c `premem index` recorded for them."""
    for key, recorded in ((manifest.get("index") or {}).get("files") or {}).items():
        local = os.path.join(path, key)
        try:
            if kv.is_local(path):
                found = file_digest(local) if os.path.exists(local) else None
            else:
                res = store_kv.read(key).result()
                found = file_digest(bytes(res.value)) if res.state == "value" else None
        except Exception as e:
            report.add("index", f"cannot be read ({one_line(e)}): rebuild it with `premem index {path}`", key=key)
            continue
        report.checked_arrays.append(key)
        if found is None:
            report.add("index", f"missing: rebuild it with `premem index {path}`", key=key)
        elif found != recorded:
            report.add("index", f"damaged: {found['bytes']} bytes with crc32c {found['crc32c']:08x}, `premem index` "
                                f"wrote {recorded['bytes']} bytes with crc32c {recorded['crc32c']:08x}: rebuild it "
                                f"with `premem index {path}`", key=key)


def _zarr_arrays(store_kv: ts.KvStore, path: str) -> set[str]:
    """Names (key prefixes) of the Zarr v3 arrays in a store."""
    out = set()
    for k in kv.list_keys(store_kv, "", path):
        if k.endswith("/zarr.json") and "/c/" not in k:
            out.add(k[: -len("/zarr.json")])
    return out


def _scan_array(path: str, name: str, manifest: dict, report: VerifyReport) -> None:
    """Read any Zarr array chunk by chunk along its first axis; name the rows (and shards) that fail."""
    try:
        spec = {"driver": "zarr3", "kvstore": kv.kvstore_spec(path, layout.array_prefix(name))}
        arr = ts.open(spec, open=True, read=True).result()
    except Exception as e:
        report.add("structure", f"the {name}/ array cannot be opened ({one_line(e)})", key=f"{name}/zarr.json")
        return
    report.checked_arrays.append(name)
    if arr.rank == 0 or arr.shape[0] == 0:
        return
    n = arr.shape[0]
    outer = max(1, int(arr.chunk_layout.write_chunk.shape[0] or n))
    inner = max(1, int(arr.chunk_layout.read_chunk.shape[0] or outer))
    shard_size = int(manifest.get("shard_size") or 0) if manifest.get("rows") == n else 0
    for start in range(0, n, outer):
        stop = min(start + outer, n)
        try:
            arr[start:stop].read().result()
            report.checked_chunks += -(-(stop - start) // inner)
            continue
        except Exception:
            pass
        for a in range(start, stop, inner):
            b = min(a + inner, stop)
            try:
                arr[a:b].read().result()
                report.checked_chunks += 1
            except Exception as e:
                what = "fails its checksum / does not decode" if kv.is_corruption(e) else "cannot be read"
                shard = a // shard_size if shard_size else None
                report.add("checksum", f"{name} rows {a}..{b - 1} {what} ({one_line(e)})", shard=shard,
                           rows=range(a, b), key=f"{name}/")


# --------------------------------------------------------------------------------------------
# the LUMEN memory store


@register_verifier(layout.KIND)
def verify_memory_store(path: str, manifest: dict, report: VerifyReport,
                        progress: Callable[[int, int], None] | None = None) -> set:
    """memory/ + lengths/ + commits/ + meta/ of a LUMEN memory store."""
    try:
        layout.check_manifest(manifest, path, layout.KIND)
    except StoreError as e:
        report.add("manifest", str(e), key=layout.MANIFEST)
        return set()
    store = MemoryStore.open(path, cache_bytes=0)
    report.num_shards = store.num_shards
    if store.num_shards != -(-store.rows // store.shard_size):
        report.add("manifest", f"num_shards={store.num_shards} does not match rows={store.rows} / "
                               f"shard_size={store.shard_size}", key=layout.MANIFEST)
        return set()
    arrays = {*store.memory_arrays, layout.LENGTHS}
    if not _check_arrays(store, report):
        return arrays
    _check_codebook(store, report)
    committed = sorted(store.committed_shards())
    report.committed_shards = committed
    report.uncommitted_shards = sorted(set(range(store.num_shards)) - set(committed))
    listed = {int(m.get("shard", -1)) for m in manifest.get("shards") or []}
    for s in sorted(listed - set(committed)):
        report.add("manifest", "listed as committed in manifest.json but its commit marker is gone", shard=s,
                   key=store.commits.key(s))
    for s in report.uncommitted_shards:
        if s not in listed:
            report.add("uncommitted", "not committed (the store is incomplete): resume `premem encode`", shard=s)
    if manifest.get("complete") and report.uncommitted_shards:
        report.add("manifest", f"manifest.json says complete but {len(report.uncommitted_shards)} shards are not "
                               f"committed", key=layout.MANIFEST)
    recorded = [m for m in manifest.get("shards") or [] if int(m.get("shard", -1)) in set(committed)]
    if manifest.get("shards"):  # finalized: its totals must add up over the markers it lists
        for k in ("passages", "tokens"):
            total = sum(int(m.get(k, 0)) for m in manifest["shards"])
            if int(manifest.get(k, total)) != total:
                report.add("manifest", f"{k}={manifest.get(k)} but its listed shards hold {total}", key=layout.MANIFEST)
    encoded_by_premem = bool((manifest.get("extra") or {}).get("shards_dir"))
    for i, s in enumerate(committed):
        _check_shard(store, s, report, need_meta=encoded_by_premem,
                     recorded=next((m for m in recorded if int(m["shard"]) == s), None))
        if progress is not None:
            progress(i + 1, len(committed))
    return arrays


def _check_codebook(store: MemoryStore, report: VerifyReport) -> None:
    """A quantized store's codebook against the size and checksums in the manifest (its codes mean nothing without)."""
    if store.quantize and store.quantize["codec"] != "int8":
        try:
            _ = store.codec
            report.checked_arrays.append(layout.CODEBOOK)
        except StoreError as e:
            report.add("codebook", str(e), key=layout.CODEBOOK)


def _check_arrays(store: MemoryStore, report: VerifyReport) -> bool:
    recorded = ((store.manifest.get("codec") or {}).get("memory") or {}).get("chunk_shape")
    q = store.quantize
    width, dtype = (int(q["code_width"]), q["code_dtype"]) if q else (store.d_model, store.dtype)
    chunk = tuple(recorded or (store.shard_size, store.max_tokens, width))
    want = {
        store.memory_arrays[0]: ((store.rows, store.max_tokens, width), dtype, chunk),
        layout.LENGTHS: ((store.rows,), "int32", (store.shard_size,)),
    }
    if layout.SCALES in store.memory_arrays:
        want[layout.SCALES] = ((store.rows, store.max_tokens), "float16", chunk[:2])
    ok = True
    for name, (shape, dtype, chunk) in want.items():
        try:
            arr = store.array(name)
        except StoreError as e:
            report.add("structure", str(e), key=f"{name}/zarr.json")
            ok = False
            continue
        report.checked_arrays.append(name)
        got = (tuple(arr.shape), arr.dtype.name, tuple(arr.chunk_layout.write_chunk.shape))
        if got != (shape, dtype, chunk):
            report.add("structure", f"the {name}/ array is shape {list(got[0])} {got[1]} in chunks of {list(got[2])}, "
                                    f"the manifest says {list(shape)} {dtype} in chunks of {list(chunk)}",
                       key=f"{name}/zarr.json")
            ok = False
    return ok


def _check_shard(store: MemoryStore, s: int, report: VerifyReport, *, need_meta: bool,
                 recorded: dict | None = None) -> None:
    rng = store.shard_rows(s)
    rows = np.arange(rng.start, rng.stop)
    len_key = layout.chunk_key(layout.LENGTHS, s, 1)
    try:
        marker = store.read_marker(s)
    except StoreError as e:
        report.add("structure", str(e), shard=s, key=store.commits.key(s))
        marker = None
    if marker is not None:
        expect = {"shard": s, "start": rng.start, "stop": rng.stop, "fingerprint": store.fingerprint}
        diff = [f"{k}={marker.get(k)!r} (expected {v!r})" for k, v in expect.items() if marker.get(k) != v]
        if recorded is not None:  # the copy manifest.json took when it was finalized
            diff += [f"{k}={marker.get(k)!r} (manifest.json: {recorded.get(k)!r})" for k in ("passages", "tokens")
                     if marker.get(k) != recorded.get(k)]
        if diff:
            report.add("structure", f"commit marker disagrees with the manifest: {', '.join(diff)}", shard=s,
                       key=store.commits.key(s))
    # lengths: one chunk per shard
    lengths = None
    try:
        lengths = store.array(layout.LENGTHS)[rng.start:rng.stop].read().result().astype(np.int64)
        report.checked_chunks += 1
    except Exception as e:
        report.add("checksum", f"the lengths chunk fails its checksum / cannot be read ({one_line(e)})", shard=s,
                   rows=rows, key=len_key)
    if lengths is not None:
        bad = (lengths < 0) | (lengths > store.max_tokens)
        if bad.any():
            report.add("lengths", f"lengths outside 0..{store.max_tokens}", shard=s, rows=rows[bad],
                       key=len_key)
            lengths = None
        elif marker is not None and "tokens" in marker and int(lengths.sum()) != int(marker["tokens"]):
            report.add("lengths", f"lengths sum to {int(lengths.sum())} tokens, the commit marker says "
                                  f"{marker['tokens']}", shard=s, rows=rows, key=len_key)
    for name in store.memory_arrays:
        _check_memory(store, name, s, lengths, report)
    _check_meta(store, s, rows, lengths, report, need_meta=need_meta)


def _check_memory(store: MemoryStore, name: str, s: int, lengths, report: VerifyReport) -> None:
    """Every inner chunk (one per row) of array ``name`` (memory/, codes/, scales/) decoded: crc32c checks every
    byte; zeros past each length, data within it."""
    rng = store.shard_rows(s)
    mem_key = layout.chunk_key(name, s, 2 if name == layout.SCALES else 3)
    arr = store.array(name)
    per_row = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.numpy_dtype.itemsize)
    block = max(1, _BLOCK_BYTES // per_row)
    for a in range(rng.start, rng.stop, block):
        b = min(a + block, rng.stop)
        try:
            data = arr[a:b].read().result()
            good_rows = np.arange(a, b)
        except Exception:
            data, good = [], []
            for r in range(a, b):
                try:
                    data.append(arr[r].read().result())
                    good.append(r)
                except Exception as e:
                    what = "fails its checksum" if kv.is_corruption(e) else "cannot be read"
                    report.add("checksum", f"the passage chunk {what} ({one_line(e)})", shard=s, rows=[r],
                               key=mem_key)
            if not good:
                continue
            data, good_rows = np.stack(data), np.asarray(good)
        if data.ndim == 2:  # scales/: one value per token
            data = data[..., None]
        token_chunk = int(arr.chunk_layout.read_chunk.shape[1])
        if lengths is not None:
            report.checked_chunks += int(np.sum(-(-lengths[good_rows - rng.start] // token_chunk)))
            _check_values(data, lengths[good_rows - rng.start], good_rows, s, mem_key, report, token_chunk)
        else:
            report.checked_chunks += len(good_rows) * -(-store.max_tokens // token_chunk)
        if name == store.memory_arrays[0]:
            report.checked_rows += len(good_rows)


def _check_values(data: np.ndarray, lens: np.ndarray, rows: np.ndarray, s: int, key: str, report: VerifyReport,
                  token_chunk: int) -> None:
    """Zeros past each length (the writer pads with zeros) and data within it: a lost token chunk reads as zeros."""
    bits = (data.view(np.uint16 if data.dtype.itemsize == 2 else np.uint32) if data.dtype.itemsize > 1 else data) != 0
    tokens = bits.any(axis=2)  # [b, P]: token has any non-zero feature
    past = np.arange(data.shape[1])[None, :] >= lens[:, None]
    padded = (tokens & past).any(axis=1)
    if padded.any():
        report.add("padding", "non-zero values past the stored length (lengths and memory disagree)", shard=s,
                   rows=rows[padded], key=key)
    n_chunks = -(-data.shape[1] // token_chunk)
    real = np.pad(tokens & ~past, ((0, 0), (0, n_chunks * token_chunk - data.shape[1])))
    has_data = real.reshape(len(rows), n_chunks, token_chunk).any(axis=2)  # [b, chunks]
    expected = np.arange(n_chunks)[None, :] * token_chunk < lens[:, None]
    lost = (expected & ~has_data).any(axis=1)
    if lost.any():
        report.add("checksum", "no stored data in a token chunk within the passage's length: it reads as all zeros "
                               "(its chunk is missing)", shard=s, rows=rows[lost], key=key)


def _check_meta(store: MemoryStore, s: int, rows: np.ndarray, lengths, report: VerifyReport, *,
                need_meta: bool) -> None:
    key = layout.meta_key(s)
    try:
        res = store.read_key(key)
    except StoreError as e:
        report.add("metadata", str(e), shard=s, key=key)
        return
    if res.state != "value":
        if need_meta:
            report.add("metadata", "passage metadata missing", shard=s, key=key)
        return
    try:
        table = pq.read_table(pa.BufferReader(res.value))
    except Exception as e:
        report.add("metadata", f"not a readable parquet file ({one_line(e)})", shard=s, key=key)
        return
    if "row" not in table.column_names:
        report.add("metadata", "no 'row' column", shard=s, key=key)
        return
    trows = table.column("row").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(trows) != len(rows) or not np.array_equal(np.sort(trows), rows):
        report.add("metadata", f"holds rows {sorted(set(trows.tolist()) ^ set(rows.tolist()))[:8]} the shard does not "
                               f"(or lacks them)", shard=s, key=key)
        return
    if lengths is not None and "length" in table.column_names:
        tl = table.column("length").to_numpy(zero_copy_only=False).astype(np.int64)
        mismatch = tl != lengths[trows - rows[0]]
        if mismatch.any():
            report.add("lengths", "stored lengths differ from the passage metadata's", shard=s, rows=trows[mismatch],
                       key=layout.chunk_key(layout.LENGTHS, s, 1))
