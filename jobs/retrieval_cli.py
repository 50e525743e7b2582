"""`premem index`, `premem search`, `premem retrieve`: the retrieval index over a store and queries against it."""
from __future__ import annotations

import click

from premem.jobs.clitools import BeamCommand, PrememCommand, force_unlock_option, run_job


@click.command(cls=BeamCommand, short_help="Build the faiss index over a store's retrieval vectors.")
@click.argument("store")
@click.option("--factory", default="auto", show_default=True,
              help="Any faiss index_factory string (e.g. Flat, IVF1024,Flat, IVF4096,PQ32, HNSW32); auto picks one "
                   "from the row count and --max-memory.")
@click.option("--max-memory", default=None, help="Memory for the index's codes (e.g. 4GiB); guides --factory auto.")
@click.option("--train-size", type=int, default=None,
              help="Training vectors sampled from the store (default: what the factory needs).")
@click.option("--on-disk", is_flag=True, help="IVF only, local store: merge the inverted lists into one "
                                              "memory-mapped file instead of RAM.")
@click.option("--target-recall", default=0.95, show_default=True,
              help="nprobe / efSearch defaults are tuned to this recall@10 against exact search (one pass over "
                   "the embeddings); 0 skips tuning (nprobe = nlist/64).")
@force_unlock_option
@click.pass_context
def index(ctx, store, factory, max_memory, train_size, on_disk, target_recall, force_unlock):
    """Build the faiss index of STORE's retrieval embeddings (trained on a sample, added shard by shard)."""
    from premem.jobs.index import IndexConfig, build_index
    from premem.storage.faiss_index import parse_memory

    config = run_job(lambda: IndexConfig(factory=factory, max_memory=parse_memory(max_memory), train_size=train_size,
                                         on_disk=on_disk, target_recall=target_recall))
    record = run_job(build_index, store, config, ctx.args, log=_index_log, force_unlock=force_unlock)
    params = " and ".join(f"{k}={v}" for k, v in record["search_params"].items())
    click.echo(f"index:    {record['factory']} over {record['ntotal']} vectors (dim {record['dim']}, inner product), "
               f"{record['bytes'] / 2**20:.1f} MiB{' on disk' if record['on_disk'] else ''}")
    click.echo(f"trained:  on {record['train_size']} sampled vectors in {record['train_seconds']:.1f} s; "
               f"{record['shards']} shards added in {record['add_seconds']:.1f} s, merged in "
               f"{record['merge_seconds']:.1f} s; total {record['build_seconds']:.1f} s")
    if not params:
        click.echo(f"search:   nothing to tune ({record['factory']} scores every vector)")
    elif record["tuned_recall_at_k"] is None:
        click.echo(f"search:   defaults {params} (not tuned)")
    else:
        click.echo(f"search:   defaults {params}, tuned to recall@{record['tuned_k']} "
                   f"{record['tuned_recall_at_k']:.3f} against exact search"
                   + (f" on {record['tuned_on']}" if record.get("tuned_on") else ""))


def _index_log(message: str) -> None:
    """build_index's progress lines, on stderr; its closing "search defaults {...}" says what the summary's search line
    says, as a dict."""
    if not message.startswith("search defaults "):
        click.echo(message, err=True)


@click.command(cls=PrememCommand, short_help="Print the passages of a store that best match a query.")
@click.argument("store")
@click.argument("query", nargs=-1, required=True)
@click.option("-k", default=10, show_default=True, help="Passages to show.")
@click.option("--nprobe", type=int, default=None, help="IVF lists to visit (default: the index's tuned value).")
@click.option("--ef-search", type=int, default=None, help="HNSW search breadth (default: the tuned value).")
@click.option("--width", default=100, show_default=True, help="Characters of passage text to show.")
def search(store, query, k, nprobe, ef_search, width):
    """Print the passages of STORE that best match QUERY (score, row, title, start of text)."""
    from premem.models.retriever import query_encoder
    from premem.storage import MemoryStore

    text = " ".join(query)

    def run():
        opened = MemoryStore.open(store)
        result = opened.search([text], k, encoder=query_encoder(opened.manifest), nprobe=nprobe, ef_search=ef_search)
        rows = [int(r) for r in result.rows[0] if r >= 0]
        return result, opened.read_metadata(rows).to_pylist() if rows else []

    result, meta = run_job(run)
    for rank, (score, record) in enumerate(zip(result.scores[0], meta, strict=False), start=1):
        snippet = " ".join(str(record.get("text", "")).split())[:width]
        click.echo(f"{rank:>3}. {score:.4f}  row {record['row']}  {record.get('title', '')}: {snippet}")


@click.command(cls=BeamCommand, short_help="Write the top-k store rows of every question (a Beam job).")
@click.argument("store")
@click.argument("questions")
@click.option("--out", required=True, help="The neighbours Parquet file to write.")
@click.option("-k", default=20, show_default=True, help="Rows per question.")
@click.option("--id-field", default="id", show_default=True,
              help="Question id field (absent: first 16 hex digits of sha256 of the question).")
@click.option("--question-field", default="question", show_default=True)
@click.option("--batch-size", default=256, show_default=True, help="Questions encoded and searched together.")
@click.option("--nprobe", type=int, default=None)
@click.option("--ef-search", type=int, default=None)
@click.pass_context
def retrieve(ctx, store, questions, out, k, id_field, question_field, batch_size, nprobe, ef_search):
    """Top-k rows of STORE for every question of QUESTIONS (JSONL or FiD's JSON array), as a neighbours file."""
    from premem.jobs.retrieve import retrieve as run_retrieve
    from premem.pipeline.retrieve import RetrieveConfig

    config = RetrieveConfig(k=k, id_field=id_field, question_field=question_field, batch_size=batch_size,
                            nprobe=nprobe, ef_search=ef_search)
    summary = run_job(run_retrieve, store, questions, out, config, ctx.args)
    click.echo(f"{summary['questions']} questions -> {summary['k']} rows each in {summary['out']}"
               + (f"; {summary['rejected']} rejected (see {summary['rejects_path']})" if summary["rejected"] else ""))
    for reason, count in summary["rejected_by_reason"].items():
        click.echo(f"  rejected, {reason}: {count}")
