"""The encode step: one element = one corpus shard -> one committed Zarr shard."""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import torch
from apache_beam.utils.shared import Shared

from premem.models import DEFAULT_TEMPLATE, resolve_checkpoint
from premem.models.encoder import load_live_layers, token_budget_batches
from premem.models.retriever import RetrieverConfig, masked_pool, memory_mean
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
    overlap: bool = True  # False: read, pad, run, copy and write in turn on one thread (the reference path)

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


def retriever_continues(retriever: RetrieverConfig | None, record: dict | None, encoder: dict, max_tokens: int) -> bool:
    """Whether the retriever reads exactly what the memory encoder read: the same checkpoint, its template equal to
    the passage template, its max length equal to the shards' token limit, one vector per passage.  Then its layers
    [0, K) are the memory encoder and it continues from the layer-K states instead of running them again."""
    if retriever is None or retriever.is_memory_mean or not record or record.get("kind") != "checkpoint":
        return False
    same_input = (record.get("template") == encoder["template"] and int(record.get("max_length") or 0) == max_tokens
                  and not record.get("window_words"))
    return same_input and resolve_checkpoint(retriever.name).resolve() == resolve_checkpoint(encoder["checkpoint"]).resolve()


class _Loaded:
    """Weak-referenceable holder so Beam's Shared keeps one model per worker process."""

    def __init__(self, encoder):
        self.encoder = encoder


QUEUE_DEPTH = 2  # batches waiting between two stages: with it, memory per worker does not grow with the corpus


class _Stage:
    """A thread fed through a bounded queue, in order; inline when not overlapping.  Its first error is raised to the
    caller at the next put or join (later items are dropped), so a failed write fails the shard and the bundle."""

    def __init__(self, name: str, threaded: bool, depth: int = QUEUE_DEPTH) -> None:
        self.error: BaseException | None = None
        self.queue: queue.Queue | None = queue.Queue(maxsize=depth) if threaded else None
        if self.queue is not None:
            threading.Thread(target=self._run, args=(self.queue,), name=name, daemon=True).start()

    def _run(self, items: queue.Queue) -> None:
        while (item := items.get()) is not None:
            if self.error is None:
                try:
                    item[0](*item[1])
                except BaseException as e:  # raised in the caller's thread
                    self.error = e
            items.task_done()
        items.task_done()

    def put(self, fn, *args) -> None:
        self.raise_error()
        if self.queue is None:
            fn(*args)
        else:
            self.queue.put((fn, args))

    def join(self) -> None:
        if self.queue is not None:
            self.queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        if self.queue is not None:
            self.queue.put(None)
            self.queue = None


