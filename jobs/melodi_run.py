"""MELODI jobs: train a model on long documents, and pre-encode documents' long-term memory (compress)."""
from __future__ import annotations

import json
from collections.abc import Callable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from premem.jobs.remote import compress_job, dry_run_if_asked
from premem.jobs.run import pipeline_options
from premem.pipeline.read import Document, FieldNames, ReadDocumentsFn, Reject, expand_inputs, keep_first
from premem.storage.errors import PrememError
from premem.storage.lease import StoreLease


def load_documents(inputs: list[str], fields: FieldNames | None = None,
                   max_doc_chars: int = 64 << 20) -> tuple[list[Document], list[Reject]]:
    """Read documents in the driver with the same validation as `premem shard` (for training: a few books).

    Returns the documents in input order (first of each id kept) and the rejects with their reasons.
    """
    reader = ReadDocumentsFn(fields or FieldNames(), max_doc_chars)
    read: list[Document] = []
    rejects: list[Reject] = []
    for i, path in enumerate(expand_inputs(inputs)):
        for out in reader.process((i, path)):
            if isinstance(out, Document):
                read.append(out)
            else:
                rejects.append(out.value)
    docs, duplicates = keep_first(read)  # the dedupe rule of `premem shard` / `premem compress`
    return docs, rejects + duplicates


def run_train_melodi(inputs: list[str], out_dir: str, config, train_config, *, heldout: int = 2,
                     fields: FieldNames | None = None, log: Callable[[str], None] | None = None,
                     tokenizer: str | None = None) -> dict:
    """Documents -> trained MELODI checkpoint in `out_dir` (resumed if it holds one); the last `heldout`
    documents in input order are held out and their perplexity is reported. `tokenizer`: 'bytes' (default) or a
    Hugging Face tokenizer directory, saved into the checkpoint."""
    from premem.models.melodi_ckpt import check_tokenizer, make_tokenizer
    from premem.models.melodi_train import train

    tok = make_tokenizer(tokenizer)
    check_tokenizer(tok, config, f"--tokenizer {tokenizer or 'bytes'}")
    docs, rejects = load_documents(inputs, fields)
    if len(docs) <= heldout:
        raise PrememError(f"{len(docs)} usable documents ({len(rejects)} rejected) for --heldout {heldout}: "
                       f"give more documents or lower --heldout")
    tokens = [tok.encode_tensor(d.text) for d in docs]
    split = len(docs) - heldout
    data = {"inputs": expand_inputs(inputs), "documents": len(docs), "heldout_ids": [d.doc_id for d in docs[split:]],
            "train_tokens": int(sum(len(t) for t in tokens[:split])), "tokenizer": tok.to_dict()}
    result = train(config, train_config, tokens[:split], tokens[split:], out_dir, data_info=data, log=log,
                   tokenizer=tok)
    return {"steps": result.steps, "history": result.history, "heldout": result.final_heldout,
            "fingerprint": result.fingerprint, "seconds": result.seconds, "rejected": len(rejects),
            "documents": len(docs), "heldout_ids": data["heldout_ids"], "train_tokens": data["train_tokens"]}


def run_compress(inputs: list[str], store_path: str, checkpoint: str, *, docs_per_shard: int = 16,
                 docs_per_batch: int = 8, dtype: str = "float32", end_state: bool = True, device: str = "cpu",
                 fields: FieldNames | None = None, max_doc_chars: int = 64 << 20,
                 pipeline_args: list[str] | None = None, force_unlock: bool = False) -> dict:
    """Documents -> long-term memory store (one Beam element = one shard of documents); returns the summary.

    Rerunning on the same store skips committed shards; the store refuses another checkpoint or other inputs.
    The job holds the store's writer lease while it runs: a second compress job of the same store is refused.
    """
    dry_run_if_asked(pipeline_args, compress_job(inputs, store_path, checkpoint, docs_per_shard=docs_per_shard,
                                                 docs_per_batch=docs_per_batch, end_state=end_state, device=device,
                                                 fields=fields, max_doc_chars=max_doc_chars))
    with StoreLease(store_path, job="premem compress", force=force_unlock) as lease:
        return _run_compress(inputs, store_path, checkpoint, docs_per_shard=docs_per_shard,
                             docs_per_batch=docs_per_batch, dtype=dtype, end_state=end_state, device=device,
                             fields=fields, max_doc_chars=max_doc_chars, pipeline_args=pipeline_args,
                             lease_token=lease.token)


