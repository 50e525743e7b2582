"""Where everything lies in a store: every key name, the Zarr codec specs, the manifest kinds and their check.

This is the only module that spells a key.  A LUMEN memory store (``premem encode``)::

    manifest.json                   what the store holds (kind, shapes, dtype, codec, encoder fingerprint, ...)
    memory/                         Zarr v3 [rows, P, d]; one Zarr shard per corpus shard (memory/c/S/0/0), inner
                                    chunks of one passage's T tokens [1, T, d], never stored past its length
    lengths/                        Zarr v3 int32 [rows], one chunk per corpus shard (lengths/c/S)
    meta/shard-00000.parquet        per-passage metadata (row, doc_id, passage, title, text, length)
    commits/shard-00000.json        commit marker of a shard's memory, written after its data
    embeddings/                     retrieval vectors [rows, e] or [rows, m, e], one chunk per corpus shard
    embedding-commits/shard-00000.json
    index/                          the faiss index (trained.faiss, parts/shard-00000.faiss, index.faiss, ivfdata)
    locks/writer.json               the writer lease of the job writing the store
    failed-shards.jsonl             shards the last encode job could not read, with the reason

A quantized store (``--quantize int8|pq``) holds ``codes/`` ([rows, P, code bytes], int8 or uint8, sharded like
memory/) instead of ``memory/``, ``scales/`` (float16 [rows, P], int8 only) and ``codebook.faiss`` (pq: the
trained faiss codec, its sha256 in the manifest); storage/quantize.py.

A MELODI long-term store (``premem compress``) has the same manifest, lease, meta/ and commits/ keys, plus
``plan.json``, ``shards/00000/{increments,end_z}/`` and ``rejects.jsonl``.
"""

from __future__ import annotations

from premem.storage.errors import StoreError
from premem.storage.tensors import DTYPES

MANIFEST = "manifest.json"
LEASE = "locks/writer.json"
FAILURES = "failed-shards.jsonl"
REJECTS = "rejects.jsonl"

# LUMEN memory store
KIND = "lumen-memory"
FORMAT_VERSION = 1
MEMORY = "memory"
LENGTHS = "lengths"
EMBEDDINGS = "embeddings"
COMMITS = "commits/"
EMBEDDING_COMMITS = "embedding-commits/"
META = "meta/"
CODECS = ("raw", "zstd")
CODES = "codes"
SCALES = "scales"
CODEBOOK = "codebook.faiss"
TOKEN_CHUNK = 32  # tokens per inner chunk: a read wastes < T tokens per passage, the shard index costs 16 B per chunk
CODE_TOKEN_CHUNK = 16  # codes are 8-32x smaller: half the padding for twice the (still small) index

# faiss index files
INDEX_DIR = "index/"
INDEX_TRAINED = "index/trained.faiss"
INDEX_MERGED = "index/index.faiss"
INDEX_PARTS = "index/parts/"
INDEX_IVFDATA = "index/ivfdata"

# MELODI long-term memory store
LONGTERM_KIND = "melodi-longterm"
LONGTERM_FORMAT_VERSION = 1
PLAN = "plan.json"
INCREMENTS = "increments"
END_Z = "end_z"
WINDOWS_PER_CHUNK = 16


def marker_key(prefix: str, shard: int) -> str:
    """Commit marker of ``shard`` under ``prefix`` (COMMITS, EMBEDDING_COMMITS)."""
    return f"{prefix}shard-{shard:05d}.json"


def marker_shard(name: str) -> int | None:
    """The shard a marker file name (prefix stripped) belongs to, or None for other files."""
    if name.startswith("shard-") and name.endswith(".json") and name[6:-5].isdigit():
        return int(name[6:-5])
    return None


def meta_key(shard: int) -> str:
    return f"{META}shard-{shard:05d}.parquet"


def array_prefix(name: str) -> str:
    """Key prefix of a Zarr array (its zarr.json and chunks)."""
    return name.rstrip("/") + "/"


def chunk_key(name: str, shard: int, rank: int) -> str:
    """The key of the one chunk (Zarr shard file) of ``shard`` in an array of ``rank`` dimensions chunked only
    along rows by corpus shard (memory: rank 3, lengths: 1, embeddings: 2 or 3)."""
    return f"{array_prefix(name)}c/{shard}" + "/0" * (rank - 1)


