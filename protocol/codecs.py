"""Wire formats of an exchange's tensors: what a float32 weight vector becomes on the wire, and back.

A swarm picks one format in its manifest (``wire_dtype``); both partners send and expect it.

  float32    the weights as they are (4 bytes per parameter).
  bfloat16   the upper 16 bits of each float32, rounded to nearest, ties to even (2 bytes per
             parameter). Same exponent range as float32, 8 significant bits: a relative error of at
             most 2^-8 per value. Exactly what torch's ``.to(torch.bfloat16)`` computes.
  blockwise8 8 bits per parameter, about 4x smaller than float32: the difference x - r from a reference
             r that every node of the swarm holds (for weights: the swarm's initial weights rounded to
             bfloat16, see `make_reference`; for an update: 0), in blocks of BLOCK values, each block one
             scale s, a power of two with max|x - r| <= 127 s (see `_block_scales`), and one signed byte
             per value, q = round((x - r) / s) (nearest, ties to even), decoded as r + q * s in float32.
             The error per value is at most s / 2 <= max|x - r| / 127: a fraction of the block's largest
             difference from the reference, never of the weight itself (raw weights quantized to 8 bits
             would lose a round's update, about 1e-3 of the weights, entirely). Re-coding a decoded
             array gives back the same values bit for bit, so what a node commits to is what arrives.
             On the wire a tensor is one byte array: the block scales (little-endian float32), then the
             codes (int8); 4 * ceil(n / BLOCK) + n bytes for n values.

A node sends ``decode(encode(x))`` of what it would have sent in float32 and commits to that (its
partner and its auditors see the same float32 numbers: protocol/SPEC.md §4.2), so the format
changes no digest and no check, only the bytes on the wire.

Why not hivemind.compression: its codecs are torch code (every verifier must reproduce the sender's bits
with numpy alone, protocol/ stays framework-free), serialize whole tensors into one protobuf (the exchange
streams checksummed chunks of a committed array), Uniform8BitQuantization / Quantile8BitQuantization use
one codebook for the whole tensor (so one large value costs every other value its precision), and its
BlockwiseQuantization needs bitsandbytes (CUDA builds); none of them quantizes against a shared reference.

(float16 is not offered: its 5-bit exponent needs clamping and scaling for weights and updates of
any range; bfloat16 is as small and keeps float32's range.)

Pure numpy, no torch: every node, whatever its framework, computes the same bits. Arrays are
converted in blocks so a conversion holds at most one block of temporaries.
"""

from __future__ import annotations

import numpy as np

from protocol.errors import InvalidField, NonFiniteTensor
from protocol.tensors import DTYPE_SIZES

__all__ = ["BLOCK", "WIRE_DTYPES", "decode", "encode", "make_reference", "reference_for", "round_trip", "wire_bytes",
           "wire_numel"]

WIRE_DTYPES = ("float32", "bfloat16", "blockwise8")

BLOCK = 512  # values per blockwise8 block: one float32 scale each, 1/128 of a byte per value
_LEVELS = np.float32(127)  # codes -127..127 (symmetric: -128 is never sent and refused on receipt)
_FLOOR_BITS = 16  # a block's scale is at least 2^-16 of its largest reference value (see _block_scales)
_MIN_EXPONENT = -149  # 2^-149: float32's smallest subnormal, the smallest scale

_BLOCK = 1 << 20  # elements per conversion step: bounds the temporaries at a few MiB


def _check(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}, expected one of {', '.join(WIRE_DTYPES)}")


