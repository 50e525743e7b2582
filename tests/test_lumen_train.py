"""`premem train-lumen` end to end on a tiny random T5: the loss falls, metrics and model are written, and the
user's mistakes are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from lumen_helpers import make_full_t5_checkpoint, passages, write_store

from premem.jobs.cli import main
from premem.jobs.train_lumen import TrainConfig, normalize_answer, train_lumen
from premem.models.lumen import LumenModel
from premem.storage import write_neighbors

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ROWS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    checkpoint = make_full_t5_checkpoint(root / "t5", layers=2)
    texts = passages(ROWS, seed=3)
    store = write_store(root / "store", checkpoint, texts, memory_layers=1, dtype="bfloat16", shard_size=4)
    questions, rows = [], []
    for i in range(ROWS):  # the answer is the passage's title: only the neighbours carry it
        questions.append({"id": f"q{i}", "question": texts[i].split(" context: ")[1][:40], "answers": [f"doc {i}"]})
        rows.append([i, (i + 1) % ROWS])
    (root / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    table = pa.table({"question_id": [q["id"] for q in questions], "question": [q["question"] for q in questions],
                      "rows": rows, "scores": [[1.0, 0.5]] * ROWS})
    write_neighbors(root / "n.parquet", table, store=store.path, store_fingerprint=store.fingerprint,
                    retriever_fingerprint="test")
    return root, checkpoint, store


def _config(root, checkpoint, store, **kwargs) -> TrainConfig:
    base = dict(checkpoint=str(checkpoint), store=store.path, questions=str(root / "q.jsonl"),
                neighbors=str(root / "n.parquet"), eval_questions=str(root / "q.jsonl"), out=str(root / "out"),
                steps=24, batch_size=4, lr=1e-2, warmup_steps=2, log_every=6, max_answer_tokens=4)
    base.update(kwargs)
    return TrainConfig(**base)


def test_loss_falls_and_outputs_are_written(setup):
    root, checkpoint, store = setup
    result = train_lumen(_config(root, checkpoint, store))
    losses = [p["loss"] for p in result["curve"]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert result["k"] == 2 and result["memory_layers"] == 1 and result["live_fraction"] == 0.5
    assert 0.0 <= result["data_wait_share"] < 1.0
    assert set(result["eval"][-1]) >= {"exact_match", "loss", "examples"}
    saved = json.loads((root / "out" / "metrics.json").read_text())
    assert saved["curve"] == result["curve"]
    reloaded = LumenModel.from_pretrained(str(root / "out" / "model"), memory_layers=1)
    assert reloaded.memory_layers == 1
    assert json.loads((root / "out" / "model" / "lumen.json").read_text())["memory_layers"] == 1


def test_no_retrieval_run(setup):
    root, checkpoint, store = setup
    result = train_lumen(_config(root, checkpoint, store, k=0, steps=3, out=str(root / "out0"), save_model=False))
    assert result["k"] == 0 and len(result["curve"]) == 1


def test_cli_reports_a_store_of_another_checkpoint_in_one_line(setup, tmp_path):
    root, _, store = setup
    other = make_full_t5_checkpoint(tmp_path / "other", layers=2, seed=1)
    args = ["train-lumen", "--checkpoint", str(other), "--store", store.path, "--questions", str(root / "q.jsonl"),
            "--neighbors", str(root / "n.parquet"), "--out", str(tmp_path / "o"), "--steps", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "expected encoder" in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_reports_a_missing_neighbours_file(setup, tmp_path):
    root, checkpoint, store = setup
    args = ["train-lumen", "--checkpoint", str(checkpoint), "--store", store.path, "--questions",
            str(root / "q.jsonl"), "--neighbors", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "run `premem retrieve` first" in result.output


def test_normalize_answer():
    assert normalize_answer("The  Tempest!") == normalize_answer("tempest")
