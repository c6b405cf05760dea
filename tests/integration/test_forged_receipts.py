"""Receipts that no exchange produced, and votes of keys ground for a known audit seed, cannot get an honest peer
flagged.

Measured with owner-signed DHT records in place (issue 13): one stranger published receipts naming honest peers'
old rounds (each commitment is public, so the digest can be copied; the nonce ground until the audit lottery draws
it). Every honest committee fetched the start state, met `no_state` (long let go), voted reject, and the honest
peer was flagged by all peers in 36 s. A receipt now counts only with the sender's attestation, signed at the end
of the exchange itself, and one older than MAX_RECEIPT_AGE is no audit.

Also measured: every validly signed vote joined the committee candidates, so two fresh keys ground to rank first
and second for a drawn audit's (public) seed, voting reject, flagged an honest peer in about a second. A seat now
needs to have been live before the audited exchange.

Here a real 3-node verifying swarm runs until its early rounds' start states are gone (RETAIN_MIN_SECONDS), then the
adversary publishes such receipts for every node's rounds 1-5 and keeps them fresh, and casts Sybil reject votes on
the swarm's genuine audits. The nodes must read and refuse the receipts, and nobody may be flagged over three vote
timeouts.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from node.verify.service import RETAIN_MIN_SECONDS
from tests.integration.adversary import adversary
from tests.integration.conftest import poll, rounds_done

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

RUN = "gossiptrain-default"
VERIFY_RATE, VOTE_TIMEOUT = 0.25, 8.0
# the default model with 20 inner steps: an honest replay takes a few seconds, so the Sybil votes (cast within a
# second of a receipt) would come first, as they did in the measurement
ARGS = ["--inner-steps", "20", "--batch-size", "8", "--eval-batches", "2", "--sync-timeout", "3", "--io-timeout", "2",
        "--seed", "19", "--checkpoint-every", "0", "--verify-rate", str(VERIFY_RATE), "--vote-timeout", str(VOTE_TIMEOUT)]
TARGET_ROUNDS = [1, 2, 3, 4, 5]  # 15 receipts: more than a node can have audited genuinely


def record_errors(samples: dict[str, float]) -> float:
    return samples.get('gossiptrain_protocol_errors_total{kind="record"}', 0.0)


async def attack(swarm, victims: list[str], seconds: float) -> tuple[int, int]:
    """Publish the forged receipts and Sybil votes every 2 s for `seconds`; returns (the most receipts stored at
    once, the Sybil votes cast)."""
    async with adversary([swarm.nodes[0].maddr], swarm.base_dir) as evil:
        forged, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            forged = max(forged, await evil.forge_receipts(RUN, victims, TARGET_ROUNDS, VERIFY_RATE))
            for _ in range(4):  # the votes must beat the honest committee's replays
                await evil.sybil_votes(RUN, VERIFY_RATE)
                await asyncio.sleep(0.5)  # paced like an attacker, not a synchronisation
        return forged, evil.sybil_votes_cast


def test_forged_receipts_and_sybil_votes_flag_nobody(make_swarm):
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
    forged, sybil_votes = asyncio.run(attack(swarm, victims, seconds=3 * VOTE_TIMEOUT + 6))
    after = [swarm.metrics(i) for i in range(3)]
    logs = [node.log_path.read_text() for node in swarm.nodes]
    assert forged >= 6, "the adversary found commitments of those rounds to forge receipts from"
    assert sybil_votes >= 2, "the adversary voted on genuine audits"
    assert all(record_errors(s) > b for s, b in zip(after, before)), (before, after)  # read and refused
    assert [s.get("gossiptrain_peers_flagged", -1) for s in after] == [0, 0, 0]
    assert all("FLAGGED" not in log for log in logs)
