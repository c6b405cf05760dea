"""Receipts that no exchange produced cannot get an honest peer flagged.

Measured with owner-signed DHT records in place (issue 13): one stranger published receipts naming honest peers'
old rounds (each commitment is public, so the digest can be copied; the nonce ground until the audit lottery draws
it). Every honest committee fetched the start state, met `no_state` (long let go), voted reject, and the honest
peer was flagged by all peers in 36 s. A receipt now counts only with the sender's attestation, signed at the end
of the exchange itself, and one older than MAX_RECEIPT_AGE is no audit.

Here a real 3-node verifying swarm runs until its early rounds' start states are gone (RETAIN_MIN_SECONDS), then the
adversary publishes such receipts for every node's rounds 1-5 and keeps them fresh. The nodes must read and refuse
them, and nobody may be flagged over three vote timeouts.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from node.verify.service import RETAIN_MIN_SECONDS
from tests.integration.adversary import adversary
from tests.integration.conftest import TINY, poll, rounds_done

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

RUN = "gossiptrain-default"
VERIFY_RATE, VOTE_TIMEOUT = 0.25, 8.0
ARGS = TINY + ["--inner-steps", "5", "--sync-timeout", "3", "--io-timeout", "2", "--seed", "19", "--checkpoint-every",
               "0", "--verify-rate", str(VERIFY_RATE), "--vote-timeout", str(VOTE_TIMEOUT)]
TARGET_ROUNDS = [1, 2, 3, 4, 5]  # 15 receipts: more than a node can have audited genuinely


def record_errors(samples: dict[str, float]) -> float:
    return samples.get('gossiptrain_protocol_errors_total{kind="record"}', 0.0)


async def forge_for(swarm, victims: list[str], seconds: float) -> int:
    """Publish the forged receipts every 2 s for `seconds`; returns the most receipts stored at once."""
    async with adversary([swarm.nodes[0].maddr], swarm.base_dir) as evil:
        forged, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            forged = max(forged, await evil.forge_receipts(RUN, victims, TARGET_ROUNDS, VERIFY_RATE))
            await asyncio.sleep(2.0)  # paced like a patient attacker, not a synchronisation
        return forged


def test_receipts_for_exchanges_that_never_happened_flag_nobody(make_swarm):
    swarm = make_swarm(3, ARGS)
    swarm.start()
    last = max(TARGET_ROUNDS)
    poll(lambda: all(rounds_done(swarm.metrics(i)) >= last + 1 for i in range(3)), timeout=180,
         what=f"every node to finish round {last}")
    committed_by = time.monotonic()
    # the round's start state is let go RETAIN_MIN_SECONDS after it was committed (and the audit window passed)
    poll(lambda: time.monotonic() > committed_by + RETAIN_MIN_SECONDS + 5
         and all(rounds_done(swarm.metrics(i)) >= last + 8 for i in range(3)),
         timeout=RETAIN_MIN_SECONDS + 120, what="the nodes to let those rounds' start states go")
    before = [record_errors(swarm.metrics(i)) for i in range(3)]
    victims = [node.status["peer_id"] for node in swarm.nodes]
    forged = asyncio.run(forge_for(swarm, victims, seconds=3 * VOTE_TIMEOUT + 6))
    after = [swarm.metrics(i) for i in range(3)]
    logs = [node.log_path.read_text() for node in swarm.nodes]
    assert forged >= 6, "the adversary found commitments of those rounds to forge receipts from"
    assert all(record_errors(s) > b for s, b in zip(after, before)), (before, after)  # read and refused
    assert [s.get("gossiptrain_peers_flagged", -1) for s in after] == [0, 0, 0]
    assert all("FLAGGED" not in log for log in logs)
