"""Behaviour of the manifest hash: canonical, order-independent, stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import manifest_hash

REPO_ROOT = Path(__file__).resolve().parents[2]

SAMPLE: dict[str, Any] = {
    "model": {"name": "tiny-llama", "layers": 4, "hidden": 256},
    "optimizer": {"inner_lr": 3e-4, "outer_lr": 0.7, "gamma": 0.9, "beta": 0.9},
    "tensors": ["theta"],
    "dtype": "float32",
    "seed": 1234,
    "frozen": False,
    "note": None,
}


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


def test_manifest_hash_is_sha256_hex() -> None:
    digest = manifest_hash(SAMPLE)
    assert len(digest) == 64
    int(digest, 16)


def test_manifest_hash_ignores_key_order_at_every_level() -> None:
    assert manifest_hash(SAMPLE) == manifest_hash(_reversed_keys(SAMPLE))


def test_manifest_hash_keeps_list_order() -> None:
    assert manifest_hash({"t": ["phi", "delta_update"]}) != manifest_hash(
        {"t": ["delta_update", "phi"]}
    )


def test_manifest_hash_distinguishes_float_from_int() -> None:
    assert manifest_hash({"lr": 1}) != manifest_hash({"lr": 1.0})


def test_manifest_hash_changes_with_any_nested_value() -> None:
    changed = _reversed_keys(SAMPLE)
    changed["optimizer"]["gamma"] = 0.8
    assert manifest_hash(changed) != manifest_hash(SAMPLE)


def test_manifest_hash_treats_tuple_like_list() -> None:
    assert manifest_hash({"shape": (2, 3)}) == manifest_hash({"shape": [2, 3]})


def test_manifest_hash_is_stable_across_processes() -> None:
    code = (
        "import json, sys; from protocol import manifest_hash; "
        "print(manifest_hash(json.loads(sys.argv[1])))"
    )
    import json

    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO_ROOT))
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SAMPLE)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        outputs.add(result.stdout.strip())
    assert outputs == {manifest_hash(SAMPLE)}


@pytest.mark.parametrize(
    "bad",
    [{"s": {1, 2}}, {"o": object()}, {"nested": {1: "int key"}}, {"c": 1j}],
)
def test_manifest_hash_refuses_unsupported_values(bad: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        manifest_hash(bad)


def test_manifest_hash_refuses_non_mapping() -> None:
    with pytest.raises(TypeError):
        manifest_hash([("a", 1)])  # type: ignore[arg-type]


_json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(
    allow_nan=False
) | st.text(max_size=8)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(manifest=st.dictionaries(st.text(max_size=6), _json, max_size=6), rnd=st.randoms())
def test_manifest_hash_is_independent_of_insertion_order(manifest: dict[str, Any], rnd: Any) -> None:
    def shuffled(value: Any) -> Any:
        if isinstance(value, dict):
            keys = list(value)
            rnd.shuffle(keys)
            return {k: shuffled(value[k]) for k in keys}
        if isinstance(value, list):
            return [shuffled(v) for v in value]
        return value

    assert manifest_hash(shuffled(manifest)) == manifest_hash(manifest)
