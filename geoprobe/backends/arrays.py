"""Point sets handed to the probes and their fast paths: one check that a non-tensor input is an array of
real numbers, read as float64."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputDataError

__all__ = ["real_float64"]


def real_float64(x: Any, what: str, shape: str) -> np.ndarray:
    """``x`` (anything ``np.asarray`` reads) as a contiguous float64 array; ``what`` names it and ``shape``
    says which array is expected (``"a 2-D array"``) in the :class:`InputDataError` raised for objects,
    strings and other non-numbers, and for complex values."""
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{what} must be {shape} of numbers: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputDataError(f"{what} must be {shape} of numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputDataError(f"{what} must be real numbers, got a complex array")
    return np.ascontiguousarray(arr, dtype=np.float64)
