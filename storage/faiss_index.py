"""The store's faiss index over its retrieval embeddings: choose, train, add per shard, merge, load, search.

Files inside the store (through TensorStore kvstores, so local and gs:// behave the same)::

    index/trained.faiss          the trained, empty index every shard part starts from
    index/parts/shard-00000.faiss one shard's vectors added (ids = store rows); removed after the merge
    index/index.faiss            the merged index searched by `premem search` / `premem retrieve`
    index/ivfdata                (--on-disk, local stores only) the merged inverted lists, memory-mapped

Vectors are L2-normalised, so the metric is inner product (= cosine).  IVF indexes are merged with
``merge_from`` (the parts share the trained quantizer); flat-code indexes (Flat, PQ, SQ) are wrapped in
``IndexIDMap`` so parts keep their row ids and merge the same way; HNSW graphs cannot be merged, so their
shards are added one after another into one graph in the building process.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import crc32c
import faiss
import numpy as np
import torch

from premem.storage import layout
from premem.storage.errors import FingerprintMismatch, RetrievalError, one_line

if TYPE_CHECKING:
    from premem.storage.store import MemoryStore

__all__ = ["RetrievalError", "SearchResult", "auto_factory", "load_index", "search_store"]

TRAINED = layout.INDEX_TRAINED
MERGED = layout.INDEX_MERGED
IVFDATA = layout.INDEX_IVFDATA
AUTO = "auto"
# faiss warns below 39 training points per centroid and uses at most 256 per centroid.
MIN_POINTS_PER_CENTROID = 39
MAX_POINTS_PER_CENTROID = 256
TARGET_RECALL = 0.95
TUNE_QUERIES = 256
_LOADED: dict[tuple, faiss.Index] = {}  # the last index loaded in this process


# --------------------------------------------------------------------------------------------
# choosing a factory


def parse_memory(text: str | int | None) -> int | None:
    """'4GiB' / '512M' / '2e9' / 123 -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB]?)\s*", str(text))
    if not m:
        raise RetrievalError(f"--max-memory {text!r} is not a size: write e.g. 4GiB, 512MB or 2000000000")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def _pq_m(dim: int, bytes_per_vector: float) -> int | None:
    """Largest PQ sub-quantizer count m (8 bits each) dividing dim with m bytes within budget."""
    fits = [m for m in (64, 48, 32, 24, 16, 12, 8, 4) if dim % m == 0 and m <= bytes_per_vector]
    return fits[0] if fits else None


def auto_factory(rows: int, dim: int, max_memory: int | None) -> str:
    """An index_factory string after faiss's guidelines ("Guidelines to choose an index").

    Below 50k vectors exact search is fast enough: Flat.  Up to 1M: IVF with ~4·sqrt(N) lists; above that an
    HNSW coarse quantizer with 2^16 (<10M), 2^18 (<100M) or 2^20 lists.  Codes: full vectors while
    rows·dim·4 bytes fit ``max_memory``, then SQ8 (dim bytes), then PQ with as many bytes as fit.
    """
    if rows < 1:
        raise RetrievalError("the store has no embedded rows: nothing to index")
    budget = max_memory if max_memory is not None else 1 << 62
    if rows < 50_000:
        if rows * dim * 4 <= budget:
            return "Flat"
        m = _pq_m(dim, budget / rows - 8)
        if m is None:
            raise RetrievalError(f"{rows} vectors cannot fit in --max-memory {budget} bytes even as PQ4 codes: "
                                 f"raise --max-memory")
        return f"PQ{m}"
    if rows < 1_000_000:
        nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(rows))))
        coarse = f"IVF{nlist}"
    elif rows < 10_000_000:
        coarse = "IVF65536_HNSW32"
    elif rows < 100_000_000:
        coarse = "IVF262144_HNSW32"
    else:
        coarse = "IVF1048576_HNSW32"
    per_vector = budget / rows - 8  # ids are int64
    if per_vector >= dim * 4:
        return f"{coarse},Flat"
    if per_vector >= dim:
        return f"{coarse},SQ8"
    m = _pq_m(dim, per_vector)
    if m is None:
        raise RetrievalError(f"{rows} vectors cannot fit in --max-memory {budget} bytes even as PQ4 codes: "
                             f"raise --max-memory")
    return f"{coarse},PQ{m}"


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingNeeds:
    minimum: int  # below this faiss cannot train the factory at all
    recommended: int  # what the build samples when the store has that many rows


