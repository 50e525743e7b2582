"""premem.storage: the store format, its writers and readers, the faiss index and the training reader.

Names are imported on first use, so that ``premem.storage.errors`` (which every layer raises) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "layout",
    "KIND": "layout",
    "FingerprintMismatch": "errors",
    "InputError": "errors",
    "LeaseHeld": "errors",
    "LeaseLost": "errors",
    "PrememError": "errors",
    "StoreError": "errors",
    "kvstore_spec": "kv",
    "normalize_path": "kv",
    "LongTermStore": "longterm",
    "MemoryBatch": "store",
    "MemoryStore": "store",
    "open_store": "store",
    "ShardWriter": "writer",
    "Neighbors": "neighbors",
    "read_neighbors": "neighbors",
    "write_neighbors": "neighbors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'premem.storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"premem.storage.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
