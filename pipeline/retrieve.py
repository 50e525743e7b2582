"""The steps of `premem retrieve`: parse questions, then encode and search them in batches.

Bad lines are set aside with their reason, never dropped silently.  Workers load the store's index and its query
encoder once; the job around it (premem.jobs.retrieve) gathers the results into one neighbours file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import apache_beam as beam
from apache_beam.utils.shared import Shared

from premem.models.retriever import query_encoder
from premem.storage import MemoryStore

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


class _Loaded:
    """Weak-referenceable holder so Beam's Shared keeps one index and query encoder per worker process."""

    def __init__(self, store, encoder):
        self.store, self.encoder = store, encoder


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
            encoder = query_encoder(store.manifest)
            store.search(["warm up"], 1, encoder=encoder)  # loads the index once per worker process
            return _Loaded(store, encoder)

        loaded = self._shared.acquire(load, tag=self.store_path)
        self.store, self.encoder = loaded.store, loaded.encoder

    def process(self, batch: list[dict]):
        result = self.store.search([q["question"] for q in batch], self.config.k, encoder=self.encoder,
                                   nprobe=self.config.nprobe, ef_search=self.config.ef_search)
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
