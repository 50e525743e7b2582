"""premem.storage."""

from premem.storage.neighbors import Neighbors, read_neighbors, write_neighbors
from premem.storage.store import (
    FORMAT_VERSION,
    KIND,
    FingerprintMismatch,
    MemoryBatch,
    MemoryStore,
    ShardWriter,
    StoreError,
    kvstore_spec,
    normalize_path,
)

__all__ = [
    "FORMAT_VERSION",
    "KIND",
    "FingerprintMismatch",
    "MemoryBatch",
    "MemoryStore",
    "Neighbors",
    "ShardWriter",
    "StoreError",
    "kvstore_spec",
    "normalize_path",
    "read_neighbors",
    "write_neighbors",
]
