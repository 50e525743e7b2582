"""`premem retrieve`: the top-k store rows for every question of a question file, as a Beam job.

Workers (premem.pipeline.retrieve) parse, encode and search the questions; the driver gathers the results into one
neighbours Parquet file (premem.storage.neighbors) sorted by question id, and every rejected line with its reason
into ``OUT.rejects.jsonl``.
"""
from __future__ import annotations

import json
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from premem.jobs.remote import dry_run_if_asked
from premem.jobs.run import pipeline_options
from premem.models.retriever import query_encoder
from premem.pipeline.objects import WriteLines, WriteParquetParts, delete_dir
from premem.pipeline.retrieve import REJECTED, ReadQuestions, RetrieveConfig, SearchQuestionsFn
from premem.storage import MemoryStore
from premem.storage.errors import RetrievalError
from premem.storage.faiss_index import index_info
from premem.storage.neighbors import SCHEMA, write_neighbors


def retrieve(store_path: str, questions_path: str, out_path: str, config: RetrieveConfig | None = None,
             pipeline_args: list[str] | None = None) -> dict:
    """Writes the neighbours file and ``OUT.rejects.jsonl``; returns counts."""
    config = config or RetrieveConfig()
    store = MemoryStore.open(store_path)
    info = index_info(store)
    if isinstance(config.k, bool) or not isinstance(config.k, int) or config.k < 1:
        raise RetrievalError(f"-k must be a positive integer, got {config.k!r}")
    if config.k > int(info["ntotal"]):
        raise RetrievalError(f"-k {config.k} is larger than the {info['ntotal']} rows in the index of store "
                             f"{store.path}: ask for at most {info['ntotal']}")
    parts_prefix = f"{out_path}.parts-{uuid.uuid4().hex[:8]}/part"
    rejects_path = f"{out_path}.rejects.jsonl"

    def build(pipeline):
        questions, rejected = pipeline | "Read" >> ReadQuestions(questions_path, config)
        searched = (questions
                    | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.batch_size)
                    | "Search" >> beam.ParDo(SearchQuestionsFn(store.path, config)).with_outputs(
                        REJECTED, main="found"))
        _ = searched.found | "WriteParts" >> WriteParquetParts(parts_prefix, SCHEMA)
        _ = ((rejected, searched[REJECTED]) | "AllRejects" >> beam.Flatten()
             | "WriteRejects" >> WriteLines(rejects_path))

    dry_run_if_asked(pipeline_args, build)
    with beam.Pipeline(options=pipeline_options(pipeline_args)) as pipeline:
        build(pipeline)
        # After the question file is found (by ReadQuestions), before any worker starts: a retriever mismatch fails here.
        store.search(["warm up"], 1, encoder=query_encoder(store.manifest))
    part_files = [m.path for m in FileSystems.match([parts_prefix + "*"])[0].metadata_list]
    tables = []
    for name in part_files:
        with FileSystems.open(name) as handle:
            tables.append(pq.read_table(pa.BufferReader(handle.read())))
    delete_dir(parts_prefix.rsplit("/", 1)[0])
    table = pa.concat_tables(tables).cast(SCHEMA) if tables else SCHEMA.empty_table()
    table = table.sort_by([("question_id", "ascending")])
    table, duplicates = _drop_duplicate_ids(table)
    if duplicates:
        with FileSystems.open(rejects_path) as handle:
            earlier = handle.read()
        with FileSystems.create(rejects_path) as handle:
            handle.write(earlier + "".join(
                json.dumps({"reason": "duplicate question id (the first one is kept)",
                            "line": json.dumps({"id": d["question_id"], "question": d["question"]})}) + "\n"
                for d in duplicates).encode())
    write_neighbors(out_path, table, store=store.path, store_fingerprint=store.fingerprint,
                    retriever_fingerprint=info["retriever"]["fingerprint"])
    with FileSystems.open(rejects_path) as handle:
        rejected = [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]
    reasons: dict[str, int] = {}
    for r in rejected:
        key = r["reason"].split(" (")[0]
        reasons[key] = reasons.get(key, 0) + 1
    return {"questions": table.num_rows, "rejected": len(rejected), "rejected_by_reason": reasons,
            "rejects_path": rejects_path, "out": out_path, "k": config.k}


def _drop_duplicate_ids(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    ids = table.column("question_id").to_pylist()
    keep = np.ones(len(ids), dtype=bool)
    for i in range(1, len(ids)):
        if ids[i] == ids[i - 1]:
            keep[i] = False
    dropped = table.filter(pa.array(~keep)).select(["question_id", "question"]).to_pylist()
    return table.filter(pa.array(keep)), dropped
