"""Runnable jobs: build a Beam pipeline from a user's request, run it, report."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from premem.jobs.remote import dry_run_if_asked, encode_job
from premem.models.retriever import RetrieverConfig, memory_mean_info, windows_per_row
from premem.pipeline.encode import EncoderConfig, EncodeShards, retriever_continues
from premem.pipeline.read import expand_inputs
from premem.pipeline.shard import INDEX_FORMAT, ShardConfig, ShardCorpus, read_index
from premem.storage import MemoryStore, layout
from premem.storage.embeddings import (
    discard_shard_embeddings,
    embedding_committed_shards,
    prepare_embeddings,
    retriever_info,
)
from premem.storage.errors import InputError, PrememError
from premem.storage.lease import DEFAULT_TTL, StoreLease
from premem.storage.verify import verify_store


def pipeline_options(pipeline_args: list[str] | None) -> PipelineOptions:
    return PipelineOptions(list(pipeline_args or []))


def run_shard(inputs: list[str], out_dir: str, config: ShardConfig, pipeline_args: list[str] | None = None) -> dict:
    """Corpus files -> passage shards; returns the index written to `out_dir`."""
    from premem.models import load_tokenizer, tokenizer_fingerprint

    config.check()
    files = expand_inputs(inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    header = {
        "format": INDEX_FORMAT,
        "inputs": files,
        "tokenizer": config.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "template": config.template,
        "passage_words": config.passage_words,
        "max_tokens": config.max_tokens,
        "shard_size": config.shard_size,
        "fields": dataclasses.asdict(config.fields),
    }
    def build(pipeline):
        _ = pipeline | "Shard" >> ShardCorpus(files, out_dir, config, header)

    dry_run_if_asked(pipeline_args, build)
    with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
        build(pipeline)
    return read_index(out_dir)


def run_encode(shards_dir: str, store_path: str, config: EncoderConfig, *, dtype: str = "bfloat16",
               codec: str = "raw", token_chunk: int | None = None, zstd_level: int = 1, pipeline_args: list[str] | None = None,
               progress: Callable[[int, int], None] | None = None, repair: bool = False,
               force_unlock: bool = False, lease_ttl: float | None = None, retriever=None, quantize=None) -> dict:
    """Passage shards -> committed memory store; returns the store summary.

    Shards already committed in the store (same encoder fingerprint) are
    skipped and partly written ones are cleared and redone, so rerunning after
    a crash finishes the job. The job holds the store's writer lease while it
    runs (a second writer is refused); `repair` first verifies every chunk and
    redoes the shards that fail.
    """
    codebook = None  # `quantize` (storage.quantize.QuantizeConfig): codebook trained before anything is written
    if token_chunk is None:
        token_chunk = layout.CODE_TOKEN_CHUNK if quantize is not None and quantize.enabled else layout.TOKEN_CHUNK
    if quantize is not None and quantize.enabled:
        from premem.pipeline.quantize import encoder_sample, prepare_codec

        index = read_index(shards_dir)
        codebook = prepare_codec(store_path, config.describe()["d_model"], quantize,
                                 lambda spec: encoder_sample(shards_dir, index, config, spec, dtype))
    dry_run_if_asked(pipeline_args, encode_job(shards_dir, store_path, config, retriever))
    lease = StoreLease(store_path, job="premem encode", ttl=lease_ttl or DEFAULT_TTL, force=force_unlock)
    with lease:
        summary = _run_encode(shards_dir, store_path, config, dtype=dtype, codec=codec, token_chunk=token_chunk,
                              zstd_level=zstd_level,
                              pipeline_args=pipeline_args, progress=progress, repair=repair, lease=lease,
                              retriever=retriever, codebook=codebook)
    if lease.taken_over is not None:
        summary["run"]["lease_taken_over"] = lease.taken_over.describe()
    return summary


def _run_encode(shards_dir: str, store_path: str, config: EncoderConfig, *, dtype: str, codec: str,
                token_chunk: int, zstd_level: int,
                pipeline_args: list[str] | None, progress: Callable[[int, int], None] | None, repair: bool,
                lease, retriever=None, codebook: tuple | None = None) -> dict:
    index = read_index(shards_dir)
    if index["rows"] == 0:
        raise PrememError(f"{shards_dir} holds no passages (all {index['records']['input']} input records were "
                       f"rejected; see rejects.jsonl there)")
    if config.template != index["template"]:
        raise PrememError(f"the shards were rendered with template {index['template']!r} but the encoder is asked for "
                       f"{config.template!r}: pass --template to match or re-run `premem shard`")
    info = config.describe()  # from the checkpoint files: the model itself is built only in the workers
    encoder_tokenizer = info["tokenizer_fingerprint"]
    if encoder_tokenizer != index["tokenizer_fingerprint"]:
        raise PrememError(f"the shards in {shards_dir} were tokenized by another tokenizer (from {index['tokenizer']}, "
                       f"fingerprint {index['tokenizer_fingerprint'][:12]}) than {config.checkpoint}'s "
                       f"({encoder_tokenizer[:12]}): re-run `premem shard --tokenizer {config.checkpoint}`")
    fingerprint = info["fingerprint"]
    store = MemoryStore.create(
        store_path, rows=index["rows"], max_tokens=index["max_tokens"], d_model=info["d_model"], dtype=dtype,
        shard_size=index["shard_size"], fingerprint=fingerprint, encoder=info, codec=codec, token_chunk=token_chunk,
        zstd_level=zstd_level,
        extra={"shards_dir": shards_dir, "records": index["records"], "passage_words": _passage_words(index),
               "compute_dtype": config.compute_dtype},
        quantize=codebook and codebook[0],
    )
    if codebook and codebook[1]:  # trained now: stored before any shard is written
        store.set_codec(*codebook[1])
    repaired = _discard_bad_shards(store) if repair else []
    committed = store.committed_shards()
    todo = [entry for entry in index["shards"] if entry["shard"] not in committed]
    redone = sorted(store.partial_shards() - set(repaired))
    for shard in redone:  # left behind by a crash or a failed write: cleared, then written from scratch
        store.discard_shard(shard)
    stats = {"shards": index["num_shards"], "skipped": index["num_shards"] - len(todo), "encoded": len(todo),
             "redone": len(redone), "repaired": len(repaired), "repaired_shards": repaired,
             "new": len(todo) - len(redone) - len(repaired)}
    retriever_fingerprint, embed_only = None, set()
    if retriever is not None:  # a RetrieverConfig: retrieval embeddings in the same pass, or alone where memory is done
        retriever_fingerprint, embed_only = prepare_store_embeddings(store, retriever, committed)
        todo += [entry for entry in index["shards"] if entry["shard"] in embed_only]
    stats["embedded_only"] = len(embed_only)
    continued = retriever_continues(retriever, retriever_info(store), info, int(index["max_tokens"]))
    stats["retriever_continued"] = continued  # layers [K, L) run on the memory states, not the whole retriever
    if todo:
        watcher = watch_commits(store, index["num_shards"], progress) if progress else contextlib.nullcontext()
        failures_path = FileSystems.join(store_path, layout.FAILURES)
        with watcher, beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
            _ = (
                pipeline
                | "Shards" >> beam.Create(todo)
                | "EncodeShards" >> EncodeShards(shards_dir, store_path, config, fingerprint, failures_path,
                                                 lease_token=lease.token, retriever=retriever,
                                                 retriever_fingerprint=retriever_fingerprint,
                                                 continue_retriever=continued)
            )
        with FileSystems.open(failures_path) as handle:
            failures = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
        if failures:
            store.finalize()
            raise PrememError(f"{len(failures)} of {len(todo)} shards could not be encoded, the others are committed "
                           f"(all reasons in {failures_path}); first: {failures[0]['error']}")
    store.finalize()
    summary = store.summary()
    summary["run"] = stats
    return summary


def _passage_words(index: dict) -> int:
    """Words of the longest passage the shards can hold: the split length, or (--passage-words 0: passages kept as
    they came) the longest one the shard step saw."""
    return int(index["passage_words"]) or max((int(s.get("max_words", 0)) for s in index["shards"]), default=0)


def _discard_bad_shards(store: MemoryStore) -> list[int]:
    """`--repair`: verify every committed shard (structure and checksums) and forget the bad ones."""
    report = verify_store(store.path)
    bad = sorted(s for s in report.bad_shards if s not in report.uncommitted_shards)
    for shard in bad:  # the whole shard is redone: memory, lengths, metadata and its retrieval embeddings
        store.discard_shard(shard)
        discard_shard_embeddings(store, shard)
    return bad


def _retriever_record(config: RetrieverConfig, memory_fingerprint: str, d_model: int) -> dict:
    """The manifest record of the retriever (a text retriever's from its checkpoint files, no model built)."""
    if config.is_memory_mean:
        if config.window_words:
            raise InputError("--retriever-window-words needs a retriever checkpoint, not memory-mean")
        return memory_mean_info(memory_fingerprint, d_model)
    return config.text_info()


def prepare_store_embeddings(store, config: RetrieverConfig, memory_committed: set[int]) -> tuple[str, set[int]]:
    """Create (or check) the store's embeddings for ``config``; returns the retriever fingerprint and the shards
    whose memory is committed but whose embeddings are not (they get embeddings only, no memory re-encode)."""
    info = _retriever_record(config, store.fingerprint, store.d_model)
    if info.get("window_words"):
        passage_words = int((store.manifest.get("extra") or {}).get("passage_words", 100))
        info["vectors_per_row"] = windows_per_row(passage_words, int(info["window_words"]))
    prepare_embeddings(store, info)
    return info["fingerprint"], set(memory_committed) - embedding_committed_shards(store)


@contextlib.contextmanager
def watch_commits(store, total: int, progress: Callable[[int, int], None], every: float = 1.0):
    """Reports committed shards from the store itself, so it works with any runner."""
    stop = threading.Event()

    def poll():
        while not stop.wait(every):
            progress(len(store.committed_shards()), total)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress(len(store.committed_shards()), total)
