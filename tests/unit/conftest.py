"""Shared unit-test fixtures: the built-in corpus, loaded once, NodeConfigs of a tiny model, and the metric
names a node exports; and the protocol tests' helpers (import them: `from tests.unit.conftest import pack`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import prometheus_client
import pytest

from protocol import InvalidField, Message, decode_message, encode_message

from node.config import NodeConfig
from node.metrics import NodeMetrics
from node.train.data import Corpus, load_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]

# A model small enough that a round of inner steps takes milliseconds on one CPU thread.
TINY_MODEL: dict[str, Any] = {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 32, "batch_size": 4,
                              "inner_steps": 4, "eval_batches": 2, "threads": 1}


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    """The built-in corpus (read-only: its bytes are an immutable buffer), shared by every unit test."""
    return load_corpus()


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., NodeConfig]:
    """A factory: tiny_config(**changes) is NodeConfig(**TINY_MODEL) with `changes` applied."""
    def make(**changes: Any) -> NodeConfig:
        return NodeConfig(**{**TINY_MODEL, **changes})

    return make


@pytest.fixture(scope="session")
def exported_metric_names() -> frozenset[str]:
    """Every series name a node's /metrics shows (read from a fresh NodeMetrics registry), plus `up`, which
    Prometheus writes for every target: what dashboards and alert rules may use."""
    metrics = NodeMetrics()
    metrics.info.info({"version": "0", "peer_id": "p", "run_id": "r", "manifest": "m", "sync": "s", "device": "cpu"})
    text = prometheus_client.generate_latest(metrics.registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    return frozenset(names | {"up"})


# --- protocol test helpers ----------------------------------------------------------


def read_spec() -> str:
    """protocol/SPEC.md, the wire format's description."""
    return (REPO_ROOT / "protocol" / "SPEC.md").read_text()


def raw_map(msg: Message) -> dict[str, Any]:
    """``msg`` as encoded, unpacked into its msgpack map: what a test mutates before packing it again."""
    raw: dict[str, Any] = msgpack.unpackb(encode_message(msg), raw=False)
    return raw


def pack(obj: Any) -> bytes:
    """``obj`` as a msgpack body, bypassing the codec's checks."""
    return msgpack.packb(obj, use_bin_type=True)


def assert_decode_refuses_field(msg: Message, field: str, value: Any) -> None:
    """Decoding ``msg`` with ``field`` set to ``value`` raises InvalidField, which names the field."""
    raw = raw_map(msg)
    raw[field] = value
    with pytest.raises(InvalidField) as info:
        decode_message(pack(raw))
    assert field in str(info.value)
    assert info.value.kind == "field"
