"""premem.storage."""

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
    "ShardWriter",
    "StoreError",
    "kvstore_spec",
    "normalize_path",
]
