"""The shard step: documents -> tokenized DPR-style passages in Parquet shards.

Rows are dense (0..N-1) and depend only on the inputs: documents are ordered
by (input file, record position), passages by their index in the document.
The row assignment is distributed: passages are counted per bucket of
records, a prefix sum over the (small) bucket table gives each bucket's first
row, and each bucket is numbered on its own.
"""
from __future__ import annotations

import dataclasses
import json
import posixpath

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from premem.models import DEFAULT_TEMPLATE
from premem.models.encoder import check_template, render_passage
from premem.pipeline.read import FieldNames, ReadCorpus, Reject
from premem.storage.errors import InputError, StoreError, one_line

INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
INDEX_FORMAT = 1
RECORDS_PER_BUCKET = 4096

PASSAGE_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("doc_id", pa.string()),
    ("passage", pa.int32()),
    ("title", pa.string()),
    ("text", pa.string()),
    ("token_ids", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("truncated", pa.bool_()),
])


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    tokenizer: str
    passage_words: int = 100  # 0: keep each record as one passage (already split, e.g. DPR's psgs_w100.tsv)
    max_tokens: int = 256
    shard_size: int = 1024
    template: str = DEFAULT_TEMPLATE
    fields: FieldNames = FieldNames()
    max_doc_chars: int = 64 << 20

    def check(self) -> None:
        if self.passage_words < 0:
            raise InputError(f"--passage-words must be >= 1, or 0 to keep each record as one passage; "
                             f"got {self.passage_words}")
        if self.max_tokens < 2:
            raise InputError(f"--max-tokens must be >= 2, got {self.max_tokens}")
        if self.shard_size < 1:
            raise InputError(f"--shard-size must be >= 1, got {self.shard_size}")
        check_template(self.template)


def split_words(text: str, passage_words: int) -> list[str]:
    """DPR-style passages: consecutive, non-overlapping runs of `passage_words` words.

    `passage_words` 0 keeps the text as it is, as one passage (a corpus already split into passages).
    """
    if passage_words == 0:
        return [text]
    words = text.split()
    return [" ".join(words[i:i + passage_words]) for i in range(0, len(words), passage_words)]


