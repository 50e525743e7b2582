"""Retrieval embeddings of one shard, computed in the encode pass (or alone, for a store whose memory is done)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from premem.models.retriever import RetrieverConfig, memory_mean, memory_mean_info


def retriever_info(config: RetrieverConfig, memory_fingerprint: str, d_model: int) -> dict:
    """The manifest record of the retriever (loads a text retriever once, in the driver, for its fingerprint)."""
    if config.is_memory_mean:
        if config.window_words:
            raise ValueError("--retriever-window-words needs a retriever checkpoint, not memory-mean")
        return memory_mean_info(memory_fingerprint, d_model)
    return config.load_text_embedder().info()


class ShardEmbedder:
    """Per worker: the retriever, loaded once; embeds shards and commits them into the store's ``embeddings/``.

    memory-mean vectors come from the memory states (collected batch by batch while the shard is encoded, or
    read back from the store when only the embeddings are missing), cast to the stored dtype first so both
    routes give the same vectors.
    """

    def __init__(self, config: RetrieverConfig, store, fingerprint: str, batch_rows: int = 256,
                 device: str = "cpu") -> None:
        self.config = config
        self.store = store
        self.fingerprint = fingerprint
        self.batch_rows = batch_rows
        self.text = None if config.is_memory_mean else config.load_text_embedder(device)
        if self.text is not None and self.text.fingerprint != fingerprint:
            raise RuntimeError(f"worker loaded retriever {self.text.fingerprint[:12]} but the store expects "
                               f"{fingerprint[:12]}: the checkpoint at {config.name} changed during the job")
        self._collected: dict[int, np.ndarray] = {}
        self.per_row = 1
        if self.text is not None and self.text.window_words > 0:
            from premem.storage.embeddings import vectors_per_row

            self.per_row = vectors_per_row(store)

    def is_committed(self, shard: int) -> bool:
        from premem.storage.embeddings import embeddings_committed

        return embeddings_committed(self.store, shard)

    def collect(self, rows: np.ndarray, states: torch.Tensor, lengths: np.ndarray) -> None:
        """memory-mean only: remember the vectors of a just-encoded batch (states as they will be stored)."""
        if self.text is None:
            stored = states.to(self.store.torch_dtype)
            vectors = memory_mean(stored, torch.as_tensor(lengths))
            for row, vector in zip(np.asarray(rows).tolist(), vectors, strict=True):
                self._collected[row] = vector

    def commit(self, shard: int, table: pa.Table) -> int:
        """Embed every row of the shard and commit; returns the number of rows embedded."""
        from premem.storage.embeddings import write_shard_embeddings

        rows = table.column("row").to_numpy().astype(np.int64)
        if self.text is not None:
            titles = table.column("title").to_pylist() if "title" in table.column_names else [""] * len(rows)
            per_passage = [self.text.passage_texts(t, x)
                           for t, x in zip(titles, table.column("text").to_pylist(), strict=True)]
            flat = self.text.embed([text for texts in per_passage for text in texts], what="passage")
            if self.text.window_words <= 0:
                vectors = flat
            else:  # [n, m, e], zeros in the slots a short passage does not fill
                vectors = np.zeros((len(rows), self.per_row, flat.shape[1]), dtype=np.float32)
                at = 0
                for i, texts in enumerate(per_passage):
                    if len(texts) > self.per_row:
                        raise ValueError(f"passage row {rows[i]} has {len(texts)} windows, the store holds "
                                         f"{self.per_row} per row: its passages are longer than passage_words")
                    vectors[i, :len(texts)] = flat[at:at + len(texts)]
                    at += len(texts)
        elif all(int(r) in self._collected for r in rows):
            vectors = np.stack([self._collected.pop(int(r)) for r in rows])
        else:
            vectors = np.concatenate([self._from_store(rows[i:i + self.batch_rows])
                                      for i in range(0, len(rows), self.batch_rows)])
        write_shard_embeddings(self.store, shard, rows, vectors)
        self._collected.clear()
        return len(rows)

    def _from_store(self, rows: np.ndarray) -> np.ndarray:
        batch = self.store.read(rows)
        return memory_mean(batch.states, batch.lengths)


def prepare_store_embeddings(store, config: RetrieverConfig, memory_committed: set[int]) -> tuple[str, set[int]]:
    """Create (or check) the store's embeddings for ``config``; returns the retriever fingerprint and the shards
    whose memory is committed but whose embeddings are not (they get embeddings only, no memory re-encode)."""
    from premem.storage.embeddings import embedding_committed_shards, prepare_embeddings

    info = retriever_info(config, store.fingerprint, store.d_model)
    if info.get("window_words"):
        from premem.models.retriever import windows_per_row

        passage_words = int((store.manifest.get("extra") or {}).get("passage_words", 100))
        info["vectors_per_row"] = windows_per_row(passage_words, int(info["window_words"]))
    prepare_embeddings(store, info)
    return info["fingerprint"], set(memory_committed) - embedding_committed_shards(store)
