"""A stop signal while a node is still starting ends it cleanly: exit 0, no p2pd left, the work dir free again.

Signals land at staggered moments, so over the cases they hit the peers-file wait, corpus and
identity set-up, p2pd start-up, the DHT bootstrap and the model build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.workdir import is_locked
from tests.integration.conftest import TINY, poll, processes_mentioning

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("delay", [0.3, 1.0, 1.6, 2.5, 4.0])
def test_stop_signal_during_start_up(tmp_path, delay):
    work_dir = tmp_path / "node"
    node = subprocess.Popen([sys.executable, "-m", "node", "run", "--work-dir", str(work_dir), "--metrics-port", "0",
                             "--min-peers", "5", *TINY], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(delay)  # the point is to land the signal at an arbitrary moment of start-up, not to wait for one
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=90)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)
    assert node.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # p2pd is stopped by the node, not left to an idle timeout
    poll(lambda: not processes_mentioning(str(work_dir)), timeout=15, what="the node's p2pd to be gone")
    assert not is_locked(work_dir)


def test_stop_signal_while_waiting_for_a_peers_file(tmp_path):
    node = subprocess.Popen([sys.executable, "-m", "node", "run", "--work-dir", str(tmp_path / "node"),
                             "--metrics-port", "0", "--initial-peers-file", str(tmp_path / "never.json"), *TINY],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        poll(lambda: (tmp_path / "node" / ".lock").exists(), timeout=60, what="the node to claim its work dir")
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=30)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)
    assert node.returncode == 0 and "stopped while starting" in output, output[-2000:]
