"""Compressed memory side by side: none (bf16) / int8 / pq at 8x, 16x and 32x on Shakespeare, MiniLM K=4.

For each codec: bytes per token (the codec's, and on disk incl. padding and the shard index), the reconstruction
quality premem measured at quantization time on held-out tokens (cosine median / p1 / min, relative MSE), the
throughput of writing the store (bf16: `premem encode`; the codecs: `premem quantize` of the bf16 store, which
writes the same codes as `premem encode --quantize`; its time includes training the codebook), cold and warm
reader batch time (640 random passages; cold: the shard files unmapped and dropped from the page cache before
every batch; with the decode, which runs on this machine's CPU, and without it: what crosses the disk when the
decode runs on the reader's GPU), and the downstream effect: `lumen-demo`'s
held-out exact match with the live side trained on each decoded memory (its own small random T5, d=64, so pq at
16x is d/8 = 8 bytes per token there too).  Writes results.json and a PNG of EM and cosine against bytes/token.

    .venv/bin/python benchmarks/quantize.py --workdir out/bench-quantize
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

CODECS = {  # name -> (--quantize, pq bytes per token as a fraction of d: d/4 = 8x, d/8 = 16x, d/16 = 32x, factory)
    "none": ("none", None, None), "int8": ("int8", None, None), "pq 16x": ("pq", 8, None), "pq 32x": ("pq", 16, None),
    "pq 8x": ("pq", 4, None),
    "PQ 16x": ("pq", 8, "PQ{b}x8"),  # no OPQ rotation: what the default's rotation buys
}


def drop_cache(root: Path) -> None:
    for path in (p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_times(path: Path, batches: list[np.ndarray]) -> tuple[float, float, float]:
    """(cold, cold without the decode, warm) median seconds per batch, decoded on this CPU unless said.

    As benchmarks/reader.py measures: the store is opened once (what a reader parses once, lengths, shard indexes,
    commit markers, the codebook, stays in the process, as in a training run after its first batch); cold = the
    shard files unmapped and every file of the store dropped from the page cache before each batch."""
    from premem.storage import MemoryStore

    store = MemoryStore.open(path)
    for rows in batches:
        store.read(rows)
    cold, cold_codes = [], []
    for decode, times in ((True, cold), (False, cold_codes)):
        for rows in batches:
            store.close()
            drop_cache(path)
            t0 = time.perf_counter()
            store.read(rows, decode=decode)
            times.append(time.perf_counter() - t0)
    warm = []
    for rows in batches:
        t0 = time.perf_counter()
        store.read(rows)
        warm.append(time.perf_counter() - t0)
    return float(np.median(cold)), float(np.median(cold_codes)), float(np.median(warm))


def request(codec: str, d: int, args):
    from premem.storage.quantize import QuantizeConfig

    kind, frac, factory = CODECS[codec]
    return QuantizeConfig(codec=kind, pq_bytes=None if frac is None else d // frac, train_tokens=args.codebook_tokens,
                          factory=factory and factory.format(b=d // frac))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="out/bench-quantize")
    parser.add_argument("--plays", type=int, default=8)
    parser.add_argument("--words-per-play", type=int, default=12000)
    parser.add_argument("--codebook-tokens", type=int, default=32768)
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated, of: " + ", ".join(CODECS))
    parser.add_argument("--demo-codecs", default="none,int8,pq 16x", help="codecs lumen-demo trains on ('' skips)")
    parser.add_argument("--demo-steps", type=int, default=150)
    parser.add_argument("--batch-rows", type=int, default=640, help="passages per batch (32 questions x 20)")
    parser.add_argument("--batches", type=int, default=5)
    args = parser.parse_args()

    import torch

    from premem.jobs.lumen_demo import run_lumen_demo, write_corpus
    from premem.jobs.quantize import run_quantize
    from premem.jobs.run import run_encode, run_shard
    from premem.pipeline.encode import EncoderConfig
    from premem.pipeline.shard import ShardConfig
    from premem.storage import MemoryStore

    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    codecs = [c for c in args.codecs.split(",") if c]
    corpus = write_corpus(work / "plays.jsonl", args.plays, args.words_per_play)
    shards = work / "shards"
    if codecs and not (shards / "index.json").exists():
        run_shard([str(corpus)], str(shards), ShardConfig(tokenizer="minilm", shard_size=256, max_tokens=256))
    previous = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    results: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for codec in codecs:
        path = work / codec.replace(" ", "")
        t0 = time.perf_counter()
        done = (path / "manifest.json").exists() and "write_seconds" in previous.get(codec, {})
        if done:  # measured by an earlier run of this benchmark: reused, not rewritten
            pass
        elif codec == "none":
            run_encode(str(shards), str(path), EncoderConfig("minilm", memory_layers=4), retriever=None)
        else:
            run_quantize(str(work / "none"), str(path), request(codec, 384, args))
        seconds = previous[codec]["write_seconds"] if done else time.perf_counter() - t0
        store = MemoryStore.open(path)
        s = store.summary()
        fid = (store.quantize or {}).get("fidelity") or {}
        if "batches" not in results:
            results["batches"] = [rng.integers(0, store.rows, args.batch_rows) for _ in range(args.batches)]
        cold, cold_codes, warm = read_times(path, results["batches"])
        results[codec] = {"codec_bytes_per_token": s["logical_bytes_per_token"], "disk_bytes_per_token": s["bytes_per_token"],
                          "disk_vs_codec": s["bytes_per_token"] / s["logical_bytes_per_token"], "tokens": s["tokens"],
                          "write_seconds": seconds, "tokens_per_second": s["tokens"] / seconds,
                          "cosine_median": fid.get("cosine_median", 1.0), "cosine_p1": fid.get("cosine_p1", 1.0),
                          "cosine_min": fid.get("cosine_min", 1.0), "relative_mse": fid.get("relative_mse", 0.0),
                          "factory": (store.quantize or {}).get("factory"), "cold_s": cold, "cold_codes_s": cold_codes,
                          "warm_s": warm}
        print(f"{codec}: {results[codec]}", flush=True)
        (work / "results.json").write_text(json.dumps({**previous, **{k: v for k, v in results.items() if k != "batches"}},
                                                      indent=2) + "\n")
    results.pop("batches", None)
    for codec in [c for c in args.demo_codecs.split(",") if c]:
        summary = run_lumen_demo(str(work / f"demo-{codec.replace(' ', '')}"), steps=args.demo_steps,
                                 quantize=request(codec, 64, args), without_retrieval=False, log=lambda m: None)
        results.setdefault(codec, {})["lumen_demo_em"] = summary["runs"]["lumen"]["eval"][-1]["exact_match"]
        print(f"{codec}: lumen-demo EM {results[codec]['lumen_demo_em']:.1%}", flush=True)
    for codec, r in previous.items():  # EM measured by an earlier run (--demo-codecs '') is kept
        if "lumen_demo_em" in r and "lumen_demo_em" not in results.get(codec, {}):
            results.setdefault(codec, {})["lumen_demo_em"] = r["lumen_demo_em"]
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    base = results.get("none", {})
    tokens = next((r["tokens"] for r in results.values() if "tokens" in r), "?")
    print(f"\nShakespeare ({tokens} tokens), MiniLM layers [0, 4), d=384; {os.cpu_count()}-core CPU")
    print(f"{'codec':<8}{'factory':<15}{'B/token':>8}{'disk B/t':>9}{'disk/codec':>11}{'cos med':>8}{'cos p1':>8}"
          f"{'cos min':>8}{'rel MSE':>9}{'write tok/s':>12}{'cold ms':>8}{'vs bf16':>8}{'codes ms':>9}{'vs bf16':>8}"
          f"{'warm ms':>8}{'demo EM':>8}")
    for codec in CODECS:
        r = results.get(codec)
        if not r or "codec_bytes_per_token" not in r:
            continue
        speed = base.get("cold_s", float("nan")) / r["cold_s"]
        speed_codes = base.get("cold_s", float("nan")) / r["cold_codes_s"]
        em = f"{r['lumen_demo_em']:.1%}" if "lumen_demo_em" in r else "-"
        print(f"{codec:<8}{r['factory'] or '-':<15}{r['codec_bytes_per_token']:>8}{r['disk_bytes_per_token']:>9.1f}"
              f"{r['disk_vs_codec']:>11.3f}{r['cosine_median']:>8.4f}{r['cosine_p1']:>8.4f}{r['cosine_min']:>8.4f}"
              f"{r['relative_mse']:>9.4f}{r['tokens_per_second']:>12.0f}{r['cold_s'] * 1e3:>8.1f}{speed:>7.1f}x"
              f"{r['cold_codes_s'] * 1e3:>9.1f}{speed_codes:>7.1f}x{r['warm_s'] * 1e3:>8.1f}{em:>8}")
    print("cold: the store's files dropped from the page cache before each batch of "
          f"{args.batch_rows} random passages, decoded on this CPU (1 thread); codes: the same read with decode=False, "
          "what crosses the disk when the decode runs on the reader's GPU")
    plot(results, work / "quantize.png")
    print(f"details: {work}/results.json, plot: {work}/quantize.png")


def plot(results: dict, out: Path) -> None:
    """EM and cosine median against bytes per token (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(((c, r) for c, r in results.items() if "codec_bytes_per_token" in r and c in CODECS),
                  key=lambda cr: cr[1]["codec_bytes_per_token"])
    line = [(c, r) for c, r in rows if CODECS[c][2] is None]  # the default codecs; others as single points
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = [r["codec_bytes_per_token"] for _, r in line]
    ax.plot(x, [r["cosine_median"] for _, r in line], "o-", label="cosine median (held-out tokens)")
    ax.plot(x, [r["cosine_p1"] for _, r in line], "s--", label="cosine p1")
    for c, r in rows:
        ax.annotate(c, (r["codec_bytes_per_token"], r["cosine_median"]), textcoords="offset points", xytext=(4, 6))
        if CODECS[c][2] is not None:
            ax.plot([r["codec_bytes_per_token"]], [r["cosine_median"]], "kx", markersize=9,
                    label=f"{c}: {r['factory']} (no rotation), cosine median")
    em = [(r["codec_bytes_per_token"], r["lumen_demo_em"]) for _, r in rows if "lumen_demo_em" in r]
    if em:
        ax2 = ax.twinx()
        ax2.plot(*zip(*em, strict=True), "^-", color="tab:green", label="lumen-demo EM (held-out questions)")
        ax2.set_ylabel("lumen-demo exact match", color="tab:green")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower center")
    ax.set_xscale("log")
    ax.set_xlabel("memory bytes per token (MiniLM d=384; bf16 = 768)")
    ax.set_ylabel("cosine (decoded vs stored bf16)")
    ax.set_title("premem compressed memory: fidelity and LUMEN EM vs bytes/token")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