def _ahead(items, threaded: bool, depth: int = QUEUE_DEPTH):
    """The items of an iterator, produced by a thread up to `depth` ahead of the consumer (padding the next batch
    while the model runs the current one)."""
    if not threaded:
        yield from items
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as e:
            out.put(e)

    threading.Thread(target=produce, name="premem-pad", daemon=True).start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _HostCopies:
    """Device -> host copies of batch outputs.

    On CUDA the copy runs on a side stream into pinned buffers reused from a pool (one more than the writer's
    queue holds), so the compute stream goes on with the next batch while bytes move, and ``wait`` is the only
    synchronisation (the writer thread's, per batch).  On CPU the outputs already are host tensors.
    """

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.free: queue.Queue = queue.Queue()
            for _ in range(QUEUE_DEPTH + 2):
                self.free.put(None)

    def start(self, *tensors: torch.Tensor) -> _HostCopy:
        if not self.cuda:
            return _HostCopy(tensors, None, None)
        buffer = self.free.get()  # blocks while every buffer waits in the writer's queue
        sizes = [t.numel() * t.element_size() for t in tensors]
        starts = [sum(-(-n // 64) * 64 for n in sizes[:i]) for i in range(len(sizes))]  # 64-byte aligned
        need = starts[-1] + sizes[-1]
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(need, dtype=torch.uint8, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())
        hosts = []
        with torch.cuda.stream(self.stream):
            for t, at, size in zip(tensors, starts, sizes, strict=True):
                host = buffer[at:at + size].view(t.dtype).view(t.shape)
                host.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # its memory is not reused before the copy is done
                hosts.append(host)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return _HostCopy(tuple(hosts), ready, lambda: self.free.put(buffer))


class _HostCopy:
    def __init__(self, tensors, ready, release) -> None:
        self._tensors, self._ready, self._release = tensors, ready, release

    def wait(self) -> tuple[torch.Tensor, ...]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._tensors

    def release(self) -> None:
        """The host tensors may be overwritten from now on (the writer copied them)."""
        if self._release is not None:
            self._release()


class ShardEmbedder:
    """Per worker: the retriever, loaded once; embeds shards and commits them into the store's ``embeddings/``.

    Three routes to the same vectors: memory-mean (from the memory states as stored), a text retriever run on
    its own inputs (tokenized on the padding thread, run after the shard's memory batches), and, when the
    retriever reads exactly what the memory encoder read (same checkpoint, template and token limit), the
    retriever's layers [K, L) continued from the layer-K states of each memory batch (`continued`).
    """

    def __init__(self, config: RetrieverConfig, store, fingerprint: str, batch_rows: int = 256,
                 device: str = "cpu", continue_from=None) -> None:
        self.config = config
        self.store = store
        self.fingerprint = fingerprint
        self.batch_rows = batch_rows
        self.device = device
        self.live = None
        self.text = None
        if continue_from is not None:  # the MemoryEncoder whose states the retriever continues
            info = config.text_info()
            self._check(info["fingerprint"])
            self.pooling = info["pooling"]
            self.live = load_live_layers(config.name, continue_from.memory_layers, device=device,
                                         dtype=next(continue_from.parameters()).dtype).requires_grad_(False)
        elif not config.is_memory_mean:
            self.text = config.load_text_embedder(device)
            self._check(self.text.fingerprint)
        self.per_row = 1
        if self.text is not None and self.text.window_words > 0:
            self.per_row = vectors_per_row(store)

    def _check(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise CheckpointError(f"worker loaded retriever {fingerprint[:12]} but the store expects "
                                  f"{self.fingerprint[:12]}: the checkpoint at {self.config.name} changed during the job")

    @property
    def continued(self) -> bool:
        return self.live is not None

    def is_committed(self, shard: int) -> bool:
        return embeddings_committed(self.store, shard)

    def text_batches(self, table: pa.Table, acc: dict):
        """Text route: the shard's retriever inputs as padded batches (runs on the padding thread).

        ``acc`` holds one shard's vectors until its commit, so the next shard can be encoded meanwhile."""
        titles = table.column("title").to_pylist() if "title" in table.column_names else [""] * table.num_rows
        acc["per_passage"] = [self.text.passage_texts(t, x)
                              for t, x in zip(titles, table.column("text").to_pylist(), strict=True)]
        flat = [text for texts in acc["per_passage"] for text in texts]
        acc["flat"] = np.zeros((len(flat), self.text.dim), dtype=np.float32)
        yield from self.text.batches(flat, what="passage")

    def continue_states(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Continued route: [b, dim] vectors from one batch of layer-K states (on the compute thread)."""
        mask = mask.to(states.device)
        return torch.nn.functional.normalize(masked_pool(self.live(states, mask), mask, self.pooling), dim=-1)

    def collect(self, acc: dict, rows: np.ndarray, states: torch.Tensor, lengths: np.ndarray,
                vectors: torch.Tensor | None = None) -> None:
        """A just-encoded memory batch: memory-mean vectors from the states as they are stored, or the continued
        route's vectors."""
        if vectors is None and self.config.is_memory_mean:
            vectors = memory_mean(self.store.as_stored(states), torch.as_tensor(lengths))
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.float().cpu().numpy()
        if vectors is not None:
            acc.setdefault("rows", {}).update(zip(np.asarray(rows).tolist(), vectors, strict=True))

    def collect_text(self, acc: dict, batch: np.ndarray, vectors: torch.Tensor) -> None:
        acc["flat"][batch] = vectors.float().cpu().numpy()

    def commit(self, shard: int, table: pa.Table, acc: dict | None = None) -> int:
        """Commit the shard's vectors (``acc``: collected while it was encoded; None: only its embeddings were
        missing, computed now); returns the number of rows embedded."""
        acc = {} if acc is None else acc
        rows = table.column("row").to_numpy().astype(np.int64)
        collected = acc.get("rows", {})
        if self.text is not None:
            if "flat" not in acc:
                for batch, input_ids, mask in self.text_batches(table, acc):
                    self.collect_text(acc, batch, self.text.vectors(input_ids, mask))
            vectors = self._from_texts(rows, acc)
        elif all(int(r) in collected for r in rows):
            vectors = np.stack([collected[int(r)] for r in rows])
        elif self.continued:
            vectors = self._from_full_retriever(table)
        else:
            vectors = np.concatenate([self._from_store(rows[i:i + self.batch_rows])
                                      for i in range(0, len(rows), self.batch_rows)])
        write_shard_embeddings(self.store, shard, rows, vectors)
        return len(rows)

    def _from_texts(self, rows: np.ndarray, acc: dict) -> np.ndarray:
        flat = acc["flat"]
        if self.text.window_words <= 0:
            return flat
        vectors = np.zeros((len(rows), self.per_row, flat.shape[1]), dtype=np.float32)  # zeros in unused slots
        at = 0
        for i, texts in enumerate(acc["per_passage"]):
            if len(texts) > self.per_row:
                raise InputError(f"passage row {rows[i]} has {len(texts)} windows, the store holds "
                                 f"{self.per_row} per row: its passages are longer than passage_words")
            vectors[i, :len(texts)] = flat[at:at + len(texts)]
            at += len(texts)
        return vectors

    def _from_full_retriever(self, table: pa.Table) -> np.ndarray:
        """Continued route, embeddings only: the stored states are rounded, so the whole retriever runs instead."""
        text = self.config.load_text_embedder(self.device)
        titles = table.column("title").to_pylist() if "title" in table.column_names else [""] * table.num_rows
        return text.embed([text.render(t, x) for t, x in zip(titles, table.column("text").to_pylist(), strict=True)],
                          what="passage")

    def _from_store(self, rows: np.ndarray) -> np.ndarray:
        batch = self.store.read(rows)
        return memory_mean(batch.states, batch.lengths)


class EncodeShardFn(beam.DoFn):
    """Encodes one corpus shard and commits it into the store.

    The model is loaded once per worker process (shared between its threads), never per bundle.  A shard that is
    already committed is skipped, so a retried or resumed element does no work twice.

    Three stages overlap per worker: a padding thread prepares the next batches, this thread runs the model, and
    a writer thread (bounded queue) takes the host copies, checksums and writes them and commits each shard.  A
    shard's commit runs while the next shard is encoded; the bundle ends only when every commit is done, and a
    failed write or commit fails the bundle (Beam retries it and skips what was committed).  Memory per worker:
    at most two shard transactions (one committing, one filling) plus QUEUE_DEPTH + 2 batches of states.
    """

    def __init__(self, shards_dir: str, store_path: str, config: EncoderConfig, fingerprint: str,
                 lease_token: str | None = None, retriever=None, retriever_fingerprint: str | None = None,
                 continue_retriever: bool = False):
        self.shards_dir = shards_dir
        self.retriever = retriever  # RetrieverConfig: retrieval embeddings in the same pass; None: memory only
        self.retriever_fingerprint = retriever_fingerprint
        self.continue_retriever = continue_retriever
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
        self.device = self.config.resolved_device()
        self.pin = torch.device(self.device).type == "cuda" and self.config.overlap
        self.copies = _HostCopies(self.device) if self.config.overlap else _HostCopies("cpu")
        self.writes = _Stage("premem-write", threaded=self.config.overlap)
        self.embedder = None
        if self.retriever is not None:
            # The retriever runs where and how the memory encoder runs (GPU, bf16 where native).
            retriever = dataclasses.replace(self.retriever, compute_dtype=str(self.config.resolved_dtype()).split(".")[-1])
            self.embedder = ShardEmbedder(retriever, self.store, self.retriever_fingerprint, device=self.device,
                                          continue_from=self.encoder if self.continue_retriever else None)

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
        writer, acc = self.store.shard_writer(shard), {}  # the previous shard may still be committing
        # Metadata first: the commit marker, written last, vouches for everything of the shard.
        self.writes.put(self.store.write_metadata, shard, table.drop_columns(["token_ids"]))
        self.writes.put(writer.__enter__)
        continued = embed and self.embedder.continued
        with torch.inference_mode():
            for kind, batch, input_ids, mask in _ahead(self._batches(table, lengths, embed, acc), self.config.overlap):
                if kind == "text":
                    vectors = self.embedder.text.vectors(input_ids, mask)
                    self.writes.put(self._collect_text, acc, batch, self.copies.start(vectors))
                    continue
                states = self.encoder(input_ids.to(self.device, non_blocking=True),
                                      mask.to(self.device, non_blocking=True))
                outputs = (states, self.embedder.continue_states(states, mask)) if continued else (states,)
                self.writes.put(self._write_batch, writer, acc if embed else None, rows[batch], lengths[batch],
                                self.copies.start(*outputs))
        self.writes.put(self._commit, writer, shard, table if embed else None, acc)
        tokens = int(lengths.sum())
        self.passages.inc(len(rows))
        self.tokens.inc(tokens)
        self.bytes.inc(tokens * self.store.d_model * self.store.torch_dtype.itemsize)
        if embed:
            self.embedded.inc(len(rows))
        if not self.config.overlap:
            self.writes.join()
        yield {"shard": shard, "passages": len(rows), "tokens": tokens, "seconds": time.perf_counter() - started}

    def _batches(self, table: pa.Table, lengths: np.ndarray, embed: bool, acc: dict):
        """("memory" | "text", indices, padded ids, mask) for the shard: its memory batches, then the text
        retriever's (tokenized here, on the padding thread, while the model runs)."""
        token_ids = table.column("token_ids").to_pylist()
        for batch in token_budget_batches(lengths, self.config.tokens_per_batch):
            input_ids, mask = pad_sequences([token_ids[i] for i in batch], self.pad_id)
            yield ("memory", batch, *self._pinned(input_ids, mask))
        if embed and self.embedder.text is not None:
            for batch, input_ids, mask in self.embedder.text_batches(table, acc):
                yield ("text", batch, *self._pinned(input_ids, mask))

    def _pinned(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.pin_memory() for t in tensors) if self.pin else tensors

    def _write_batch(self, writer, acc: dict | None, rows, lengths, copy: _HostCopy) -> None:
        """Writer thread: one memory batch into the shard's transaction (and its vectors into ``acc``)."""
        host = copy.wait()
        writer.write(rows, host[0], lengths)
        if acc is not None:
            self.embedder.collect(acc, rows, host[0], lengths, host[1] if len(host) > 1 else None)
        copy.release()

    def _collect_text(self, acc: dict, batch, copy: _HostCopy) -> None:
        self.embedder.collect_text(acc, batch, copy.wait()[0])
        copy.release()

    def _commit(self, writer, shard: int, table: pa.Table | None, acc: dict) -> None:
        """Writer thread: compress, checksum and commit the shard's memory, then its embeddings."""
        writer.__exit__(None, None, None)
        if table is not None:
            self.embedder.commit(shard, table, acc)

    def finish_bundle(self):
        self.writes.join()  # every shard of the bundle is committed before Beam counts the bundle done

    def teardown(self):
        writes = getattr(self, "writes", None)
        if writes is not None:
            writes.close()


class EncodeShards(beam.PTransform):
    """Shard index entries -> one summary per shard encoded now.

    Shards whose file cannot be read are listed in `failures_path` (JSON
    lines, rewritten by every run) instead of failing the whole job.
    """

    def __init__(self, shards_dir: str, store_path: str, config: EncoderConfig, fingerprint: str, failures_path: str,
                 lease_token: str | None = None, retriever=None, retriever_fingerprint: str | None = None,
                 continue_retriever: bool = False):
        super().__init__()
        self.fn = EncodeShardFn(shards_dir, store_path, config, fingerprint, lease_token, retriever,
                                retriever_fingerprint, continue_retriever)
        self.failures_path = failures_path

    def expand(self, entries):
        results = (
            entries
            | "SpreadShards" >> beam.Reshuffle()
            | "Encode" >> beam.ParDo(self.fn).with_outputs(FAILED, main="encoded")
        )
        _ = results[FAILED] | "WriteFailures" >> WriteLines(self.failures_path)
        return results.encoded
