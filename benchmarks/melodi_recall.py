"""Does MELODI use its memory? Long-range recall of a random key, S+L vs S-only vs no memory, same budget.

Synthetic documents (premem.models.melodi_recall): a random key is stated at the start of one window ('#', a
label, the key) and must be reproduced k windows later ('@', the label, the key), only '.' filler between.
The three settings are trained with the project's training loop (premem.models.melodi_train.train) from the
same seed, data and budget, and scored on held-out documents: recall accuracy of the key letters by distance k
(1 .. n_windows-1) and by the number of keys per document, beside chance (1/26), plus the held-out
perplexity by window position (whole documents, fresh state).

    python benchmarks/melodi_recall.py --out /tmp/melodi-recall            # all three settings, one after another
    python benchmarks/melodi_recall.py --out /tmp/melodi-recall --settings S+L   # one setting (run them side by side)
    python benchmarks/melodi_recall.py --out /tmp/melodi-recall --report   # the table of the settings done so far
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from premem.models.melodi import MelodiConfig
from premem.models.melodi_ckpt import load_checkpoint
from premem.models.melodi_recall import make_recall_docs, recall_accuracy
from premem.models.melodi_train import TrainConfig, evaluate, train

SETTINGS = {
    "S+L": {},
    "S only": {"use_long_term": False},
    "none": {"S": 0, "L": 0, "use_long_term": False},
}
# 2 layers of d=64: the long-term layer on top; S=4 short-term tokens per layer, L=2 long-term tokens per window,
# a FIFO as deep as the document. attn_scale_init 8: see MelodiConfig (the reference's 1 learns nothing here).
MODEL = dict(num_layers=2, d_model=64, num_heads=4, d_ff=128, S=4, Su=4, L=2, long_term_layer=1, vocab_size=257,
             dropout=0.0, attn_scale_init=8.0)


def config_for(setting: str, args) -> MelodiConfig:
    return MelodiConfig(**{**MODEL, "W": args.window, "Q_max": args.windows, **SETTINGS[setting]})


def run_setting(setting: str, args, out: Path) -> dict:
    task = dict(W=args.window, n_windows=args.windows, key_len=args.key_len)
    train_docs = [d.tokens for d in make_recall_docs(args.steps * args.batch_size, n_keys=args.train_keys, seed=1,
                                                     **task)]
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, segment_windows=args.windows, lr=args.lr,
                     warmup_steps=args.warmup, eval_every=args.steps, checkpoint_every=args.steps, seed=0,
                     device="cpu")
    ckpt = out / setting.split()[0].replace("+", "")
    t0 = time.perf_counter()
    res = train(config_for(setting, args), tc, train_docs, [], ckpt)
    seconds = time.perf_counter() - t0
    model = load_checkpoint(ckpt).model
    row = {"setting": setting, "seconds": seconds, "steps": res.steps, "train_loss": res.history[-1]["train_loss"],
           "tokens_per_s": res.history[-1]["tokens_per_s"], "by_keys": {}}
    for n in args.eval_keys:
        held = make_recall_docs(args.heldout, n_keys=n, seed=100 + n, **task)
        acc = recall_accuracy(model, held)
        row["by_keys"][n] = acc["all"]
        if n == args.eval_keys[0]:
            row["by_distance"], row["letters"] = acc["by_distance"], acc["letters"]
            ev = evaluate(model, [d.tokens for d in held], segment_windows=args.windows)
            row["ppl_by_window"] = {k: v["ppl"] for k, v in ev["buckets"].items()}
            row["ppl"] = ev["ppl"]
    (out / f"result-{ckpt.name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def report(args, out: Path) -> None:
    rows = [json.loads(p.read_text()) for s in SETTINGS
            if (p := out / f"result-{s.split()[0].replace('+', '')}.json").is_file()]
    if not rows:
        print(f"no results under {out} yet")
        return
    c = config_for("S+L", args)
    print(f"\nrecall of a {args.key_len}-letter key k windows later; {c.num_layers} layers x d={c.d_model}, W={c.W}, "
          f"S={c.S}, L={c.L}, Q_max={c.Q_max}, attn_scale_init={c.attn_scale_init}; {args.steps} steps x "
          f"{args.batch_size} documents of {args.windows} windows ({args.steps * args.batch_size * args.windows * c.W} "
          f"tokens), AdamW lr {args.lr}, fp32, 1 CPU thread; held-out: {args.heldout} documents per key count; "
          f"chance = 1/26 = {1 / 26:.3f}")
    ks = sorted({int(k) for r in rows for k in r["by_distance"]})
    print("| setting | " + " | ".join(f"k={k}" for k in ks) + " | train seconds |")
    print("|---|" + "---:|" * (len(ks) + 1))
    for r in rows:
        d = {int(k): v for k, v in r["by_distance"].items()}
        print(f"| {r['setting']} | " + " | ".join(f"{d.get(k, float('nan')):.2f}" for k in ks)
              + f" | {r['seconds']:.0f} |")
    ns = sorted({int(n) for r in rows for n in r["by_keys"]})
    print("\n| setting | " + " | ".join(f"{n} key{'s' if n > 1 else ''}/doc" for n in ns) + " |")
    print("|---|" + "---:|" * len(ns))
    for r in rows:
        d = {int(n): v for n, v in r["by_keys"].items()}
        print(f"| {r['setting']} | " + " | ".join(f"{d[n]:.2f}" for n in ns) + " |")
    buckets = list(rows[0]["ppl_by_window"])
    print("\nheld-out perplexity per token (whole documents, 1 key each) by window position")
    print("| setting | all | " + " | ".join(f"windows {b}" for b in buckets) + " |")
    print("|---|---:|" + "---:|" * len(buckets))
    for r in rows:
        print(f"| {r['setting']} | {r['ppl']:.4f} | " + " | ".join(f"{r['ppl_by_window'][b]:.4f}" for b in buckets)
              + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/melodi-recall")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="Comma-separated: S+L, S only, none.")
    ap.add_argument("--report", action="store_true", help="Only print the table of the settings already run.")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--windows", type=int, default=10, help="Windows per document: distances 1 .. windows-1.")
    ap.add_argument("--key-len", type=int, default=1)
    ap.add_argument("--train-keys", type=int, nargs="+", default=[1])
    ap.add_argument("--eval-keys", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--heldout", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for s in args.settings.split(","):
            row = run_setting(s.strip(), args, out)
            print(f"[{row['setting']}] {row['seconds']:.0f} s, recall {row['by_keys']}", flush=True)
    report(args, out)


if __name__ == "__main__":
    main()