def _run_compress(inputs: list[str], store_path: str, checkpoint: str, *, docs_per_shard: int, docs_per_batch: int,
                  dtype: str, end_state: bool, device: str, fields: FieldNames | None, max_doc_chars: int,
                  pipeline_args: list[str] | None, lease_token: str | None = None) -> dict:
    from premem.models.melodi_ckpt import load_checkpoint
    from premem.pipeline.compress import CompressConfig, CompressDocuments
    from premem.storage.longterm import LongTermStore

    if docs_per_shard < 1 or docs_per_batch < 1:
        raise PrememError("--docs-per-shard and --docs-per-batch must be >= 1")
    files = expand_inputs(inputs)
    loaded = load_checkpoint(checkpoint)
    if not loaded.model.config.long_term_enabled:
        raise PrememError(f"checkpoint {checkpoint} has no long-term memory (use_long_term=False or L=0): "
                       f"nothing to compress")
    cfg = CompressConfig(checkpoint=checkpoint, fingerprint=loaded.fingerprint, W=loaded.model.config.W,
                         docs_per_shard=docs_per_shard,
                         docs_per_batch=docs_per_batch, end_state=end_state, device=device, lease_token=lease_token)
    store = LongTermStore.create(store_path, config=loaded.model.config.to_dict(), fingerprint=loaded.fingerprint,
                                 dtype=dtype, docs_per_shard=docs_per_shard, end_state=end_state,
                                 checkpoint={"path": checkpoint, "tokenizer": loaded.tokenizer.to_dict()},
                                 inputs=files)
    del loaded
    rejects_path = FileSystems.join(store.path, "rejects.jsonl")
    with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
        _ = pipeline | "Compress" >> CompressDocuments(files, store.path, cfg, rejects_path, fields, max_doc_chars)
    with FileSystems.open(rejects_path) as handle:
        rejects = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
    store = LongTermStore.open(store.path, read_only=False)
    store.finalize(rejected=len(rejects))
    summary = store.summary()
    summary["rejects"] = rejects
    summary["rejects_path"] = rejects_path
    return summary


def run_eval_melodi(checkpoint: str, inputs: list[str], *, segment_windows: int = 8, batch_size: int = 8,
                    max_tokens: int | None = None, device: str = "auto", precision: str = "fp32",
                    fields: FieldNames | None = None) -> dict:
    """Whole-document perplexity of a MELODI checkpoint, overall and by window position bucket. Documents shorter
    than one window are set aside (counted); none left is an error."""
    from premem.models.melodi_ckpt import load_checkpoint
    from premem.models.melodi_train import evaluate, resolve_device

    dev = resolve_device(device)
    if segment_windows < 1 or batch_size < 1:
        raise PrememError("--segment-windows and --batch-size must be >= 1")
    loaded = load_checkpoint(checkpoint, dev)
    W = loaded.model.config.W
    docs, rejects = load_documents(inputs, fields)
    tokens = [loaded.tokenizer.encode_tensor(d.text) for d in docs]
    kept = [t for t in tokens if len(t) >= W]
    if not kept:
        raise PrememError(f"none of the {len(docs)} documents ({len(rejects)} records rejected) has one window of "
                          f"W={W} tokens: give longer documents")
    ev = evaluate(loaded.model, kept, segment_windows=segment_windows, tokens_per_doc=max_tokens,
                  bf16=precision == "bf16" or (precision == "auto" and dev.type == "cuda"), batch_size=batch_size)
    return {**ev, "rejected": len(rejects), "too_short": len(tokens) - len(kept), "W": W, "device": str(dev),
            "fingerprint": loaded.fingerprint}
