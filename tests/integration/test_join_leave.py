"""Join, clean leave, crash and restart on a live swarm of real processes.

One swarm goes through every phase in turn, so each phase starts from a swarm that
has really trained: a late joiner downloads the state, a SIGTERMed node leaves
cleanly and resumes from its checkpoint, a kill -9ed node is dropped within the
presence TTL and comes back by re-syncing.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time

import pytest

from node.tools.swarm import exchange_count, exchange_counts
from node.train.checkpoint import list_checkpoints, verify_checkpoint
from tests.integration.conftest import TINY, poll, rounds_done

pytestmark = pytest.mark.integration

PRESENCE_TTL, HEARTBEAT = 6.0, 2.0
ARGS = TINY + ["--inner-steps", "20", "--sync-timeout", "3", "--io-timeout", "2", "--checkpoint-every", "2",
               "--seed", "11", "--presence-ttl", str(PRESENCE_TTL), "--heartbeat", str(HEARTBEAT)]
REJOIN = ["--min-peers", "1"]


def failed_exchanges(samples: dict[str, float]) -> int:
    return exchange_counts(samples)[1]


def ok_exchanges(samples: dict[str, float]) -> int:
    return exchange_count(samples, "ok")


def test_join_leave_crash_and_restart(make_swarm):
    swarm = make_swarm(3, ARGS)
    swarm.start()

    def live(indices):
        return {i: swarm.metrics(i) for i in indices}

    poll(lambda: all(rounds_done(m) >= 4 for m in live(range(3)).values()), timeout=180,
         what="the swarm to train 4 rounds")

    # --- a late joiner downloads the swarm's state and starts near the swarm's loss -------------
    joiner = swarm.start_node(3, [swarm.nodes[1].maddr], REJOIN)  # bootstraps via node 1, not node 0
    swarm.wait_until_up(joiner)
    status = poll(lambda: joiner.poll_status().get("initial_eval_loss") and joiner.status, timeout=60,
                  what="the joiner's first held-out loss")
    swarm_eval = statistics.mean(m["gossiptrain_eval_loss"] for m in live(range(3)).values())
    assert status["start"] == "synced", status
    assert status["initial_eval_loss"] < math.log(256) - 1.0, status  # far from a fresh model (5.55)
    assert abs(status["initial_eval_loss"] - swarm_eval) < 0.3, (status, swarm_eval)
    samples = swarm.metrics(3)
    assert samples["gossiptrain_state_sync_bytes_total"] == 2 * 4 * status["parameters"]
    assert samples["gossiptrain_state_sync_seconds"] > 0
    assert samples["gossiptrain_start_mode{mode=\"synced\"}"] == 1
    poll(lambda: ok_exchanges(swarm.metrics(3)) >= 1 and rounds_done(swarm.metrics(3)) >= 2, timeout=90,
         what="the joiner to train and exchange")
    assert sum(m['gossiptrain_state_uploads_total{result="ok"}'] for m in live(range(3)).values()) == 1

    # --- SIGTERM: a clean leave, partners barely notice ----------------------------------------
    leaver = swarm.nodes[2]
    failed_before = {i: failed_exchanges(m) for i, m in live((0, 1, 3)).items()}
    started = time.monotonic()
    leaver.process.send_signal(signal.SIGTERM)
    assert leaver.process.wait(timeout=30) == 0, leaver.log_tail()
    leave_seconds = time.monotonic() - started
    assert leaver.poll_status()["status"] == "stopped"
    checkpoints = list_checkpoints(leaver.work_dir / "checkpoints")
    assert checkpoints
    for path in checkpoints:
        verify_checkpoint(path)
    # withdrawn from the DHT: peers drop it at their next refresh, well inside the presence TTL
    dropped_after = poll(lambda: all(m.get("gossiptrain_peers_live") == 2 for m in live((0, 1, 3)).values())
                         and time.monotonic() - started, timeout=PRESENCE_TTL + HEARTBEAT,
                         what="peers to drop the node that left")
    survivors_rounds = {i: rounds_done(m) for i, m in live((0, 1, 3)).items()}
    poll(lambda: all(rounds_done(swarm.metrics(i)) >= r + 2 for i, r in survivors_rounds.items()), timeout=90,
         what="the others to train on")
    for index, before in failed_before.items():
        assert failed_exchanges(swarm.metrics(index)) - before <= 1, swarm.nodes[index].log_tail()
    print(f"clean leave: exit 0 in {leave_seconds:.1f}s, dropped by all peers after {dropped_after:.1f}s")

    # --- restart after the clean leave: a checkpoint within the lag allowance is resumed --------
    # (TINY rounds take well under a second, so the allowance is widened to make "recent" certain)
    swarm.start_node(2, [swarm.nodes[3].maddr], REJOIN + ["--resume-max-lag", "10000"])
    swarm.wait_until_up(swarm.nodes[2])
    assert swarm.nodes[2].poll_status()["start"] == "resumed", swarm.nodes[2].status
    poll(lambda: rounds_done(swarm.metrics(2)) >= 2, timeout=90, what="the resumed node to train")

    # --- kill -9: dropped within the presence TTL, survivors carry on -------------------------
    victim = swarm.nodes[1]
    started = time.monotonic()
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    dropped_after = poll(lambda: all(m.get("gossiptrain_peers_live") == 2 for m in live((0, 2, 3)).values())
                         and time.monotonic() - started, timeout=PRESENCE_TTL + 2 * HEARTBEAT + 2,
                         what="survivors to drop the killed node")
    survivors_rounds = {i: rounds_done(m) for i, m in live((0, 2, 3)).items()}
    poll(lambda: all(rounds_done(swarm.metrics(i)) >= r + 2 for i, r in survivors_rounds.items()), timeout=90,
         what="survivors to train on after the crash")
    print(f"kill -9: dropped by all survivors after {dropped_after:.1f}s")

    # --- restart with a zero lag allowance: it re-syncs from peers and says so ------------------
    swarm.start_node(1, [swarm.nodes[0].maddr], REJOIN + ["--resume-max-lag", "0"])
    swarm.wait_until_up(swarm.nodes[1])
    assert swarm.nodes[1].poll_status()["start"] == "synced", swarm.nodes[1].status
    poll(lambda: ok_exchanges(swarm.metrics(1)) >= 1, timeout=90, what="the re-synced node to exchange")
    assert all(node.process.poll() is None for node in swarm.nodes)
