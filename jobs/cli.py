"""The `premem` command line.

Commands that run a Beam pipeline hand Apache Beam's own pipeline options to it unchanged, so any pipeline option
works (`--runner=DataflowRunner --project=... --region=...`, `--direct_num_workers 2
--direct_running_mode=multi_processing`); an option neither premem nor Beam knows is an error naming the nearest one.
Nothing heavy (torch, transformers, Beam) is imported before a command runs, so `--help` is instant.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from premem.jobs.clitools import (
    DEFAULT_TEMPLATE_TEXT,
    BeamCommand,
    PrememGroup,
    ProgressBar,
    force_unlock_option,
    listing,
    quiet_beam,
    run_job,
)
from premem.jobs.quantize import echo_quantize, quantize_options, quantize_request

_HINTS = "premem.summary_hints"  # ctx.meta key: False when a command runs inside `premem demo`


@click.group(cls=PrememGroup)
@click.version_option(package_name="premem")
def main() -> None:
    """premem: pre-encode text corpora into stored memory for LUMEN and MELODI.

    The commands in the order data flows: shard -> encode -> index -> retrieve / search -> train-lumen;
    train-melodi -> eval-melodi / compress for MELODI; info and verify on any store.
    """
    quiet_beam()


@main.command(cls=BeamCommand, short_help="Split corpus files into tokenized passage shards.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Directory (local or gs://) for the Parquet passage shards.")
@click.option("--tokenizer", required=True, help="Checkpoint directory whose tokenizer to use, or 'minilm'.")
@click.option("--passage-words", default=100, show_default=True,
              help="Words per passage (DPR-style split; 0: keep each record as one passage, e.g. DPR's psgs_w100.tsv).")
@click.option("--max-tokens", default=256, show_default=True, help="Tokens kept per passage (truncation).")
@click.option("--shard-size", default=1024, show_default=True, help="Passages per shard.")
@click.option("--template", default=None, show_default=DEFAULT_TEMPLATE_TEXT,
              help="Passage rendering; only {title} and {text}.")
@click.option("--id-field", default="id", show_default=True)
@click.option("--title-field", default="title", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--max-doc-chars", default=64 << 20, show_default=True,
              help="Longer documents are rejected (with their reason) rather than read.")
@click.pass_context
def shard(ctx, inputs, out, tokenizer, passage_words, max_tokens, shard_size, template, id_field, title_field,
          text_field, max_doc_chars):
    """Split INPUTS (.jsonl/.parquet/.tsv/.txt files, dirs, globs; local or gs://) into tokenized passage shards."""
    from premem.jobs.run import run_shard
    from premem.pipeline.read import FieldNames
    from premem.pipeline.shard import ShardConfig

    config = ShardConfig(tokenizer=tokenizer, passage_words=passage_words, max_tokens=max_tokens,
                         shard_size=shard_size, max_doc_chars=max_doc_chars,
                         fields=FieldNames(id=id_field, title=title_field, text=text_field),
                         **({} if template is None else {"template": template}))
    index = run_job(run_shard, list(inputs), out, config, ctx.args)
    records = index["records"]
    click.echo(f"{records['input']} input records = {records['accepted']} accepted + {records['rejected']} rejected"
               + (f" (see {out}/rejects.jsonl)" if records["rejected"] else ""))
    for reason, count in records["rejected_by_reason"].items():
        click.echo(f"  rejected, {reason}: {count}")
    truncated = sum(s["truncated"] for s in index["shards"])
    click.echo(f"{index['rows']} passages, {index['tokens']} tokens ({truncated} truncated to {max_tokens}) "
               f"in {index['num_shards']} shards under {out}")


@main.command(cls=BeamCommand, short_help="Encode passage shards into a memory store (first K layers).")
@click.argument("shards")
@click.option("--store", required=True, help="Store directory (local or gs://) to create or resume.")
@click.option("--encoder", required=True, help="Checkpoint directory (local or gs://), or 'minilm'.")
@click.option("--memory-layers", "-k", type=int, help="K: frozen layers [0, K) whose output is stored.")
@click.option("--live-fraction", type=float, help="α: K = round((1-α)·L), instead of --memory-layers.")
@click.option("--template", default=None, show_default=DEFAULT_TEMPLATE_TEXT,
              help="Passage rendering; only {title} and {text}.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Stored dtype.")
@click.option("--compute-dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="auto: bfloat16 on GPU and on CPUs with AMX/AVX512-BF16, else float32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--tokens-per-batch", default=16384, show_default=True,
              help="Padded tokens per batch (batches are formed by this budget over length-sorted passages).")
@click.option("--codec", type=click.Choice(["raw", "zstd"]), default="raw", show_default=True,
              help="raw: bytes + crc32c, ~1.07x the real tokens on disk, read without decoding (training reads); "
                   "zstd: smaller on disk (e.g. buckets), every read decompresses.")
@click.option("--token-chunk", type=int, default=None,
              help="Tokens per stored chunk: reads fetch a passage's chunks, so < T padding tokens per passage "
                   "(default 32; 16 with --quantize, whose chunks are smaller).")
@click.option("--zstd-level", default=1, show_default=True, help="With --codec zstd.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--repair", is_flag=True,
              help="First verify every committed shard (as `premem verify` does) and redo the ones that fail.")
@force_unlock_option
@click.option("--retriever", default="minilm", show_default=True,
              help="Retrieval embeddings computed in the same pass: a sentence-embedding checkpoint (directory, "
                   "gs://, 'minilm'), 'memory-mean' (mean of the stored memory states) or 'none'.")
@click.option("--retriever-pooling", type=click.Choice(["auto", "mean", "cls", "max"]), default="auto",
              show_default=True, help="auto: the checkpoint's 1_Pooling/config.json, else mean.")
@click.option("--retriever-max-length", type=int, default=None,
              help="Retriever tokens per passage, longer ones truncated (default: the checkpoint's max_seq_length).")
@click.option("--retriever-window-words", type=int, default=0, show_default=True,
              help="> 0: one retrieval vector per window of this many words (stride half), a row scored by its "
                   "best window; finds short quotes far better than one vector per passage.")
@click.option("--retriever-template", default="{title}: {text}", show_default=True,
              help="Retriever input; equal to --template, with the encoder's checkpoint and --max-tokens as its max "
                   "length, the retriever continues from the stored layer-K states instead of re-running them.")
@quantize_options
@click.pass_context
def encode(ctx, shards, store, encoder, memory_layers, live_fraction, template, dtype, compute_dtype, device,
           tokens_per_batch, codec, token_chunk, zstd_level, progress, repair, force_unlock, retriever, retriever_pooling,
           retriever_max_length, retriever_window_words, retriever_template, quantize, pq_bytes, pq_factory,
           quantize_seed, codebook_tokens):
    """Encode the passage SHARDS into a memory STORE with the first K layers of an encoder."""
    from premem.jobs.run import run_encode
    from premem.pipeline.encode import EncoderConfig

    config = EncoderConfig(checkpoint=encoder, memory_layers=memory_layers, live_fraction=live_fraction,
                           device=device, compute_dtype=compute_dtype, tokens_per_batch=tokens_per_batch,
                           **({} if template is None else {"template": template}))
    from premem.models.retriever import NONE, RetrieverConfig

    retriever_config = None if retriever == NONE else RetrieverConfig(
        name=retriever, pooling=retriever_pooling, max_length=retriever_max_length,
        window_words=retriever_window_words, template=retriever_template)
    with ProgressBar(progress) as report:
        summary = run_job(run_encode, shards, store, config, dtype=dtype, codec=codec, token_chunk=token_chunk,
                          zstd_level=zstd_level, pipeline_args=ctx.args, progress=report, repair=repair,
                          force_unlock=force_unlock, retriever=retriever_config,
                          quantize=quantize_request(quantize, pq_bytes, pq_factory, quantize_seed, codebook_tokens))
    run = summary["run"]
    if run.get("lease_taken_over"):
        click.echo(f"took over the writer lease of a dead job ({run['lease_taken_over']})")
    click.echo(f"shards: {run['shards']} ({run['skipped']} already committed, skipped; {run['encoded']} encoded: "
               f"{run['redone']} redone after a partial write, {run['repaired']} repaired, {run['new']} new)")
    if run.get("embedded_only"):
        click.echo(f"retrieval embeddings: memory of {run['embedded_only']} shards was already complete, computed "
                   f"only their embeddings ({retriever})")
    if run.get("retriever_continued"):
        click.echo(f"retrieval embeddings: {retriever} continued from the layer-K memory states (same input)")
    if repair:
        listed = f" ({run['repaired_shards']})" if run["repaired"] else ""  # tests/test_verify.py pins "([1])"
        click.echo(f"repair: {run['repaired']} bad shards redone{listed}")
    if ctx.meta.get(_HINTS, True):  # `premem demo` prints the summary once its index is built
        from premem.storage import MemoryStore

        _echo_summary(run_job(lambda: _store_summary(MemoryStore.open(store), summary)))


@main.command(short_help="Summarise a store: rows, tokens, encoder, vectors, index.")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(store, as_json):
    """Summarise a memory STORE: rows, tokens, bytes per token, encoder, retrieval embeddings and index."""
    from premem.storage import open_store

    summary = run_job(lambda: _store_summary(open_store(store)))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    elif summary.get("kind") == "melodi-longterm":
        from premem.jobs.melodi_cli import echo_longterm_summary

        echo_longterm_summary(summary)
    else:
        _echo_summary(summary)


def _store_summary(store, summary: dict | None = None) -> dict:
    """The store's summary (or ``summary``, one a job returned), plus what its retrieval embeddings and faiss index
    hold (LUMEN memory stores)."""
    summary = dict(summary or store.summary())
    if summary.get("kind") == "melodi-longterm":
        return summary
    from premem.storage.embeddings import embedding_committed_shards, retriever_info

    retriever = retriever_info(store)
    if retriever is not None:
        summary["embeddings"] = {"retriever": retriever, "committed_shards": len(embedding_committed_shards(store))}
    index = store.manifest.get("index")
    if index:
        stale = retriever is None or (index.get("retriever") or {}).get("fingerprint") != retriever.get("fingerprint")
        summary["index"] = {**index, "stale": stale}
    if summary["committed_shards"] < summary["num_shards"]:
        summary["progress"] = _progress(store.commits.read_all(), summary)
    return summary


def _progress(markers: list[dict], summary: dict) -> dict | None:
    """A store being written (e.g. by a Dataflow job): its rate from the commit markers' times, so progress shows on
    any machine that can read the store."""
    from datetime import datetime

    timed = sorted((datetime.fromisoformat(m["committed_at"]), int(m["stop"]) - int(m["start"]))
                   for m in markers if m.get("committed_at"))
    if len(timed) < 2 or timed[-1][0] == timed[0][0]:
        return None
    rate = sum(rows for _, rows in timed[1:]) / (timed[-1][0] - timed[0][0]).total_seconds()  # after the first commit
    return {"rows_per_second": rate, "last_commit": timed[-1][0].isoformat(),
            "seconds_left": (summary["rows"] - summary["committed_rows"]) / rate}


def _echo_summary(s: dict, hints: bool = True) -> None:
    """The store summary, one sentence-like line per part; ``hints``: say which command adds what is missing."""
    enc = s.get("encoder", {})
    click.echo(f"store:    {s['path']}")
    click.echo(f"rows:     {s['committed_rows']}/{s['rows']} committed in {s['committed_shards']}/{s['num_shards']} shards"
               + (" (complete)" if s["committed_shards"] == s["num_shards"] else " (INCOMPLETE: resume with `premem encode`)"))
    if s.get("progress"):
        p = s["progress"]
        click.echo(f"progress: {p['rows_per_second']:.1f} rows/s between the first and the last commit "
                   f"({p['last_commit']}); ~{p['seconds_left']:.0f} s to go at that rate if the job still runs")
    click.echo(f"tokens:   {s['tokens']} (max {s['max_tokens']} per passage), d={s['d_model']}, {s['dtype']}")
    on_disk = s.get("memory_bytes_on_disk")
    click.echo(f"bytes:    {s['logical_bytes'] / 2**20:.1f} MiB of real tokens "
               f"({s['logical_bytes_per_token']} B/token in "
               f"{s['quantize']['codec'] + ' codes' if s.get('quantize') else s['dtype']})"
               + (f", memory {on_disk / 2**20:.1f} MiB on disk ({s['bytes_per_token']:.0f} B/token incl. padding, "
                  f"codec {s.get('codec', 'zstd')})" if on_disk else ""))
    echo_quantize(s)
    click.echo(f"encoder:  {enc.get('checkpoint')} ({enc.get('arch')}, layers [0, {enc.get('memory_layers')}) "
               f"of {enc.get('num_layers')}), fingerprint {s['fingerprint'][:16]}")
    emb = s.get("embeddings")
    if emb is None:
        click.echo("vectors:  none" + (" (add them with `premem encode ... --retriever minilm`)" if hints else ""))
    else:
        r = emb["retriever"]
        per = f"up to {r.get('vectors_per_row')} per passage ({r.get('window_words')}-word windows)" if r.get("window_words") \
            else "1 per passage"
        click.echo(f"vectors:  {r.get('checkpoint') or r.get('kind')} dim {r.get('dim')}, {per}, in "
                   f"{emb['committed_shards']}/{s['num_shards']} shards")
    index = s.get("index")
    if index is None:
        click.echo("index:    none" + (f" (build it with `premem index {s['path']}`)" if emb and hints else ""))
    else:
        click.echo(f"index:    {index.get('factory')} over {index.get('ntotal')} vectors, {index.get('bytes', 0) / 2**20:.1f} MiB"
                   + (f"; STALE: built from other embeddings than the store holds, rebuild with `premem index {s['path']}`"
                      if index["stale"] else ""))


@main.command(short_help="Shakespeare end to end: shard, encode, index, search.")
@click.option("--workdir", default="out/demo", show_default=True, help="Where the corpus, shards and store go.")
@click.option("--plays", type=int, default=None, help="Only the first N plays (default: all 37).")
@click.option("--memory-layers", "-k", default=4, show_default=True)
@click.option("--window-words", default=16, show_default=True,
              help="Retrieval vectors per window of this many words (0: one per passage).")
@click.option("--lines", default=300, show_default=True, help="Random lines searched for their passage.")
@click.pass_context
def demo(ctx, workdir, plays, memory_layers, window_words, lines):
    """The embedded default: Shakespeare's plays -> shards -> MiniLM memory (K=4 of 6) and retrieval index -> reads."""
    import numpy as np

    from premem.jobs.retrieval_cli import index
    from premem.jobs.sample import lines_in_passages, write_plays_jsonl
    from premem.storage import MemoryStore

    work = Path(workdir)
    corpus = write_plays_jsonl(work / "plays.jsonl", limit=plays)
    click.echo(f"corpus: {corpus}")
    ctx.invoke(shard, inputs=(str(corpus),), out=str(work / "shards"), tokenizer="minilm")
    ctx.meta[_HINTS] = False  # the summary (with its "add vectors / build the index" hints) waits for the index
    ctx.invoke(encode, shards=str(work / "shards"), store=str(work / "store"), encoder="minilm",
               memory_layers=memory_layers, retriever="minilm", retriever_window_words=window_words)
    ctx.invoke(index, store=str(work / "store"), factory="Flat")  # ~10^5 vectors: exact search is cheap
    store = MemoryStore.open(str(work / "store"))
    _echo_summary(_store_summary(store))
    rows = [0, store.rows // 2, store.rows - 1]
    batch = store.read(rows)
    meta = store.read_metadata(rows).to_pylist()
    click.echo(f"sample read of rows {listing(rows)}: states {' x '.join(map(str, batch.states.shape))} "
               f"{batch.states.dtype}, mask {' x '.join(map(str, batch.mask.shape))}, lengths "
               f"{listing(batch.lengths.tolist())} tokens")
    for record in meta:
        click.echo(f"  row {record['row']}: {record['title']} #{record['passage']}: {record['text'][:70]}...")

    every = store.read_metadata(np.arange(store.rows)).to_pylist()
    pairs = lines_in_passages(corpus, {(m["doc_id"], m["passage"]): m["row"] for m in every}, count=lines)
    from premem.models.retriever import query_encoder

    found = store.search([line for line, _ in pairs], 10, encoder=query_encoder(store.manifest)).rows.tolist()
    top10 = sum(row in hits for (_, row), hits in zip(pairs, found, strict=True))
    click.echo(f"retrieval: {top10}/{len(pairs)} random lines ({top10 / max(len(pairs), 1):.1%}) find their own "
               "passage in the top 10")
    line, row = pairs[0]
    click.echo(f'  e.g. "{line}" -> rows {", ".join(map(str, found[0][:5]))}, ... (its passage: row {row})')


# Commands of the other capabilities live in their own modules.
# (each: `from premem.jobs.<module> import <command>; main.add_command(<command>)`)
from premem.jobs.verify_cli import verify  # noqa: E402

main.add_command(verify)
from premem.jobs.retrieval_cli import index, retrieve, search  # noqa: E402

main.add_command(index)
main.add_command(search)
main.add_command(retrieve)
from premem.jobs.melodi_cli import compress, eval_melodi, train_melodi  # noqa: E402

main.add_command(train_melodi)
main.add_command(eval_melodi)
main.add_command(compress)
from premem.jobs.lumen_cli import lumen_demo_command, train_lumen_command  # noqa: E402

main.add_command(train_lumen_command)
main.add_command(lumen_demo_command)
from premem.jobs.quantize import quantize_command  # noqa: E402

main.add_command(quantize_command)


if __name__ == "__main__":
    main(prog_name="premem")
