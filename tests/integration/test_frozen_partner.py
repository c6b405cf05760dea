"""A frozen (SIGSTOPped) peer hangs instead of erroring: only our deadlines end the waits."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import TINY, poll, rounds_done

pytestmark = pytest.mark.integration

SYNC_TIMEOUT = 3.0  # + io_timeout 2 s for the acks: every boundary ends within 5 s
ARGS = TINY + ["--inner-steps", "20", "--sync-timeout", str(SYNC_TIMEOUT), "--io-timeout", "2"]


def rounds_of(swarm, index: int) -> int:
    return rounds_done(swarm.metrics(index))


def test_survivors_never_wait_past_the_deadline_for_a_frozen_partner(make_swarm):
    swarm = make_swarm(3, ARGS)
    swarm.start()
    poll(lambda: all(rounds_of(swarm, i) >= 3 for i in range(3)), timeout=120, what="3 rounds on every node")

    frozen = swarm.nodes[2]
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        before = [rounds_of(swarm, i) for i in range(2)]
        poll(lambda: all(rounds_of(swarm, i) >= before[i] + 6 for i in range(2)), timeout=120,
             what="survivors to complete 6 more rounds while a peer is frozen")
        # its presence expires (TTL 6 s): survivors stop counting it, and race far ahead of its round
        poll(lambda: all(swarm.metrics(i).get("gossiptrain_peers_live") == 1 for i in range(2)), timeout=30,
             what="survivors to drop the frozen peer from their live view")
        for index in range(2):
            samples = swarm.metrics(index)
            # every round boundary ended within sync_timeout + io_timeout = 5 s (a histogram bucket edge)
            assert samples['gossiptrain_sync_wait_seconds_bucket{le="5.0"}'] == samples[
                "gossiptrain_sync_wait_seconds_count"], samples
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)

    frozen_rounds = poll(lambda: rounds_of(swarm, 2), timeout=30, what="the thawed node to answer /metrics")
    frozen_ok = swarm.metrics(2)['gossiptrain_exchanges_total{result="ok"}']
    poll(lambda: rounds_of(swarm, 2) >= frozen_rounds + 3, timeout=120, what="the thawed node to train again")
    poll(lambda: all(swarm.metrics(i).get("gossiptrain_peers_live") == 2 for i in range(3)), timeout=30,
         what="everyone to see everyone again")
    poll(lambda: swarm.metrics(2)['gossiptrain_exchanges_total{result="ok"}'] > frozen_ok, timeout=120,
         what="the thawed node to exchange again")
    assert all(node.process.poll() is None for node in swarm.nodes)
