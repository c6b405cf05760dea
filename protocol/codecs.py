"""Wire formats of an exchange's tensors: what a float32 weight vector becomes on the wire, and back.

A swarm picks one format in its manifest (``wire_dtype``); both partners send and expect it.

  float32    the weights as they are (4 bytes per parameter).
  bfloat16   the upper 16 bits of each float32, rounded to nearest, ties to even (2 bytes per
             parameter). Same exponent range as float32, 8 significant bits: a relative error of at
             most 2^-8 per value. Exactly what torch's ``.to(torch.bfloat16)`` computes.

A node sends ``decode(encode(x))`` of what it would have sent in float32 and commits to that (its
partner and its auditors see the same float32 numbers: protocol/SPEC.md §4.2), so the format
changes no digest and no check, only the bytes on the wire.

(float16 is not offered: its 5-bit exponent needs clamping and scaling for weights and updates of
any range; bfloat16 is as small and keeps float32's range.)

Pure numpy, no torch: every node, whatever its framework, computes the same bits. Arrays are
converted in blocks so a conversion holds at most one block of temporaries.
"""

from __future__ import annotations

import numpy as np

__all__ = ["WIRE_DTYPES", "decode", "encode", "round_trip"]

WIRE_DTYPES = ("float32", "bfloat16")

_BLOCK = 1 << 20  # elements per conversion step: bounds the temporaries at a few MiB


def _check(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}, expected one of {', '.join(WIRE_DTYPES)}")


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """A flat float32 array in wire format `dtype` (bfloat16: its raw 16-bit patterns, as '<u2')."""
    _check(dtype)
    flat = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    if dtype == "float32":
        return flat
    bits = flat.view("<u4")
    out = np.empty(flat.size, dtype="<u2")
    for start in range(0, flat.size, _BLOCK):
        block = bits[start:start + _BLOCK]
        # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits
        # (finite inputs cannot overflow 32 bits: the largest, 0xFF7FFFFF, + 0x8000 fits)
        rounded = block + (np.uint32(0x7FFF) + ((block >> np.uint32(16)) & np.uint32(1)))
        out[start:start + _BLOCK] = (rounded >> np.uint32(16)).astype("<u2")
    return out


def decode(array: np.ndarray, dtype: str) -> np.ndarray:
    """Wire format `dtype` back to a flat float32 array (exact: every bfloat16 is a float32)."""
    _check(dtype)
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    half = np.ascontiguousarray(array).reshape(-1).view("<u2")
    out = np.empty(half.size, dtype="<u4")
    for start in range(0, half.size, _BLOCK):
        out[start:start + _BLOCK] = half[start:start + _BLOCK].astype("<u4") << np.uint32(16)
    return out.view("<f4")


def round_trip(array: np.ndarray, dtype: str) -> np.ndarray:
    """What the partner will hold after `array` crossed the wire in `dtype` (float32)."""
    return decode(encode(array, dtype), dtype)
