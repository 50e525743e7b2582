"""`premem retrieve`: the top-k store rows for every question of a JSONL file, as a Beam job.

Questions are parsed (bad lines are set aside with their reason, never dropped silently), batched, encoded by
the store's retriever and searched in the store's faiss index by workers that load both once; the driver
gathers the results into one neighbours Parquet file (premem.storage.neighbors) sorted by question id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.shared import Shared

from premem.storage import MemoryStore
from premem.storage.faiss_index import RetrievalError, index_info
from premem.storage.neighbors import SCHEMA, write_neighbors

REJECTED = "rejected"


@dataclasses.dataclass(frozen=True)
class RetrieveConfig:
    k: int = 20
    id_field: str = "id"
    question_field: str = "question"
    batch_size: int = 256
    nprobe: int | None = None
    ef_search: int | None = None


def parse_question(line: str, config: RetrieveConfig) -> dict:
    """One JSONL line -> {"question_id", "question"}; raises ValueError with the reason for a bad line.

    A record without the id field gets the first 16 hex digits of sha256(question) as its id.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but a {type(record).__name__}")
    question = record.get(config.question_field)
    if not isinstance(question, str):
        raise ValueError(f"no string field {config.question_field!r} (pass --question-field)")
    if not question.strip():
        raise ValueError(f"field {config.question_field!r} is empty")
    qid = record.get(config.id_field)
    if qid is None:
        qid = hashlib.sha256(question.encode()).hexdigest()[:16]
    elif isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ValueError(f"field {config.id_field!r} is a {type(qid).__name__}, not a string or integer")
    return {"question_id": str(qid), "question": question}


class ParseQuestionsFn(beam.DoFn):
    def __init__(self, config: RetrieveConfig):
        self.config = config
        self.parsed = beam.metrics.Metrics.counter("premem", "questions_parsed")
        self.rejected = beam.metrics.Metrics.counter("premem", "questions_rejected")

    def process(self, line: str):
        if not line.strip():
            return  # blank lines are not records
        try:
            yield parse_question(line, self.config)
            self.parsed.inc()
        except ValueError as e:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTED, json.dumps({"reason": str(e), "line": line[:500]}))


class _Holder:
    def __init__(self, store):
        self.store = store


class SearchQuestionsFn(beam.DoFn):
    """A batch of questions -> one record per question with its k rows and scores (store and index loaded once)."""

    def __init__(self, store_path: str, config: RetrieveConfig):
        self.store_path = store_path
        self.config = config
        self._shared = Shared()
        self.searched = beam.metrics.Metrics.counter("premem", "questions_searched")
        self.short = beam.metrics.Metrics.counter("premem", "questions_short_of_k")

    def setup(self):
        def load():
            store = MemoryStore.open(self.store_path)
            store.search(["warm up"], 1)  # loads the retriever and the index once per worker process
            return _Holder(store)

        self.store = self._shared.acquire(load, tag=self.store_path).store

    def process(self, batch: list[dict]):
        result = self.store.search([q["question"] for q in batch], self.config.k, nprobe=self.config.nprobe,
                                   ef_search=self.config.ef_search)
        for q, rows, scores in zip(batch, result.rows, result.scores, strict=True):
            found = int((rows >= 0).sum())
            if found < self.config.k:
                self.short.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, json.dumps({
                    "reason": f"only {found} of k={self.config.k} neighbours found: raise --nprobe / --ef-search",
                    "line": json.dumps({"id": q["question_id"], "question": q["question"]})}))
                continue
            self.searched.inc()
            yield {**q, "rows": rows.tolist(), "scores": scores.tolist()}


def retrieve(store_path: str, questions_path: str, out_path: str, config: RetrieveConfig = RetrieveConfig(),
             pipeline_args: list[str] | None = None) -> dict:
    """Writes the neighbours file and ``OUT.rejects.jsonl``; returns counts."""
    store = MemoryStore.open(store_path)
    info = index_info(store)
    if isinstance(config.k, bool) or not isinstance(config.k, int) or config.k < 1:
        raise RetrievalError(f"-k must be a positive integer, got {config.k!r}")
    if config.k > int(info["ntotal"]):
        raise RetrievalError(f"-k {config.k} is larger than the {info['ntotal']} rows in the index of store "
                             f"{store.path}: ask for at most {info['ntotal']}")
    if not FileSystems.match([questions_path])[0].metadata_list:
        raise FileNotFoundError(f"questions file {questions_path} does not exist: pass a JSONL file with one "
                                f"{{\"{config.id_field}\": ..., \"{config.question_field}\": ...}} per line")
    store.search(["warm up"], 1)  # a retriever / index mismatch fails here, before any worker starts
    parts_prefix = f"{out_path}.parts-{uuid.uuid4().hex[:8]}/part"
    rejects_path = f"{out_path}.rejects.jsonl"
    with beam.Pipeline(options=PipelineOptions(list(pipeline_args or []))) as pipeline:
        parsed = (pipeline
                  | "Read" >> beam.io.ReadFromText(questions_path)
                  | "Parse" >> beam.ParDo(ParseQuestionsFn(config)).with_outputs(REJECTED, main="questions"))
        searched = (parsed.questions
                    | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=config.batch_size)
                    | "Search" >> beam.ParDo(SearchQuestionsFn(store.path, config)).with_outputs(
                        REJECTED, main="found"))
        _ = searched.found | "WriteParts" >> beam.io.WriteToParquet(parts_prefix, SCHEMA, file_name_suffix=".parquet")
        _ = ((parsed[REJECTED], searched[REJECTED]) | "AllRejects" >> beam.Flatten()
             | "WriteRejects" >> beam.io.WriteToText(rejects_path, shard_name_template="", num_shards=1))
    part_files = [m.path for m in FileSystems.match([parts_prefix + "*"])[0].metadata_list]
    tables = []
    for name in part_files:
        with FileSystems.open(name) as handle:
            tables.append(pq.read_table(pa.BufferReader(handle.read())))
    FileSystems.delete(part_files)
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
