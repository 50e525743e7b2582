"""Reading corpus files (JSONL, Parquet, TSV, plain text) into validated documents.

Every input record ends up either as a `Document` or as a `Reject` with its
reason: nothing is dropped silently and no bad record stops a job.

`ReadCorpus` is the whole read step of `premem shard` and `premem compress`:
read, keep the first document of each id, write every reject to rejects.jsonl.
Driver-side readers (MELODI training) use `ReadDocumentsFn` and `keep_first`,
the same per-file reader and dedupe rule.

TSV is DPR's passage format (psgs_w100.tsv): a header line naming the columns
(``id\ttext\ttitle``; the id/title/text field names pick them), then one
record per line, fields separated by tabs and quoted CSV-style (``"``, inner
quotes doubled); a field may not span lines.  An empty id cell counts as absent.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from premem.pipeline.objects import WriteLines
from premem.storage.errors import InputError

__all__ = ["REJECTS", "Document", "DropDuplicateIds", "FieldNames", "InputError", "ReadCorpus", "ReadDocuments",
           "ReadDocumentsFn", "Reject", "expand_inputs", "keep_first"]

REJECTS = "rejects"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.gz")
TSV_SUFFIXES = (".tsv", ".tsv.gz")
EXCERPT_CHARS = 300


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """Which record fields hold the id, title and text (corpora disagree)."""

    id: str = "id"
    title: str = "title"
    text: str = "text"


@dataclasses.dataclass
class Document:
    source: str     # file the document came from
    file_index: int  # position of `source` in the sorted input list: orders rows
    position: int   # record index within the file (line number for JSONL, 1-based)
    doc_id: str
    title: str
    text: str


@dataclasses.dataclass
class Reject:
    source: str
    position: int
    reason: str
    excerpt: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand paths and globs (local or any Beam filesystem) to a sorted file list.

    Sorting fixes the file order, which fixes the row ids: the same inputs
    always give the same rows, whatever the runner does.
    """
    files: set[str] = set()
    for pattern in patterns:
        if FileSystems.exists(pattern) and not _is_glob(pattern):
            match_pattern = pattern.rstrip("/") + "/**" if _is_dir(pattern) else pattern
        else:
            match_pattern = pattern
        found = [m.path for m in FileSystems.match([match_pattern])[0].metadata_list]
        found = [f for f in found if _format_of(f) is not None or match_pattern == pattern]
        if not found:
            raise InputError(f"no input file matches {pattern!r}: check the path or glob")
        files.update(found)
    return sorted(files)


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_dir(path: str) -> bool:
    return "://" not in path and os.path.isdir(path)