def chunk_shard(name: str, key: str) -> int | None:
    """The shard of a chunk key of array ``name`` (the inverse of chunk_key), or None."""
    head = f"{array_prefix(name)}c/"
    if not key.startswith(head):
        return None
    first = key[len(head):].split("/", 1)[0]
    return int(first) if first.isdigit() else None


def index_part_key(shard: int) -> str:
    return f"{INDEX_PARTS}shard-{shard:05d}.faiss"


def longterm_array(shard: int, name: str) -> str:
    """Key prefix of one long-term shard's array (INCREMENTS, END_Z)."""
    return f"shards/{shard:05d}/{name}/"


# --------------------------------------------------------------------------------------------
# codecs


def _bytes() -> dict:
    return {"name": "bytes", "configuration": {"endian": "little"}}


def chunk_codecs(zstd_level: int | None) -> list[dict]:
    """bytes (+ zstd) + crc32c: a reader tells a corrupt chunk from a good one."""
    zstd = [] if zstd_level is None else [{"name": "zstd", "configuration": {"level": zstd_level, "checksum": False}}]
    return [_bytes(), *zstd, {"name": "crc32c"}]


def sharded_codecs(inner_chunk: list[int], zstd_level: int | None) -> list[dict]:
    """Zarr v3 sharding: one file per outer chunk, inner chunks of ``inner_chunk`` read one by one, the shard
    index (checksummed) at the end of the file."""
    return [{
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": list(inner_chunk),
            "codecs": chunk_codecs(zstd_level),
            "index_codecs": [_bytes(), {"name": "crc32c"}],
            "index_location": "end",
        },
    }]


def memory_codecs(token_chunk: int, d_model: int, codec: str, zstd_level: int) -> list[dict]:
    return sharded_codecs([1, token_chunk, d_model], zstd_level if codec == "zstd" else None)


def zarr_spec(kvstore: dict, *, shape: list[int], dtype: str, chunk_shape: list[int], codecs: list[dict],
              dimension_names: list[str]) -> dict:
    """A TensorStore spec that creates a Zarr v3 array (fill value 0)."""
    return {
        "driver": "zarr3",
        "kvstore": kvstore,
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "fill_value": 0,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
            "codecs": codecs,
            "dimension_names": dimension_names,
        },
    }


# --------------------------------------------------------------------------------------------
# manifests

# kind -> (format version, keys every manifest of that kind has, the command that makes such a store)
_KINDS = {
    KIND: (FORMAT_VERSION, ("rows", "max_tokens", "d_model", "dtype", "shard_size", "num_shards", "fingerprint"),
           "premem encode"),
    LONGTERM_KIND: (LONGTERM_FORMAT_VERSION, ("fingerprint", "config", "dtype", "end_state"), "premem compress"),
}
_KIND_NAMES = {KIND: "LUMEN memory store", LONGTERM_KIND: "MELODI long-term memory store"}


def check_manifest(manifest: dict, path: str, kind: str) -> None:
    """Raise StoreError unless ``manifest`` is a readable manifest of store ``kind``."""
    version, required, command = _KINDS[kind]
    if manifest.get("kind") != kind:
        other = _KIND_NAMES.get(manifest.get("kind"))
        hint = f"it is a {other}: open it with premem.storage.open_store" if other else f"pass a store made by `{command}`"
        raise StoreError(f"{path} is not a {_KIND_NAMES[kind]} (kind={manifest.get('kind')!r}): {hint}")
    if manifest.get("format_version") != version:
        raise StoreError(
            f"store {path} has format_version {manifest.get('format_version')!r}, this premem reads version "
            f"{version}: upgrade premem or run `{command}` again"
        )
    for k in required:
        if k not in manifest:
            raise StoreError(f"{path}/{MANIFEST} lacks {k!r}: the store is damaged, run `{command}` again")
    if manifest["dtype"] not in DTYPES:
        raise StoreError(f"store {path} has unsupported dtype {manifest['dtype']!r}: upgrade premem")
