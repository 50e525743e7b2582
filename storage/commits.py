"""The commit protocol every store kind uses: a shard's data first, then its marker; the writer lease checked
right before.

A shard is readable only once its commit marker (``<prefix>shard-NNNNN.json``) exists, so a killed job resumes by
skipping committed shards and a half-written shard is never read.  Memory, retrieval embeddings and long-term
memory each keep their markers under their own prefix (storage/layout.py) through one :class:`ShardCommits`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import tensorstore as ts

from premem.storage import kv, layout
from premem.storage.errors import StoreError, one_line
from premem.storage.lease import check_lease


class StoreHandle:
    """A store's location, manifest and kvstore: the base of every store kind.

    The kvstore handle is reopened after a fork (TensorStore aborts a forked child that uses its parent's handles)
    and the object pickles as its location, manifest and writer lease, so Beam and DataLoader workers reopen it
    themselves.  ``lease_token``: the writer lease this handle writes under (taken by the job, storage/lease.py);
    every writer calls :meth:`check_lease` right before it commits, so a job whose lease was taken over writes
    nothing more.
    """

    def __init__(self, path: str, manifest: dict, *, read_only: bool, lease_token: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.read_only = read_only
        self.lease_token = lease_token
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._kv_handle: ts.KvStore | None = None
        self._memo: dict[str, object] = {}

    def memo(self, name: str, make: Callable[[], object]):
        """An object derived from the store (e.g. its loaded faiss index), made once per handle and process."""
        self._check_pid()
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def __getstate__(self) -> dict:
        return {"path": self.path, "manifest": self.manifest, "read_only": self.read_only,
                "lease_token": self.lease_token}

    def __setstate__(self, state: dict) -> None:
        StoreHandle.__init__(self, state["path"], state["manifest"], read_only=state["read_only"],
                             lease_token=state.get("lease_token"))
        self._reset_handles()

    def _check_pid(self) -> None:
        # NB: TensorStore aborts a forked child that uses it once the parent has used it ("fork() use
        # detected"); use spawn/forkserver workers (the store pickles) or read in the main process.
        if os.getpid() != self._pid:
            self._reset_handles()

    @property
    def kv(self) -> ts.KvStore:
        """The store's kvstore (keys relative to the store's root)."""
        self._check_pid()
        if self._kv_handle is None:
            self._kv_handle = kv.open_kv(self.path)
        return self._kv_handle

    def read_key(self, key: str):
        return kv.read(self.kv, key, self.path)

    def write_key(self, key: str, value: bytes | None) -> None:
        """Write (None: delete) one key of the store."""
        kv.write(self.kv, key, value, self.path)

    def read_json(self, key: str) -> dict | None:
        res = self.read_key(key)
        return kv.parse_json(res.value, f"{self.path}/{key}") if res.state == "value" else None

    def update_manifest(self, key: str, value) -> None:
        """Set (None: remove) one top-level manifest key, re-reading the manifest first so that keys written
        meanwhile by others survive."""
        manifest = self.read_json(layout.MANIFEST) or dict(self.manifest)
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
        self.write_key(layout.MANIFEST, kv.dump_json(manifest))
        self.manifest = manifest

    def require_writable(self, what: str = "write") -> None:
        if self.read_only:
            raise StoreError(f"store {self.path} was opened read-only: open it with read_only=False to {what}")

    def check_lease(self) -> None:
        """Raise LeaseLost unless this handle's writer lease is still held (no-op for a handle without one)."""
        if self.lease_token is not None:
            check_lease(self.path, self.lease_token)


class ShardCommits:
    """The commit markers under one prefix of a store: which shards are committed, and committing one."""

    def __init__(self, store: StoreHandle, prefix: str, num_shards: int | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.num_shards = num_shards
        self._known: set[int] = set()  # markers seen; premem never removes one except through forget()

    def key(self, shard: int) -> str:
        return layout.marker_key(self.prefix, shard)

    def committed(self) -> set[int]:
        """Every committed shard (lists the prefix)."""
        found = {s for name in kv.list_keys(self.store.kv, self.prefix, self.store.path)
                 if (s := layout.marker_shard(name)) is not None
                 and (self.num_shards is None or s < self.num_shards)}
        self._known = found
        return set(found)

    def is_committed(self, shard: int) -> bool:
        if shard in self._known:
            return True
        if self.store.read_key(self.key(shard)).state == "value":
            self._known.add(shard)
            return True
        return False

    def read(self, shard: int) -> dict | None:
        """The marker of ``shard``, or None when it is not committed."""
        return self.store.read_json(self.key(shard))

    def read_all(self) -> list[dict]:
        """Every committed shard's marker, in shard order (read concurrently)."""
        shards = sorted(self.committed())
        futures = [self.store.kv.read(self.key(s)) for s in shards]
        out = []
        for s, future in zip(shards, futures, strict=True):
            try:
                res = future.result()
            except Exception as e:
                raise StoreError(f"store {self.store.path}: cannot read {self.key(s)} ({one_line(e)})") from e
            if res.state == "value":
                out.append(kv.parse_json(res.value, f"{self.store.path}/{self.key(s)}"))
        return out

    def commit(self, shard: int, write_data: Callable[[], dict]) -> dict:
        """Check the writer lease, run ``write_data`` (which makes the shard's data durable and returns the marker's
        fields), then write the marker; returns it."""
        self.store.check_lease()
        fields = write_data()
        marker = {"shard": shard, **fields, "committed_at": kv.now()}
        kv.write(self.store.kv, self.key(shard), kv.dump_json(marker), self.store.path)
        self._known.add(shard)
        return marker

    def forget(self, shard: int) -> None:
        """Remove the marker: from then on the shard is not committed (its data can be rewritten)."""
        kv.write(self.store.kv, self.key(shard), None, self.store.path)
        self._known.discard(shard)

    def forget_all(self) -> None:
        kv.delete_prefix(self.store.kv, self.prefix, self.store.path)
        self._known.clear()
