"""Field validators for everything decoded from peers: exchange messages and verification records.

Each checker returns the (normalised) value or raises ``error`` (``InvalidField`` by
default; the verification records pass ``InvalidRecord``) naming the field. The
message codec runs the same checkers on encode and decode, so a node never sends
what a peer would refuse.

The ``Annotated`` aliases at the end are the wire field types of SPEC.md §3: a
message field declared as ``round: U63`` is validated with ``check_u63``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from protocol.errors import InvalidField

__all__ = [
    "MAX_STR_CHARS",
    "MAX_DIMS",
    "MAX_TENSORS",
    "MAX_UINT",
    "MAX_U63",
    "check_str",
    "check_uint",
    "check_u63",
    "check_bool",
    "check_bytes",
    "check_seq",
    "check_names",
    "check_shape",
    "check_float",
    "check_hex",
    "Str",
    "UInt",
    "U63",
    "Bool",
    "Bytes",
    "Names",
    "Shape",
]

MAX_STR_CHARS = 256
MAX_DIMS = 8
MAX_TENSORS = 64
# msgpack cannot carry integers beyond uint64.
MAX_UINT = 2**64 - 1
# Rounds and step counters must fit a signed 64-bit integer (torch, SQLite, JSON readers),
# on the wire and in the verification records alike.
MAX_U63 = 2**63 - 1

_Error = type[InvalidField]


def check_str(field: str, value: Any, limit: int = MAX_STR_CHARS, error: _Error = InvalidField) -> str:
    if not isinstance(value, str):
        raise error(f"field '{field}' must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise error(f"field '{field}' is {len(value)} characters long, the limit is {limit}")
    return value


def check_uint(field: str, value: Any, limit: int = MAX_UINT, error: _Error = InvalidField) -> int:
    # bool is a subclass of int in Python; on the wire it is a distinct type.
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"field '{field}' must be an integer, got {type(value).__name__}")
    if value < 0:
        raise error(f"field '{field}' must be a non-negative integer, got {value}")
    if value > limit:
        raise error(f"field '{field}' must be at most {limit}, got {value}")
    return value


def check_u63(field: str, value: Any, error: _Error = InvalidField) -> int:
    """A round or step counter: a non-negative integer below 2**63."""
    return check_uint(field, value, MAX_U63, error)


def check_bool(field: str, value: Any, error: _Error = InvalidField) -> bool:
    if not isinstance(value, bool):
        raise error(f"field '{field}' must be a boolean, got {type(value).__name__}")
    return value


def check_bytes(field: str, value: Any, error: _Error = InvalidField) -> bytes:
    # Encoding accepts any contiguous byte buffer; decoding always yields bytes.
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise error(f"field '{field}' must be binary, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def check_seq(field: str, value: Any, limit: int, error: _Error = InvalidField) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise error(f"field '{field}' must be an array, got {type(value).__name__}")
    if len(value) > limit:
        raise error(f"field '{field}' has {len(value)} entries, the limit is {limit}")
    return tuple(value)


def check_names(field: str, value: Any, error: _Error = InvalidField) -> tuple[str, ...]:
    items = check_seq(field, value, MAX_TENSORS, error)
    return tuple(check_str(f"{field}[{i}]", item, error=error) for i, item in enumerate(items))


def check_shape(field: str, value: Any, error: _Error = InvalidField) -> tuple[int, ...]:
    items = check_seq(field, value, MAX_DIMS, error)
    return tuple(check_uint(f"{field}[{i}]", item, error=error) for i, item in enumerate(items))


def check_float(field: str, value: Any, error: _Error = InvalidField) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"field '{field}' must be a finite number")
    return float(value)


def check_hex(field: str, value: Any, chars: int, error: _Error = InvalidField) -> str:
    """Exactly ``chars`` lowercase hex characters (a digest or nonce)."""
    if not isinstance(value, str) or len(value) != chars or any(c not in "0123456789abcdef" for c in value):
        raise error(f"field '{field}' must be {chars} lowercase hex characters")
    return value


# Wire field types (SPEC.md §3): the type of a message field, and the checker it is validated with.
Str = Annotated[str, check_str]
UInt = Annotated[int, check_uint]
U63 = Annotated[int, check_u63]
Bool = Annotated[bool, check_bool]
Bytes = Annotated[bytes, check_bytes]
Names = Annotated[tuple[str, ...], check_names]
Shape = Annotated[tuple[int, ...], check_shape]
