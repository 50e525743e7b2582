"""The encode step: one element = one corpus shard -> one committed Zarr shard."""
from __future__ import annotations

import dataclasses
import json
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.utils.shared import Shared

from premem.models import DEFAULT_TEMPLATE
from premem.models.encoder import token_budget_batches
from premem.models.retriever import RetrieverConfig, memory_mean
from premem.pipeline.objects import WriteLines
from premem.pipeline.shard import read_shard
from premem.storage import MemoryStore
from premem.storage.embeddings import embeddings_committed, vectors_per_row, write_shard_embeddings
from premem.storage.errors import CheckpointError, InputError
from premem.storage.tensors import pad_sequences

FAILED = "failed"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 there."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything a worker needs to rebuild the exact frozen stack."""

    checkpoint: str
    memory_layers: int | None = None
    live_fraction: float | None = None
    template: str = DEFAULT_TEMPLATE
    device: str = "auto"
    compute_dtype: str = "auto"
    tokens_per_batch: int = 16384

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        """bf16 on GPUs and on CPUs with native bf16 matmuls; fp32 elsewhere."""
        if self.compute_dtype != "auto":
            if self.compute_dtype not in DTYPES:
                raise InputError(f"--compute-dtype {self.compute_dtype!r} is not one of auto, {', '.join(DTYPES)}")
            return DTYPES[self.compute_dtype]
        native_bf16 = self.resolved_device().startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native_bf16 else torch.float32

    def describe(self) -> dict:
        """The encoder's manifest record and fingerprint from its checkpoint files: the driver never builds the model."""
        from premem.models.encoder import memory_encoder_info

        return memory_encoder_info(self.checkpoint, memory_layers=self.memory_layers, live_fraction=self.live_fraction,
                                   template=self.template)

    def load(self, device: str | None = None, dtype: torch.dtype | None = None):
        from premem.models import MemoryEncoder

        return MemoryEncoder.from_pretrained(
            self.checkpoint,
            memory_layers=self.memory_layers,
            live_fraction=self.live_fraction,
            template=self.template,
            device=device or self.resolved_device(),
            dtype=dtype or self.resolved_dtype(),
        )


