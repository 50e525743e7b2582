"""The shard step: passages, dense deterministic rows, and bad input set aside with reasons."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from premem.jobs.run import run_shard
from premem.pipeline.read import InputError, expand_inputs
from premem.pipeline.shard import ShardConfig, read_index, render_passage, split_words


def test_split_words_is_dpr_style():
    text = " ".join(f"w{i}" for i in range(250))
    passages = split_words(text, 100)
    assert [len(p.split()) for p in passages] == [100, 100, 50]
    assert " ".join(passages).split() == text.split()
    assert render_passage("title: {title} context: {text}", "T", "x y") == "title: T context: x y"
    with pytest.raises(ValueError, match="template"):
        render_passage("{question} {text}", "T", "x")


VOCAB = ("the king queen lord castle night ghost sword love death crown father son daughter sea storm "
         "blood honour speak night day heaven earth friend enemy fair foul wind fire water stone").split()


def _words(n: int, seed: int) -> str:
    return " ".join(VOCAB[(seed * 7919 + i * 31) % len(VOCAB)] for i in range(n))


@pytest.fixture()
def messy_corpus(tmp_path):
    """Good records and one of each kind of bad input, in three formats."""
    src = tmp_path / "in"
    src.mkdir()
    lines = [
        json.dumps({"id": "a", "title": "Alpha", "text": _words(230, 1)}).encode(),
        b"{not json",
        json.dumps({"id": "b", "title": "Beta"}).encode(),                   # missing text
        json.dumps({"id": "c", "title": "Gamma", "text": "   "}).encode(),   # empty text
        json.dumps({"id": "d", "title": "Delta", "text": "caf"}).encode()[:-2] + b"\xff\xfe\"}",  # not UTF-8
        json.dumps({"id": "e", "title": "Eps", "text": 42}).encode(),        # wrong type
        json.dumps({"id": "a", "title": "Alpha again", "text": _words(50, 2)}).encode(),  # duplicate id
        json.dumps(["a", "list"]).encode(),
        b"",
        json.dumps({"id": 7, "title": None, "text": _words(120, 3)}).encode(),
    ]
    (src / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    big = _words(2_100_000, 4)  # a ~10 MB single document
    assert len(big) > 10_000_000
    (src / "part-1.jsonl").write_text(json.dumps({"id": "big", "title": "Big", "text": big}) + "\n")
    pq.write_table(pa.table({"id": ["p1", "p2", "b"], "title": ["P1", "P2", "dup"],
                             "text": [_words(99, 5), None, _words(10, 6)]}), src / "part-2.parquet")
    (src / "Hamlet.txt").write_text(_words(205, 7))
    (src / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (src / "notes.csv").write_text("id,text\n1,hello\n")
    return src


def test_bad_input_is_counted_and_set_aside(messy_corpus, tmp_path, minilm_path):
    out = tmp_path / "shards"
    index = run_shard([str(messy_corpus / "*")], str(out), ShardConfig(tokenizer=str(minilm_path), shard_size=4096))
    rec = index["records"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rec["input"] == rec["accepted"] + rec["rejected"]
    assert rec["rejected"] == len(rejects) == 10
    assert sorted((r["source"].rsplit("/", 1)[1], r["position"], r["reason"].split(" (")[0]) for r in rejects) == [
        ("latin1.txt", 1, "not valid UTF-8"),
        ("notes.csv", 0, "unsupported file type: use .jsonl, .parquet or .txt"),
        ("part-0.jsonl", 2, "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
        ("part-0.jsonl", 3, "missing field 'text'"),
        ("part-0.jsonl", 4, "empty field 'text'"),
        ("part-0.jsonl", 5, "not valid UTF-8"),
        ("part-0.jsonl", 6, "field 'text' is int, expected string"),
        ("part-0.jsonl", 7, "duplicate id 'a'"),
        ("part-0.jsonl", 8, "record is a JSON list, expected an object"),
        ("part-2.parquet", 2, "missing field 'text'"),
    ]
    assert rec["rejected_by_reason"]["not valid UTF-8"] == 2
    # Accepted: a, 7, big, p1, b (its earlier record had no text), Hamlet.
    assert rec["accepted"] == 6

    table = pa.concat_tables(pq.read_table(out / s["path"]) for s in index["shards"])
    assert table.column("row").to_pylist() == list(range(index["rows"]))
    docs = table.column("doc_id").to_pylist()
    assert docs[:3] == ["Hamlet", "Hamlet", "Hamlet"]  # sorted file order: Hamlet.txt first
    assert docs.count("big") == 21_000 and docs.count("a") == 3 and docs.count("b") == 1
    lengths = table.column("length").to_pylist()
    assert all(0 < n <= 256 for n in lengths)
    assert lengths == [len(t) for t in table.column("token_ids").to_pylist()]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["title"] == "Hamlet" and first["passage"] == 0


def test_rejected_file_types_and_unmatched_inputs(tmp_path, minilm_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "notes.csv").write_text("id,text\n1,hello\n")
    (src / "good.jsonl").write_text(json.dumps({"id": 1, "text": "to be or not to be"}) + "\n")
    index = run_shard([str(src / "notes.csv"), str(src / "good.jsonl")], str(tmp_path / "o"),
                      ShardConfig(tokenizer=str(minilm_path)))
    assert index["records"] == {"input": 2, "accepted": 1, "rejected": 1,
                                "rejected_by_reason": {"unsupported file type": 1}}
    with pytest.raises(InputError, match="no input file matches"):
        expand_inputs([str(tmp_path / "nothing-*.jsonl")])


def test_rows_are_deterministic_across_runs_and_workers(tmp_path, minilm_path):
    src = tmp_path / "in"
    src.mkdir()
    for f in range(3):
        with (src / f"part-{f}.jsonl").open("w") as handle:
            for i in range(40):
                handle.write(json.dumps({"id": f"{f}-{i}", "title": f"T{i}", "text": _words(30 + 17 * i, f * 100 + i)}) + "\n")
    config = ShardConfig(tokenizer=str(minilm_path), passage_words=40, shard_size=64)
    a = run_shard([str(src)], str(tmp_path / "a"), config)
    b = run_shard([str(src)], str(tmp_path / "b"), config,
                  ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    assert a["rows"] == b["rows"] and a["num_shards"] == b["num_shards"] > 2
    for sa, sb in zip(a["shards"], b["shards"]):
        assert pq.read_table(tmp_path / "a" / sa["path"]).equals(pq.read_table(tmp_path / "b" / sb["path"]))
    table = pa.concat_tables(pq.read_table(tmp_path / "a" / s["path"]) for s in a["shards"])
    keys = [(d.split("-")[0], int(d.split("-")[1]), p) for d, p in zip(table.column("doc_id").to_pylist(),
                                                                       table.column("passage").to_pylist())]
    assert keys == sorted(keys)
    assert read_index(str(tmp_path / "a"))["tokenizer_fingerprint"]
