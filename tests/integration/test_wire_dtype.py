"""Swarms on the bfloat16 and blockwise8 wires (protocol/SPEC.md §4.2): half and about a quarter of the bytes
per exchange, every exchange audited, nobody flagged (a verifier rounds its replay like the wire, so honest
rounds compare as in float32)."""

from __future__ import annotations

import pytest

from protocol import codecs

from node.tools.swarm import LocalSwarm
from tests.integration.conftest import TINY, poll

pytestmark = pytest.mark.integration

ROUNDS = 200  # an upper bound: the test stops the swarm once audits have been voted on
RUN_ARGS = TINY + ["--inner-steps", "10", "--rounds", str(ROUNDS), "--sync-timeout", "6", "--seed", "5",
                   "--verify-rate", "1.0", "--vote-timeout", "10", "--checkpoint-every", "0"]


def exchange_bytes(scrape: dict) -> tuple[float, int]:
    """(bytes sent on exchange streams, completed exchanges) from one scrape."""
    return (scrape.get('gossiptrain_bytes_sent_total{kind="exchange"}', 0.0),
            int(scrape.get('gossiptrain_exchanges_total{result="ok"}', 0)))


def votes(scrape: dict | None, verdict: str) -> int:
    return int((scrape or {}).get(f'gossiptrain_verifications_total{{verdict="{verdict}"}}', 0))


@pytest.mark.parametrize("wire_dtype, float32_ratio", [("bfloat16", 2.0), ("blockwise8", 3.9)])
def test_a_compressed_swarm_sends_fewer_bytes_and_flags_nobody(tmp_path, wire_dtype, float32_ratio):
    swarm = LocalSwarm(3, tmp_path / "swarm", RUN_ARGS + ["--wire-dtype", wire_dtype])
    try:
        swarm.start()
        numel = swarm.nodes[0].status["parameters"]
        per_exchange = codecs.wire_bytes(numel, wire_dtype)
        assert per_exchange * float32_ratio <= 4 * numel

        def exchanged_and_audited():  # every exchange is drawn for audit: votes follow within seconds
            scrapes = [swarm.metrics(i) for i in range(3)]
            done = all(s and exchange_bytes(s)[1] >= 1 for s in scrapes)
            return done and sum(votes(s, "accept") for s in scrapes) >= 2 and scrapes

        scrapes = poll(exchanged_and_audited, timeout=240, what="an exchange on every node and two accept votes")
        for scrape in scrapes:
            sent, ok = exchange_bytes(scrape)
            # every completed exchange sent numel values; failed and refused ones send less, framing adds ~0.1%
            assert sent >= ok * per_exchange, (sent, ok, numel)
            assert sent < (ok + 1) * per_exchange * 1.01 + 64 * 1024 * (ok + 1), (sent, ok, numel)
            assert votes(scrape, "reject") == 0, scrape
    finally:
        swarm.stop()  # a clean leave: each node writes its summary
    summaries = swarm.summaries()
    assert all(s["exchanges"]["ok"] >= 1 for s in summaries), summaries
    assert not any(s["votes"].get("reject", 0) for s in summaries), summaries
    assert not any(s["flagged"] for s in summaries), summaries
