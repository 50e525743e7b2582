"""Training-shaped reads from a memory store, side by side with the naive peer and the disk's own speed.

    PREMEM_CACHE=/tmp/pcache /work/venv/bin/python benchmarks/reader.py [--rows 2000] [--d-model 768]

One batch = 32 questions x 20 passages = 640 random rows (LUMEN reads ~20 passages per question).
- store raw: MemoryStore.read of a store written with the default codec (bytes + crc32c token chunks: the shard
  files are mapped, each passage's real-token chunks copied into the batch and checksummed; storage/chunkread.py);
- store zstd: the same data written with --codec zstd, read through TensorStore (decompress + crc32c per chunk);
- peer: a padded fp16 numpy memmap [rows, P, d] read with fancy indexing (mm[rows]);
- disk: one sequential pass of 8 MiB reads over a file of the peer's size, measured in the same run.
Cold = before each batch, every file unmapped and its pages dropped from the page cache with
posix_fadvise(POSIX_FADV_DONTNEED) (no root here for /proc/sys/vm/drop_caches); what a reader parsed once (lengths,
shard indexes) stays in the process, as in a training run after its first batch; the zstd store gets a fresh
TensorStore cache.  "needed bytes" = the real tokens' bytes a batch asks for.
Then the share of a training step spent waiting for data: LumenDataset + Prefetcher feeding a loop whose step
takes --step-ms (a sleep: the accelerator's time, during which the host is free).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


def build(root: Path, rows: int, max_tokens: int, d: int, shard_size: int, seed: int) -> dict[str, Path]:
    """bf16 stores (raw and zstd) and the padded fp16 memmap peer, holding the same random activations."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_tokens * 6 // 10, max_tokens + 1, size=rows)
    stores = {codec: MemoryStore.create(root / codec, rows=rows, max_tokens=max_tokens, d_model=d, dtype="bfloat16",
                                        shard_size=shard_size, fingerprint="bench", encoder={"bench": True}, codec=codec)
              for codec in ("raw", "zstd")}
    store = stores["raw"]
    peer_path = root / "peer.f16"
    peer = np.lib.format.open_memmap(peer_path, mode="w+", dtype=np.float16, shape=(rows, max_tokens, d))
    for shard in range(store.num_shards):
        rng_rows = store.shard_rows(shard)
        writers = [s.shard_writer(shard) for s in stores.values()]
        for writer in writers:
            writer.__enter__()
        for start in range(rng_rows.start, rng_rows.stop, 64):
            stop = min(start + 64, rng_rows.stop)
            states = torch.from_numpy(rng.standard_normal((stop - start, max_tokens, d), dtype=np.float32))
            keep = torch.arange(max_tokens)[None, :, None] < torch.from_numpy(lengths[start:stop])[:, None, None]
            states *= keep
            for writer in writers:
                writer.write(np.arange(start, stop), states, lengths[start:stop])
            peer[start:stop] = states.to(torch.bfloat16).to(torch.float16).numpy()
        for writer in writers:
            writer.__exit__(None, None, None)
    for s in stores.values():
        s.finalize()
    peer.flush()
    del peer
    return {"store raw": root / "raw", "store zstd": root / "zstd", "peer": peer_path}


def sequential_bandwidth(path: Path, block: int = 8 << 20) -> float:
    """Bytes/s of one sequential pass over `path` from a dropped cache."""
    drop_cache([path])
    size, started = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(block):
            size += len(chunk)
    return size / (time.perf_counter() - started)


