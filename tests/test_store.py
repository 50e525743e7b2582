"""Tests of premem.storage: the sharded Zarr v3 memory store."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import struct

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
import torch

from premem.storage import FingerprintMismatch, MemoryBatch, MemoryStore, StoreError, kvstore_spec, normalize_path

ROWS, S, P, D = 10, 4, 16, 8
FP = "0123456789abcdef" * 4
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _data(seed: int = 0, rows: int = ROWS):
    rng = np.random.default_rng(seed)
    states = rng.standard_normal((rows, P, D)).astype(np.float32)
    lengths = rng.integers(1, P + 1, rows)
    lengths[0], lengths[1] = 1, P
    return states, lengths


def _create(path, dtype="bfloat16", fingerprint=FP, rows=ROWS, **kw):
    return MemoryStore.create(
        path, rows=rows, max_tokens=P, d_model=D, dtype=dtype, shard_size=S, fingerprint=fingerprint,
        encoder={"name": "test-encoder", "layers": 2}, **kw,
    )


def _write_shard(store, shard, states, lengths, seed=0, chunks=3):
    """Write one shard in shuffled row order over several write() calls, states trimmed to the batch max."""
    rng = np.random.default_rng(seed + shard)
    rows = np.array(list(store.shard_rows(shard)))
    rng.shuffle(rows)
    with store.shard_writer(shard) as w:
        for part in np.array_split(rows, min(chunks, len(rows))):
            t = int(lengths[part].max())
            w.write(part, torch.from_numpy(states[part, :t]), lengths[part])
    return w


def _expected(states, lengths, rows, dtype):
    ref = torch.from_numpy(states).to(TORCH[dtype])
    p_max = int(lengths[rows].max())
    out = torch.zeros((len(rows), p_max, D), dtype=TORCH[dtype])
    for i, r in enumerate(rows):
        out[i, : lengths[r]] = ref[r, : lengths[r]]
    return out


def _full_store(path, dtype="bfloat16", **kw):
    store = _create(path, dtype=dtype, **kw)
    states, lengths = _data()
    for shard in range(store.num_shards):
        _write_shard(store, shard, states, lengths)
    return store, states, lengths


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip(tmp_path, dtype):
    store, states, lengths = _full_store(tmp_path / "s", dtype)
    assert store.num_shards == 3 and store.committed_shards() == {0, 1, 2}
    assert [store.shard_rows(i) for i in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert store.shard_of(9) == 2

    ro = MemoryStore.open(tmp_path / "s", expected_fingerprint=FP)
    rng = np.random.default_rng(1)
    for rows in ([1, 0], [0], [0, 0, 0], [9, 3, 3, 0, 7, 7, 2], rng.integers(0, ROWS, 25), list(range(ROWS))):
        rows = np.asarray(rows)
        b = ro.read(rows)
        assert isinstance(b, MemoryBatch)
        p_max = int(lengths[rows].max())
        assert b.states.dtype == TORCH[dtype] and b.states.shape == (len(rows), p_max, D)
        assert torch.equal(b.states, _expected(states, lengths, rows, dtype))
        assert b.lengths.dtype == torch.int64 and b.lengths.tolist() == lengths[rows].tolist()
        assert b.rows.dtype == torch.int64 and b.rows.tolist() == rows.tolist()
        assert b.mask.dtype == torch.bool
        assert torch.equal(b.mask, torch.arange(p_max)[None, :] < b.lengths[:, None])
    # P_max trimming: a batch of only the 1-token passage is [1, 1, D]
    assert ro.read([0]).states.shape == (1, 1, D)
    assert ro.read(torch.tensor([1])).states.shape == (1, P, D)
    assert ro.lengths([3, 0, 1]).tolist() == [lengths[3], 1, P] and ro.lengths([0]).dtype == np.int32
    b = ro.read(np.array([], dtype=np.int64))
    assert b.states.shape == (0, 0, D) and len(b) == 0
    moved = ro.read([2, 5]).to("cpu")
    assert torch.equal(moved.states, ro.read([2, 5]).states)
    # pickled stores reopen their handles lazily (Beam DoFns, spawned DataLoader workers)
    clone = pickle.loads(pickle.dumps(ro))
    assert torch.equal(clone.read([4, 8]).states, ro.read([4, 8]).states)


@pytest.mark.parametrize("dtype,codec,token_chunk", [("bfloat16", "raw", 4), ("float32", "raw", 5), ("float16", "raw", 16),
                                                     ("bfloat16", "zstd", 3)])
def test_token_chunks_read_directly_equal_tensorstore(tmp_path, dtype, codec, token_chunk):
    """Raw stores are read by mapping the shard files (storage/chunkread.py); it must give exactly what TensorStore
    gives, for any token chunk size (5 and 3 do not divide P), trimmed batches, repeats and any order."""
    store, states, lengths = _full_store(tmp_path / "s", dtype, codec=codec, token_chunk=token_chunk)
    ro = MemoryStore.open(tmp_path / "s")
    assert (ro._raw_reader() is not None) == (codec == "raw")
    rng = np.random.default_rng(1)
    for rows in [np.arange(ROWS), np.array([0]), np.array([3, 3, 0, 9, 1, 6]), *rng.integers(0, ROWS, (20, 7))]:
        got = ro.read(rows).states
        assert torch.equal(got, _expected(states, lengths, rows, dtype))
        via_tensorstore = ro._read_states_ts(rows, got.shape[1])
        assert np.array_equal(got.view(torch.uint8).numpy(), via_tensorstore.view(np.uint8).reshape(*got.shape[:2], -1))
    # chunks past a passage's length are never stored: the shard file holds only the real tokens' chunks
    per_chunk = token_chunk * D * np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    if codec == "raw":
        stored = sum(os.path.getsize(tmp_path / "s" / "memory" / "c" / str(i) / "0" / "0") for i in range(3))
        chunks = int(sum(-(-int(n) // token_chunk) for n in lengths))
        assert stored == chunks * (per_chunk + 4) + 3 * (S * -(-P // token_chunk) * 16 + 4)
    ro.close()  # unmapped; reads reopen
    assert torch.equal(ro.read([2]).states, _expected(states, lengths, np.array([2]), dtype))
    # batch buffers are reused only once nothing refers to a batch: batches kept alive are never overwritten
    kept = [(rows, ro.read(rows).states[1:]) for rows in rng.integers(0, ROWS, (12, 5))]
    for rows, view in kept:
        assert torch.equal(view, _expected(states, lengths, rows, dtype)[1:])


def test_chunks_in_any_order_and_missing_chunks_read_like_tensorstore(tmp_path):
    """Zarr lets a shard hold its chunks in any order, and a chunk equal to the fill value may be missing: such
    rows take the reader's slow path and still read exactly as TensorStore reads them."""
    import crc32c

    path = tmp_path / "s"
    _, states, lengths = _full_store(path, token_chunk=4)
    shard_file = path / "memory" / "c" / "0" / "0" / "0"
    raw = shard_file.read_bytes()
    n_index = S * 4
    index = np.frombuffer(raw[-(16 * n_index + 4):-4], dtype="<u8").reshape(S, 4, 2).copy()
    body = bytearray()
    for r, c in reversed([(r, c) for r in range(S) for c in range(4)]):  # every chunk moved, in reverse order
        offset, nbytes = index[r, c]
        if offset == 2**64 - 1:
            continue
        index[r, c, 0] = len(body)
        body += raw[int(offset):int(offset + nbytes)]
    index[1, 2] = 2**64 - 1  # row 1 (P tokens) loses its third chunk: it reads as zeros there
    table = index.tobytes()
    shard_file.write_bytes(bytes(body) + table + crc32c.crc32c(table).to_bytes(4, "little"))
    ro = MemoryStore.open(path)
    assert ro._raw_reader() is not None
    rows = np.array([1, 0, 3, 2, 1, 5])
    got = ro.read(rows).states
    assert torch.equal(got.view(torch.int16), torch.from_numpy(ro._read_states_ts(rows, got.shape[1]).view(np.int16)))
    expected = _expected(states, lengths, rows, "bfloat16")
    expected[[0, 4], 8:12] = 0
    assert torch.equal(got, expected)