def new_index(factory: str, dim: int) -> faiss.Index:
    """``faiss.index_factory`` with inner product, a user error for a string faiss does not understand."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise RetrievalError(f"faiss cannot build factory {factory!r} for {dim}-d vectors "
                             f"({_faiss_message(e)}): see faiss's index_factory docs, or use --factory auto") from e
    return index


def training_needs(index: faiss.Index) -> TrainingNeeds:
    """How many training vectors the factory needs: its largest k-means (IVF lists, PQ/SQ codebooks)."""
    if index.is_trained:
        return TrainingNeeds(0, 0)
    centroids = 1
    try:
        centroids = max(centroids, faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        pass
    # Product quantizers train 2^nbits centroids per sub-space.
    for sub in _sub_indexes(index):
        pq = getattr(sub, "pq", None)
        if pq is not None:
            centroids = max(centroids, 1 << pq.nbits)
    minimum = max(centroids, 1)
    recommended = max(MIN_POINTS_PER_CENTROID * centroids, 1000)
    return TrainingNeeds(minimum, min(recommended, MAX_POINTS_PER_CENTROID * centroids))


def _sub_indexes(index: faiss.Index) -> list:
    """The index and every index inside it (pre-transform, IDMap, IVF quantizer, HNSW storage)."""
    out, todo = [], [index]
    while todo:
        idx = faiss.downcast_index(todo.pop())
        out.append(idx)
        for attr in ("index", "base_index", "quantizer", "storage"):
            child = getattr(idx, attr, None)
            if isinstance(child, faiss.Index):
                todo.append(child)
    return out


def train_index(factory: str, sample: np.ndarray, rows: int) -> faiss.Index:
    """A trained, empty index; a clear error when the store is too small for the factory."""
    dim = sample.shape[1]
    index = new_index(factory, dim)
    needs = training_needs(index)
    if rows < needs.minimum:
        raise RetrievalError(f"factory {factory!r} needs at least {needs.minimum} training vectors but the store has "
                             f"only {rows} rows: use a smaller factory (fewer IVF lists or PQ bits), Flat, or auto")
    if not index.is_trained:
        try:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as e:
            raise RetrievalError(f"training factory {factory!r} on {len(sample)} vectors failed "
                                 f"({_faiss_message(e)}): use a smaller factory or --factory auto") from e
    if not is_ivf(index) and not isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)  # ids = store rows (or row * m + window) for every kind of index
    return index


def is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _can_merge_codes(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlatCodes)


def is_mergeable(index: faiss.Index) -> bool:
    """Parts of this index can be built separately and merged (IVF, or IDMap over flat codes)."""
    if is_ivf(index):
        return True
    idx = faiss.downcast_index(index)
    return isinstance(idx, faiss.IndexIDMap) and _can_merge_codes(idx.index)


# --------------------------------------------------------------------------------------------
# adding and merging


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def add_rows(index: faiss.Index, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Add vectors with their ids (store rows, or row * m + window)."""
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64))


def merge_parts(trained: faiss.Index, parts) -> faiss.Index:
    """One index from the trained empty one and the shard parts (an iterable, loaded one at a time)."""
    merged = deserialize(serialize(trained))  # the parts' route: a deserialized index has the parts' exact types
    for part in parts:
        if is_ivf(merged):
            merged.merge_from(part, 0)
        else:
            merged.merge_from(part)
    return merged


def read_index_bytes(store: MemoryStore, key: str) -> bytes | None:
    res = store.read_key(key)
    return bytes(res.value) if res.state == "value" else None


def file_digest(source: bytes | str) -> dict:
    """Size and crc32c of index bytes, or of a local file (read in 64 MiB pieces), as the manifest records them."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return {"bytes": len(source), "crc32c": crc32c.crc32c(source)}
    value, size = 0, 0
    with open(source, "rb") as handle:
        while piece := handle.read(64 << 20):
            value, size = crc32c.crc32c(piece, value), size + len(piece)
    return {"bytes": size, "crc32c": value}


# --------------------------------------------------------------------------------------------
# search parameters


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply nprobe / efSearch (only those the index has)."""
    if params.get("nprobe") is not None and is_ivf(index):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if params.get("efSearch") is not None:
        for sub in _sub_indexes(index):
            hnsw = getattr(sub, "hnsw", None)
            if hnsw is not None:
                hnsw.efSearch = int(params["efSearch"])