def random_read_seconds(store: MemoryStore, rows: np.ndarray, threads: int = 16) -> float:
    """The device alone on the batch's own byte ranges: each row's stored chunks read by ``preadv`` into a scratch
    buffer from a dropped cache, ``threads`` at a time, no readahead; what any reader of these bytes has to wait."""
    reader = store._raw_reader()
    lay, lengths = reader.layout, store.lengths(rows)
    ranges = []
    for row, length in zip(rows.tolist(), lengths.tolist()):
        shard = reader._shard(row // lay.shard_rows)
        local = row % lay.shard_rows
        ranges.append((shard.path, int(shard.start[local]), -(-length // lay.token_chunk) * (lay.chunk_bytes + 4)))
    store.close()
    drop_cache(sorted({Path(path) for path, _, _ in ranges}))
    scratch = threading.local()

    def read(item: tuple[str, int, int]) -> None:
        path, offset, size = item
        if getattr(scratch, "buffer", None) is None or len(scratch.buffer) < size:
            scratch.buffer = bytearray(size)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.preadv(fd, [memoryview(scratch.buffer)[:size]], offset)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(read, ranges))
        return time.perf_counter() - started


class Reader:
    """One of the compared readers, as a training process holds it: opened once."""

    def __init__(self, path: Path):
        self.path = path
        self.store = self.peer = None
        self.reopen()

    def reopen(self) -> None:
        if self.path.suffix == ".f16":
            self.peer = np.load(self.path, mmap_mode="r")
        elif self.store is None or self.path.name == "zstd":
            self.store = MemoryStore.open(self.path)  # zstd: a new TensorStore cache, so no decoded chunk is kept

    def close(self) -> None:
        """Unmap the files, so that dropping the page cache really drops their pages; what the reader parsed
        (lengths, shard indexes, commit markers) stays, as in a training process after its first batch."""
        if self.store is not None:
            self.store.close()
        self.peer = None

    def read(self, rows: np.ndarray) -> torch.Tensor:
        if self.path.suffix == ".f16":
            return torch.from_numpy(np.ascontiguousarray(self.peer[np.sort(rows)]))
        return self.store.read(rows).states

    def files(self) -> list[Path]:
        return [self.path] if self.path.is_file() else files_under(self.path)


def cold_reads(batches: list[np.ndarray], reader: Reader) -> float:
    """Mean seconds per batch, every file unmapped and dropped from the page cache before each batch."""
    total = 0.0
    for rows in batches:
        reader.close()
        reader.reopen()
        drop_cache(reader.files())
        started = time.perf_counter()
        reader.read(rows)
        total += time.perf_counter() - started
    return total / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
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
    parser.add_argument("--gcs", action="store_true",
                        help="Also read the raw store from gs:// (fake-gcs-server on loopback) at 0 and --latency-ms.")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="Added per request in front of the server.")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="premem-reader-bench-"))
    started = time.perf_counter()
    paths = build(root, args.rows, args.max_tokens, args.d_model, args.shard_size, args.seed)
    readers = {name: Reader(path) for name, path in paths.items()}
    for reader in readers.values():
        fsync_all(reader.files())
    itemsize = 2
    sizes = ", ".join(f"{name} {sum(p.stat().st_size for p in r.files()) / 2**20:.0f} MiB" for name, r in readers.items())
    print(f"built in {time.perf_counter() - started:.0f} s under {root}: {args.rows} rows x <= {args.max_tokens} "
          f"tokens x d={args.d_model}, bf16 stores, padded fp16 peer; on disk: {sizes}", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    per_batch = args.questions * args.k
    batches = [rng.choice(args.rows, per_batch, replace=False) for _ in range(args.batches)]
    store = readers["store raw"].store
    lengths = store.lengths(np.arange(args.rows))
    needed = float(np.mean([lengths[b].sum() for b in batches])) * args.d_model * itemsize

    cold, disk = {}, []
    for name, reader in readers.items():
        disk.append(sequential_bandwidth(paths["peer"]))
        cold[name] = cold_reads(batches, reader)
        if name == "store raw":  # the device on the same byte ranges, right after: the same state of the disk
            random_s = float(np.mean([random_read_seconds(reader.store, rows) for rows in batches]))
        reader.close()
    disk.append(sequential_bandwidth(paths["peer"]))
    # warm: every reader's page cache (and the reader) warmed, then the readers take turns on each batch, so that
    # all of them run in the same state of the machine and of the process's allocator; the median per reader
    warm_times: dict[str, list[float]] = {name: [] for name in readers}
    for reader in readers.values():
        reader.reopen()
        for rows in batches:
            reader.read(rows)
    for _round in range(3):
        for rows in batches:
            for name, reader in readers.items():
                started = time.perf_counter()
                reader.read(rows)
                warm_times[name].append(time.perf_counter() - started)
    results = {name: (cold[name], float(np.median(warm_times[name]))) for name in readers}
    disk_bw = float(np.mean(disk))
    print(f"\none batch = {args.questions} questions x {args.k} passages = {per_batch} random rows, "
          f"{needed / 2**20:.1f} MiB of real tokens needed (bf16); disk sequential read {disk_bw / 2**20:.0f} MiB/s "
          f"(mean of {len(disk)} passes between the readers: {', '.join(f'{d / 2**20:.0f}' for d in disk)})")
    print(f"{'reader':<12}{'cold s/batch':>14}{'cold MiB/s':>12}{'vs disk':>9}{'warm s/batch':>14}{'warm MiB/s':>12}"
          f"{'warm vs peer':>14}")
    for name, (cold, warm) in results.items():
        print(f"{name:<12}{cold:>14.3f}{needed / cold / 2**20:>12.0f}{needed / cold / disk_bw:>9.2f}"
              f"{warm:>14.3f}{needed / warm / 2**20:>12.0f}{results['peer'][1] / warm:>13.2f}x")
    print(f"{'disk random':<12}{random_s:>14.3f}{needed / random_s / 2**20:>12.0f}{needed / random_s / disk_bw:>9.2f}"
          f"   (the raw store's byte ranges of each batch, 16 threads of preadv, no copy, no checksum)")
    print("(MiB/s of needed bytes: the peer also reads each row's padding; 'warm vs peer' > 1: faster than the peer)")
    print(f"store raw cold = {random_s / results['store raw'][0]:.2f} of the device's own random-read speed for the "
          f"same bytes")

    # --- data wait inside a training loop --------------------------------------------------------
    neighbors = root / "neighbors.parquet"
    n_questions = args.questions * args.loop_batches
    table = pa.table({"question_id": [f"q{i}" for i in range(n_questions)],
                      "question": [f"q{i}" for i in range(n_questions)],
                      "rows": [rng.choice(args.rows, args.k, replace=False).tolist() for _ in range(n_questions)],
                      "scores": [[0.0] * args.k for _ in range(n_questions)]})
    store = readers["store raw"].store
    write_neighbors(neighbors, table, store=store.path, store_fingerprint=store.fingerprint,
                    retriever_fingerprint="bench")
    dataset = LumenDataset(store, neighbors, [[1, 2, 3]] * n_questions, [[4, 1]] * n_questions)
    for cold in (False, True):
        if cold:
            store.close()
            drop_cache(readers["store raw"].files())
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
    if args.gcs:
        gcs_reads(args, paths["store raw"], batches, needed, results["store raw"][1], neighbors, n_questions)
    rss = int(open("/proc/self/statm").read().split()[1]) * 4096
    print(f"\nprocess RSS at the end: {rss / 2**20:.0f} MiB (TensorStore cache limit {store.cache_bytes >> 20} MiB)")
    if args.workdir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def gcs_reads(args, local_store: Path, batches: list[np.ndarray], needed: float, local_warm: float, neighbors: Path,
              n_questions: int) -> None:
    """The raw store copied to gs:// on a real GCS JSON API (fake-gcs-server, tests/gcs_server.py) and read there
    through a proxy that counts requests and bytes and adds a fixed latency per request."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gcs_server import GcsServer, Proxy, point_at

    from premem.storage import kv

    server = GcsServer(local_store.parent / "gcs-root").start()
    try:
        point_at(server.url)
        url = server.make_bucket("premem-bench") + "/store"
        for f in files_under(local_store):
            kv.write_file(f"{url}/{f.relative_to(local_store).as_posix()}", f.read_bytes())
        limit = kv.gcs_context()["gcs_request_concurrency"]["limit"]
        print(f"\ngs:// (fake-gcs-server on loopback, GCS request concurrency {limit}), {len(batches[0])} random rows "
              f"per batch; local warm {local_warm:.3f} s/batch")
        print(f"{'added latency':<15}{'s/batch':>10}{'batches/s':>11}{'vs local':>10}{'requests':>10}{'MiB/batch':>11}"
              f"{'needed MiB':>12}{'loop wait':>11}")
        for latency in (0.0, args.latency_ms / 1000):
            proxy = Proxy(server.url, latency=latency)
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = proxy.url
            # no chunk cache: every batch comes from the server (the store is smaller than a training corpus)
            store = MemoryStore.open(url, cache_bytes=0)
            store.read(batches[0][:1])  # the store's manifest, lengths and shard indexes: read once per process
            times, requests, sent = [], [], []
            for rows in batches:
                proxy.take()
                before = proxy.bytes_sent
                started = time.perf_counter()
                store.read(rows)
                times.append(time.perf_counter() - started)
                requests.append(len(proxy.take()))
                sent.append(proxy.bytes_sent - before)
            dataset = LumenDataset(store, neighbors, [[1, 2, 3]] * n_questions, [[4, 1]] * n_questions)
            prefetched = Prefetcher(make_loader(dataset, args.questions, shuffle=True, seed=1), depth=2)
            loop_started = time.perf_counter()
            for _batch in prefetched:
                time.sleep(args.step_ms / 1000)
            wall = time.perf_counter() - loop_started
            steady = (prefetched.wait_seconds - prefetched.first_wait_seconds) / (wall - prefetched.first_wait_seconds)
            t = float(np.median(times))
            print(f"{latency * 1000:>10.0f} ms  {t:>10.3f}{1 / t:>11.2f}{t / local_warm:>9.1f}x{np.mean(requests):>10.0f}"
                  f"{np.mean(sent) / 2**20:>11.1f}{needed / 2**20:>12.1f}{steady:>10.1%}")
            store.close()
            proxy.close()
        print(f"(loop wait: share of a {args.step_ms:.0f} ms step spent waiting for data after the first batch, "
              "LumenDataset + Prefetcher depth 2 reading from gs://; no chunk cache, every batch from the server)")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
