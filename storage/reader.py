"""The training-time reader: questions + their neighbours' stored memory, as device tensors, ahead of the loop.

A question set (JSONL or FiD's JSON array: question, answers, optional id; see premem.storage.questions) is joined
by question id to a neighbours file (`premem retrieve`) and to the memory store it names. `LumenDataset` is a
map-style torch Dataset; its `__getitems__` reads a whole batch's B·k passages in one store read
(`MemoryStore.read`, any order, repeats allowed), so a DataLoader with automatic batching gets a ready
`LumenBatch`. `make_loader` builds the DataLoader (spawn workers, each reopening the store; disjoint parts per
distributed rank), and `Prefetcher` keeps `depth` batches read, pinned and copied to the device ahead of the
training step.

Tokenizing questions is the caller's business (storage does not import models): pass the question and answer
token ids, e.g. from `LumenModel.question_ids` / `label_ids`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from premem.storage.errors import ReaderError
from premem.storage.neighbors import Neighbors, read_neighbors
from premem.storage.questions import Question, read_question_file
from premem.storage.store import MemoryStore
from premem.storage.tensors import pad_sequences

LABEL_PAD = -100  # ignored by the cross-entropy of Hugging Face seq2seq models


# --------------------------------------------------------------------------------------------
# questions


@dataclass
class QuestionSet:
    """Questions read from a question file, with the records set aside and why."""

    questions: list[Question]
    rejects: list[dict] = field(default_factory=list)  # {"line": n, "reason": ..., "record": excerpt}


def read_questions(path: str | os.PathLike, *, require_answers: bool = True) -> QuestionSet:
    """A question file (JSONL, or FiD's JSON array) with `question`, `answers` (or `answer`) and an optional `id`.

    Parsed by premem.storage.questions, the parser `premem retrieve` uses, so both give a question the same id
    (absent: the first 16 hex digits of sha256 of the question).  Bad records (not JSON, missing fields,
    duplicate ids) are set aside with their reason, never dropped silently.
    """
    try:
        out, rejects = read_question_file(path, require_answers=require_answers)
    except FileNotFoundError:
        raise ReaderError(f"question file {path} does not exist: pass a JSONL file (or FiD's JSON array) with "
                          "question, answers and optionally id") from None
    if not out:
        raise ReaderError(f"question file {path} holds no usable question ({len(rejects)} records set aside"
                          + (f", first: line {rejects[0]['line']}: {rejects[0]['reason']}" if rejects else "") + ")")
    return QuestionSet(out, rejects)


# --------------------------------------------------------------------------------------------
# batches


@dataclass
class LumenBatch:
    """One training batch: questions, their k passages' stored memory, and the answers as labels."""

    question_ids: torch.Tensor  # int64 [B, Q], 0-padded
    question_mask: torch.Tensor  # bool [B, Q]
    memory: torch.Tensor  # [B, k, P, d] in the store's dtype, zeros past each passage
    memory_mask: torch.Tensor  # bool [B, k, P]
    labels: torch.Tensor | None  # int64 [B, A], LABEL_PAD-padded
    rows: torch.Tensor  # int64 [B, k] store rows
    index: torch.Tensor  # int64 [B] positions in the dataset

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LumenBatch:
        return LumenBatch(**{name: (None if value is None else fn(value)) for name, value in vars(self).items()})

    def to(self, device: str | torch.device, non_blocking: bool = False) -> LumenBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LumenBatch:
        """Called by DataLoader(pin_memory=True) and by Prefetcher: page-locked copies for async device copies."""
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.question_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if t is not None)


# --------------------------------------------------------------------------------------------
# dataset