def test_batch_buffers_are_reused_only_when_free():
    from premem.storage.chunkread import BatchBuffers

    pool = BatchBuffers(keep=2)
    a = pool.take(100)
    first = id(a.base)
    held = torch.from_numpy(a.reshape(10, 10)).view(torch.int16)[2:]  # a view of a tensor of the buffer
    del a
    b = pool.take(100)
    assert id(b.base) != first  # in use through `held`
    del held
    c = pool.take(80)
    assert id(c.base) == first  # free again: reused
    pool.take(200)  # both kept buffers in use: a fresh one, not kept
    assert len(pool._buffers) == 2
    del b
    d = pool.take(300)  # the free one is too small: replaced by a larger one
    assert len(pool._buffers) == 2 and any(kept is d.base for kept in pool._buffers)


def test_a_corrupt_middle_token_chunk_is_named(tmp_path):
    path = tmp_path / "s"
    _, states, lengths = _full_store(path, token_chunk=4)
    row = 1  # P tokens: four chunks
    shard_file = path / "memory" / "c" / "0" / "0" / "0"
    entries = _shard_index(str(shard_file), S * 4)
    offset, nbytes = entries[row * 4 + 2]
    raw = bytearray(shard_file.read_bytes())
    raw[offset + 7] ^= 0x10
    shard_file.write_bytes(bytes(raw))
    ro = MemoryStore.open(path)
    with pytest.raises(StoreError, match=r"corrupt: row 1 \(shard 0, memory/c/0/0/0\).*tokens 8\.\.11 fails its crc32c"):
        ro.read([0, 1])
    assert torch.equal(ro.read([0, 2]).states, _expected(states, lengths, np.array([0, 2]), "bfloat16"))


