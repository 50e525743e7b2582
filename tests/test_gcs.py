"""premem on gs:// against a real GCS JSON API (fake-gcs-server on loopback, tests/gcs_server.py): the whole chain
equal byte for byte to the same run on local disk, faults, and the one-line errors of bad object-storage input."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.io.filesystems import FileSystems
from gcs_chain import store_contents

from premem.storage import MemoryStore, open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_chain_on_gcs_equals_local_byte_for_byte(gcs_chains):
    local, remote = gcs_chains["local"], gcs_chains["remote"]
    for sub in ("shards", "store", "longterm"):
        a, b = store_contents(f"{local}/{sub}", local), store_contents(f"{remote}/{sub}", remote)
        assert sorted(a) == sorted(b), sub
        for key in a:
            assert a[key] == b[key], f"{sub}/{key} differs"
    with FileSystems.open(f"{remote}/neighbors.parquet") as h, open(f"{local}/neighbors.parquet", "rb") as g:
        assert pq.read_table(h).equals(pq.read_table(g))
    assert sum(1 for k in store_contents(f"{remote}/store", remote) if k.startswith("memory/c/")) >= 2
    # train-lumen read the gs:// store, questions and neighbours through the loader: the same losses as on disk
    runs = [json.loads((gcs_chains["work"][w] / "train" / "metrics.json").read_text()) for w in ("local", "gcs")]
    assert runs[0]["curve"] and [p["loss"] for p in runs[0]["curve"]] == [p["loss"] for p in runs[1]["curve"]]


def test_store_reads_and_loader_on_gcs(gcs_chains):
    local, remote = gcs_chains["local"], gcs_chains["remote"]
    a, b = MemoryStore.open(f"{local}/store"), MemoryStore.open(f"{remote}/store")
    rows = [0, 5, 3, b.rows - 1]
    ma, mb = a.read(rows), b.read(rows)
    assert torch.equal(ma.lengths, mb.lengths) and torch.equal(ma.states.view(torch.int16), mb.states.view(torch.int16))
    lt_a, lt_b = open_store(f"{local}/longterm"), open_store(f"{remote}/longterm")
    docs = ["d0", "d7", "d11"]
    fa, fb = lt_a.long_term(docs, 1), lt_b.long_term(docs, 1)
    assert all(torch.equal(getattr(fa, f), getattr(fb, f)) for f in vars(fa) if isinstance(getattr(fa, f), torch.Tensor))
    ea, eb = lt_a.end_state(docs), lt_b.end_state(docs)
    assert torch.equal(ea.z, eb.z) and torch.equal(ea.fifo, eb.fifo) and torch.equal(ea.n_valid, eb.n_valid)
