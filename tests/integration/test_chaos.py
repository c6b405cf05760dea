"""Seeded chaos over 5 real nodes: SIGKILL, SIGTERM and SIGSTOP on a schedule; every check of the report holds.

The CI-sized version of `gossiptrain chaos`: a 90 s chaos phase (seed 1: one term, one freeze,
one kill9), then a fault-free swarm for the same wall time as the loss reference.
"""

from __future__ import annotations

import time

import pytest

from node.tools.chaos import KINDS, make_schedule, run_chaos
from tests.integration.conftest import TINY

pytestmark = pytest.mark.integration

SEED = 1
NODES = 5
CHAOS_S = 90.0
ARGS = TINY + ["--inner-steps", "10", "--sync-timeout", "3", "--io-timeout", "2"]


@pytest.mark.timeout(480)  # typically ~4 min: 2 x (swarm start ~25 s + 90 s + stop) + restarts
def test_swarm_survives_seeded_chaos(tmp_path):
    schedule = make_schedule(SEED, NODES, CHAOS_S)
    assert {event.kind for event in schedule} == set(KINDS)  # the seed exercises every kind
    started = time.monotonic()
    report = run_chaos(tmp_path, seed=SEED, num_nodes=NODES, duration_s=CHAOS_S, node_args=ARGS,
                       schedule=schedule, on_event=lambda entry: print(entry.line(), flush=True))
    print(f"\n{report.render()}\n\nwall time {time.monotonic() - started:.0f}s", flush=True)
    failures = "\n".join(f"{check.name}: {check.detail}" for check in report.failures())
    assert report.passed, f"chaos checks failed (logs under {tmp_path}):\n{failures}"
    assert all(check.passed for check in report.checks), [c.name for c in report.checks if not c.passed]