class TokenizePassagesFn(beam.DoFn):
    """Document -> passage dicts with token ids; the tokenizer loads once per worker."""

    def __init__(self, config: ShardConfig):
        self.config = config
        self.truncated = beam.metrics.Metrics.counter("premem", "passages_truncated")

    def setup(self):
        from premem.models import load_tokenizer

        self.tokenizer = load_tokenizer(self.config.tokenizer)

    def process(self, doc):
        cfg = self.config
        chunks = split_words(doc.text, cfg.passage_words)
        rendered = [render_passage(cfg.template, doc.title, chunk) for chunk in chunks]
        # One token over the limit tells truncation apart; only those are tokenized again, in one batch.
        encoded = self._tokenize(rendered, cfg.max_tokens + 1)
        over = [i for i, ids in enumerate(encoded) if len(ids) > cfg.max_tokens]
        if over:
            for i, ids in zip(over, self._tokenize([rendered[i] for i in over], cfg.max_tokens)):
                encoded[i] = ids
            self.truncated.inc(len(over))
        over = set(over)
        for index, (chunk, ids) in enumerate(zip(chunks, encoded)):
            yield {
                "bucket": (doc.file_index, doc.position // RECORDS_PER_BUCKET),
                "order": (doc.position, index),
                "doc_id": doc.doc_id,
                "passage": index,
                "title": doc.title,
                "text": chunk,
                "token_ids": ids,
                "length": len(ids),
                "truncated": index in over,
            }

    def _tokenize(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _bucket_offsets(counts: dict) -> dict:
    """First row of each bucket: a prefix sum over buckets in input order."""
    offsets, total = {}, 0
    for bucket in sorted(counts):
        offsets[bucket] = total
        total += counts[bucket]
    return offsets


def _number_bucket(item, offsets):
    bucket, passages = item
    first = offsets[bucket]
    for i, p in enumerate(sorted(passages, key=lambda p: p["order"])):
        p = dict(p)
        del p["bucket"], p["order"]
        p["row"] = first + i
        yield p


class AssignRows(beam.PTransform):
    """Passages -> passages with a dense, deterministic `row`."""

    def expand(self, passages):
        offsets = (
            passages
            | "BucketOf" >> beam.Map(lambda p: (p["bucket"], 1))
            | "CountPerBucket" >> beam.CombinePerKey(sum)
            | "BucketTable" >> beam.combiners.ToDict()
            | "PrefixSum" >> beam.Map(_bucket_offsets)
        )
        return (
            passages
            | "KeyByBucket" >> beam.Map(lambda p: (p["bucket"], p))
            | "GroupByBucket" >> beam.GroupByKey()
            | "Number" >> beam.FlatMap(_number_bucket, offsets=beam.pvalue.AsSingleton(offsets))
        )


def shard_path(out_dir: str, shard: int) -> str:
    return FileSystems.join(out_dir, f"shard-{shard:05d}.parquet")


class WriteShardFn(beam.DoFn):
    """One group of rows -> one Parquet shard, sorted by row; emits its summary."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.passages = beam.metrics.Metrics.counter("premem", "passages")
        self.tokens = beam.metrics.Metrics.counter("premem", "tokens")

    def process(self, item):
        shard, passages = item
        rows = sorted(passages, key=lambda p: p["row"])
        table = pa.Table.from_pylist(rows, schema=PASSAGE_SCHEMA)
        path = shard_path(self.out_dir, shard)
        with FileSystems.create(path) as handle:
            pq.write_table(table, handle, compression="zstd")
        tokens = sum(p["length"] for p in rows)
        self.passages.inc(len(rows))
        self.tokens.inc(tokens)
        yield {
            "shard": shard,
            "path": posixpath.basename(path),
            "start": rows[0]["row"],
            "stop": rows[-1]["row"] + 1,
            "passages": len(rows),
            "tokens": tokens,
            "max_length": max(p["length"] for p in rows),
            "max_words": max(len(p["text"].split()) for p in rows),
            "truncated": sum(p["truncated"] for p in rows),
        }


def _reason_kind(reject: Reject) -> str:
    """Groups reasons into a few counted kinds for the summary."""
    reason = reject.reason
    for prefix in ("duplicate id", "invalid JSON", "not valid UTF-8", "missing field", "empty field",
                   "unsupported file type", "could not read", "document has", "wrong number of tsv columns",
                   "bad tsv quoting"):
        if reason.startswith(prefix):
            return prefix
    return reason.split(":")[0][:60]


class WriteIndexFn(beam.DoFn):
    """Writes index.json once every shard is written: the contract the encode job reads."""

    def __init__(self, out_dir: str, header: dict):
        self.out_dir = out_dir
        self.header = header

    def process(self, shards, docs_accepted, reject_kinds):
        shards = sorted(shards, key=lambda s: s["shard"])
        rejected = sum(reject_kinds.values())
        index = dict(self.header)
        index.update({
            "rows": sum(s["passages"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "num_shards": len(shards),
            "shards": shards,
            "records": {
                "input": docs_accepted + rejected,
                "accepted": docs_accepted,
                "rejected": rejected,
                "rejected_by_reason": dict(sorted(reject_kinds.items())),
            },
        })
        _check_dense(shards, self.header["shard_size"])
        with FileSystems.create(FileSystems.join(self.out_dir, INDEX_FILE)) as handle:
            handle.write(json.dumps(index, indent=2).encode())
        yield index


def _check_dense(shards: list[dict], shard_size: int) -> None:
    for expected, s in enumerate(shards):
        if s["shard"] != expected or s["start"] != expected * shard_size or s["stop"] - s["start"] != s["passages"]:
            raise RuntimeError(f"internal error: shard {s['shard']} covers rows {s['start']}..{s['stop']}, "
                               f"expected shard {expected} from row {expected * shard_size}")


class ShardCorpus(beam.PTransform):
    """Input files -> Parquet passage shards + rejects.jsonl + index.json (emitted)."""

    def __init__(self, files: list[str], out_dir: str, config: ShardConfig, header: dict):
        super().__init__()
        self.files = files
        self.out_dir = out_dir
        self.config = config
        self.header = header

    def expand(self, pbegin):
        cfg = self.config
        docs, rejects = pbegin | "Read" >> ReadCorpus(self.files, cfg.fields, cfg.max_doc_chars,
                                                      FileSystems.join(self.out_dir, REJECTS_FILE))
        reject_kinds = (
            rejects
            | "RejectKind" >> beam.Map(lambda r: (_reason_kind(r), 1))
            | "CountKinds" >> beam.CombinePerKey(sum)
            | "KindTable" >> beam.combiners.ToDict()
        )
        docs_accepted = docs | "CountDocs" >> beam.combiners.Count.Globally()
        shard_size = cfg.shard_size
        shards = (
            docs
            | "Tokenize" >> beam.ParDo(TokenizePassagesFn(cfg))
            | "AssignRows" >> AssignRows()
            | "KeyByShard" >> beam.Map(lambda p: (p["row"] // shard_size, p))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(WriteShardFn(self.out_dir))
            | "AllShards" >> beam.combiners.ToList()
        )
        return shards | "WriteIndex" >> beam.ParDo(
            WriteIndexFn(self.out_dir, self.header),
            docs_accepted=beam.pvalue.AsSingleton(docs_accepted),
            reject_kinds=beam.pvalue.AsSingleton(reject_kinds),
        )


def read_index(shards_dir: str) -> dict:
    path = FileSystems.join(shards_dir, INDEX_FILE)
    if not FileSystems.exists(path):
        raise InputError(f"{shards_dir} has no {INDEX_FILE}: run `premem shard` on your corpus first "
                                "and pass its --out directory")
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def read_shard(shards_dir: str, entry: dict) -> pa.Table:
    from apache_beam.io.filesystem import CompressionTypes

    path = FileSystems.join(shards_dir, entry["path"])
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            table = pq.read_table(handle)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"shard file {path} is missing or unreadable ({type(err).__name__}): "
                         "re-run `premem shard` into a fresh --out directory") from None
    except Exception as err:  # Beam's GCS client gave up retrying (RetryError, ConnectionError): not the file's fault
        if not any(k in type(err).__name__ for k in ("RetryError", "ConnectionError", "ServiceUnavailable", "Timeout")):
            raise
        raise StoreError(f"cannot read shard file {path}: the object store did not answer (retries exhausted) "
                         f"({one_line(err, 200)}): rerun the same command once it is reachable: committed shards "
                         "are kept and the rest is redone") from None
    if table.num_rows != entry["passages"]:
        raise InputError(f"shard file {path} has {table.num_rows} rows but index.json says {entry['passages']}: "
                         "re-run `premem shard` into a fresh --out directory")
    return table
