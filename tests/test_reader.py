"""The training reader: questions joined to neighbours and stored memory, batched reads, workers, ranks,
prefetching, bounded memory, and the errors a user can hit."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pyarrow as pa
import pytest
import torch
from lumen_helpers import make_full_t5_checkpoint, passages, write_store

from premem.storage import FingerprintMismatch, MemoryStore, write_neighbors
from premem.storage.reader import (
    LABEL_PAD,
    LumenBatch,
    LumenDataset,
    Prefetcher,
    ReaderError,
    collate_lumen,
    make_loader,
    read_questions,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


K = 3
QUESTIONS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_full_t5_checkpoint(tmp_path_factory.mktemp("t5full"), layers=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory, checkpoint):
    return write_store(tmp_path_factory.mktemp("store") / "s", checkpoint, passages(20), memory_layers=1,
                       dtype="bfloat16", shard_size=8)


def _neighbors_table(rows: np.ndarray) -> pa.Table:
    return pa.table({
        "question_id": [f"q{i}" for i in range(len(rows))],
        "question": [f"question {i}" for i in range(len(rows))],
        "rows": rows.tolist(),
        "scores": np.linspace(1, 0, rows.size, dtype=np.float32).reshape(rows.shape).tolist(),
    })


@pytest.fixture(scope="module")
def files(tmp_path_factory, store):
    """A question file (with two bad lines and one question without neighbours) and its neighbours file."""
    root = tmp_path_factory.mktemp("qa")
    rng = np.random.default_rng(0)
    rows = np.stack([rng.choice(store.rows, K, replace=False) for _ in range(QUESTIONS)])
    write_neighbors(root / "n.parquet", _neighbors_table(rows), store=store.path,
                    store_fingerprint=store.fingerprint, retriever_fingerprint="test")
    lines = [json.dumps({"id": f"q{i}", "question": "word " * (1 + i % 5), "answers": [f"answer {i}"]})
             for i in range(QUESTIONS)]
    lines += ["{not json", json.dumps({"id": "q3", "question": "again", "answer": "dup"}),
              json.dumps({"id": "orphan", "question": "no neighbours", "answer": "x"})]
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return root / "q.jsonl", root / "n.parquet", rows


def _tokens(texts: list[str]) -> list[list[int]]:
    return [[3 + len(w) for w in t.split()] for t in texts]


def _dataset(store, files, **kwargs) -> LumenDataset:
    questions, neighbors, _ = files
    dataset, _ = LumenDataset.from_files(store, questions, neighbors, tokenize_questions=_tokens,
                                         tokenize_answers=_tokens, **kwargs)
    return dataset


def test_join_report_sets_bad_lines_aside(store, files):
    questions, neighbors, _ = files
    dataset, report = LumenDataset.from_files(store, questions, neighbors, tokenize_questions=_tokens,
                                              tokenize_answers=_tokens)
    assert len(dataset) == QUESTIONS and dataset.k == K
    assert report["without_neighbors_ids"] == ["orphan"]
    assert [r["reason"] for r in report["rejects"]] == ["not valid JSON", "duplicate id 'q3'"]


def test_batch_holds_the_stored_memory_of_each_neighbour(store, files):
    dataset = _dataset(store, files)
    rows = files[2]
    batch = dataset.__getitems__([5, 0, 5, 17])  # any order, repeats
    assert isinstance(batch, LumenBatch)
    b, k, p, d = batch.memory.shape
    assert (b, k, d) == (4, K, store.d_model) and batch.memory.dtype == torch.bfloat16
    for i, q in enumerate([5, 0, 5, 17]):
        assert torch.equal(batch.rows[i], torch.from_numpy(rows[q]))
        direct = store.read(rows[q])
        n = direct.states.shape[1]
        assert torch.equal(batch.memory[i, :, :n], direct.states)
        assert not batch.memory[i, :, n:].any()
        assert torch.equal(batch.memory_mask[i, :, :n], direct.mask) and not batch.memory_mask[i, :, n:].any()
        expected_q = _tokens([dataset.questions[q].question])[0]
        assert batch.question_ids[i, :len(expected_q)].tolist() == expected_q
        assert int(batch.question_mask[i].sum()) == len(expected_q)
        expected_a = _tokens(dataset.questions[q].answers[:1])[0]
        assert batch.labels[i, :len(expected_a)].tolist() == expected_a
        assert (batch.labels[i, len(expected_a):] == LABEL_PAD).all()
    # the per-item path plus collate gives the same batch
    same = collate_lumen([dataset[i] for i in [5, 0, 5, 17]])
    for name in ("question_ids", "question_mask", "memory", "memory_mask", "labels", "rows", "index"):
        assert torch.equal(getattr(same, name), getattr(batch, name)), name


def _all_batches(loader) -> dict[int, LumenBatch]:
    out = {}
    for batch in loader:
        for i, index in enumerate(batch.index.tolist()):
            out[index] = (batch.memory[i][batch.memory_mask[i]].float().sum().item(), batch.rows[i].tolist())
    return out


def test_spawned_workers_and_ranks_read_disjoint_parts(store, files):
    dataset = _dataset(store, files)
    reference = _all_batches(make_loader(dataset, 5, shuffle=False))
    assert sorted(reference) == list(range(QUESTIONS))
    with_workers = _all_batches(make_loader(dataset, 5, shuffle=True, num_workers=2))
    assert with_workers == reference
    parts = [_all_batches(make_loader(dataset, 4, rank=r, world_size=3, seed=7)) for r in range(3)]
    assert all(len(p) == QUESTIONS // 3 for p in parts)
    assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
    merged = {**parts[0], **parts[1], **parts[2]}
    assert merged == reference


def test_forked_worker_is_a_clear_error(store, files):
    dataset = _dataset(store, files)
    dataset[0]  # the parent has used TensorStore
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate_lumen,
                                         multiprocessing_context=multiprocessing.get_context("fork"))
    with pytest.raises(ReaderError, match="multiprocessing_context='spawn'"):
        next(iter(loader))


def test_prefetcher_keeps_order_counts_waiting_and_raises_loader_errors(store, files):
    dataset = _dataset(store, files)
    loader = make_loader(dataset, 4, shuffle=False)
    prefetched = Prefetcher(loader, device="cpu", depth=2)
    got = [b.index.tolist() for b in prefetched]
    assert got == [b.index.tolist() for b in loader]
    assert prefetched.batches == len(got) and prefetched.wait_seconds >= 0

    def broken():
        yield dataset.__getitems__([0, 1])
        raise ReaderError("disk went away")

    seen = []
    with pytest.raises(ReaderError, match="disk went away"):
        for batch in Prefetcher(broken(), depth=1):
            seen.append(batch)
    assert len(seen) == 1
    for step, _batch in enumerate(Prefetcher(make_loader(dataset, 2), depth=1)):
        if step == 1:
            break  # early exit stops the thread


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def test_memory_stays_bounded_over_a_long_run(store, files):
    questions, neighbors, _ = files
    dataset, _ = LumenDataset.from_files(store.path, questions, neighbors, tokenize_questions=_tokens,
                                         tokenize_answers=_tokens, cache_bytes=1 << 20)
    loader = make_loader(dataset, 8, shuffle=True, drop_last=True)
    samples = []
    for epoch in range(120):
        for _batch in Prefetcher(loader, depth=2):
            pass
        if epoch in (20, 119):
            samples.append(_rss_bytes())
    assert samples[1] - samples[0] < 8 << 20, f"RSS grew by {(samples[1] - samples[0]) >> 20} MiB over 300 batches"


def test_rows_outside_the_store_are_refused(store, tmp_path):
    rows = np.array([[0, 1, store.rows + 5], [2, 3, 4]])
    write_neighbors(tmp_path / "n.parquet", _neighbors_table(rows), store=store.path,
                    store_fingerprint=store.fingerprint, retriever_fingerprint="test")
    with pytest.raises(ReaderError, match=rf"neighbour 2 of question 'q0' is row {store.rows + 5}, outside store"):
        LumenDataset(store, tmp_path / "n.parquet", _tokens(["a", "b"]))


def test_neighbours_of_another_store_are_refused(store, tmp_path):
    write_neighbors(tmp_path / "n.parquet", _neighbors_table(np.array([[0, 1, 2]])), store="/elsewhere",
                    store_fingerprint="f" * 64, retriever_fingerprint="test")
    with pytest.raises(FingerprintMismatch, match="rerun `premem retrieve`"):
        LumenDataset(store, tmp_path / "n.parquet", _tokens(["a"]))


def test_store_with_the_wrong_fingerprint_is_refused(store, files):
    with pytest.raises(FingerprintMismatch, match="expected encoder"):
        _dataset(store.path, files, expected_fingerprint="0" * 64)
    with pytest.raises(ReaderError, match="k=9 but the neighbours file holds 3"):
        _dataset(store, files, k=9)


def test_question_file_without_usable_lines_is_an_error(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(ReaderError, match="no usable question.*line 1: no string field 'question'"):
        read_questions(tmp_path / "q.jsonl")


def test_open_by_path_reopens_in_each_process(store):
    clone = MemoryStore.open(store.path)
    import pickle

    again = pickle.loads(pickle.dumps(clone))
    assert torch.equal(again.read([3]).states, store.read([3]).states)
