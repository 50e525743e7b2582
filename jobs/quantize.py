"""Compressed memory from the command line: the `--quantize` options of `premem encode`, and `premem quantize`
(an existing store -> a quantized copy, without re-encoding)."""
from __future__ import annotations

import contextlib
import functools

import click

from premem.jobs.clitools import BeamCommand, ProgressBar, force_unlock_option, run_job


def quantize_options(fn):
    """--quantize none|int8|pq and the codebook's options (storage/quantize.py)."""
    options = [
        click.option("--quantize", "quantize", type=click.Choice(["none", "int8", "pq"]), default="none",
                     show_default=True,
                     help="Store codes instead of states: int8 (one absmax scale per token, 2x smaller than bf16) or "
                          "pq (faiss product quantization, d/8 bytes per token = 16x by default), decoded on read."),
        click.option("--pq-bytes", type=int, default=None,
                     help="pq: bytes per token (must divide d; default d/8, 16x smaller than bf16)."),
        click.option("--pq-factory", default=None,
                     help="pq: a faiss index_factory codec (default OPQ{bytes},PQ{bytes}x8; e.g. PQ48x8, PQ24x16, SQ4)."),
        click.option("--quantize-seed", default=0, show_default=True, help="Seed of the codebook's training sample."),
        click.option("--codebook-tokens", default=65536, show_default=True,
                     help="Memory vectors the codebook trains on (a seeded sample of shards; 8192 more are held out "
                          "to measure its fidelity)."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def quantize_request(quantize: str, pq_bytes, pq_factory, quantize_seed: int, codebook_tokens: int):
    from premem.storage.quantize import QuantizeConfig

    return QuantizeConfig(codec=quantize, pq_bytes=pq_bytes, factory=pq_factory, seed=quantize_seed,
                          train_tokens=codebook_tokens)


def run_quantize(source: str, out: str, request, *, pipeline_args=None, progress=None, force_unlock: bool = False,
                 lease_ttl: float | None = None) -> dict:
    """Store -> quantized store (a Beam job, one shard per element, resumable, holding the writer lease of ``out``);
    metadata and retrieval embeddings are kept.  Everything that can be refused is refused before anything is
    written."""
    import apache_beam as beam

    from premem.jobs.run import pipeline_options, watch_commits
    from premem.pipeline.quantize import QuantizeShards, prepare_codec, store_sample
    from premem.storage import MemoryStore, kv, layout
    from premem.storage.embeddings import prepare_embeddings, retriever_info
    from premem.storage.errors import InputError
    from premem.storage.lease import DEFAULT_TTL, StoreLease

    src = MemoryStore.open(source)
    if src.quantize:
        raise InputError(f"store {src.path} is already quantized ({src.quantize['codec']}, "
                         f"{src.quantize.get('factory') or 'int8'}): quantize the unquantized store it was made from")
    if not request.enabled:
        raise InputError("premem quantize needs --quantize int8 or pq")
    if kv.normalize_path(out) == src.path:
        raise InputError(f"--out {out} is the source store: pass a new directory")
    if len(src.committed_shards()) != src.num_shards:
        raise InputError(f"store {src.path} is incomplete ({len(src.committed_shards())}/{src.num_shards} shards "
                         f"committed): finish it with `premem encode` first")
    spec, trained = prepare_codec(out, src.d_model, request, lambda spec: store_sample(src, spec))
    codec = (src.manifest.get("codec") or {})
    lease = StoreLease(out, job="premem quantize", ttl=lease_ttl or DEFAULT_TTL, force=force_unlock)
    with lease:
        dst = MemoryStore.create(
            out, rows=src.rows, max_tokens=src.max_tokens, d_model=src.d_model, dtype=src.dtype,
            shard_size=src.shard_size, fingerprint=src.encoder_fingerprint, encoder=src.encoder,
            codec=codec.get("name", "zstd"), token_chunk=layout.CODE_TOKEN_CHUNK,
            zstd_level=int(codec.get("zstd_level", 1)), extra={**src.manifest.get("extra", {}), "quantized_from": src.path},
            quantize=spec)
        if trained:
            dst.set_codec(*trained)
        info = retriever_info(src)
        if info is not None:
            from premem.models.retriever import MEMORY_MEAN, memory_mean_info

            if info.get("kind") == MEMORY_MEAN:
                info = memory_mean_info(dst.fingerprint, dst.d_model)
            prepare_embeddings(dst, info)
        for shard in sorted(dst.partial_shards()):
            dst.discard_shard(shard)
        todo = sorted(set(range(dst.num_shards)) - dst.committed_shards())
        if info is not None:
            from premem.storage.embeddings import embedding_committed_shards

            todo = sorted(set(todo) | (set(range(dst.num_shards)) - embedding_committed_shards(dst)))
        if todo:
            watcher = watch_commits(dst, dst.num_shards, progress) if progress else contextlib.nullcontext()
            with watcher, beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
                _ = pipeline | "Shards" >> beam.Create(todo) | "Quantize" >> QuantizeShards(src.path, dst.path, lease.token)
        dst.finalize()
    summary = dst.summary()
    summary["run"] = {"shards": dst.num_shards, "quantized": len(todo), "skipped": dst.num_shards - len(todo)}
    return summary


@click.command("quantize", cls=BeamCommand, short_help="Convert a memory store into a quantized one (int8 / pq codes).")
@click.argument("store")
@click.option("--out", required=True, help="The quantized store to create or resume (local or gs://).")
@quantize_options
@click.option("--progress/--no-progress", default=True, show_default=True)
@force_unlock_option
@click.pass_context
def quantize_command(ctx, store, out, quantize, pq_bytes, pq_factory, quantize_seed, codebook_tokens, progress,
                     force_unlock):
    """Re-write STORE's memory as codes into --out, without re-encoding: the same codes as `premem encode --quantize`
    of the same corpus; metadata and retrieval embeddings are kept (memory-mean ones recomputed)."""
    request = quantize_request(quantize, pq_bytes, pq_factory, quantize_seed, codebook_tokens)
    with ProgressBar(progress) as report:
        summary = run_job(run_quantize, store, out, request, pipeline_args=ctx.args, progress=report,
                          force_unlock=force_unlock)
    echo_quantize(summary)
    click.echo(f"shards: {summary['run']['shards']} ({summary['run']['skipped']} already done, skipped; "
               f"{summary['run']['quantized']} quantized) into {summary['path']}")


def echo_quantize(summary: dict) -> None:
    """The codec line of a store summary (`premem info`, `premem encode`, `premem quantize`)."""
    q = summary.get("quantize")
    if not q:
        return
    fid = q.get("fidelity") or {}
    click.echo(f"codec:    {q['codec']} ({q.get('factory') or 'absmax per token + fp16 scale'}), "
               f"{q['bytes_per_token']} B/token; held-out fidelity at quantization ({fid.get('tokens')} tokens): "
               f"cosine median {fid.get('cosine_median')}, p1 {fid.get('cosine_p1')}, min {fid.get('cosine_min')}, "
               f"relative MSE {fid.get('relative_mse')}")
