"""`gossiptrain swarm` as a user runs it: SIGTERM to the launcher (kill, CI, docker stop) stops its nodes too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import TINY, poll, processes_mentioning

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_to_the_launcher_stops_every_node_cleanly(tmp_path):
    base = tmp_path / "swarm"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "node", "swarm", "--nodes", "2", "--rounds", "1000", "--dir", str(base),
         "--metrics-base-port", "0", "--refresh", "1", *TINY, "--inner-steps", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    pids: list[int] = []
    statuses = [base / f"node{i}" / "node.json" for i in range(2)]
    try:
        histories = [base / f"node{i}" / "history.jsonl" for i in range(2)]
        poll(lambda: all(h.exists() and len(h.read_text().splitlines()) >= 3 for h in histories), timeout=120,
             what="both nodes to finish two rounds")
        pids = [json.loads(p.read_text())["pid"] for p in statuses]
        launcher.send_signal(signal.SIGTERM)
        output, _ = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
        pids = pids or [json.loads(p.read_text())["pid"] for p in statuses if p.exists()]
        orphans = [pid for pid in pids if _alive(pid)]
        for pid in orphans:  # a failing run must not leave nodes (and their p2pd) behind
            os.killpg(pid, signal.SIGKILL)
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
