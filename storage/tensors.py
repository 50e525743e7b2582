"""Store dtypes, conversions between numpy (incl. ml_dtypes.bfloat16), torch and row-id arguments, and padding.

A leaf (torch, numpy and premem.storage.errors only): every layer, models included, may use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from premem.storage.errors import StoreError

# store dtype name -> (numpy dtype, torch dtype)
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), torch.bfloat16),
    "float16": (np.dtype(np.float16), torch.float16),
    "float32": (np.dtype(np.float32), torch.float32),
}


def dtype_name(dtype: Any) -> str:
    """'bf16' / torch.bfloat16 / 'bfloat16' ... -> the store's dtype name."""
    if isinstance(dtype, torch.dtype):
        for k, v in DTYPES.items():
            if v[1] == dtype:
                return k
    else:
        name = str(dtype).lower().replace("torch.", "")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
        if name in DTYPES:
            return name
    raise StoreError(f"unsupported store dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def as_rows(rows: Any, what: str = "rows") -> np.ndarray:
    """Row ids as a 1-D int64 numpy array (from list / numpy / torch / range / int)."""
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    elif isinstance(rows, range):
        rows = np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    arr = np.asarray(rows)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise StoreError(f"{what} must be a 1-D sequence of row ids, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.floor(arr) == arr):
            arr = arr.astype(np.int64)
        else:
            raise StoreError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def to_numpy(x: Any, np_dtype: np.dtype | None = None) -> np.ndarray:
    """torch / numpy / list -> numpy, cast to ``np_dtype`` (torch does the cast for torch inputs)."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if np_dtype is not None:
            tdt = {np.dtype(v[0]): v[1] for v in DTYPES.values()}.get(np.dtype(np_dtype))
            if tdt is not None:
                x = x.to(device="cpu", dtype=tdt)
        x = x.cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        x = x.numpy()
    arr = np.asarray(x)
    if np_dtype is not None and arr.dtype != np_dtype:
        arr = arr.astype(np_dtype)
    return arr


def np_to_torch(arr: np.ndarray) -> torch.Tensor:
    """numpy (incl. ml_dtypes.bfloat16) -> torch without a copy."""
    if arr.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def pad_sequences(sequences: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids int64 [B, longest] padded with ``value``, mask bool [B, longest], True on real ids)."""
    longest = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), longest), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask
