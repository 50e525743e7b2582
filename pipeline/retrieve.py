"""The steps of `premem retrieve`: parse questions, then encode and search them in batches.

Questions come from JSONL (read line-parallel) or FiD's JSON array (read as one element), parsed by
premem.storage.questions (the parser training uses).  Bad records are set aside with their reason, never dropped
silently.  Workers load the store's index and its query encoder once; the job around it (premem.jobs.retrieve)
gathers the results into one neighbours file.
"""
from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils.shared import Shared

from premem.models.retriever import query_encoder
from premem.storage import MemoryStore
from premem.storage.errors import InputError
from premem.storage.questions import BadQuestion, Question, QuestionFields, parse_line, parse_questions, starts_like_array

REJECTED = "rejected"


@dataclasses.dataclass(frozen=True)
class RetrieveConfig:
    k: int = 20
    id_field: str = "id"
    question_field: str = "question"
    batch_size: int = 256
    nprobe: int | None = None
    ef_search: int | None = None

    @property
    def fields(self) -> QuestionFields:
        return QuestionFields(id=self.id_field, question=self.question_field, id_option="--id-field",
                              question_option="--question-field")


def parse_question(line: str, config: RetrieveConfig) -> dict:
    """One JSONL line -> {"question_id", "question"}; raises BadQuestion (a ValueError) with the reason.

    The parser of premem.storage.questions, which training uses too: a record without the id field gets the
    first 16 hex digits of sha256(question) as its id.
    """
    return _as_element(parse_line(line, config.fields))


def _as_element(question: Question) -> dict:
    return {"question_id": question.id, "question": question.question}


def _rejected(reason: str, text: str):
    return beam.pvalue.TaggedOutput(REJECTED, json.dumps({"reason": reason, "line": text[:500]}))


class ParseQuestionsFn(beam.DoFn):
    """One JSONL line -> one question, or its line and reason on the `rejected` tag."""

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
            yield _rejected(str(e), line)


class ParseQuestionFileFn(ParseQuestionsFn):
    """A whole question file (FiD's JSON array, which is not line-oriented) -> its questions and rejects."""

    def process(self, path: str):
        with FileSystems.open(path) as handle:
            data = handle.read()
        for _, excerpt, parsed in parse_questions(data, self.config.fields):
            if isinstance(parsed, BadQuestion):
                self.rejected.inc()
                yield _rejected(str(parsed), excerpt)
            else:
                self.parsed.inc()
                yield _as_element(parsed)


def is_json_array_file(path: str, probe_bytes: int = 1 << 16) -> bool:
    """Whether a question file starts with `[` (FiD's JSON array) rather than a JSONL record."""
    with FileSystems.open(path) as handle:
        while chunk := handle.read(probe_bytes):
            if chunk.lstrip(b"\xef\xbb\xbf \t\r\n"):
                return starts_like_array(chunk.lstrip(b" \t\r\n"))
    return False


class ReadQuestions(beam.PTransform):
    """Question file (path or glob) -> (questions, rejected): the `Read` step of `premem retrieve`.

    JSONL files are read line-parallel (ReadFromText); a JSON array file (first non-space character `[`, FiD's
    form) is read and parsed as one element (it is not line-oriented).  Both go through the same parser.
    """

    def __init__(self, path: str, config: RetrieveConfig):
        super().__init__()
        self.path, self.config = path, config

    def expand(self, pbegin):
        files = [m.path for m in FileSystems.match([self.path])[0].metadata_list]
        if not files:
            raise InputError(f"questions file {self.path} does not exist: pass a JSONL file with one "
                             f"{{\"{self.config.id_field}\": ..., \"{self.config.question_field}\": ...}} per line, "
                             "or FiD's JSON array of such objects")
        arrays = sorted(f for f in files if is_json_array_file(f))
        lines = sorted(set(files) - set(arrays))
        parts = []
        if lines:
            read = (beam.io.ReadFromText(self.path) if not arrays
                    else "Lines" >> beam.Create(lines) | "ReadLines" >> beam.io.ReadAllFromText())
            parts.append(pbegin | "ReadJsonl" >> read
                         | "ParseLines" >> beam.ParDo(ParseQuestionsFn(self.config)).with_outputs(
                             REJECTED, main="questions"))
        if arrays:
            parts.append(pbegin | "JsonFiles" >> beam.Create(arrays)
                         | "ParseJson" >> beam.ParDo(ParseQuestionFileFn(self.config)).with_outputs(
                             REJECTED, main="questions"))
        if len(parts) == 1:
            return parts[0].questions, parts[0][REJECTED]
        return (tuple(p.questions for p in parts) | "AllQuestions" >> beam.Flatten(),
                tuple(p[REJECTED] for p in parts) | "AllRejected" >> beam.Flatten())


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
