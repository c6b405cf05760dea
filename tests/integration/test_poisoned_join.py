"""Poisoning donors against real joiners: a donor serving a random φ (10 × ‖φ‖) is refused, never adopted.

Measured before the check (issue 13): a peer claiming the swarm's front and serving a random φ was every
joiner's first donor; the joiner adopted it (held-out loss 9.7) and its first exchanges took honest nodes'
loss from 2.14 to 3.37. Donors are now tried uniformly near the median front, and a downloaded state is
adopted only if its held-out loss is close to what the live peers report (node/join/plan.py state_problem).

One honest node and two poisoners (they train and pair honestly; only the state they serve joiners is a random
φ, by test-only fault injection) form a swarm; two joiners join at once (the honest donor serves one at a time,
so the other meets the poisoners too). Each must end synced from an honest donor (the honest node, or the other
joiner once it holds the honest state) near the swarm's loss, and every poisoned state a poisoner sent must have
been refused by the joiner that got it.
"""

from __future__ import annotations

import math
import re
import statistics

import pytest

from node.verify.faults import FAULT_ACK, FAULT_ACK_ENV, FAULT_ENV
from tests.integration.conftest import TINY, poll, rounds_done

pytestmark = pytest.mark.integration

POISON = {FAULT_ENV: "poison_state", FAULT_ACK_ENV: FAULT_ACK}
ARGS = TINY + ["--inner-steps", "10", "--sync-timeout", "3", "--io-timeout", "2", "--seed", "17",
               "--checkpoint-every", "0", "--state-sync-timeout", "60"]
HONEST, POISONERS, JOINERS = 0, (1, 2), (3, 4)


def test_joiners_refuse_poisoned_states_and_sync_from_the_honest_donor(make_swarm):
    swarm = make_swarm(3, ARGS, node_env={i: POISON for i in POISONERS})
    swarm.start()
    poll(lambda: all(rounds_done(swarm.metrics(i)) >= 4 for i in range(3)), timeout=180,
         what="the swarm to train 4 rounds")
    joiners = [swarm.start_node(i, [swarm.nodes[HONEST].maddr], ["--min-peers", "1"]) for i in JOINERS]
    for joiner in joiners:
        swarm.wait_until_up(joiner)
    statuses = [poll(lambda j=j: j.poll_status().get("initial_eval_loss") and j.status, timeout=90,
                     what="a joiner's first held-out loss") for j in joiners]
    swarm_eval = statistics.mean(swarm.metrics(i)["gossiptrain_eval_loss"] for i in range(3))
    poisoner_ids = [swarm.nodes[i].status["peer_id"] for i in POISONERS]
    joiner_logs = {j.status["peer_id"]: j.log_path.read_text() for j in joiners}
    for status in statuses:
        log = joiner_logs[status["peer_id"]]
        # from the honest node, or from the other joiner once it held the honest state: never from a poisoner
        assert status["start"] == "synced", (status, log[-3000:])
        assert not any(f"donor {p[-8:]}" in status["start_detail"] for p in poisoner_ids), status
        assert status["initial_eval_loss"] < math.log(256) - 1.0, status  # not a random φ (loss far above ln 256)
        assert abs(status["initial_eval_loss"] - swarm_eval) < 0.5, (status, swarm_eval)
    served = 0
    for index in POISONERS:
        for joiner_tail in re.findall(r"sent state of round \d+ to joiner (\w+)", swarm.nodes[index].log_path.read_text()):
            served += 1
            log = next(text for peer, text in joiner_logs.items() if peer.endswith(joiner_tail))
            poisoner = swarm.nodes[index].status["peer_id"]
            assert f"state from {poisoner[-8:]} refused: held-out loss" in log, log[-3000:]
    refused = sum(swarm.metrics(i).get("gossiptrain_states_refused_total", 0) for i in JOINERS)
    assert refused == served  # every poisoned state that reached a joiner was refused, nothing else was
