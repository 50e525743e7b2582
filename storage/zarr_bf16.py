"""bfloat16 for zarr-python, so that ``zarr.open_array`` reads premem's ``memory/`` arrays without TensorStore.

TensorStore writes ``"data_type": "bfloat16"`` in ``zarr.json``; zarr-python 3.1 knows no such type and refuses to
open the array.  :class:`BFloat16` is a zarr-python data type backed by ``ml_dtypes.bfloat16`` (the numpy dtype
TensorStore and JAX use, so values read back are bit for bit the stored ones); call :func:`register` once before
opening a bfloat16 array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):
    """Zarr v3 ``bfloat16``: zarr-python's own float type with ml_dtypes' numpy dtype.

    Zarr v2 has no bfloat16 (numpy spells it ``"<V2"``, which v2 readers take for raw bytes), so it is v3 only.
    """

    dtype_cls = type(_BF16)
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2

    def to_json(self, zarr_format):
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(f"bfloat16 exists only in Zarr v3, not in zarr_format={zarr_format}")

    def from_json_scalar(self, data, *, zarr_format):
        """Numbers, "NaN", "Infinity" and "-Infinity" as for any float; "0x3f80" is a bfloat16 bit pattern.

        zarr-python reads four hex digits as float16 bits, which for bfloat16 would give another value.
        """
        if zarr_format == 3 and isinstance(data, str) and data.startswith("0x"):
            if len(data) != 6:
                raise ValueError(f"invalid bfloat16 fill value {data!r}: expected '0x' and 4 hex digits")
            return np.uint16(int(data, 16)).view(_BF16)
        return super().from_json_scalar(data, zarr_format=zarr_format)


def register() -> None:
    """Make zarr-python resolve ``"bfloat16"`` (and ``ml_dtypes.bfloat16`` arrays) to :class:`BFloat16`; idempotent."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)