def exact_top_k(queries: np.ndarray, shards, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (rows, vectors) chunks, streamed: no full copy of the embeddings."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for rows, vectors in shards:
        scores = queries @ vectors.T
        all_s = np.concatenate([best_s, scores], axis=1)
        all_r = np.concatenate([best_r, np.broadcast_to(rows, scores.shape)], axis=1)
        keep = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, keep, 1)
        best_r = np.take_along_axis(all_r, keep, 1)
    return best_s, best_r


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the index found in its top-k."""
    hits = [len(set(f.tolist()) & set(e.tolist())) / max(len(e), 1) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def tune_search_params(index: faiss.Index, queries: np.ndarray, exact_rows: np.ndarray, k: int,
                       target: float = TARGET_RECALL) -> dict:
    """Smallest nprobe (IVF) / efSearch (HNSW) reaching ``target`` recall@k against exact search.

    A margin of 0.01 above target covers queries beyond the tuning set.
    """
    params: dict[str, Any] = {}
    want = min(1.0, target + 0.01)
    if is_ivf(index):
        nlist = faiss.extract_index_ivf(index).nlist
        candidates = sorted({min(nlist, 2 ** i) for i in range(0, int(math.log2(nlist)) + 2)})
        params["nprobe"] = candidates[-1]
        for nprobe in candidates:
            set_search_params(index, {"nprobe": nprobe})
            recall = recall_at_k(index.search(queries, k)[1], exact_rows)
            if recall >= want:
                params["nprobe"] = nprobe
                break
        set_search_params(index, params)
    if any(getattr(sub, "hnsw", None) is not None for sub in _sub_indexes(index)) and not is_ivf(index):
        params["efSearch"] = 1024
        for ef in (16, 32, 64, 128, 256, 512, 1024):
            set_search_params(index, {"efSearch": ef})
            if recall_at_k(index.search(queries, k)[1], exact_rows) >= want:
                params["efSearch"] = ef
                break
        set_search_params(index, params)
    params["tuned_recall_at_k"] = round(recall_at_k(index.search(queries, k)[1], exact_rows), 4)
    params["tuned_k"] = k
    return params


def _faiss_message(e: BaseException) -> str:
    text = str(e)
    m = re.search(r"Error: '([^']*)' failed|what\(\):\s*(.*)|Error in .*?: (.*)", text)
    if m:
        return next(g for g in m.groups() if g).strip()[:200]
    return one_line(e)


# --------------------------------------------------------------------------------------------
# loading and searching


@dataclass
class SearchResult:
    """Top-k per query, best first; rows are store rows (-1 where fewer than k were found)."""

    scores: np.ndarray  # float32 [Q, k]
    rows: np.ndarray  # int64 [Q, k]


def index_info(store: MemoryStore) -> dict:
    info = store.manifest.get("index")
    if not info:
        raise RetrievalError(f"store {store.path} has no faiss index: build it with `premem index {store.path}`")
    embedded = (store.manifest.get("retriever") or {}).get("fingerprint")
    if embedded and (info.get("retriever") or {}).get("fingerprint") != embedded:
        raise FingerprintMismatch(f"the index of store {store.path} was built from another retriever's embeddings "
                                  f"than the store now holds: rebuild it with `premem index {store.path}`")
    return dict(info)


def load_index(store: MemoryStore) -> faiss.Index:
    """The merged index (loaded once per store handle); on-disk IVF indexes are memory-mapped."""
    return store.memo("faiss_index", lambda: _load_index(store))


def _load_index(store: MemoryStore) -> faiss.Index:
    info = index_info(store)
    key = (store.path, info.get("built_at"), info.get("bytes"), info.get("factory"), info.get("build_seconds"))
    if key in _LOADED:  # one copy per process: the driver and in-process workers share it
        return _LOADED[key]
    if info.get("on_disk"):
        path = os.path.join(store.path, MERGED)
        try:
            index = faiss.read_index(path)  # its OnDiskInvertedLists memory-map ivfdata
        except RuntimeError as e:
            raise RetrievalError(f"cannot read on-disk index {path} ({_faiss_message(e)}): rebuild it with "
                                 f"`premem index {store.path}`") from e
    else:
        data = read_index_bytes(store, MERGED)
        if data is None:
            raise RetrievalError(f"store {store.path} lists an index but {MERGED} is missing: rebuild it with "
                                 f"`premem index {store.path}`")
        recorded = (info.get("files") or {}).get(MERGED)
        if recorded is not None and file_digest(data) != recorded:
            raise RetrievalError(f"{store.path}/{MERGED} is damaged (its size or crc32c differs from what `premem "
                                 f"index` recorded): rebuild it with `premem index {store.path}`")
        try:
            index = deserialize(data)
        except RuntimeError as e:
            raise RetrievalError(f"{store.path}/{MERGED} is not a readable faiss index ({_faiss_message(e)}): "
                                 f"rebuild it with `premem index {store.path}`") from e
    set_search_params(index, info.get("search_params", {}))
    _LOADED.clear()
    _LOADED[key] = index
    return index


def check_query_encoder(store: MemoryStore, encoder: Any) -> None:
    """Raise FingerprintMismatch unless ``encoder`` (with ``.fingerprint``) made the vectors the index holds."""
    recorded = index_info(store).get("retriever") or {}
    if encoder.fingerprint != recorded.get("fingerprint"):
        raise FingerprintMismatch(
            f"the index of store {store.path} holds embeddings of retriever {str(recorded.get('fingerprint'))[:12]} "
            f"({recorded.get('checkpoint', recorded.get('kind'))}), the query encoder is {encoder.fingerprint[:12]}: "
            f"query with the retriever the store was embedded with, or re-embed the store with `premem encode "
            f"--retriever ...` and re-index")


def search_store(store: MemoryStore, queries, k: int = 10, *, encoder: Any = None, nprobe: int | None = None,
                 ef_search: int | None = None) -> SearchResult:
    """Top-k store rows for [Q, e] vectors, or for texts encoded by ``encoder`` (``.embed(texts, what=...)``,
    ``.fingerprint``: the store's query encoder, see premem.models.retriever.query_encoder)."""
    info = index_info(store)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RetrievalError(f"k must be a positive integer, got {k!r}")
    ntotal = int(info.get("rows", info.get("ntotal", 0)))
    if k > ntotal:
        raise RetrievalError(f"k={k} is larger than the {ntotal} rows in the index of store {store.path}: "
                             f"ask for at most {ntotal}")
    dim = int(info["dim"])
    index = load_index(store)
    if isinstance(queries, str):
        queries = [queries]
    if isinstance(queries, (list, tuple)) and (len(queries) == 0 or isinstance(queries[0], str)):
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise RetrievalError(f"query {i} is empty (or not a string): every query needs some text")
        if encoder is None:
            raise RetrievalError("text queries need the store's query encoder: pass encoder="
                                 "premem.models.retriever.query_encoder(store.manifest), or search with vectors")
        check_query_encoder(store, encoder)
        vectors = encoder.embed(list(queries), what="query")
    else:
        vectors = _as_query_vectors(queries, dim)
    params = dict(info.get("search_params", {}))
    if nprobe is not None:
        params["nprobe"] = nprobe
    if ef_search is not None:
        params["efSearch"] = ef_search
    set_search_params(index, params)
    if len(vectors) == 0:
        return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    per_row = int(info.get("vectors_per_row", 1))
    wanted = int(k) if per_row == 1 else min(int(info["ntotal"]), int(k) * per_row)
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), wanted)
    if per_row == 1:
        return SearchResult(scores.astype(np.float32), ids.astype(np.int64))
    return collapse_windows(scores, ids, per_row, int(k))


def collapse_windows(scores: np.ndarray, ids: np.ndarray, per_row: int, k: int) -> SearchResult:
    """Window hits -> the k best rows, each scored by its best window (max-sim); -1 where fewer were found."""
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_r = np.full((len(ids), k), -1, dtype=np.int64)
    for q in range(len(ids)):
        seen: set[int] = set()
        for score, vid in zip(scores[q], ids[q], strict=True):
            if vid < 0:
                break
            row = int(vid) // per_row
            if row in seen:
                continue
            out_r[q, len(seen)], out_s[q, len(seen)] = row, score
            seen.add(row)
            if len(seen) == k:
                break
    return SearchResult(out_s, out_r)


def _as_query_vectors(queries, dim: int) -> np.ndarray:
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().float().cpu().numpy()
    try:
        vectors = np.asarray(queries, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise RetrievalError("queries must be texts or a [Q, e] array of vectors") from e
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise RetrievalError(f"query vectors must have shape [Q, {dim}] (the index's dimension), got "
                             f"{list(vectors.shape)}: encode queries with the store's retriever")
    if not np.all(np.isfinite(vectors)):
        raise RetrievalError("query vectors contain NaN or inf")
    return vectors
