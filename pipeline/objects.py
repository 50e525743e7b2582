"""Beam on object storage: its GCS filesystem pointed at ``STORAGE_EMULATOR_HOST``, and sinks that write each final
object directly.

Beam's file sinks (WriteToText, WriteToParquet) write temporary files and rename them at finalize; on GCS a rename
is a batched copy + delete, which costs two requests per object and which emulators (and some S3-compatible stores)
do not serve.  The sinks here write every object once, under its final name.
"""
from __future__ import annotations

import io
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from premem.storage import kv


def use_emulator() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, Beam talks to the emulator without looking for Google credentials (its
    lookup retries for ~30 s when there are none); TensorStore is pointed there too."""
    if kv.use_storage_emulator() is None:
        return
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:  # Beam caches its credentials here; None = anonymous client
        auth._Credentials._credentials_init = True
        auth._Credentials._credentials = None


def write_object(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def delete_dir(url: str) -> None:
    """Every object under ``url``, deleted one by one through TensorStore (Beam's GCS delete is a batch request)."""
    kv.delete_prefix(kv.open_kv(url), "", url)


class _WriteLinesFn(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, lines):
        write_object(self.path, "".join(line + "\n" for line in sorted(lines)).encode())
        yield self.path


class WriteLines(beam.PTransform):
    """Text lines -> one object at ``path``, sorted (so a rerun and another runner write the same bytes); an empty
    collection writes an empty object.  For small outputs (rejects, failures): the lines meet in one worker."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, lines):
        return (lines
                | "Gather" >> beam.combiners.ToList()
                | "WriteObject" >> beam.ParDo(_WriteLinesFn(self.path)))


class _WriteParquetPartFn(beam.DoFn):
    def __init__(self, prefix: str, schema: pa.Schema):
        self.prefix = prefix
        self.schema = schema

    def start_bundle(self):
        self.rows = []

    def process(self, row):
        self.rows.append(row)

    def finish_bundle(self):
        if self.rows:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), buf)
            write_object(f"{self.prefix}-{uuid.uuid4().hex}.parquet", buf.getvalue())
        self.rows = []


class WriteParquetParts(beam.PTransform):
    """Rows -> Parquet objects ``PREFIX-<random>.parquet``, one per bundle, each written once under its final name."""

    def __init__(self, prefix: str, schema: pa.Schema):
        super().__init__()
        self.prefix = prefix
        self.schema = schema

    def expand(self, rows):
        return rows | "WriteParts" >> beam.ParDo(_WriteParquetPartFn(self.prefix, self.schema))


use_emulator()  # workers import this module with the DoFns they run
