"""Re-encode a random sample of a store's rows with its recorded encoder and compare with what is stored.

Checksums prove the bytes are the ones written; this proves the bytes are the right memory: made by the
encoder the manifest names (fingerprint), from the passages the shards hold, at the stored precision.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import torch

from premem.models.encoder import token_budget_batches
from premem.pipeline.shard import read_index, read_shard
from premem.storage.tensors import pad_sequences

# Largest ||stored - recomputed|| / ||recomputed|| per passage that still counts as the same memory, by the
# stored dtype (rounding) and by the dtype the encode job computed in (recomputation is in float32).
# Measured on MiniLM K=4: bf16 store 1.7e-3, bf16 compute 9.2e-3, fp32 everything 8e-7; a wrong row is ~1.
STORE_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 8e-3}
COMPUTE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2, "auto": 5e-2}


@dataclasses.dataclass
class RecheckResult:
    """Rows re-encoded, their relative errors, the tolerance used, and the rows beyond it."""

    rows: list[int]
    errors: list[float]
    tolerance: float
    bad_rows: list[int]
    problem: str | None = None  # why the sample could not be re-encoded at all

    @property
    def max_error(self) -> float:
        return max(self.errors) if self.errors else 0.0


def tolerance_for(store) -> float:
    compute = str((store.manifest.get("extra") or {}).get("compute_dtype", "auto"))
    return max(STORE_TOLERANCE[store.dtype], COMPUTE_TOLERANCE.get(compute, COMPUTE_TOLERANCE["auto"]))


def sample_rows(store, n: int, seed: int = 0, exclude=()) -> np.ndarray:
    """``n`` distinct random committed rows (fewer if the store has fewer), sorted."""
    committed = sorted(store.committed_shards())
    pool = np.concatenate([np.arange(store.shard_rows(s).start, store.shard_rows(s).stop) for s in committed]) \
        if committed else np.zeros(0, dtype=np.int64)
    pool = np.setdiff1d(pool, np.asarray(list(exclude), dtype=np.int64))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)) if len(pool) else pool


def recheck_rows(store, rows, *, device: str = "cpu", tokens_per_batch: int = 8192) -> RecheckResult:
    """Re-encode ``rows`` of ``store`` in float32 and compare with the stored memory."""
    from premem.models import MemoryEncoder

    rows = [int(r) for r in rows]
    tol = tolerance_for(store)
    if not rows:
        return RecheckResult([], [], tol, [])
    enc_info = store.encoder
    shards_dir = (store.manifest.get("extra") or {}).get("shards_dir")
    if not shards_dir:
        return RecheckResult([], [], tol, [], "the manifest names no shards directory, so the passages are unknown")
    try:
        token_ids = _token_ids(shards_dir, store, rows)
        encoder = MemoryEncoder.from_pretrained(
            enc_info["checkpoint"], memory_layers=enc_info["memory_layers"], template=enc_info["template"],
            device=device, dtype=torch.float32)
    except Exception as e:  # a missing shards dir or checkpoint: the sample cannot be checked
        return RecheckResult([], [], tol, [], f"cannot re-encode the sample: {' '.join(str(e).split())[:300]}")
    if encoder.fingerprint != store.fingerprint:
        return RecheckResult([], [], tol, [], (
            f"the checkpoint at {enc_info['checkpoint']} (K={enc_info['memory_layers']}) now has fingerprint "
            f"{encoder.fingerprint[:12]}, the store was made by {store.fingerprint[:12]}: the checkpoint changed "
            f"since; point the manifest's encoder at the original checkpoint or re-encode the store"))
    lengths = np.array([len(token_ids[r]) for r in rows])
    errors = np.zeros(len(rows))
    pad_id = encoder.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for batch in token_budget_batches(lengths, tokens_per_batch):
            ids, mask = pad_sequences([token_ids[rows[i]] for i in batch], pad_id)
            ref = encoder(ids.to(device), mask.to(device)).float().cpu()
            stored = store.read([rows[i] for i in batch]).states.float()
            for j, i in enumerate(batch.tolist()):
                n = int(lengths[i])
                if int(store.lengths([rows[i]])[0]) != n:
                    errors[i] = float("inf")
                    continue
                diff = (stored[j, :n] - ref[j, :n]).norm() / ref[j, :n].norm().clamp_min(1e-12)
                errors[i] = float(diff)
    bad = [r for r, e in zip(rows, errors.tolist(), strict=True) if not e <= tol]
    return RecheckResult(rows, errors.tolist(), tol, bad)


def _token_ids(shards_dir: str, store, rows: list[int]) -> dict[int, list[int]]:
    index = read_index(shards_dir)
    entries = {e["shard"]: e for e in index["shards"]}
    out: dict[int, list[int]] = {}
    for s in sorted({r // store.shard_size for r in rows}):
        table: pa.Table = read_shard(shards_dir, entries[s])
        want = {r for r in rows if r // store.shard_size == s}
        for r, ids in zip(table.column("row").to_pylist(), table.column("token_ids").to_pylist(), strict=True):
            if r in want:
                out[r] = ids
    return out