class LumenDataset(Dataset):
    """Question i, its top-k store rows and their memory; batched reads through `__getitems__`.

    The store handle reopens itself in every process (spawn DataLoader workers get a pickled copy).  A forked
    worker cannot use TensorStore once its parent did, so that case is refused with a clear error.
    """

    def __init__(
        self,
        store: MemoryStore | str | os.PathLike,
        neighbors: Neighbors | str | os.PathLike,
        question_ids: Sequence[Sequence[int]],
        label_ids: Sequence[Sequence[int]] | None = None,
        *,
        k: int | None = None,
        expected_fingerprint: str | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        if not isinstance(store, MemoryStore):
            store = MemoryStore.open(store, expected_fingerprint=expected_fingerprint, cache_bytes=cache_bytes)
        elif expected_fingerprint is not None and store.fingerprint != expected_fingerprint:
            store = MemoryStore.open(store.path, expected_fingerprint=expected_fingerprint)  # raises the mismatch
        if not isinstance(neighbors, Neighbors):
            neighbors = read_neighbors(neighbors, expected_fingerprint=store.fingerprint)
        elif neighbors.store_fingerprint != store.fingerprint:
            raise ReaderError(
                f"the neighbours were retrieved against store {neighbors.store} (fingerprint "
                f"{neighbors.store_fingerprint[:16]}), not {store.path} ({store.fingerprint[:16]}): "
                "rerun `premem retrieve` against this store")
        if len(question_ids) != len(neighbors) or (label_ids is not None and len(label_ids) != len(neighbors)):
            raise ReaderError(
                f"{len(neighbors)} neighbour lists but {len(question_ids)} questions"
                + ("" if label_ids is None else f" and {len(label_ids)} answers")
                + ": pass one question (and answer) per neighbours row, e.g. via LumenDataset.from_files")
        rows = neighbors.rows
        if k is not None:
            if not 0 <= k <= neighbors.k:
                raise ReaderError(f"k={k} but the neighbours file holds {neighbors.k} per question: "
                                  f"pick k in 0..{neighbors.k} or retrieve more")
            rows = rows[:, :k]
        _check_rows(rows, neighbors.question_ids, store)
        self.store = store
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.question_ids_text = list(neighbors.question_ids)
        self.question_tokens = [list(map(int, q)) for q in question_ids]
        self.label_tokens = None if label_ids is None else [list(map(int, a)) for a in label_ids]
        self._owner_pid = os.getpid()

    @classmethod
    def from_files(
        cls,
        store: MemoryStore | str | os.PathLike,
        questions: str | os.PathLike | QuestionSet,
        neighbors: str | os.PathLike | Neighbors,
        *,
        tokenize_questions: Callable[[list[str]], list[list[int]]],
        tokenize_answers: Callable[[list[str]], list[list[int]]] | None = None,
        k: int | None = None,
        expected_fingerprint: str | None = None,
        cache_bytes: int | None = None,
    ) -> tuple[LumenDataset, dict]:
        """Join a question file and a neighbours file by question id; returns the dataset and a join report.

        Questions without neighbours are set aside (counted, with ids); neighbours of questions not in the file
        are ignored (counted).
        """
        if not isinstance(store, MemoryStore):
            store = MemoryStore.open(store, expected_fingerprint=expected_fingerprint, cache_bytes=cache_bytes)
        qset = questions if isinstance(questions, QuestionSet) else read_questions(
            questions, require_answers=tokenize_answers is not None)
        if not isinstance(neighbors, Neighbors):
            neighbors = read_neighbors(neighbors, expected_fingerprint=store.fingerprint)
        position = {qid: i for i, qid in enumerate(neighbors.question_ids)}
        kept = [q for q in qset.questions if q.id in position]
        missing = [q.id for q in qset.questions if q.id not in position]
        if not kept:
            raise ReaderError(
                f"none of the {len(qset.questions)} questions has neighbours in the neighbours file (its ids look "
                f"like {neighbors.question_ids[:2]}, the questions' like {[q.id for q in qset.questions[:2]]}): "
                "run `premem retrieve` on this question file")
        take = np.array([position[q.id] for q in kept], dtype=np.int64)
        joined = Neighbors(
            question_ids=[q.id for q in kept], questions=[q.question for q in kept], rows=neighbors.rows[take],
            scores=neighbors.scores[take], store=neighbors.store, store_fingerprint=neighbors.store_fingerprint,
            retriever_fingerprint=neighbors.retriever_fingerprint)
        labels = None if tokenize_answers is None else tokenize_answers([q.answers[0] for q in kept])
        dataset = cls(store, joined, tokenize_questions([q.question for q in kept]), labels, k=k,
                      expected_fingerprint=expected_fingerprint)
        dataset.questions = kept
        report = {"questions": len(qset.questions), "joined": len(kept), "without_neighbors": len(missing),
                  "without_neighbors_ids": missing[:20], "rejected_lines": len(qset.rejects),
                  "rejects": qset.rejects[:20], "unused_neighbor_rows": len(neighbors) - len(kept)}
        return dataset, report

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return len(self.question_tokens)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_owner_pid"] = None  # unpickled in a new process: the store reopens itself there
        return state

    def _check_process(self) -> None:
        if self._owner_pid is not None and self._owner_pid != os.getpid():
            raise ReaderError(
                "LumenDataset was inherited by a forked DataLoader worker, where TensorStore cannot run: "
                "build the DataLoader with multiprocessing_context='spawn' (premem.storage.reader.make_loader does)")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One question: token ids, its k passages' memory [k, P, d] + mask, label ids."""
        self._check_process()
        rows = self.rows[index]
        batch = self.store.read(rows) if self.k else None
        return {
            "index": int(index),
            "question_ids": self.question_tokens[index],
            "label_ids": None if self.label_tokens is None else self.label_tokens[index],
            "rows": torch.from_numpy(rows.copy()),
            "memory": None if batch is None else batch.states,
            "memory_mask": None if batch is None else batch.mask,
        }

    def __getitems__(self, indices: Sequence[int]) -> LumenBatch:
        """A whole batch in one store read, straight into [B, k, P, d]."""
        self._check_process()
        index = np.asarray(list(indices), dtype=np.int64)
        rows = self.rows[index]  # [B, k]
        question_ids, question_mask = pad_sequences([self.question_tokens[i] for i in index], 0)
        labels = None
        if self.label_tokens is not None:
            labels, _ = pad_sequences([self.label_tokens[i] for i in index], LABEL_PAD)
        b, k = rows.shape
        if k == 0:
            memory = torch.zeros((b, 0, 0, self.store.d_model), dtype=self.store.torch_dtype)
            memory_mask = torch.zeros((b, 0, 0), dtype=torch.bool)
        else:  # rows in batch order (repeats allowed): the read lands in its final layout, no gather copy
            read = self.store.read(rows.reshape(-1))
            memory = read.states.reshape(b, k, *read.states.shape[1:])
            memory_mask = read.mask.reshape(b, k, -1)
        return LumenBatch(question_ids, question_mask, memory, memory_mask, labels,
                          torch.from_numpy(rows.copy()), torch.from_numpy(index))


def collate_lumen(items: LumenBatch | Sequence[dict[str, Any]]) -> LumenBatch:
    """DataLoader collate: passes a batch from `__getitems__` through; pads a list of `__getitem__` items."""
    if isinstance(items, LumenBatch):
        return items
    items = list(items)
    question_ids, question_mask = pad_sequences([it["question_ids"] for it in items], 0)
    labels = None
    if items[0]["label_ids"] is not None:
        labels, _ = pad_sequences([it["label_ids"] for it in items], LABEL_PAD)
    rows = torch.stack([it["rows"] for it in items])
    b, k = rows.shape
    if items[0]["memory"] is None:
        memory = torch.zeros((b, 0, 0, 0))
        memory_mask = torch.zeros((b, 0, 0), dtype=torch.bool)
    else:
        p = max(it["memory"].shape[1] for it in items)
        first = items[0]["memory"]
        memory = torch.zeros((b, k, p, first.shape[-1]), dtype=first.dtype)
        memory_mask = torch.zeros((b, k, p), dtype=torch.bool)
        for i, it in enumerate(items):
            n = it["memory"].shape[1]
            memory[i, :, :n], memory_mask[i, :, :n] = it["memory"], it["memory_mask"]
    index = torch.tensor([it["index"] for it in items], dtype=torch.long)
    return LumenBatch(question_ids, question_mask, memory, memory_mask, labels, rows, index)


def _check_rows(rows: np.ndarray, question_ids: list[str], store: MemoryStore) -> None:
    """Every neighbour row exists in the store and lies in a committed shard."""
    if rows.size == 0:
        return
    bad = (rows < 0) | (rows >= store.rows)
    if bad.any():
        q, j = np.argwhere(bad)[0]
        raise ReaderError(
            f"neighbour {j} of question {question_ids[q]!r} is row {int(rows[q, j])}, outside store {store.path} "
            f"(rows 0..{store.rows - 1}): the neighbours file was made against another store; rerun `premem retrieve`")
    committed = store.committed_shards()
    shards = np.unique(rows // store.shard_size)
    absent = [int(s) for s in shards if int(s) not in committed]
    if absent:
        raise ReaderError(
            f"the neighbours name rows in shards {absent[:5]} of store {store.path}, which are not committed: "
            "resume `premem encode` to finish the store")


# --------------------------------------------------------------------------------------------
# loading


def make_loader(
    dataset: LumenDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader of whole `LumenBatch`es: one store read per batch, spawn workers, disjoint rows per rank.

    With `world_size > 1` every rank reads its own 1/world_size of the questions (torch DistributedSampler);
    call `loader.batch_sampler.sampler.set_epoch(epoch)` each epoch for a new shuffle.
    """
    if batch_size < 1:
        raise ReaderError(f"batch size {batch_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise ReaderError(f"rank {rank} is not in 0..{world_size - 1}")
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    options: dict[str, Any] = {}
    if num_workers > 0:
        # TensorStore aborts in a forked child once the parent used it: workers start fresh and reopen the store.
        options = {"multiprocessing_context": "spawn", "persistent_workers": True, "prefetch_factor": prefetch_factor}
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last), collate_fn=collate_lumen,
                      num_workers=num_workers, pin_memory=pin_memory, **options)


class Prefetcher:
    """Runs a loader `depth` batches ahead in a background thread: reads, pins and copies to `device` meanwhile.

    Store reads release the GIL (numpy copies, TensorStore), so the thread's reads overlap the training step.  On
    CUDA the copy runs on a side stream from pinned memory (non-blocking) and the consumer's stream waits on it.
    `wait_seconds` is the time the loop spent blocked on data.  Memory is bounded: at most `depth` + 1 batches
    exist at once.
    """

    def __init__(self, loader: Iterable[LumenBatch], device: str | torch.device | None = None, depth: int = 2):
        if depth < 1:
            raise ReaderError(f"prefetch depth {depth} must be at least 1")
        self.loader = loader
        self.device = torch.device(device) if device is not None else None
        self.depth = depth
        self.wait_seconds = 0.0
        self.first_wait_seconds = 0.0  # the wait for the first batch: nothing could be read ahead of it
        self.batches = 0

    def __iter__(self) -> Iterator[LumenBatch]:
        cuda = self.device is not None and self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.loader:
                    event = None
                    if cuda:
                        if not batch.memory.is_pinned():
                            batch = batch.pin_memory()
                        with torch.cuda.stream(stream):
                            batch = batch.to(self.device, non_blocking=True)
                            event = torch.cuda.Event()
                            event.record(stream)
                    elif self.device is not None:
                        batch = batch.to(self.device)
                    while not stop.is_set():
                        try:
                            slots.put((batch, event, None), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as error:  # handed to the consumer, raised there
                slots.put((None, None, error))
                return
            slots.put((None, None, StopIteration()))

        thread = threading.Thread(target=produce, name="premem-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                started = time.perf_counter()
                batch, event, error = slots.get()
                waited = time.perf_counter() - started
                self.wait_seconds += waited
                if self.batches == 0:
                    self.first_wait_seconds += waited
                if isinstance(error, StopIteration):
                    return
                if error is not None:
                    raise error
                if event is not None:
                    _wait_on(batch, event, torch.cuda.current_stream(self.device))
                self.batches += 1
                yield batch
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    slots.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


def _wait_on(batch: LumenBatch, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
    """The consumer's stream waits for the side-stream copy; the caching allocator learns who uses the memory."""
    stream.wait_event(event)
    for tensor in vars(batch).values():
        if tensor is not None:
            tensor.record_stream(stream)
