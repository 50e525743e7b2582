"""The encode step: one element = one corpus shard -> one committed Zarr shard."""
from __future__ import annotations

import dataclasses
import functools
import json
import time

import apache_beam as beam
import torch
from apache_beam.utils.shared import Shared

from premem.models import DEFAULT_TEMPLATE
from premem.models.encoder import token_budget_batches
from premem.pipeline.shard import read_shard

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
                raise ValueError(f"--compute-dtype {self.compute_dtype!r} is not one of auto, {', '.join(DTYPES)}")
            return DTYPES[self.compute_dtype]
        native_bf16 = self.resolved_device().startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native_bf16 else torch.float32

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


def pad_batch(token_ids: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.bool)
    for i, ids in enumerate(token_ids):
        input_ids[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = True
    return input_ids, mask


class _Loaded:
    """Weak-referenceable holder so Beam's Shared keeps one model per worker process."""

    def __init__(self, encoder):
        self.encoder = encoder


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
        from premem.storage import MemoryStore

        self.encoder = self._shared.acquire(lambda: _Loaded(self.config.load()), tag=self.fingerprint).encoder
        if self.encoder.fingerprint != self.fingerprint:
            raise RuntimeError(f"worker loaded encoder {self.encoder.fingerprint[:12]} but the store expects "
                               f"{self.fingerprint[:12]}: the checkpoint at {self.config.checkpoint} changed during the job")
        self.store = MemoryStore.open(self.store_path, expected_fingerprint=self.fingerprint, read_only=False)
        if self.lease_token is not None:
            from premem.storage.lease import check_lease

            self.store.commit_guard = functools.partial(check_lease, self.store_path, self.lease_token)
        self.pad_id = self.encoder.tokenizer.pad_token_id or 0
        self.embedder = None
        if self.retriever is not None:
            from premem.pipeline.embed import ShardEmbedder

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
        if self.store.commit_guard is not None:
            self.store.commit_guard()  # a job that lost its writer lease writes nothing more
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
                input_ids, mask = pad_batch([token_ids[i] for i in batch], self.pad_id)
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
        _ = results[FAILED] | "WriteFailures" >> beam.io.WriteToText(
            self.failures_path, shard_name_template="", num_shards=1)
        return results.encoded