def test_store_layout_and_manifest(tmp_path):
    store, _, lengths = _full_store(tmp_path / "s")
    root = tmp_path / "s"
    assert sorted(os.listdir(root / "commits")) == ["shard-00000.json", "shard-00001.json", "shard-00002.json"]
    assert sorted(os.listdir(root / "memory" / "c")) == ["0", "1", "2"]  # one file per corpus shard
    zarr = json.loads((root / "memory" / "zarr.json").read_text())
    assert zarr["data_type"] == "bfloat16" and zarr["shape"] == [ROWS, P, D]
    shard_codec = zarr["codecs"][0]
    assert shard_codec["name"] == "sharding_indexed"
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [S, P, D]
    assert shard_codec["configuration"]["chunk_shape"] == [1, P, D]  # token chunks of min(32, P) tokens
    assert [c["name"] for c in shard_codec["configuration"]["codecs"]] == ["bytes", "crc32c"]  # "raw", the default
    assert [c["name"] for c in shard_codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    marker = json.loads((root / "commits" / "shard-00001.json").read_text())
    assert marker["shard"] == 1 and (marker["start"], marker["stop"]) == (4, 8)
    assert marker["passages"] == 4 and marker["tokens"] == int(lengths[4:8].sum())
    assert marker["bytes"] == marker["tokens"] * D * 2 and marker["fingerprint"] == FP
    m = json.loads((root / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["kind"] == "lumen-memory" and m["complete"] is False
    shape = (m["rows"], m["max_tokens"], m["d_model"], m["dtype"], m["shard_size"], m["num_shards"])
    assert shape == (ROWS, P, D, "bfloat16", S, 3)
    assert m["encoder"] == {"name": "test-encoder", "layers": 2} and m["fingerprint"] == FP
    assert m["codec"]["name"] == "raw" and m["codec"]["memory"]["inner_chunk_shape"] == [1, P, D]
    # --codec zstd: the same layout, zstd between bytes and crc32c
    _create(tmp_path / "z", codec="zstd", token_chunk=5, zstd_level=3)
    zarr = json.loads((tmp_path / "z" / "memory" / "zarr.json").read_text())
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [S, 20, D]  # whole token chunks: 16 -> 20
    assert zarr["codecs"][0]["configuration"]["chunk_shape"] == [1, 5, D]
    assert [c["name"] for c in zarr["codecs"][0]["configuration"]["codecs"]] == ["bytes", "zstd", "crc32c"]
    m = json.loads((tmp_path / "z" / "manifest.json").read_text())
    assert m["codec"]["name"] == "zstd" and m["codec"]["zstd_level"] == 3
    with pytest.raises(StoreError, match="codec must be one of raw, zstd"):
        _create(tmp_path / "x", codec="lz4")
    with pytest.raises(StoreError, match="token_chunk must be a positive integer"):
        _create(tmp_path / "x", token_chunk=0)


def test_numpy_states_and_padding_zeroed(tmp_path):
    store = _create(tmp_path / "s", rows=4)
    rng = np.random.default_rng(3)
    states = rng.standard_normal((4, 10, D)).astype(np.float32)  # t=10 < P, garbage past the lengths
    lengths = np.array([3, 10, 1, 7])
    with store.shard_writer(0) as w:
        w.write(np.array([2, 0]), states[[2, 0]], lengths[[2, 0]])
        w.write([3, 1], states[[3, 1]].astype(ml_dtypes.bfloat16), lengths[[3, 1]].tolist())
    b = store.read([0, 1, 2, 3])
    assert b.states.shape == (4, 10, D)
    ref = torch.from_numpy(states).to(torch.bfloat16)
    for r in range(4):
        assert torch.equal(b.states[r, : lengths[r]], ref[r, : lengths[r]])
        assert not b.states[r, lengths[r]:].any()


def test_uncommitted_and_failed_writers(tmp_path):
    store = _create(tmp_path / "s")
    states, lengths = _data()
    _write_shard(store, 0, states, lengths)

    with pytest.raises(StoreError, match=r"row 5 is in shard 1 .*not committed.*premem encode"):
        store.read([0, 5])
    with pytest.raises(StoreError, match=r"row 10 out of range.*rows 0\.\.9"):
        store.read([10])
    with pytest.raises(StoreError, match=r"row -1 out of range"):
        store.read([-1])

    # an exception inside the writer: nothing committed, exception re-raised
    with pytest.raises(ValueError, match="boom"):
        with store.shard_writer(1) as w:
            w.write([4, 5, 6, 7], torch.from_numpy(states[4:8]), lengths[4:8])
            raise ValueError("boom")
    assert not store.is_committed(1) and store.committed_shards() == {0}
    assert not (tmp_path / "s" / "commits" / "shard-00001.json").exists()

    # missing rows: error, no marker
    with pytest.raises(StoreError, match=r"1 of 4 rows were never written \(first: row 6\)"):
        with store.shard_writer(1) as w:
            w.write([4, 5, 7], torch.from_numpy(states[[4, 5, 7]]), lengths[[4, 5, 7]])
    assert store.committed_shards() == {0}
    with pytest.raises(StoreError, match="not committed"):
        MemoryStore.open(tmp_path / "s").read([6])

    # bad writes
    with store.shard_writer(1) as w:
        with pytest.raises(StoreError, match=r"row 8 is not in shard 1"):
            w.write([8], torch.from_numpy(states[8:9]), lengths[8:9])
        w.write([4], torch.from_numpy(states[4:5]), lengths[4:5])
        with pytest.raises(StoreError, match=r"row 4 of shard 1 written twice"):
            w.write([4], torch.from_numpy(states[4:5]), lengths[4:5])
        with pytest.raises(StoreError, match=r"written twice"):
            w.write([5, 5], torch.from_numpy(states[[5, 5]]), lengths[[5, 5]])
        with pytest.raises(StoreError, match=r"must have shape"):
            w.write([5], torch.zeros(1, P, D + 1), [1])
        with pytest.raises(StoreError, match=r"must have shape"):
            w.write([5], torch.zeros(1, P + 1, D), [1])
        with pytest.raises(StoreError, match=r"lengths .* must be in 0\.\.3"):
            w.write([5], torch.zeros(1, 3, D), [4])
        w.write([5, 6, 7], torch.from_numpy(states[5:8]), lengths[5:8])
    assert store.committed_shards() == {0, 1}
    b = MemoryStore.open(tmp_path / "s").read([5, 0])
    assert torch.equal(b.states, _expected(states, lengths, np.array([5, 0]), "bfloat16"))

    with pytest.raises(StoreError, match=r"shard 1 .* already committed"):
        store.shard_writer(1)
    with pytest.raises(StoreError, match=r"read-only"):
        MemoryStore.open(tmp_path / "s").shard_writer(2)
    with pytest.raises(StoreError, match=r"shard 3 out of range"):
        store.shard_writer(3)


def test_create_resume_and_mismatch(tmp_path):
    path = tmp_path / "s"
    store = _create(path)
    states, lengths = _data()
    _write_shard(store, 0, states, lengths)

    again = _create(path)  # same fingerprint + shapes: resume
    assert again.committed_shards() == {0}
    assert torch.equal(again.read([2]).states, store.read([2]).states)
    _write_shard(again, 1, states, lengths)
    assert MemoryStore.open(path).committed_shards() == {0, 1}

    with pytest.raises(FingerprintMismatch, match=r"holds memory of encoder 0123456789ab, this run's encoder is ffffffffffff: "
                                                     r"use another --store or delete"):
        _create(path, fingerprint="f" * 64)
    with pytest.raises(StoreError, match=r"created with dtype='bfloat16' \(this run: 'float32'\)"):
        _create(path, dtype="float32")
    with pytest.raises(StoreError, match=r"rows=10 \(this run: 11\)"):
        _create(path, rows=11)
    assert MemoryStore.open(path, expected_fingerprint=FP).fingerprint == FP
    with pytest.raises(FingerprintMismatch, match="0123456789ab"):
        MemoryStore.open(path, expected_fingerprint="f" * 64)

    with pytest.raises(StoreError, match=r"no premem store at .*nope \(manifest.json missing\): run `premem encode` first"):
        MemoryStore.open(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"file\.bin is a file, not a premem store directory"):
        MemoryStore.open(tmp_path / "file.bin")
    with pytest.raises(StoreError, match=r"is a file"):
        _create(tmp_path / "file.bin")

    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"format_version 99"):
        MemoryStore.open(path)
    with pytest.raises(StoreError, match="unsupported store dtype"):
        _create(tmp_path / "t", dtype="int8")
    with pytest.raises(StoreError, match="shard_size must be a positive integer"):
        MemoryStore.create(tmp_path / "t", rows=4, max_tokens=P, d_model=D, shard_size=0, fingerprint=FP, encoder={})


def test_fresh_create_clears_stale_markers(tmp_path):
    path = tmp_path / "s"
    store, _, _ = _full_store(path)
    (path / "manifest.json").unlink()  # an interrupted create leaves no manifest: start over
    fresh = _create(path)
    assert fresh.committed_shards() == set()


def _shard_index(path: str, n_inner: int):
    raw = open(path, "rb").read()
    idx = raw[-(16 * n_inner + 4): -4]
    return [struct.unpack_from("<QQ", idx, 16 * i) for i in range(n_inner)]


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "s"
    store, states, lengths = _full_store(path)
    shard_file = path / "memory" / "c" / "1" / "0" / "0"
    offset, nbytes = _shard_index(str(shard_file), S)[2]  # row 6 = inner chunk 2 of shard 1
    raw = bytearray(shard_file.read_bytes())
    original = bytes(raw)
    for pos in sorted({offset, offset + nbytes // 2, offset + nbytes - 5, offset + nbytes - 1}):
        raw = bytearray(original)
        raw[pos] ^= 0x01
        shard_file.write_bytes(bytes(raw))
        ro = MemoryStore.open(path)
        with pytest.raises(StoreError, match=r"store .* is corrupt: row 6 \(shard 1, memory/c/1/0/0\) is unreadable"):
            ro.read([4, 6, 0])
        # the other passages of that shard are still fine
        assert torch.equal(ro.read([5, 7]).states, _expected(states, lengths, np.array([5, 7]), "bfloat16"))
    # any single flipped bit inside that passage's chunk: an error, never wrong values
    for pos in range(offset, offset + nbytes):
        raw = bytearray(original)
        raw[pos] ^= 1 << (pos % 8)
        shard_file.write_bytes(bytes(raw))
        with pytest.raises(StoreError, match="corrupt: row 6"):
            MemoryStore.open(path).read([6])
    # a flipped byte in the shard index makes every row of that shard unreadable (never garbage)
    raw = bytearray(original)
    raw[-10] ^= 0x01
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"corrupt: row 4 \(shard 1"):
        MemoryStore.open(path).read([4])
    shard_file.write_bytes(original)
    assert torch.equal(MemoryStore.open(path).read([6]).states, _expected(states, lengths, np.array([6]), "bfloat16"))


def test_finalize_and_summary(tmp_path):
    store = _create(tmp_path / "s", extra={"corpus": "toy"})
    states, lengths = _data()
    _write_shard(store, 2, states, lengths)
    _write_shard(store, 0, states, lengths)
    m = store.finalize()
    assert [x["shard"] for x in m["shards"]] == [0, 2]
    assert m["complete"] is False and m["passages"] == 6
    assert m["tokens"] == int(lengths[[0, 1, 2, 3, 8, 9]].sum())
    assert m["extra"] == {"corpus": "toy"}
    _write_shard(store, 1, states, lengths)
    m = store.finalize()
    assert m["complete"] is True and [x["shard"] for x in m["shards"]] == [0, 1, 2]
    assert m["passages"] == ROWS and m["tokens"] == int(lengths.sum()) and m["bytes"] == int(lengths.sum()) * D * 2
    on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert on_disk["complete"] is True and on_disk["tokens"] == int(lengths.sum())
    assert MemoryStore.open(tmp_path / "s").manifest["complete"] is True

    s = MemoryStore.open(tmp_path / "s").summary()
    assert s["rows"] == ROWS and s["committed_shards"] == 3 and s["committed_rows"] == ROWS
    assert s["tokens"] == int(lengths.sum()) and s["logical_bytes"] == int(lengths.sum()) * D * 2
    assert s["bytes_on_disk"] > s["memory_bytes_on_disk"] > 0
    assert s["bytes_per_token"] == pytest.approx(s["memory_bytes_on_disk"] / s["tokens"])
    assert s["logical_bytes_per_token"] == D * 2
    assert s["dtype"] == "bfloat16" and s["fingerprint"] == FP and s["encoder"]["name"] == "test-encoder"
    assert s["complete"] is True
    with pytest.raises(StoreError, match="read-only"):
        MemoryStore.open(tmp_path / "s").finalize()


def test_metadata(tmp_path):
    store, _, lengths = _full_store(tmp_path / "s")
    for shard in range(store.num_shards):
        rows = list(store.shard_rows(shard))[::-1]
        store.write_metadata(shard, pa.table({
            "row": pa.array(rows, pa.int64()),
            "doc_id": [f"doc{r // 2}" for r in rows],
            "passage": [r % 2 for r in rows],
            "title": [f"title {r}" for r in rows],
            "text": [f"text of passage {r}" for r in rows],
            "length": [int(lengths[r]) for r in rows],
        }))
    t = MemoryStore.open(tmp_path / "s").read_metadata([9, 0, 5, 5])
    assert t.column("row").to_pylist() == [9, 0, 5, 5]
    assert t.column("text").to_pylist() == ["text of passage 9", "text of passage 0", "text of passage 5", "text of passage 5"]
    assert t.column("length").to_pylist() == [int(lengths[r]) for r in (9, 0, 5, 5)]
    with pytest.raises(StoreError, match="not in shard 0"):
        store.write_metadata(0, pa.table({"row": [5]}))
    empty = _create(tmp_path / "e")
    with pytest.raises(StoreError, match=r"no passage metadata for shard 0"):
        empty.read_metadata([1])


def test_kvstore_spec(monkeypatch):
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "t")  # gs:// specs need credentials (or an emulator)
    gcs = kvstore_spec("gs://bucket/a/b/", "memory/")
    assert set(gcs.pop("context")) == {"gcs_request_concurrency", "gcs_request_retries"}
    assert gcs == {"driver": "gcs", "bucket": "bucket", "path": "a/b/memory/"}
    assert {k: v for k, v in kvstore_spec("gs://bucket", "manifest.json").items() if k != "context"} == {
        "driver": "gcs", "bucket": "bucket", "path": "manifest.json"}
    assert kvstore_spec("/x/y") == {"driver": "file", "path": "/x/y/"}
    assert kvstore_spec("file:///x/y", "commits/") == {"driver": "file", "path": "/x/y/commits/"}
    assert normalize_path("gs://b/p/") == "gs://b/p"
    with pytest.raises(StoreError, match="unsupported store location"):
        normalize_path("ftp://x/y")


def _worker(path: str, shards: list[int]) -> None:
    store = MemoryStore.open(path, read_only=False)
    states, lengths = _data(seed=7, rows=24)
    for shard in shards:
        _write_shard(store, shard, states, lengths, chunks=4)


def test_concurrent_workers_match_single_writer(tmp_path):
    def make(path):
        return MemoryStore.create(path, rows=24, max_tokens=P, d_model=D, shard_size=S, fingerprint=FP, encoder={})

    single = make(tmp_path / "single")
    _worker(str(tmp_path / "single"), list(range(single.num_shards)))

    make(tmp_path / "multi")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "multi"), shards)) for shards in ([0, 2, 4], [1, 3, 5])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    a, b = MemoryStore.open(tmp_path / "single"), MemoryStore.open(tmp_path / "multi")
    assert a.committed_shards() == b.committed_shards() == set(range(6))
    rows = np.arange(24)
    x, y = a.read(rows), b.read(rows)
    assert torch.equal(x.states, y.states) and torch.equal(x.lengths, y.lengths) and torch.equal(x.mask, y.mask)
    states, lengths = _data(seed=7, rows=24)
    assert torch.equal(y.states, _expected(states, lengths, rows, "bfloat16"))


def test_reader_sees_later_commits_and_reencode(tmp_path):
    path = tmp_path / "s"
    store = _create(path)
    states, lengths = _data()
    _write_shard(store, 0, states, lengths)
    reader = MemoryStore.open(path)  # long-lived reader, opened while encoding goes on
    with pytest.raises(StoreError, match="not committed"):
        reader.read([5])
    _write_shard(store, 1, states, lengths)
    assert torch.equal(reader.read([5, 1]).states, _expected(states, lengths, np.array([5, 1]), "bfloat16"))

    # a shard whose data was committed but whose marker is missing (crash in between) is simply re-encoded
    (path / "commits" / "shard-00002.json").unlink(missing_ok=True)
    other, other_lengths = _data(seed=5)
    _write_shard(store, 2, other, other_lengths)
    (path / "commits" / "shard-00002.json").unlink()
    assert not MemoryStore.open(path).is_committed(2)
    store2 = MemoryStore.open(path, read_only=False)
    _write_shard(store2, 2, states, lengths)
    assert torch.equal(MemoryStore.open(path).read([8, 9]).states, _expected(states, lengths, np.array([8, 9]), "bfloat16"))
