"""`gossiptrain swarm` as a user runs it: SIGTERM to the launcher (kill, CI, docker stop) stops its nodes too."""

from __future__ import annotations

import json
import os
import signal

import pytest

from node.tools.procs import signal_group
from tests.integration.conftest import TINY, gossiptrain, poll, processes_mentioning, stop

pytestmark = pytest.mark.integration


def test_sigterm_to_the_launcher_stops_every_node_cleanly(tmp_path):
    base = tmp_path / "swarm"
    statuses = [base / f"node{i}" / "node.json" for i in range(2)]
    histories = [base / f"node{i}" / "history.jsonl" for i in range(2)]
    try:
        with gossiptrain("swarm", "--nodes", "2", "--rounds", "1000", "--dir", str(base), "--metrics-base-port", "0",
                         "--refresh", "1", *TINY, "--inner-steps", "5") as launcher:
            poll(lambda: all(h.exists() and len(h.read_text().splitlines()) >= 3 for h in histories), timeout=120,
                 what="both nodes to finish two rounds")
            output = stop(launcher, timeout=90)
    finally:
        # the nodes run in sessions of their own: a failing launcher must not leave them (and their p2pd) behind
        pids = [json.loads(p.read_text())["pid"] for p in statuses if p.exists()]
        orphans = [pid for pid in pids if _alive(pid)]
        for pid in orphans:
            signal_group(pid, signal.SIGKILL)
    assert not orphans, "nodes kept running after their launcher got SIGTERM"
    poll(lambda: not processes_mentioning(str(base)), timeout=15, what="the nodes' p2pd to be gone")
    assert "interrupted: stopping nodes (clean leave)" in output
    assert f"plots: gossiptrain report {base}" in output
    for index in range(2):
        summary = json.loads((base / f"node{index}" / "summary.json").read_text())
        assert summary["rounds_done"] >= 1  # each node left cleanly, with its summary written
    assert launcher.returncode == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