class _Loaded:
    """Weak-referenceable holder so Beam's Shared keeps one model per worker process."""

    def __init__(self, encoder):
        self.encoder = encoder


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
            raise CheckpointError(f"worker loaded retriever {self.text.fingerprint[:12]} but the store expects "
                               f"{fingerprint[:12]}: the checkpoint at {config.name} changed during the job")
        self._collected: dict[int, np.ndarray] = {}
        self.per_row = 1
        if self.text is not None and self.text.window_words > 0:
            self.per_row = vectors_per_row(store)

    def is_committed(self, shard: int) -> bool:
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
                        raise InputError(f"passage row {rows[i]} has {len(texts)} windows, the store holds "
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


class EncodeShardFn(beam.DoFn):
    """Encodes one corpus shard and commits it into the store.

    The model is loaded once per worker process (shared between its
    threads), never per bundle. A shard that is already committed is skipped,
    so a retried or resumed element does no work twice.
    """

    def __init__(self, shards_dir: str, store_path: str, config: EncoderConfig, fingerprint: str,
                 lease_token: str | None = None, retriever=None, retriever_fingerprint: str | None = None):
        self.shards_dir = shards_dir
        self.retriever = retriever  # RetrieverConfig: retrieval embeddings in the same pass; None: memory only
        self.retriever_fingerprint = retriever_fingerprint
        self.store_path = store_path
        self.config = config
        self.fingerprint = fingerprint
        self.lease_token = lease_token  # the job's writer lease: checked before each shard is written
        self._shared = Shared()
        self.passages = beam.metrics.Metrics.counter("premem", "passages_encoded")
        self.tokens = beam.metrics.Metrics.counter("premem", "tokens_encoded")
        self.bytes = beam.metrics.Metrics.counter("premem", "bytes_written")
        self.skipped = beam.metrics.Metrics.counter("premem", "shards_skipped")
        self.failed = beam.metrics.Metrics.counter("premem", "shards_failed")
        self.embedded = beam.metrics.Metrics.counter("premem", "passages_embedded")

    def setup(self):
        self.encoder = self._shared.acquire(lambda: _Loaded(self.config.load()), tag=self.fingerprint).encoder
        if self.encoder.fingerprint != self.fingerprint:
            raise CheckpointError(f"worker loaded encoder {self.encoder.fingerprint[:12]} but the store expects "
                               f"{self.fingerprint[:12]}: the checkpoint at {self.config.checkpoint} changed during the job")
        self.store = MemoryStore.open(self.store_path, expected_fingerprint=self.fingerprint, read_only=False,
                                      lease_token=self.lease_token)
        self.pad_id = self.encoder.tokenizer.pad_token_id or 0
        self.embedder = None
        if self.retriever is not None:
            # The retriever runs where and how the memory encoder runs (GPU, bf16 where native).
            retriever = dataclasses.replace(self.retriever, compute_dtype=str(self.config.resolved_dtype()).split(".")[-1])
            self.embedder = ShardEmbedder(retriever, self.store, self.retriever_fingerprint,
                                          device=self.config.resolved_device())

    def process(self, entry: dict):
        shard = entry["shard"]
        memory_done = self.store.is_committed(shard)
        embed = self.embedder is not None and not self.embedder.is_committed(shard)
        if memory_done and not embed:
            self.skipped.inc()
            return
        self.store.check_lease()  # a job that lost its writer lease writes nothing more
        started = time.perf_counter()
        try:
            table = read_shard(self.shards_dir, entry)
        except ValueError as err:  # one bad shard file must not stop the others
            self.failed.inc()
            yield beam.pvalue.TaggedOutput(FAILED, json.dumps({"shard": shard, "error": str(err)}))
            return
        if memory_done:  # only the retrieval embeddings are missing: the memory is not encoded again
            self.embedded.inc(self.embedder.commit(shard, table))
            yield {"shard": shard, "passages": table.num_rows, "tokens": 0, "embedded_only": True,
                   "seconds": time.perf_counter() - started}
            return
        rows = table.column("row").to_numpy()
        lengths = table.column("length").to_numpy()
        token_ids = table.column("token_ids").to_pylist()
        device = self.config.resolved_device()
        # Metadata first: the commit marker, written last, vouches for everything of the shard.
        self.store.write_metadata(shard, table.drop_columns(["token_ids"]))
        with self.store.shard_writer(shard) as writer, torch.inference_mode():
            for batch in token_budget_batches(lengths, self.config.tokens_per_batch):
                input_ids, mask = pad_sequences([token_ids[i] for i in batch], self.pad_id)
                states = self.encoder(input_ids.to(device), mask.to(device))
                writer.write(rows[batch], states.cpu(), lengths[batch])
                if embed:
                    self.embedder.collect(rows[batch], states, lengths[batch])
        if embed:
            self.embedded.inc(self.embedder.commit(shard, table))
        tokens = int(lengths.sum())
        self.passages.inc(len(rows))
        self.tokens.inc(tokens)
        self.bytes.inc(tokens * self.store.d_model * self.store.torch_dtype.itemsize)
        yield {"shard": shard, "passages": len(rows), "tokens": tokens, "seconds": time.perf_counter() - started}


class EncodeShards(beam.PTransform):
    """Shard index entries -> one summary per shard encoded now.

    Shards whose file cannot be read are listed in `failures_path` (JSON
    lines, rewritten by every run) instead of failing the whole job.
    """

    def __init__(self, shards_dir: str, store_path: str, config: EncoderConfig, fingerprint: str, failures_path: str,
                 lease_token: str | None = None, retriever=None, retriever_fingerprint: str | None = None):
        super().__init__()
        self.fn = EncodeShardFn(shards_dir, store_path, config, fingerprint, lease_token, retriever,
                                retriever_fingerprint)
        self.failures_path = failures_path

    def expand(self, entries):
        results = (
            entries
            | "SpreadShards" >> beam.Reshuffle()
            | "Encode" >> beam.ParDo(self.fn).with_outputs(FAILED, main="encoded")
        )
        _ = results[FAILED] | "WriteFailures" >> WriteLines(self.failures_path)
        return results.encoded
