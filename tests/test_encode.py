"""The encode job end to end: shards -> store -> reader, against the encoder run directly."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorstore as ts
import torch
from click.testing import CliRunner

from premem.jobs.cli import main
from premem.jobs.run import run_encode, run_shard
from premem.models import MemoryEncoder
from premem.models.encoder import token_budget_batches
from premem.pipeline.encode import EncoderConfig
from premem.pipeline.shard import ShardConfig
from premem.storage import MemoryStore

MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="session")
def shakespeare_texts():
    from premem.jobs.sample import shakespeare_texts

    return shakespeare_texts()


@pytest.fixture(scope="session")
def plays_corpus(tmp_path_factory, shakespeare_texts):
    """Real text: the openings of a few plays, short enough for a fast test."""
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    with path.open("w") as handle:
        for i, name in enumerate(["hamlet_gut", "macbeth_gut", "tempest_gut"]):
            words = (shakespeare_texts / f"{name}.txt").read_text().split()
            handle.write(json.dumps({"id": name, "title": name, "text": " ".join(words[: 2500 + 700 * i])}) + "\n")
    return path


def _minilm_fp32(minilm_path) -> EncoderConfig:
    return EncoderConfig(str(minilm_path), memory_layers=4, tokens_per_batch=2048, compute_dtype="float32")


@pytest.fixture(scope="session")
def minilm_shards(tmp_path_factory, plays_corpus, minilm_path):
    out = tmp_path_factory.mktemp("shards")
    index = run_shard([str(plays_corpus)], str(out), ShardConfig(tokenizer=str(minilm_path), shard_size=16, max_tokens=160))
    assert index["num_shards"] > 3
    return out


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory, minilm_shards, minilm_path):
    store = tmp_path_factory.mktemp("store") / "s"
    run_encode(str(minilm_shards), str(store), _minilm_fp32(minilm_path))
    return store


def _shard_table(shards_dir) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(shards_dir.glob("shard-*.parquet")))


def _assert_round_trip(store_path, shards_dir, encoder: MemoryEncoder):
    store = MemoryStore.open(str(store_path), expected_fingerprint=encoder.fingerprint)
    table = _shard_table(shards_dir)
    assert store.rows == table.num_rows
    rows = table.column("row").to_pylist()
    ids = table.column("token_ids").to_pylist()
    lengths = table.column("length").to_pylist()
    for start in range(0, len(rows), 50):
        chunk = rows[start:start + 50][::-1]  # any order
        batch = store.read(chunk)
        assert batch.states.dtype == torch.bfloat16
        assert batch.states.shape[1] == max(lengths[r] for r in chunk)
        expected_len = torch.tensor([lengths[r] for r in chunk])
        assert torch.equal(batch.lengths, expected_len)
        assert torch.equal(batch.mask, torch.arange(batch.states.shape[1])[None, :] < expected_len[:, None])
        for i, row in enumerate(chunk):
            with torch.inference_mode():
                direct = encoder(torch.tensor([ids[row]]), torch.ones(1, lengths[row], dtype=torch.bool))[0]
            stored = batch.states[i, : lengths[row]].float()
            torch.testing.assert_close(stored, direct, rtol=2**-8, atol=1e-4)
            assert not batch.states[i, lengths[row]:].any()


def test_round_trip_minilm(minilm_store, minilm_shards, minilm_path):
    encoder = MemoryEncoder.from_pretrained(str(minilm_path), memory_layers=4)
    _assert_round_trip(minilm_store, minilm_shards, encoder)
    summary = MemoryStore.open(str(minilm_store)).summary()
    assert summary["committed_shards"] == summary["num_shards"]
    assert summary["tokens"] == sum(_shard_table(minilm_shards).column("length").to_pylist())


def test_round_trip_t5(tmp_path, plays_corpus, t5_v11_checkpoint):
    shards, store = tmp_path / "shards", tmp_path / "store"
    run_shard([str(plays_corpus)], str(shards), ShardConfig(tokenizer=str(t5_v11_checkpoint), shard_size=64, max_tokens=128))
    run_encode(str(shards), str(store), EncoderConfig(str(t5_v11_checkpoint), memory_layers=2, tokens_per_batch=4096,
                                                      compute_dtype="float32"))
    encoder = MemoryEncoder.from_pretrained(str(t5_v11_checkpoint), memory_layers=2)
    _assert_round_trip(store, shards, encoder)


def _arrays(store_path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("memory", "lengths"):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store_path / name)}}
        out[name] = ts.open(spec, open=True).result().read().result()
    return out


def test_same_store_with_one_and_two_worker_processes(tmp_path, minilm_shards, minilm_store, minilm_path):
    store2 = tmp_path / "multi"
    run_encode(str(minilm_shards), str(store2), _minilm_fp32(minilm_path),
               pipeline_args=MULTI_PROCESS)
    one, two = _arrays(minilm_store), _arrays(store2)
    for name in one:
        assert one[name].dtype == two[name].dtype
        np.testing.assert_array_equal(one[name].view(np.uint8), two[name].view(np.uint8))


def test_rerun_skips_committed_shards(minilm_shards, minilm_store, minilm_path):
    summary = run_encode(str(minilm_shards), str(minilm_store), EncoderConfig(str(minilm_path), memory_layers=4))
    assert summary["run"]["encoded"] == 0 and summary["run"]["skipped"] == summary["num_shards"]


def test_token_budget_batches_sort_by_length_and_respect_budget():
    lengths = np.array([5, 100, 7, 60, 100, 3, 64, 1])
    batches = token_budget_batches(lengths, 200)
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    assert (np.diff(lengths[order]) <= 0).all()
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 200 or len(batch) == 1
    assert [len(b) for b in batches] == [2, 3, 3]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_errors_are_one_line(tmp_path, minilm_shards, minilm_store, minilm_path):
    cases = [
        (["encode", minilm_shards, "--store", tmp_path / "a", "--encoder", tmp_path / "nope", "-k", 2], "nope"),
        (["encode", minilm_shards, "--store", tmp_path / "b", "--encoder", minilm_path, "-k", 9], "out of range"),
        (["encode", minilm_shards, "--store", minilm_store, "--encoder", minilm_path, "-k", 3], "holds memory"),
        (["encode", tmp_path, "--store", tmp_path / "c", "--encoder", minilm_path, "-k", 2], "premem shard"),
        (["info", tmp_path / "no-store"], "premem encode"),
    ]
    for args, needle in cases:
        result = _cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_cli_shard_encode_info(tmp_path, plays_corpus, minilm_path):
    result = _cli("shard", plays_corpus, "--out", tmp_path / "sh", "--tokenizer", minilm_path, "--shard-size", 200)
    assert result.exit_code == 0, result.output
    assert "3 input records = 3 accepted + 0 rejected" in result.output
    result = _cli("encode", tmp_path / "sh", "--store", tmp_path / "st", "--encoder", minilm_path,
                  "--live-fraction", 0.5, "--no-progress", "--direct_num_workers=1")
    assert result.exit_code == 0, result.output
    assert "(complete)" in result.output and "layers [0, 3) of 6" in result.output
    result = _cli("info", tmp_path / "st")
    assert result.exit_code == 0 and "B/token" in result.output and "codec raw" in result.output
    assert "vectors:  minilm dim 384, 1 per passage, in 1/1 shards" in result.output, result.output


def test_missing_shard_file_fails_clearly_and_keeps_the_others(tmp_path, minilm_shards, minilm_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(minilm_shards, shards)
    (shards / "shard-00002.parquet").unlink()
    result = _cli("encode", shards, "--store", tmp_path / "st", "--encoder", minilm_path, "-k", 4, "--no-progress")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1 of 6 shards could not be encoded"), result.output
    assert "shard-00002.parquet is missing or unreadable" in lines[0]
    failures = [json.loads(line) for line in (tmp_path / "st" / "failed-shards.jsonl").read_text().splitlines()]
    assert [f["shard"] for f in failures] == [2]
    store = MemoryStore.open(str(tmp_path / "st"))
    assert store.committed_shards() == {0, 1, 3, 4, 5}
    shutil.copy(minilm_shards / "shard-00002.parquet", shards)  # restored: the rerun finishes the store
    result = _cli("encode", shards, "--store", tmp_path / "st", "--encoder", minilm_path, "-k", 4, "--no-progress")
    assert result.exit_code == 0 and "5 already committed, skipped; 1 encoded" in result.output, result.output
    assert (tmp_path / "st" / "failed-shards.jsonl").read_text() == ""
