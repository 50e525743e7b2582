"""Training-shaped reads from a memory store, side by side with the naive peer and the disk's own speed.

    PREMEM_CACHE=/tmp/pcache /work/venv/bin/python benchmarks/reader.py [--rows 3000] [--d-model 768]

One batch = 32 questions x 20 passages = 640 random rows (LUMEN reads ~20 passages per question).
- store: MemoryStore.read (one TensorStore call; zstd shards; only each passage's real tokens are stored);
- peer: a padded fp16 numpy memmap [rows, P, d] read with fancy indexing (mm[rows]);
- disk: sequential 8 MiB reads of a file of the same size, measured in the same run.
Cold = the files' pages dropped from the page cache before every batch, with posix_fadvise(POSIX_FADV_DONTNEED)
(no root here for /proc/sys/vm/drop_caches).  "needed bytes" = the real tokens' bytes a batch asks for.
Then the share of a training step spent waiting for data: LumenDataset + Prefetcher feeding a loop whose step
takes --step-ms (a sleep: the accelerator's time, during which the host is free).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from premem.storage import MemoryStore, write_neighbors
from premem.storage.reader import LumenDataset, Prefetcher, make_loader


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (they are clean: written and fsynced before)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def fsync_all(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build(root: Path, rows: int, max_tokens: int, d: int, shard_size: int, seed: int) -> tuple[MemoryStore, Path]:
    """A bf16 store and the padded fp16 memmap peer, holding the same random activations."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_tokens * 6 // 10, max_tokens + 1, size=rows)
    store = MemoryStore.create(root / "store", rows=rows, max_tokens=max_tokens, d_model=d, dtype="bfloat16",
                               shard_size=shard_size, fingerprint="bench", encoder={"bench": True})
    peer_path = root / "peer.f16"
    peer = np.lib.format.open_memmap(peer_path, mode="w+", dtype=np.float16, shape=(rows, max_tokens, d))
    for shard in range(store.num_shards):
        rng_rows = store.shard_rows(shard)
        with store.shard_writer(shard) as writer:
            for start in range(rng_rows.start, rng_rows.stop, 64):
                stop = min(start + 64, rng_rows.stop)
                states = torch.from_numpy(rng.standard_normal((stop - start, max_tokens, d), dtype=np.float32))
                keep = torch.arange(max_tokens)[None, :, None] < torch.from_numpy(lengths[start:stop])[:, None, None]
                states *= keep
                writer.write(np.arange(start, stop), states, lengths[start:stop])
                peer[start:stop] = states.to(torch.bfloat16).to(torch.float16).numpy()
    store.finalize()
    peer.flush()
    del peer
    return MemoryStore.open(root / "store"), peer_path


def sequential_bandwidth(path: Path, block: int = 8 << 20) -> float:
    """Bytes/s of one sequential pass over `path` from a dropped cache."""
    drop_cache([path])
    size, started = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            size += len(chunk)
    return size / (time.perf_counter() - started)


def time_reads(batches: list[np.ndarray], read, cold_files: list[Path] | None) -> float:
    total = 0.0
    for rows in batches:
        if cold_files:
            drop_cache(cold_files)
        started = time.perf_counter()
        read(rows)
        total += time.perf_counter() - started
    return total / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=1000.0, help="Simulated training step time.")
    parser.add_argument("--loop-batches", type=int, default=12, help="Batches in the training-loop measurement.")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="premem-reader-bench-"))
    started = time.perf_counter()
    store, peer_path = build(root, args.rows, args.max_tokens, args.d_model, args.shard_size, args.seed)
    store_files = files_under(root / "store")
    fsync_all(store_files + [peer_path])
    itemsize = 2
    print(f"built in {time.perf_counter() - started:.0f} s under {root}: {args.rows} rows x <= {args.max_tokens} "
          f"tokens x d={args.d_model}; store {sum(p.stat().st_size for p in store_files) / 2**20:.0f} MiB on disk "
          f"(bf16, zstd), peer {peer_path.stat().st_size / 2**20:.0f} MiB (padded fp16)", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    per_batch = args.questions * args.k
    batches = [rng.choice(args.rows, per_batch, replace=False) for _ in range(args.batches)]
    lengths = store.lengths(np.arange(args.rows))
    needed = float(np.mean([lengths[b].sum() for b in batches])) * args.d_model * itemsize
    peer = np.load(peer_path, mmap_mode="r")

    def read_store(rows):
        return store.read(rows)

    def read_peer(rows):
        return torch.from_numpy(np.ascontiguousarray(peer[np.sort(rows)]))

    disk = sequential_bandwidth(peer_path)
    results = {}
    for name, fn, files in (("store", read_store, store_files), ("peer", read_peer, [peer_path])):
        cold = time_reads(batches, fn, files)
        fn(batches[0])  # warm the page cache for these rows
        for rows in batches:
            fn(rows)
        warm = time_reads(batches, fn, None)
        results[name] = (cold, warm)
    print(f"\none batch = {args.questions} questions x {args.k} passages = {per_batch} random rows, "
          f"{needed / 2**20:.1f} MiB of real tokens needed (bf16); disk sequential read {disk / 2**20:.0f} MiB/s")
    print(f"{'reader':<8}{'cold s/batch':>14}{'cold MiB/s':>12}{'vs disk':>9}{'warm s/batch':>14}{'warm MiB/s':>12}")
    for name, (cold, warm) in results.items():
        print(f"{name:<8}{cold:>14.3f}{needed / cold / 2**20:>12.0f}{needed / cold / disk:>9.2f}"
              f"{warm:>14.3f}{needed / warm / 2**20:>12.0f}")
    print("(MiB/s of needed bytes: the peer also reads each row's padding; the store reads compressed real tokens)")

    # --- data wait inside a training loop --------------------------------------------------------
    neighbors = root / "neighbors.parquet"
    n_questions = args.questions * args.loop_batches
    table = pa.table({"question_id": [f"q{i}" for i in range(n_questions)],
                      "question": [f"q{i}" for i in range(n_questions)],
                      "rows": [rng.choice(args.rows, args.k, replace=False).tolist() for _ in range(n_questions)],
                      "scores": [[0.0] * args.k for _ in range(n_questions)]})
    write_neighbors(neighbors, table, store=store.path, store_fingerprint=store.fingerprint,
                    retriever_fingerprint="bench")
    dataset = LumenDataset(store, neighbors, [[1, 2, 3]] * n_questions, [[4, 1]] * n_questions)
    for cold in (False, True):
        if cold:
            drop_cache(store_files)
        prefetched = Prefetcher(make_loader(dataset, args.questions, shuffle=True, seed=1), depth=2)
        steps, started = 0, time.perf_counter()
        for _batch in prefetched:
            time.sleep(args.step_ms / 1000)  # the accelerator's step
            steps += 1
        wall = time.perf_counter() - started
        steady = prefetched.wait_seconds - prefetched.first_wait_seconds
        print(f"\ntraining loop ({'cold' if cold else 'warm'} cache), step {args.step_ms:.0f} ms, prefetch depth 2: "
              f"{steps} steps in {wall:.1f} s, waiting for data {prefetched.wait_seconds:.2f} s = "
              f"{prefetched.wait_seconds / wall:.1%} of the loop; after the first batch "
              f"{steady / (wall - prefetched.first_wait_seconds):.1%}")
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096
    print(f"\nprocess RSS at the end: {rss / 2**20:.0f} MiB (TensorStore cache limit {store.cache_bytes >> 20} MiB)")
    if args.workdir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
