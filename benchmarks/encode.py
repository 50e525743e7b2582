"""premem encode vs the naive peer, on the same corpus and checkpoint.

The peer is what users write by hand: transformers AutoModel cut to the same
K layers, fixed batches of 64 padded to max length, synchronous writes into an
fp16 numpy memmap. Both get the same token ids (from `premem shard`), so the
comparison is of the encode step alone; premem's figure includes its Beam
pipeline start-up and the compressed Zarr writes.

    python benchmarks/encode.py --passages 2048            # Shakespeare + bundled MiniLM, K=4
    python benchmarks/encode.py --encoder /ckpt/t5 -k 8 --device cuda
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModel

from premem.jobs.run import run_encode, run_shard
from premem.jobs.sample import write_plays_jsonl
from premem.models import resolve_checkpoint
from premem.pipeline.encode import EncoderConfig
from premem.pipeline.shard import ShardConfig
from premem.storage import MemoryStore

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def naive_peer(checkpoint: Path, k: int, token_ids: list[list[int]], max_len: int, pad_id: int, device: str,
               out: Path, batch_size: int = 64) -> np.memmap:
    model = AutoModel.from_pretrained(checkpoint)
    model = getattr(model, "encoder", model) if model.config.model_type == "t5" else model
    if model.config.model_type == "t5":
        model.block = model.block[:k]
        model.final_layer_norm = torch.nn.Identity()
    else:
        model.encoder.layer = model.encoder.layer[:k]
    model.to(device).eval()
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    memmap = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(len(token_ids), max_len, d))
    with torch.inference_mode():
        for start in range(0, len(token_ids), batch_size):
            chunk = token_ids[start:start + batch_size]
            ids = torch.full((len(chunk), max_len), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), max_len), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            memmap[start:start + len(chunk)] = hidden.float().cpu().numpy().astype(np.float16)
            memmap.flush()
    return memmap


def encoder_flops_per_token(store: MemoryStore, mean_len: float) -> float:
    """Dense-layer + attention FLOPs per token for the K stored layers (2 FLOPs per MAC)."""
    enc = store.encoder
    d, k = store.d_model, enc["memory_layers"]
    params_per_layer = enc.get("layer_params") or 12 * d * d
    return k * (2 * params_per_layer + 4 * mean_len * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("-k", "--memory-layers", type=int, default=4)
    parser.add_argument("--passages", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-dtypes", default="float32,bfloat16")
    parser.add_argument("--check-rows", type=int, default=64)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="premem-bench-"))
    checkpoint = resolve_checkpoint(args.encoder)
    corpus = write_plays_jsonl(work / "plays.jsonl")
    index = run_shard([str(corpus)], str(work / "all"), ShardConfig(tokenizer=args.encoder, max_tokens=args.max_tokens))
    table = pa.concat_tables(pq.read_table(work / "all" / s["path"]) for s in index["shards"]).slice(0, args.passages)
    # Re-shard the first N passages so both sides see exactly the same rows.
    subset = work / "subset"
    subset.mkdir(exist_ok=True)
    shard_size = index["shard_size"]
    shards = []
    for i, start in enumerate(range(0, table.num_rows, shard_size)):
        part = table.slice(start, shard_size)
        pq.write_table(part, subset / f"shard-{i:05d}.parquet")
        shards.append({"shard": i, "path": f"shard-{i:05d}.parquet", "start": start, "stop": start + part.num_rows,
                       "passages": part.num_rows, "tokens": int(pa.compute.sum(part["length"]).as_py())})
    sub_index = dict(index, rows=table.num_rows, num_shards=len(shards), shards=shards,
                     tokens=sum(s["tokens"] for s in shards))
    (subset / "index.json").write_text(json.dumps(sub_index))
    token_ids = table.column("token_ids").to_pylist()
    tokens = sub_index["tokens"]
    n = table.num_rows
    print(f"corpus: {n} Shakespeare passages, {tokens} tokens (mean {tokens / n:.0f}, max {args.max_tokens}); "
          f"encoder {args.encoder}, K={args.memory_layers}; device {args.device}; torch threads {torch.get_num_threads()}")

    started = time.perf_counter()
    peer = naive_peer(checkpoint, args.memory_layers, token_ids, args.max_tokens, 0, args.device, work / "peer.npy")
    peer_s = time.perf_counter() - started
    results = [("naive peer (AutoModel, batch 64 padded to max, fp16 memmap)", peer_s, None)]

    for compute in args.compute_dtypes.split(","):
        store_path = work / f"store-{compute}"
        shutil.rmtree(store_path, ignore_errors=True)
        config = EncoderConfig(args.encoder, memory_layers=args.memory_layers, device=args.device, compute_dtype=compute)
        started = time.perf_counter()
        run_encode(str(subset), str(store_path), config)
        elapsed = time.perf_counter() - started
        store = MemoryStore.open(str(store_path))
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(n, size=min(args.check_rows, n), replace=False))
        batch = store.read(rows)
        worst = 0.0
        for i, row in enumerate(rows):
            length = int(batch.lengths[i])
            ours = batch.states[i, :length].float().numpy()
            theirs = peer[row, :length].astype(np.float32)
            worst = max(worst, float(np.abs(ours - theirs).max() / (np.abs(theirs).max() + 1e-6)))
        results.append((f"premem encode (compute {compute}, stored bf16, zstd Zarr)", elapsed, worst))
        summary = store.summary()
        on_disk = summary.get("bytes_on_disk")

    print(f"\n{'':62s} {'seconds':>8s} {'passages/s':>11s} {'tokens/s':>10s} {'speed-up':>9s}  max rel. diff vs peer")
    for name, seconds, worst in results:
        print(f"{name:62s} {seconds:8.1f} {n / seconds:11.1f} {tokens / seconds:10.0f} {peer_s / seconds:8.2f}x  "
              + ("-" if worst is None else f"{worst:.2e} on {min(args.check_rows, n)} rows"))
    peer_bytes = (work / "peer.npy").stat().st_size
    print(f"\nbytes on disk: peer memmap {peer_bytes / 2**20:.1f} MiB; premem store {on_disk / 2**20:.1f} MiB "
          f"({on_disk / tokens:.0f} B/token vs {peer_bytes / tokens:.0f})" if on_disk else "")
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        _, best, _ = min(results[1:], key=lambda r: r[1])
        flops = encoder_flops_per_token(store, tokens / n) * tokens / best
        print(f"GPU {name}: {flops / 1e12:.1f} TFLOP/s achieved"
              + (f" = {flops / 1e12 / peak:.1%} of the {peak:.0f} TFLOP/s bf16 dense peak" if peak else ""))


if __name__ == "__main__":
    main()
