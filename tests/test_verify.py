"""`premem verify` names every bad shard and row, readers raise instead of returning garbage, `--repair`
restores exactly the bad shards, and a store is never mixed with memory of a changed checkpoint."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorstore as ts
import torch
from click.testing import CliRunner
from resilience_data import encode_args, fault_inject_module, make_shards, write_small_corpus

from premem.jobs.cli import main
from premem.storage import MemoryStore, StoreError
from premem.storage.verify import verify_store

fault = fault_inject_module()
S = 4  # passages per shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    work = tmp_path_factory.mktemp("verify")
    return make_shards(work / "shards", write_small_corpus(work / "plays.jsonl", words=800), shard_size=S)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, shards):
    store = tmp_path_factory.mktemp("pristine") / "store"
    result = _cli(*encode_args(shards, store))
    assert result.exit_code == 0, result.output
    return store


@pytest.fixture
def store(tmp_path, pristine):
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    return copy


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _flip_row_chunk(store, row: int) -> None:
    """Flip bytes in the middle of the first token chunk of passage ``row`` inside its Zarr shard file."""
    shard, inner = divmod(row, S)
    zarr = json.loads((store / "memory" / "zarr.json").read_text())
    per_row = zarr["chunk_grid"]["configuration"]["chunk_shape"][1] // zarr["codecs"][0]["configuration"]["chunk_shape"][1]
    path = store / "memory" / "c" / str(shard) / "0" / "0"
    raw = bytearray(path.read_bytes())
    index = raw[-(16 * S * per_row + 4): -4]
    offset, nbytes = struct.unpack_from("<QQ", index, 16 * inner * per_row)
    for pos in (offset + nbytes // 3, offset + nbytes // 2):
        raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_whole_store_verifies_with_a_sample_reencoded(pristine):
    result = _cli("verify", pristine, "--sample", 6)
    assert result.exit_code == 0, result.output
    assert "OK: the store is whole" in result.output
    assert "6 rows re-encoded (seed 0), max relative error" in result.output
    report = json.loads(_cli("verify", pristine, "--json").output)
    assert report["ok"] and report["checked_rows"] == MemoryStore.open(str(pristine)).rows


def test_flipped_bytes_are_named_refused_by_readers_and_repaired(store, shards, pristine):
    from premem.storage.neighbors import Neighbors
    from premem.storage.reader import LumenDataset

    _flip_row_chunk(store, row=6)
    result = _cli("verify", store)
    assert result.exit_code == 1, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith("BAD [checksum] shard 1; row 6; memory/c/1/0/0: the passage chunk "
                                               "fails its checksum"), result.output
    assert "FAILED: 1 problems in 1 shards (1), rows 6; rerun the encode command with --repair" in result.output

    reader = MemoryStore.open(str(store))
    with pytest.raises(StoreError, match=rf"store {store} is corrupt: row 6 \(shard 1, memory/c/1/0/0\) is unreadable"):
        reader.read([0, 6, 9])
    assert torch.equal(reader.read([4, 5, 7]).states, MemoryStore.open(str(pristine)).read([4, 5, 7]).states)
    rows = np.array([[2, 6]])
    neighbors = Neighbors(["q0"], ["who?"], rows, np.zeros(rows.shape, np.float32), str(store), reader.fingerprint, "r")
    dataset = LumenDataset(reader, neighbors, [[1, 2, 3]])
    with pytest.raises(StoreError, match=r"corrupt: row 6 \(shard 1"):
        dataset.__getitems__([0])

    result = _cli(*encode_args(shards, store, "--repair"))
    assert result.exit_code == 0, result.output
    assert "repair: 1 bad shards redone ([1])" in result.output
    assert "1 encoded: 0 redone after a partial write, 1 repaired, 0 new" in result.output
    assert _cli("verify", store).exit_code == 0
    assert fault.compare_stores(pristine, store) == []


def test_each_kind_of_damage_is_named(store):
    m = MemoryStore.open(str(store))
    # lengths chunk of shard 2: every row of the shard, and the reader names them
    path = store / "lengths" / "c" / "2"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    lengths_error = rf"store {store} is corrupt: the lengths of rows 8\.\.11 \(shard 2, lengths/c/2\)"
    with pytest.raises(StoreError, match=lengths_error):
        MemoryStore.open(str(store)).read([9])
    # a lost commit marker of a shard the manifest lists as committed, and totals that do not add up
    (store / "commits" / "shard-00000.json").unlink()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["tokens"] += 1
    (store / "manifest.json").write_text(json.dumps(manifest))
    # metadata that disagrees with the stored lengths
    meta_path = store / "meta" / "shard-00001.parquet"
    table = pq.read_table(meta_path)
    pq.write_table(table.set_column(table.column_names.index("length"), "length",
                                    [[v + 1 for v in table.column("length").to_pylist()]]), meta_path)
    # another array in the store (as later store kinds add): any Zarr array is read chunk by chunk
    extra = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / "extra") + "/"},
                     "metadata": {"shape": [m.rows, 3], "data_type": "float32", "chunk_grid": {
                         "name": "regular", "configuration": {"chunk_shape": [S, 3]}},
                         "codecs": [{"name": "bytes"}, {"name": "crc32c"}]}}, create=True).result()
    extra.write(np.ones((m.rows, 3), np.float32)).result()
    chunk = store / "extra" / "c" / "3" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0x01
    chunk.write_bytes(bytes(raw))

    report = verify_store(store)
    lines = [p.line() for p in report.problems]
    assert report.bad_shards == [0, 1, 2, 3], lines
    assert any(x.startswith("[checksum] shard 2; rows 8, 9, 10, 11; lengths/c/2: the lengths chunk fails")
               for x in lines)
    assert any(x.startswith("[manifest] shard 0; commits/shard-00000.json: listed as committed") for x in lines)
    tokens = manifest["tokens"]
    assert f"[manifest] manifest.json: tokens={tokens} but its listed shards hold {tokens - 1}" in lines
    assert any(x.startswith("[lengths] shard 1; rows 4, 5, 6, 7; lengths/c/1: stored lengths differ from the "
                            "passage metadata") for x in lines)
    assert any(x.startswith("[checksum] shard 3; rows 12, 13, 14, 15; extra/: extra rows 12..15 fails its checksum")
               for x in lines), lines
    assert "extra" in report.checked_arrays


def test_wrong_values_with_valid_checksums_are_found_by_the_sample(store):
    rw = MemoryStore.open(str(store), read_only=False)
    rows = list(rw.shard_rows(1))
    batch = rw.read(rows)
    meta = pq.read_table(store / "meta" / "shard-00001.parquet")
    rw.discard_shard(1)
    rw.write_metadata(1, meta)
    with rw.shard_writer(1) as writer:  # rows 4 and 5 swapped: every checksum is valid, the memory is wrong
        order = [1, 0, 2, 3]
        lengths = batch.lengths.numpy()
        n = np.minimum(lengths, lengths[order])
        states = batch.states.clone()
        for i, j in enumerate(order):
            states[i, : n[i]] = batch.states[j, : n[i]]
            states[i, n[i]:] = 0
        writer.write(rows, states, lengths)
    assert verify_store(store).ok  # structure and checksums cannot tell
    result = _cli("verify", store, "--sample", 100)
    assert result.exit_code == 1, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert [line.split(":")[0] for line in bad] == ["BAD [values] shard 1; row 4; memory/c/1/0/0",
                                                    "BAD [values] shard 1; row 5; memory/c/1/0/0"], result.output
    assert "re-encoded memory differs from the stored one: relative error" in bad[0]


def test_a_checkpoint_that_changes_between_two_runs_is_refused(tmp_path, t5_v11_checkpoint):
    from checkpoints import make_t5_checkpoint

    from premem.jobs.run import run_shard
    from premem.pipeline.shard import ShardConfig

    ckpt = tmp_path / "ckpt"
    shutil.copytree(t5_v11_checkpoint, ckpt)
    corpus = write_small_corpus(tmp_path / "plays.jsonl", words=200)
    run_shard([str(corpus)], str(tmp_path / "shards"), ShardConfig(tokenizer=str(ckpt), shard_size=8, max_tokens=64))
    args = ["encode", tmp_path / "shards", "--store", tmp_path / "store", "--encoder", ckpt, "-k", 2, "--no-progress",
            "--retriever", "none", "--compute-dtype", "float32"]
    assert _cli(*args).exit_code == 0
    make_t5_checkpoint(ckpt, variant="v1.1", seed=1)  # same architecture and tokenizer, other weights
    result = _cli(*args)
    assert result.exit_code == 2
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith(f"error: store {tmp_path / 'store'} holds memory of encoder ")
    assert "use another --store or delete" in line
    assert f"finish the store with the encoder it was made with ({ckpt}, K=2)" in line
    result = _cli("verify", tmp_path / "store", "--sample", 3)
    assert result.exit_code == 1
    assert f"BAD [values] the checkpoint at {ckpt} (K=2) now has fingerprint" in result.output
    assert "the checkpoint changed since" in result.output