def _format_of(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(TEXT_SUFFIXES):
        return "txt"
    if lower.endswith(TSV_SUFFIXES):
        return "tsv"
    return None


def _excerpt(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:EXCERPT_CHARS]


class ReadDocumentsFn(beam.DoFn):
    """Reads one input file; emits Documents, and Rejects on the `rejects` tag."""

    def __init__(self, fields: FieldNames, max_doc_chars: int):
        self.fields = fields
        self.max_doc_chars = max_doc_chars
        self.records = beam.metrics.Metrics.counter("premem", "records_read")

    def process(self, element: tuple[int, str]) -> Iterator:
        file_index, path = element
        fmt = _format_of(path)
        if fmt is None:
            yield self._reject(path, 0, "unsupported file type: use .jsonl, .parquet or .txt "
                                        "(or .tsv with a header line, like DPR's psgs_w100.tsv)")
            return
        try:
            yield from getattr(self, f"_read_{fmt}")(file_index, path)
        except Exception as err:  # an unreadable file is one rejected record, not a crash
            yield self._reject(path, 0, f"could not read {fmt} file: {type(err).__name__}: {err}")

    def _reject(self, source: str, position: int, reason: str, raw=None):
        self.records.inc()
        return beam.pvalue.TaggedOutput(REJECTS, Reject(source, position, reason, _excerpt(raw or "")))

    def _text_lines(self, path: str, lines) -> Iterator:
        """(line number, text, None) per non-blank line, or (line number, None, reject) for one that is not UTF-8."""
        for line_no, raw in lines:
            if not raw.strip():
                continue
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield line_no, None, self._reject(path, line_no, f"not valid UTF-8 (byte {err.start})",
                                                  raw.decode("utf-8", "replace"))

    def _read_jsonl(self, file_index: int, path: str) -> Iterator:
        with FileSystems.open(path) as handle:
            for line_no, line, reject in self._text_lines(path, enumerate(iter(handle.readline, b""), start=1)):
                if reject is not None:
                    yield reject
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    yield self._reject(path, line_no, f"invalid JSON: {err.msg} at column {err.colno}", line)
                    continue
                yield self._validate(file_index, path, line_no, record, line)

    def _read_parquet(self, file_index: int, path: str) -> Iterator:
        import pyarrow.parquet as pq

        wanted = [self.fields.id, self.fields.title, self.fields.text]
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            parquet = pq.ParquetFile(handle)
            columns = [c for c in wanted if c in parquet.schema_arrow.names]
            position = 0
            for batch in parquet.iter_batches(columns=columns, batch_size=1024):
                for record in batch.to_pylist():
                    position += 1
                    yield self._validate(file_index, path, position, record, record)

    def _read_tsv(self, file_index: int, path: str) -> Iterator:
        csv.field_size_limit(max(csv.field_size_limit(), self.max_doc_chars + 1))  # longer: rejected as too long
        with FileSystems.open(path) as handle:
            lines = enumerate(iter(handle.readline, b""), start=1)
            header = None
            for line_no, raw in lines:
                if raw.strip():
                    header, reason = self._tsv_header(raw)
                    if reason:
                        yield self._reject(path, line_no, reason, raw.decode("utf-8", "replace"))
                        return
                    break
            if header is None:
                return  # an empty file holds no records
            for line_no, line, reject in self._text_lines(path, lines):
                if reject is not None:
                    yield reject
                    continue
                line = line.rstrip("\r\n")
                try:
                    values = next(csv.reader([line], delimiter="\t", strict=True))
                except csv.Error as err:
                    yield self._reject(path, line_no, f"bad tsv quoting: {err}", line)
                    continue
                if len(values) != len(header):
                    yield self._reject(path, line_no, f"wrong number of tsv columns: {len(values)}, expected "
                                       f"{len(header)} ({', '.join(header)})", line)
                    continue
                record = dict(zip(header, values, strict=True))
                if record.get(self.fields.id) == "":
                    del record[self.fields.id]  # an empty id cell: the id is made from file and line
                yield self._validate(file_index, path, line_no, record, line)

    def _tsv_header(self, raw: bytes) -> tuple[list[str], str]:
        """The column names of a tsv header line, or the reason the file cannot be read."""
        try:
            header = next(csv.reader([raw.decode("utf-8-sig").rstrip("\r\n")], delimiter="\t", strict=True))
        except (UnicodeDecodeError, csv.Error) as err:
            return [], f"bad tsv header line: {err}"
        if self.fields.text not in header:
            return header, (f"tsv header names no text column: {self.fields.text!r} is not among "
                            f"{', '.join(header)}; the first line must name the columns (DPR's: id, text, title), "
                            "or pass --text-field")
        return header, ""

    def _read_txt(self, file_index: int, path: str) -> Iterator:
        with FileSystems.open(path) as handle:
            data = handle.read()
        name = posixpath.basename(path)
        stem = name.split(".")[0]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            yield self._reject(path, 1, f"not valid UTF-8 (byte {err.start})", data[:EXCERPT_CHARS].decode("utf-8", "replace"))
            return
        record = {self.fields.id: stem, self.fields.title: stem, self.fields.text: text}
        yield self._validate(file_index, path, 1, record, text)

    def _validate(self, file_index: int, path: str, position: int, record, raw):
        f = self.fields
        if not isinstance(record, dict):
            return self._reject(path, position, f"record is a JSON {type(record).__name__}, expected an object", raw)
        text = record.get(f.text)
        if text is None:
            return self._reject(path, position, f"missing field {f.text!r}", raw)
        if not isinstance(text, str):
            return self._reject(path, position, f"field {f.text!r} is {type(text).__name__}, expected string", raw)
        if not text.strip():
            return self._reject(path, position, f"empty field {f.text!r}", raw)
        if len(text) > self.max_doc_chars:
            return self._reject(path, position, f"document has {len(text)} characters, over --max-doc-chars "
                                f"{self.max_doc_chars}: split it or raise the limit", raw)
        title = record.get(f.title)
        if title is None:
            title = ""
        if not isinstance(title, str):
            return self._reject(path, position, f"field {f.title!r} is {type(title).__name__}, expected string", raw)
        doc_id = record.get(f.id)
        if doc_id is None:
            doc_id = f"{posixpath.basename(path)}:{position}"
        elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            return self._reject(path, position, f"field {f.id!r} is {type(doc_id).__name__}, expected string or integer", raw)
        self.records.inc()
        return Document(path, file_index, position, str(doc_id), " ".join(title.split()), text)


class ReadDocuments(beam.PTransform):
    """Input files -> (documents, rejects)."""

    def __init__(self, files: list[str], fields: FieldNames = FieldNames(), max_doc_chars: int = 64 << 20):
        super().__init__()
        self.files = files
        self.fields = fields
        self.max_doc_chars = max_doc_chars

    def expand(self, pbegin):
        results = (
            pbegin
            | "ListFiles" >> beam.Create(list(enumerate(self.files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(ReadDocumentsFn(self.fields, self.max_doc_chars)).with_outputs(REJECTS, main="docs")
        )
        return results.docs, results[REJECTS]


def keep_first(docs) -> tuple[list[Document], list[Reject]]:
    """The one dedupe rule: of documents with the same id, the first in input order (file, position) is kept.

    Returns the kept documents in input order and a Reject for every later one.  Used by the Beam dedupe step
    (per id) and by driver-side readers (on all documents at once).
    """
    first: dict[str, Document] = {}
    rejects: list[Reject] = []
    for doc in sorted(docs, key=lambda d: (d.file_index, d.position)):
        seen = first.get(doc.doc_id)
        if seen is None:
            first[doc.doc_id] = doc
        else:
            rejects.append(Reject(doc.source, doc.position,
                                  f"duplicate id {doc.doc_id!r} (first seen at {seen.source}:{seen.position})",
                                  _excerpt(doc.text)))
    return list(first.values()), rejects


def _first_and_duplicates(item):
    _, docs = item
    kept, duplicates = keep_first(docs)
    yield from kept
    for reject in duplicates:
        yield beam.pvalue.TaggedOutput(REJECTS, reject)


class DropDuplicateIds(beam.PTransform):
    """Keeps the first document (in input order) of each id; rejects the rest."""

    def expand(self, docs):
        results = (
            docs
            | "KeyById" >> beam.Map(lambda d: (d.doc_id, d))
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMap(_first_and_duplicates).with_outputs(REJECTS, main="docs")
        )
        return results.docs, results[REJECTS]


class ReadCorpus(beam.PTransform):
    """Input files -> (documents, rejects): read, keep the first document of each id, write `rejects_path`.

    `rejects_path` gets every rejected record (read errors and duplicate ids) as one JSON line with its reason;
    the rejects are also returned, e.g. to count them by reason.
    """

    def __init__(self, files: list[str], fields: FieldNames | None = None, max_doc_chars: int = 64 << 20,
                 rejects_path: str | None = None):
        super().__init__()
        self.files = files
        self.fields = fields or FieldNames()
        self.max_doc_chars = max_doc_chars
        self.rejects_path = rejects_path

    def expand(self, pbegin):
        docs, read_rejects = pbegin | "Read" >> ReadDocuments(self.files, self.fields, self.max_doc_chars)
        docs, dup_rejects = docs | "Dedupe" >> DropDuplicateIds()
        rejects = (read_rejects, dup_rejects) | "AllRejects" >> beam.Flatten()
        if self.rejects_path is not None:
            _ = (
                rejects
                | "RejectJson" >> beam.Map(Reject.to_json)
                | "WriteRejects" >> WriteLines(self.rejects_path)
            )
        return docs, rejects
