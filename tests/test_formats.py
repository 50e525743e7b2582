"""Public corpus and question formats end to end: DPR's passage tsv through `premem shard --passage-words 0`
(bad lines are counted rejects with their reasons), and FiD's JSON question files (and JSONL without ids)
through `premem retrieve` and `premem train-lumen`."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from checkpoints import english_sentences
from click.testing import CliRunner
from lumen_helpers import make_full_t5_checkpoint

from premem.jobs.cli import main
from premem.pipeline.retrieve import ReadQuestions, RetrieveConfig
from premem.storage import MemoryStore, read_neighbors
from premem.storage.questions import missing_id
from premem.storage.reader import read_questions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PASSAGES = 12


def _texts() -> list[str]:
    sentences = english_sentences(PASSAGES * 2, seed=5)
    texts = [f"{sentences[2 * i]} {sentences[2 * i + 1]}" for i in range(PASSAGES)]
    texts[1] = 'she said "to be,  or not" and left\tthe room'  # quotes, two spaces and a tab: kept exactly
    texts[2] = " ".join(texts[2].split() * 12)  # over 100 words: one passage all the same with --passage-words 0
    return texts


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _write_dpr_tsv(path, texts: list[str]) -> None:
    """DPR's psgs_w100.tsv layout: header id/text/title, text quoted with inner quotes doubled; plus bad lines."""
    lines = [b"id\ttext\ttitle"]
    lines += [f"{i + 1}\t{_quoted(t)}\tdoc {i}".encode() for i, t in enumerate(texts)]
    lines += [
        b"100\ttoo few columns",                 # line 14
        b'101\t""\tEmpty',                        # line 15: empty text
        b'102\t"unclosed quote\tBad',             # line 16
        b"103\tnot utf-8 \xff\xfe\tBad",          # line 17
        b"1\ta second passage with id 1\tDup",    # line 18
        b"",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_full_t5_checkpoint(tmp_path_factory.mktemp("t5"), layers=2)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("dpr")
    _write_dpr_tsv(root / "psgs.tsv", _texts())
    out = root / "shards"
    result = CliRunner().invoke(main, ["shard", str(root / "psgs.tsv"), "--out", str(out), "--tokenizer",
                                       str(checkpoint), "--passage-words", "0", "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_dpr_tsv_passages_are_kept_and_bad_lines_are_counted_rejects(sharded):
    out, output = sharded
    index = json.loads((out / "index.json").read_text())
    assert index["passage_words"] == 0
    table = pa.concat_tables(pq.read_table(out / s["path"]) for s in index["shards"])
    texts = _texts()
    assert table.column("text").to_pylist() == texts  # one passage per line, text exactly as in the file
    assert table.column("doc_id").to_pylist() == [str(i + 1) for i in range(PASSAGES)]
    assert table.column("title").to_pylist() == [f"doc {i}" for i in range(PASSAGES)]
    assert set(table.column("passage").to_pylist()) == {0}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["position"], r["reason"]) for r in rejects) == [
        (14, "wrong number of tsv columns: 2, expected 3 (id, text, title)"),
        (15, "empty field 'text'"),
        (16, "bad tsv quoting: unexpected end of data"),
        (17, "not valid UTF-8 (byte 14)"),
        (18, "duplicate id '1' (first seen at " + str(out.parent / "psgs.tsv") + ":2)"),
    ]
    assert index["records"] == {
        "input": PASSAGES + 5, "accepted": PASSAGES, "rejected": 5,
        "rejected_by_reason": {"bad tsv quoting": 1, "duplicate id": 1, "empty field": 1, "not valid UTF-8": 1,
                               "wrong number of tsv columns": 1}}
    assert f"{PASSAGES + 5} input records = {PASSAGES} accepted + 5 rejected" in output
    assert "rejected, wrong number of tsv columns: 1" in output


def test_tsv_header_must_name_the_text_column(tmp_path, checkpoint):
    (tmp_path / "p.tsv").write_text("1\tsome text\ttitle\n")
    result = CliRunner().invoke(main, ["shard", str(tmp_path / "p.tsv"), "--out", str(tmp_path / "o"),
                                       "--tokenizer", str(checkpoint), "--passage-words", "0"])
    assert result.exit_code == 0, result.output
    (reject,) = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert reject["position"] == 1 and reject["reason"].startswith("tsv header names no text column: 'text'")
    result = CliRunner().invoke(main, ["shard", str(tmp_path / "p.tsv"), "--out", str(tmp_path / "o2"),
                                       "--tokenizer", str(checkpoint), "--passage-words", "-1"])
    assert result.exit_code == 2 and "--passage-words must be >= 1, or 0" in result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory, sharded, checkpoint, minilm_path):
    """The tsv's passages encoded (K=1 of 2) with MiniLM vectors and an exact faiss index."""
    path = tmp_path_factory.mktemp("store") / "s"
    runner = CliRunner()
    result = runner.invoke(main, ["encode", str(sharded[0]), "--store", str(path), "--encoder", str(checkpoint),
                                  "--memory-layers", "1", "--compute-dtype", "float32", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["index", str(path), "--factory", "Flat"])
    assert result.exit_code == 0, result.output
    return path


def _questions() -> list[dict]:
    """FiD-style records: question, answers, ctxs; ids on some, none on others; and one bad record."""
    texts = _texts()
    out = []
    for i in range(8):
        record = {"question": " ".join(texts[i].split()[:6]), "answers": [f"doc {i}"],
                  "ctxs": [{"id": str(i + 1), "title": f"doc {i}", "text": texts[i], "score": "1.5"}]}
        if i % 2 == 0:
            record = {"id": f"fid-{i}", **record}
        out.append(record)
    out.append({"id": "fid-bad", "question": "  ", "answers": ["x"]})
    return out


@pytest.fixture(scope="module")
def question_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("questions")
    records = _questions()
    (root / "fid.json").write_text(json.dumps(records, indent=2))  # FiD's form: one JSON array
    (root / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = [r.get("id") or missing_id(r["question"]) for r in records[:-1]]
    return root, expected


def _retrieve(store, questions, out):
    result = CliRunner().invoke(main, ["retrieve", str(store), str(questions), "--out", str(out), "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "8 questions -> 3 rows each" in result.output and "1 rejected" in result.output, result.output
    rejects = [json.loads(line) for line in open(f"{out}.rejects.jsonl")]
    assert [r["reason"] for r in rejects] == ["field 'question' is empty"]
    return read_neighbors(out)


def _train(checkpoint, store, questions, neighbors, out):
    result = CliRunner().invoke(main, [
        "train-lumen", "--checkpoint", str(checkpoint), "--store", str(store), "--questions", str(questions),
        "--neighbors", str(neighbors), "--out", str(out), "--steps", "2", "--batch-size", "4", "--warmup-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "questions: 8 trained on (0 without neighbours, 1 bad lines set aside)" in result.output, result.output
    return json.loads((out / "metrics.json").read_text())


def test_questions_without_ids_get_the_same_ids_in_retrieve_and_training(store, question_files, checkpoint, tmp_path):
    root, expected = question_files
    neighbors = _retrieve(store, root / "same.jsonl", tmp_path / "n.parquet")
    assert sorted(neighbors.question_ids) == sorted(expected)  # sha256(question)[:16] where the id is missing
    assert sorted(q.id for q in read_questions(root / "same.jsonl").questions) == sorted(expected)
    metrics = _train(checkpoint, store, root / "same.jsonl", tmp_path / "n.parquet", tmp_path / "out")
    assert metrics["train"]["joined"] == 8


def test_fid_json_questions_train(store, question_files, checkpoint, tmp_path):
    root, expected = question_files
    qset = read_questions(root / "fid.json")
    assert [q.id for q in qset.questions] == expected and qset.questions[0].answers == ["doc 0"]
    assert [(r["line"], r["reason"]) for r in qset.rejects] == [(9, "field 'question' is empty")]
    _retrieve(store, root / "same.jsonl", tmp_path / "n.parquet")  # the same records as JSONL: the same ids
    metrics = _train(checkpoint, store, root / "fid.json", tmp_path / "n.parquet", tmp_path / "out")
    assert metrics["train"]["joined"] == 8


def test_fid_json_is_read_as_one_element_by_the_retrieve_read_step(question_files):
    root, expected = question_files
    records = _questions()
    with beam.Pipeline() as pipeline:
        questions, rejected = pipeline | ReadQuestions(str(root / "fid.json"), RetrieveConfig())
        assert_that(questions, equal_to([{"question_id": qid, "question": r["question"]}
                                         for qid, r in zip(expected, records, strict=False)]))
        assert_that(rejected | beam.Map(lambda r: json.loads(r)["reason"]),
                    equal_to(["field 'question' is empty"]), label="rejected")


def test_fid_json_through_retrieve(store, question_files, tmp_path):
    root, expected = question_files
    from_json = _retrieve(store, root / "fid.json", tmp_path / "json.parquet")
    from_jsonl = _retrieve(store, root / "same.jsonl", tmp_path / "jsonl.parquet")
    assert from_json.question_ids == from_jsonl.question_ids and sorted(from_json.question_ids) == sorted(expected)
    assert (from_json.rows == from_jsonl.rows).all()
    assert MemoryStore.open(str(store)).rows == PASSAGES
