"""The whole premem chain with every path under one base (a local directory or gs://bucket/prefix), for the tests
that compare the two and build Dataflow jobs from its outputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from apache_beam.io.filesystems import FileSystems
from checkpoints import english_sentences
from click.testing import CliRunner
from lumen_helpers import make_full_t5_checkpoint

from premem.jobs.cli import main
from premem.storage import kv

BUCKET = "gs://premem-test"
MULTI_PROCESS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def upload(local, url: str) -> None:
    """A local file or directory copied to ``url`` through Beam's filesystem."""
    local = Path(local)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        target = url if local.is_file() else f"{url}/{f.relative_to(local).as_posix()}"
        with FileSystems.create(target) as handle:
            handle.write(f.read_bytes())


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def make_inputs(root):
    """A corpus of a few dozen passages, questions, a tiny random T5 and a tiny random MELODI checkpoint."""
    from premem.models.melodi import MelodiConfig, MelodiLM
    from premem.models.melodi_ckpt import save_checkpoint

    sentences = english_sentences(120, seed=5)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"d{i}", "title": f"doc {i}", "text": " ".join(sentences[10 * i:10 * i + 4 + i % 5])})
                    + "\n")
        f.write("{not json\n")
    with open(root / "questions.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": f"q{i}", "question": sentences[10 * i], "answers": [f"doc {i}"]}) + "\n")
    make_full_t5_checkpoint(root / "t5", layers=2)
    torch.manual_seed(0)
    melodi = MelodiConfig(num_layers=3, d_model=32, num_heads=4, d_ff=64, W=8, S=4, Su=4, L=2, Q_max=3,
                          long_term_layer=1, vocab_size=257, dropout=0.0)
    save_checkpoint(MelodiLM(melodi).eval(), root / "melodi")
    return root


def run_chain(base: str, inputs, encode_args: list[str], workdir) -> None:
    """shard -> encode (memory + memory-mean embeddings) -> index -> retrieve -> verify -> train-lumen -> compress,
    every path under ``base`` (the checkpoints too: workers mirror them); ``encode_args``: Beam options of encode."""
    for name in ("corpus.jsonl", "questions.jsonl", "t5", "melodi"):
        if base.startswith("gs://"):
            upload(inputs / name, f"{base}/{name}")
        else:
            (shutil.copytree if (inputs / name).is_dir() else shutil.copy)(inputs / name, f"{base}/{name}")
    cli("shard", f"{base}/corpus.jsonl", "--out", f"{base}/shards", "--tokenizer", f"{base}/t5", "--passage-words", "12",
        "--shard-size", "8")
    cli("encode", f"{base}/shards", "--store", f"{base}/store", "--encoder", f"{base}/t5", "--memory-layers", "1",
        "--compute-dtype", "float32", "--retriever", "memory-mean", "--no-progress", *encode_args)
    cli("index", f"{base}/store", "--factory", "Flat")
    cli("retrieve", f"{base}/store", f"{base}/questions.jsonl", "--out", f"{base}/neighbors.parquet", "-k", "2")
    assert "ok" in cli("verify", f"{base}/store").lower()
    cli("train-lumen", "--checkpoint", f"{base}/t5", "--store", f"{base}/store", "--questions", f"{base}/questions.jsonl",
        "--neighbors", f"{base}/neighbors.parquet", "--out", str(workdir / "train"), "--steps", "3", "--batch-size", "2",
        "--eval-every", "0", "--num-workers", "0")
    cli("compress", f"{base}/corpus.jsonl", "--store", f"{base}/longterm", "--checkpoint", f"{base}/melodi",
        "--docs-per-shard", "4", "--end-state")


# Keys whose bytes name their own location or time: compared as JSON without those fields.
_VOLATILE = ("created", "updated", "committed_at", "time", "path", "store", "shards_dir", "inputs", "source",
             "checkpoint", "written_at", "started", "finished", "seconds", "host", "pid", "job")


def _scrub(obj, base: str):
    if isinstance(obj, dict):
        return {k: _scrub(v, base) for k, v in obj.items() if k not in _VOLATILE and not k.endswith(("seconds", "_at"))}
    if isinstance(obj, list):
        return [_scrub(v, base) for v in obj]
    return obj.replace(base, "BASE") if isinstance(obj, str) else obj


def store_contents(path: str, base: str) -> dict[str, bytes]:
    """Every object of a store: bytes, or (JSON) the parsed object without location and time fields."""
    store = kv.open_kv(path)
    out = {}
    for key in kv.list_keys(store, "", path):
        if key.startswith("locks/"):
            continue
        raw = kv.read(store, key, path).value
        if key.endswith(".json") and not key.endswith("zarr.json"):
            raw = _scrub(json.loads(raw), base)
        elif key.endswith(".jsonl"):  # rejects name their source file
            raw = raw.replace(base.encode(), b"BASE")
        elif key.endswith(".parquet") and key.startswith("meta/"):  # metadata names the source file
            raw = _scrub(pq.read_table(pa.BufferReader(raw)).to_pylist(), base)
        out[key] = raw
    return out
