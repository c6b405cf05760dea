"""Six nodes bootstrapped through different initial peers still form one swarm (no split DHT).

hivemind issue 624: nodes that bootstrap from different initial peers can end up in separate DHTs.
Here every node gets exactly one initial peer, an already running node, and joiners spread over them:

  chain:  0 <- 1 <- 2 <- 3 <- 4 <- 5           each joins through the node started just before it
  waves:  0 | 1<-0 | 2<-0, 3<-1 | 4<-2, 5<-3   a wave starts together, each joiner through a different
                                                 running node; 4 and 5 join through 2 and 3, which
                                                 themselves joined at the same moment

Every node must then count the five others live within a bounded time, keep counting five (no
flapping), and train paired rounds. LocalSwarm passes --min-peers 5: nobody trains before it sees
everyone (or 120 s pass), so training also proves the view was complete.
"""

from __future__ import annotations

import time

import pytest

from node.tools.swarm import LocalSwarm, NodeProcess
from tests.integration.conftest import TINY, rounds_done

pytestmark = pytest.mark.integration

NUM_NODES = 6
ALL_SEE_ALL_TIMEOUT = 60.0  # from the last node up until every node counts every other one
STABLE_WINDOW = 8.0  # then the view must hold, at least this long and until everyone has exchanged
TRAIN_TIMEOUT = 60.0
OK_EXCHANGES = 'gossiptrain_exchanges_total{result="ok"}'
ARGS = TINY + ["--inner-steps", "10", "--sync-timeout", "3", "--io-timeout", "2"]

# (node, its only initial peer) per wave; a wave starts at once, the next one once it is up
TOPOLOGIES = {
    "chain": [[(0, None)], [(1, 0)], [(2, 1)], [(3, 2)], [(4, 3)], [(5, 4)]],
    "waves": [[(0, None)], [(1, 0)], [(2, 0), (3, 1)], [(4, 2), (5, 3)]],
}


def start_in_waves(swarm: LocalSwarm, waves: list[list[tuple[int, int | None]]]) -> None:
    for wave in waves:
        started: list[NodeProcess] = []
        for index, peer in sorted(wave):  # start_node appends: indices must come in order
            started.append(swarm.start_node(index, [] if peer is None else [swarm.nodes[peer].maddr]))
        for node in started:
            swarm.wait_until_up(node)


def peers_live(swarm: LocalSwarm) -> list[int | None]:
    """Each node's live-peer count from its /metrics (None: no answer, or no heartbeat yet)."""
    counts = []
    for index in range(swarm.num_nodes):
        value = swarm.metrics(index).get("gossiptrain_peers_live")
        counts.append(None if value is None else int(value))
    return counts


def describe(swarm: LocalSwarm) -> str:
    return "\n".join(f"--- node {n.index}:\n{n.log_tail(15)}" for n in swarm.nodes)


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_nodes_bootstrapped_through_different_peers_form_one_swarm(make_swarm, topology):
    swarm = make_swarm(NUM_NODES, ARGS, name=topology)
    started = time.monotonic()
    start_in_waves(swarm, TOPOLOGIES[topology])
    all_up = time.monotonic()

    everyone = NUM_NODES - 1
    while (counts := peers_live(swarm)) != [everyone] * NUM_NODES:
        if time.monotonic() - all_up > ALL_SEE_ALL_TIMEOUT:
            pytest.fail(f"split swarm: live-peer counts {counts} after {ALL_SEE_ALL_TIMEOUT:.0f}s "
                        f"(expected {everyone} everywhere)\n{describe(swarm)}")
        time.sleep(0.5)
    converged = time.monotonic()
    print(f"\n[bootstrap {topology}] started in {all_up - started:.1f}s; all {NUM_NODES} saw all others "
          f"{converged - all_up:.1f}s after the last was up")

    # the view holds while the swarm trains: no node ever counts fewer (or more) than five
    window_end = converged + STABLE_WINDOW
    deadline = converged + TRAIN_TIMEOUT
    while True:
        scrapes = [swarm.metrics(i) for i in range(NUM_NODES)]
        for index, samples in enumerate(scrapes):
            if "gossiptrain_peers_live" in samples:  # a scrape can time out on this loaded box
                assert samples["gossiptrain_peers_live"] == everyone, (
                    f"node {index} dropped to {samples['gossiptrain_peers_live']:.0f} live peers "
                    f"{time.monotonic() - converged:.1f}s after convergence:\n{describe(swarm)}")
        trained = all(s and rounds_done(s) >= 2 and s[OK_EXCHANGES] >= 1
                      for s in scrapes)
        if trained and time.monotonic() >= window_end:
            break
        assert time.monotonic() < deadline, (
            f"not every node did 2 rounds with an ok exchange within {TRAIN_TIMEOUT:.0f}s: "
            f"{[(rounds_done(s), s.get(OK_EXCHANGES)) for s in scrapes]}\n"
            f"{describe(swarm)}")
        time.sleep(0.5)
    print(f"[bootstrap {topology}] view stable and all trained; {time.monotonic() - converged:.1f}s checked")
    assert all(node.process.poll() is None for node in swarm.nodes)
