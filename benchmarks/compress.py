"""Throughput of `premem compress` beside a forward of the full MELODI model over the same tokens.

The compressor runs only the layers up to the long-term layer (with --no-end-state) and never the output head;
the peer is the full model (all layers + head, logits computed), reading the same documents side by side,
segment by segment with the state carried. All sides use the same random-init checkpoint and the same bytes
(the first --doc-bytes of the first --docs Shakespeare plays).

    PREMEM_CACHE=/tmp/pcache python benchmarks/compress.py
    PREMEM_CACHE=/tmp/pcache python benchmarks/compress.py --vocab 32128   # with the paper's T5 vocabulary size
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from premem.jobs.melodi_run import run_compress
from premem.jobs.sample import write_plays_jsonl
from premem.models.melodi import MelodiConfig, MelodiLM
from premem.models.melodi_ckpt import ByteTokenizer, save_checkpoint
from premem.pipeline.compress import compress_documents


def full_forward(model: MelodiLM, docs: list[torch.Tensor], batch: int, segment_windows: int) -> int:
    """The peer: logits for every token, documents side by side, state carried across segments."""
    c = model.config
    seen = 0
    with torch.inference_mode():
        for s in range(0, len(docs), batch):
            group = docs[s:s + batch]
            n = max(-(-len(d) // c.W) for d in group)
            tokens = torch.zeros(len(group), n * c.W, dtype=torch.long)
            for b, d in enumerate(group):
                tokens[b, :len(d)] = d
            state = None
            T = segment_windows * c.W
            for off in range(0, tokens.shape[1], T):
                logits, state = model(tokens[:, off:off + T], state)
                seen += logits.shape[0] * logits.shape[1]
    return seen


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-bytes", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=257)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = MelodiConfig(num_layers=args.layers, d_model=args.d_model, num_heads=4, d_ff=4 * args.d_model, W=128,
                          S=32, Su=32, L=16, Q_max=16, long_term_layer=args.layers // 2, vocab_size=args.vocab,
                          dropout=0.0)
    work = Path(tempfile.mkdtemp(prefix="premem-compress-bench-"))
    try:
        plays = [json.loads(line) for line in write_plays_jsonl(work / "plays.jsonl").read_text().splitlines()]
        corpus = work / "docs.jsonl"
        with corpus.open("w") as f:
            for p in plays[:args.docs]:
                text = p["text"].encode()[:args.doc_bytes].decode("utf-8", "ignore")
                f.write(json.dumps({"id": p["id"], "title": p["title"], "text": text}) + "\n")
        docs = [ByteTokenizer().encode_tensor(json.loads(line)["text"]) for line in corpus.read_text().splitlines()]
        tokens = sum(len(d) for d in docs)
        torch.manual_seed(0)
        model = MelodiLM(config).eval()
        save_checkpoint(model, work / "ckpt")
        batch = args.docs

        def run_job(end_state: bool) -> None:
            shutil.rmtree(work / "store", ignore_errors=True)
            run_compress([str(corpus)], str(work / "store"), str(work / "ckpt"), docs_per_shard=args.docs,
                         docs_per_batch=batch, end_state=end_state)

        rows = [
            ("full model forward (all layers + head, logits)",
             best_of(args.repeats, lambda: full_forward(model, docs, batch, 8))),
            ("compress core, increments only (layers 0..LT)", best_of(args.repeats, lambda: list(
                compress_documents(model, docs, docs_per_batch=batch, end_state=False)))),
            ("compress core, + end state (all layers, no head)", best_of(args.repeats, lambda: list(
                compress_documents(model, docs, docs_per_batch=batch, end_state=True)))),
            ("`premem compress --no-end-state` job (Beam, read, store)", best_of(args.repeats, lambda: run_job(False))),
            ("`premem compress` job (default: with end state)", best_of(args.repeats, lambda: run_job(True))),
        ]
        peer = rows[0][1]
        print(f"{tokens} tokens ({args.docs} plays x {args.doc_bytes} bytes), MELODI {config.num_layers}x"
              f"{config.d_model}, long-term layer {config.long_term_layer}, W={config.W}, S={config.S}, "
              f"L={config.L}, Q_max={config.Q_max}, vocab {config.vocab_size}, fp32, {args.threads} CPU threads, "
              f"best of {args.repeats}")
        print("| | seconds | tokens/s | vs full forward |")
        print("|---|---:|---:|---:|")
        for name, sec in rows:
            print(f"| {name} | {sec:.2f} | {tokens / sec:,.0f} | {peer / sec:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