def wire_numel(numel: int, dtype: str) -> int:
    """Elements of the wire tensor that carries `numel` values in `dtype` (bytes, for blockwise8)."""
    _check(dtype)
    return 4 * -(-numel // BLOCK) + numel if dtype == "blockwise8" else numel


def wire_bytes(numel: int, dtype: str) -> int:
    """Bytes on the wire of `numel` values in `dtype` (blockwise8: its scales included)."""
    return wire_numel(numel, dtype) * DTYPE_SIZES[dtype]


def make_reference(initial: np.ndarray) -> np.ndarray:
    """The shared reference of blockwise8 weights: the swarm's initial weights (identical on every node:
    built from the manifest's seed or --init-weights) as bfloat16 patterns, half the memory of float32."""
    return encode(initial, "bfloat16")


def reference_for(name: str, reference: np.ndarray | None) -> np.ndarray | None:
    """The reference an exchanged tensor is coded against (protocol/SPEC.md §4): the weights ("theta",
    "phi") against the swarm's, an update ("delta_update") against 0."""
    return reference if name in ("theta", "phi") else None


def _reference_block(reference: np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    if reference is None:
        return None
    return decode(reference[start:stop], "bfloat16")  # the reference is bfloat16 (make_reference)


def _padded(values: np.ndarray) -> np.ndarray:
    """`values` as rows of BLOCK (the last row padded with zeros)."""
    rows = -(-values.size // BLOCK)
    if values.size == rows * BLOCK:
        return values.reshape(rows, BLOCK)
    out = np.zeros(rows * BLOCK, dtype="<f4")
    out[:values.size] = values
    return out.reshape(rows, BLOCK)


def _check_reference(reference: np.ndarray | None, numel: int) -> None:
    if reference is not None and (reference.dtype != np.dtype("<u2") or reference.size != numel):
        raise ValueError(f"a blockwise8 reference is {numel} bfloat16 patterns ('<u2'), "
                         f"got {reference.size} of {reference.dtype}")


def _ceil_log2(values: np.ndarray) -> np.ndarray:
    """ceil(log2(v)) of positive float64 values, exactly (np.frexp, no logarithm rounding)."""
    mantissa, exponent = np.frexp(values)
    return exponent - (mantissa == 0.5)


def _block_scales(rows: np.ndarray, base_rows: np.ndarray | None) -> np.ndarray:
    """Each block's scale: the power of two 2^k that brings its largest difference to at most 127 codes
    (k = ceil(log2(max|d| / 127 · (1 - 2^-10))); the slack keeps k the same when a decoded block is coded
    again), and never below 2^-16 of the block's largest reference value. 0 for a block without a
    difference. Powers of two make q·s exact, and the floor keeps s above float32's resolution of the
    weights it is added to: re-coding a decoded block gives back the same codes (see `encode`)."""
    largest = np.max(np.abs(rows), axis=1).astype(np.float64)
    moved = largest > 0
    exponent = np.full(rows.shape[0], _MIN_EXPONENT, dtype=np.int64)
    exponent[moved] = _ceil_log2(largest[moved] * (1 - 2.0**-10) / 127)
    if base_rows is not None:
        reference = np.max(np.abs(base_rows), axis=1).astype(np.float64)
        floor = np.full(rows.shape[0], _MIN_EXPONENT, dtype=np.int64)
        floor[reference > 0] = _ceil_log2(reference[reference > 0]) - _FLOOR_BITS
        exponent = np.maximum(exponent, floor)
    exponent = np.maximum(exponent, _MIN_EXPONENT)
    return np.where(moved, np.ldexp(1.0, exponent), 0.0).astype("<f4")


def _encode_blockwise8(flat: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    if not np.isfinite(flat).all():
        raise ValueError("blockwise8 encodes finite values only")
    _check_reference(reference, flat.size)
    blocks = -(-flat.size // BLOCK)
    out = np.empty(4 * blocks + flat.size, dtype="u1")
    scales = out[:4 * blocks].view("<f4")
    codes = out[4 * blocks:].view("i1")
    step = _BLOCK - _BLOCK % BLOCK  # whole blocks per conversion step
    for start in range(0, flat.size, step):
        stop = min(start + step, flat.size)
        values = flat[start:stop]
        base = _reference_block(reference, start, stop)
        if base is not None:
            values = values - base
        rows = _padded(values)
        scale = _block_scales(rows, None if base is None else _padded(base))
        q = np.zeros_like(rows)
        np.divide(rows, scale[:, None], out=q, where=scale[:, None] > 0)
        q = np.clip(np.rint(q), -_LEVELS, _LEVELS)
        scales[start // BLOCK:start // BLOCK + rows.shape[0]] = scale
        codes[start:stop] = q.reshape(-1)[:stop - start].astype("i1")
    return out


def _decode_blockwise8(wire: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Hostile input: the layout, every scale (finite, >= 0), every code (-127..127) and every decoded value
    (finite) are checked; a violation raises a typed protocol error."""
    raw = np.ascontiguousarray(wire).reshape(-1).view("u1")
    blocks = -(-raw.size // (BLOCK + 4))
    numel = raw.size - 4 * blocks
    if numel < 0 or -(-numel // BLOCK) != blocks:
        raise InvalidField(f"{raw.size} bytes are no blockwise8 layout (4 bytes per block of {BLOCK}, then 1 per value)")
    _check_reference(reference, numel)
    scales = raw[:4 * blocks].view("<f4")
    codes = raw[4 * blocks:].view("i1")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise NonFiniteTensor("blockwise8 block scales must be finite and non-negative")
    if (np.frexp(scales[scales > 0])[0] != 0.5).any():
        raise InvalidField("blockwise8 block scales are powers of two")
    if numel and int(codes.min()) < -127:
        raise InvalidField("blockwise8 codes are -127..127, got -128")
    out = np.empty(numel, dtype="<f4")
    step = _BLOCK - _BLOCK % BLOCK
    for start in range(0, numel, step):
        stop = min(start + step, numel)
        scale = np.repeat(scales[start // BLOCK:-(-stop // BLOCK)], BLOCK)[:stop - start]
        with np.errstate(over="ignore"):  # an overflow is refused just below
            values = codes[start:stop].astype("<f4") * scale
            base = _reference_block(reference, start, stop)
            if base is not None:
                values += base
        if not np.isfinite(values).all():
            raise NonFiniteTensor("blockwise8 values overflow float32")
        out[start:stop] = values
    return out


def encode(array: np.ndarray, dtype: str, reference: np.ndarray | None = None) -> np.ndarray:
    """A flat float32 array in wire format `dtype` (bfloat16: its raw 16-bit patterns, as '<u2'; blockwise8:
    its bytes, as 'u1', against `reference` (`make_reference`; None: against 0). Only blockwise8 uses
    `reference`."""
    _check(dtype)
    flat = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    if dtype == "float32":
        return flat
    if dtype == "blockwise8":
        return _encode_blockwise8(flat, reference)
    bits = flat.view("<u4")
    out = np.empty(flat.size, dtype="<u2")
    for start in range(0, flat.size, _BLOCK):
        block = bits[start:start + _BLOCK]
        # round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then drop the low 16 bits
        # (finite inputs cannot overflow 32 bits: the largest, 0xFF7FFFFF, + 0x8000 fits)
        rounded = block + (np.uint32(0x7FFF) + ((block >> np.uint32(16)) & np.uint32(1)))
        out[start:start + _BLOCK] = (rounded >> np.uint32(16)).astype("<u2")
    return out


def decode(array: np.ndarray, dtype: str, reference: np.ndarray | None = None) -> np.ndarray:
    """Wire format `dtype` back to a flat float32 array (bfloat16: exact, every bfloat16 is a float32;
    blockwise8: validated, against the same `reference` as the sender's)."""
    _check(dtype)
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    if dtype == "blockwise8":
        return _decode_blockwise8(array, reference)
    half = np.ascontiguousarray(array).reshape(-1).view("<u2")
    out = np.empty(half.size, dtype="<u4")
    for start in range(0, half.size, _BLOCK):
        out[start:start + _BLOCK] = half[start:start + _BLOCK].astype("<u4") << np.uint32(16)
    return out.view("<f4")


def round_trip(array: np.ndarray, dtype: str, reference: np.ndarray | None = None) -> np.ndarray:
    """What the partner will hold after `array` crossed the wire in `dtype` (float32)."""
    return decode(encode(array, dtype, reference), dtype, reference)
