"""The add step of `premem index`: each shard's embeddings added to a copy of the trained index, one part per shard.

The job around it (premem.jobs.index) trains the index first and merges the parts afterwards.
"""
from __future__ import annotations

import apache_beam as beam
import faiss

from premem.storage import MemoryStore, layout
from premem.storage import faiss_index as fx
from premem.storage.embeddings import flatten_vectors, read_shard_embeddings


class AddShardFn(beam.DoFn):
    """One shard's embeddings -> one index part (the trained index plus that shard's vectors, ids = rows)."""

    def __init__(self, store_path: str, lease_token: str | None = None):
        self.store_path = store_path
        self.lease_token = lease_token  # the job's writer lease: checked before each part is written
        self.vectors = beam.metrics.Metrics.counter("premem", "vectors_indexed")

    def setup(self):
        self.store = MemoryStore.open(self.store_path, read_only=False, lease_token=self.lease_token)
        self.trained = fx.deserialize(fx.read_index_bytes(self.store, fx.TRAINED))

    def process(self, shard: int):
        rows, vectors = flatten_vectors(*read_shard_embeddings(self.store, shard))
        part = faiss.clone_index(self.trained)
        fx.add_rows(part, rows, vectors)
        self.store.check_lease()  # a job that lost its writer lease writes nothing more
        self.store.write_key(layout.index_part_key(shard), fx.serialize(part))
        self.vectors.inc(len(rows))
        yield {"shard": shard, "vectors": len(rows)}


class AddShardsToIndex(beam.PTransform):
    """Shard numbers -> one part per shard written into the store; emits a summary per part."""

    def __init__(self, store_path: str, lease_token: str | None = None):
        super().__init__()
        self.store_path = store_path
        self.lease_token = lease_token

    def expand(self, shards):
        return (shards | "Spread" >> beam.Reshuffle()
                | "AddShard" >> beam.ParDo(AddShardFn(self.store_path, self.lease_token)))
