"""MELODI memory ablation at equal steps on Shakespeare's plays (bytes as tokens).

Trains the same small model three times from the same seed and data order, changing only the memory:

  S+L      short-term memory in every layer + the long-term FIFO in the middle layer
  S only   short-term memory, no long-term FIFO (use_long_term=False)
  none     no memory at all: S=0, L=0 (each window sees only itself and its summary tokens)

and prints the held-out perplexity (per byte) of the two last plays, read whole from a fresh state, overall and
by window position (0, 1-3, 4-15, 16-63, 64+), side by side.

    PREMEM_CACHE=/tmp/pcache python benchmarks/melodi_ablation.py --steps 400 --out /tmp/melodi-ablation
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from premem.jobs.melodi_cli import SMALL
from premem.jobs.melodi_run import run_train_melodi
from premem.jobs.sample import write_plays_jsonl
from premem.models.melodi import MelodiConfig
from premem.models.melodi_train import TrainConfig
from premem.pipeline.encode import cpu_has_native_bf16

SETTINGS = {
    "S+L": {},
    "S only": {"use_long_term": False},
    "none (window-local)": {"S": 0, "L": 0, "use_long_term": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--segment-windows", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-tokens", type=int, default=None, help="Cap per held-out play (default: whole plays).")
    ap.add_argument("--out", default="/tmp/melodi-ablation")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    corpus = write_plays_jsonl(out / "plays.jsonl")
    bf16 = cpu_has_native_bf16()
    rows = []
    for name, kw in SETTINGS.items():
        config = MelodiConfig(**{**SMALL, **kw})
        tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, segment_windows=args.segment_windows,
                         lr=args.lr, bf16=bf16, eval_every=max(1, args.steps // 4),
                         eval_tokens_per_doc=args.eval_tokens, checkpoint_every=args.steps)
        t0 = time.perf_counter()
        ckpt = out / name.split()[0].replace("+", "")
        res = run_train_melodi([str(corpus)], str(ckpt), config, tc, heldout=2,
                               log=lambda m, n=name: print(f"[{n}] {m}", flush=True))
        rows.append({"setting": name, "S": config.S, "L": config.L if config.long_term_enabled else 0,
                     "seconds": time.perf_counter() - t0,
                     "first_heldout_ppl": res["history"][0].get("heldout_ppl"),
                     "heldout_loss": res["heldout"]["loss"], "heldout_ppl": res["heldout"]["ppl"],
                     "heldout_tokens": res["heldout"]["tokens"], "history": res["history"],
                     "buckets": {k: v["ppl"] for k, v in res["heldout"]["buckets"].items()}})
    print()
    print(f"{args.steps} steps x {args.batch_size} rows x {args.segment_windows * SMALL['W']} bytes, "
          f"model {SMALL['num_layers']}x{SMALL['d_model']}, W={SMALL['W']}, Q_max={SMALL['Q_max']}, "
          f"{'bf16' if bf16 else 'fp32'} on {torch.get_num_threads()} CPU threads; held-out: the last 2 plays, "
          + (f"first {args.eval_tokens} bytes each" if args.eval_tokens else "whole"))
    print("| setting | S | L | held-out loss (nats/byte) | held-out perplexity | at step "
          f"{max(1, args.steps // 4)} | train seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['S']} | {r['L']} | {r['heldout_loss']:.4f} | {r['heldout_ppl']:.3f} | "
              f"{r['first_heldout_ppl']:.3f} | {r['seconds']:.0f} |")
    buckets = list(rows[0]["buckets"])
    print("\nheld-out perplexity by window position (whole documents from a fresh state)")
    print("| setting | " + " | ".join(f"windows {b}" for b in buckets) + " |")
    print("|---|" + "---:|" * len(buckets))
    for r in rows:
        print(f"| {r['setting']} | " + " | ".join(f"{r['buckets'].get(b, float('nan')):.3f}" for b in buckets) + " |")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
