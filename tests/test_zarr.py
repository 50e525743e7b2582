"""zarr-python reads a store premem wrote through TensorStore, bit for bit (bfloat16 through premem.storage.zarr_bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from premem.storage import MemoryStore
from premem.storage.embeddings import prepare_embeddings, read_embeddings, write_shard_embeddings
from premem.storage.zarr_bf16 import BFloat16, register

ROWS, P, D, E = 10, 40, 8, 6
# full length, multiples of the 16-token inner chunk, one token, and lengths ending mid-chunk
LENGTHS = np.array([40, 16, 1, 33, 32, 17, 5, 40, 2, 31], dtype=np.int32)

register()
register()  # idempotent


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bits of a float array, so that comparisons are bit for bit (and -0.0 differs from 0.0)."""
    x = np.ascontiguousarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def torch_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().view(f"u{t.element_size()}")


def make_store(path, dtype: str, codec: str, per_row: int) -> MemoryStore:
    gen = np.random.default_rng(7)
    states = gen.standard_normal((ROWS, P, D)).astype(np.float32)
    states[0, 0, :3] = [-0.0, 1e-40, 6e4]  # signed zero, a float32 denormal, near the float16 maximum
    store = MemoryStore.create(str(path), rows=ROWS, max_tokens=P, d_model=D, dtype=dtype, shard_size=4,
                               fingerprint="f" * 64, encoder={}, codec=codec, token_chunk=16)
    info = {"fingerprint": "r" * 64, "dim": E, "kind": "checkpoint"}
    if per_row > 1:
        info["vectors_per_row"] = per_row
    prepare_embeddings(store, info)
    vectors = gen.standard_normal((ROWS, E) if per_row == 1 else (ROWS, per_row, E)).astype(np.float32)
    for s in range(store.num_shards):
        rng = store.shard_rows(s)
        rows = np.arange(rng.start, rng.stop)
        with store.shard_writer(s) as w:
            w.write(rows, states[rng.start:rng.stop], LENGTHS[rng.start:rng.stop])
        write_shard_embeddings(store, s, rows, vectors[rng.start:rng.stop])
    store.finalize()
    return MemoryStore.open(str(path))


@pytest.mark.parametrize(("dtype", "codec", "per_row"), [
    ("bfloat16", "raw", 1),
    ("bfloat16", "zstd", 3),
    ("float16", "raw", 3),
    ("float32", "zstd", 1),
])
def test_zarr_reads_premem_store(tmp_path, dtype, codec, per_row):
    store = make_store(tmp_path / "store", dtype, codec, per_row)
    memory = zarr.open_array(str(tmp_path / "store" / "memory"), mode="r")
    assert memory.shape == (ROWS, P, D)
    assert memory.dtype == store.numpy_dtype
    if dtype == "bfloat16":
        assert isinstance(memory.metadata.data_type, BFloat16)

    full = memory[:]
    batch = store.read(range(ROWS))
    want = np.zeros((ROWS, P, D), dtype=f"u{store.numpy_dtype.itemsize}")  # premem's rows, zero-padded to P
    want[:, :batch.states.shape[1]] = torch_bits(batch.states)
    np.testing.assert_array_equal(bits(full), want)
    for r, n in enumerate(LENGTHS):  # past each length zarr sees the fill value: never-stored inner chunks, zeroed tails
        assert not bits(full[r, n:]).any()
    assert bits(full[0, 0, :3]).any()  # the bits are not all trivially zero

    # partial reads decode single inner chunks of a shard
    np.testing.assert_array_equal(bits(memory[3, 5:20]), want[3, 5:20])
    np.testing.assert_array_equal(bits(memory.oindex[[7, 2], 10:30]), want[[7, 2], 10:30])

    lengths = zarr.open_array(str(tmp_path / "store" / "lengths"), mode="r")
    assert lengths.dtype == np.int32
    np.testing.assert_array_equal(lengths[:], store.lengths(range(ROWS)))
    np.testing.assert_array_equal(lengths[:], LENGTHS)

    embeddings = zarr.open_array(str(tmp_path / "store" / "embeddings"), mode="r")
    assert embeddings.shape == ((ROWS, E) if per_row == 1 else (ROWS, per_row, E))
    np.testing.assert_array_equal(bits(embeddings[:]), bits(read_embeddings(store, range(ROWS))))


@pytest.mark.parametrize(("json", "value"), [
    (0, 0.0), (0.0, 0.0), (-1.5, -1.5), ("NaN", np.nan), ("Infinity", np.inf), ("-Infinity", -np.inf),
    ("0x3f80", 1.0), ("0xc000", -2.0), ("0x7fc0", np.nan),
])
def test_bfloat16_fill_values(json, value):
    dtype = BFloat16()
    scalar = dtype.from_json_scalar(json, zarr_format=3)
    assert scalar.dtype == dtype.to_native_dtype()
    np.testing.assert_equal(float(scalar), value)
    assert dtype.from_json_scalar(dtype.to_json_scalar(scalar, zarr_format=3), zarr_format=3).tobytes() == scalar.tobytes()


def test_bfloat16_json_and_bad_input():
    dtype = BFloat16.from_json("bfloat16", zarr_format=3)
    assert dtype.to_json(zarr_format=3) == "bfloat16"
    with pytest.raises(ValueError, match="4 hex digits"):
        dtype.from_json_scalar("0x3f800000", zarr_format=3)
    with pytest.raises(ValueError, match="Zarr v3"):
        dtype.to_json(zarr_format=2)
