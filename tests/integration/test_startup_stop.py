"""A stop signal while a node is still starting ends it cleanly: exit 0, no p2pd left, the work dir free again.

Signals land at staggered moments, so over the cases they hit the peers-file wait, corpus and
identity set-up, p2pd start-up, the DHT bootstrap and the model build.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from node.net.p2pd import start_p2p
from node.tools.procs import p2pd_children
from node.workdir import is_locked
from tests.integration.conftest import TINY, gossiptrain, poll, processes_mentioning, stop

pytestmark = pytest.mark.integration



def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0, 1.6, 2.5, 4.0])
def test_stop_signal_during_start_up(tmp_path, delay):
    """`delay` counts from the moment the process handles SIGTERM (before any heavy import, see node/cli/main.py),
    so no case depends on how fast this machine imports: 0.0 lands while torch and hivemind are still loading."""
    work_dir = tmp_path / "node"
    with gossiptrain("run", "--work-dir", str(work_dir), "--metrics-port", "0", "--min-peers", "5", *TINY) as node:
        poll(lambda: catches_sigterm(node.pid), timeout=30, interval=0.005, what="a SIGTERM handler")
        # the point is to land the signal at an arbitrary moment of start-up, not to wait for one
        time.sleep(delay)
        output = stop(node, timeout=90)
    assert node.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # p2pd is stopped by the node, not left to an idle timeout
    poll(lambda: not processes_mentioning(str(work_dir)), timeout=15, what="the node's p2pd to be gone")
    assert not is_locked(work_dir)


def test_stop_signal_while_waiting_for_a_peers_file(tmp_path):
    with gossiptrain("run", "--work-dir", str(tmp_path / "node"), "--metrics-port", "0",
                     "--initial-peers-file", str(tmp_path / "never.json"), *TINY) as node:
        poll(lambda: (tmp_path / "node" / ".lock").exists(), timeout=60, what="the node to claim its work dir")
        output = stop(node, timeout=30)
    assert node.returncode == 0 and "stopped while starting" in output, output[-2000:]


@pytest.mark.parametrize("cancel_after", [0.0, 0.01, 0.03, 0.06])
async def test_start_p2p_cancelled_midway_leaves_no_daemon(cancel_after):
    """hivemind's P2P.create, cancelled while it waits for the daemon, leaves p2pd running; start_p2p does not.
    (p2pd is up in about 0.1 s: a late cancellation may find it started, which is then shut down here.)"""
    assert p2pd_children() == []
    starting = asyncio.ensure_future(start_p2p(30, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
    await asyncio.sleep(cancel_after)  # lands the cancellation at a chosen point of the start-up
    cancelled = starting.cancel()
    try:
        p2p = await starting
    except asyncio.CancelledError:
        pass
    else:
        assert cancel_after > 0, "a cancellation before the daemon could start must cancel"
        await p2p.shutdown()
    deadline = time.monotonic() + 15
    while p2pd_children() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert p2pd_children() == []
    assert cancelled or cancel_after > 0


async def test_start_p2p_starts_a_working_daemon():
    p2p = await start_p2p(30, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert len(p2pd_children()) == 1 and (await p2p.get_visible_maddrs())
    finally:
        await p2p.shutdown()
