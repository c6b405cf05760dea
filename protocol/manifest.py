"""Stable hash of a run manifest.

Peers compare ``manifest_hash`` in ``ExchangeRequest`` to refuse averaging with
a node whose model or run configuration differs. The hash must therefore not
depend on dict insertion order, process, or platform.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import msgpack

from protocol.fields import MAX_UINT

__all__ = ["manifest_hash", "canonical_manifest_bytes"]

_MIN_INT = -(2**63)


def _canonical(value: Any, path: str) -> Any:
    """Return ``value`` rebuilt with every mapping's keys in sorted order; TypeError if unsupported."""
    # bool before int: bool is an int subclass but has its own msgpack encoding.
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return value
    if isinstance(value, int):
        if not _MIN_INT <= value <= MAX_UINT:
            raise ValueError(f"integer at {path} does not fit in 64 bits: {value}")
        return value
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"manifest keys must be strings, got {type(key).__name__} at {path}")
        return {key: _canonical(value[key], f"{path}.{key}") for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"unsupported manifest value of type {type(value).__name__} at {path}")


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """Canonical msgpack encoding of ``manifest``: keys sorted recursively, lists in order, floats as float64."""
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a mapping, got {type(manifest).__name__}")
    return msgpack.packb(_canonical(manifest, "$"), use_bin_type=True, use_single_float=False)


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical encoding of ``manifest``."""
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()
