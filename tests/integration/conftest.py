"""Helpers for integration tests: real node processes with real p2pd on 127.0.0.1.

The process helpers (stopping, /proc scanners) live in node/tools/procs.py and the scrape readers in
node/tools/swarm.py, shared with the swarm and chaos tools: tests import them from there
(processes_mentioning and rounds_done, once defined here, are still re-exported).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from node.tools.procs import kill_all, processes_mentioning
from node.tools.swarm import LocalSwarm, rounds_done

__all__ = ["TINY", "gossiptrain", "poll", "processes_mentioning", "rounds_done", "stop"]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]

# Small enough for a 2-core CI box, big enough that the loss visibly drops.
TINY = ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--context", "64", "--batch-size", "8",
        "--eval-batches", "4", "--warmup-steps", "10", "--lr", "3e-3"]


def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.25, what: str = "condition") -> T:
    """Return the first truthy value of predicate(), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@contextlib.contextmanager
def gossiptrain(*args: str) -> Iterator[subprocess.Popen]:
    """`python -m node ARGS` in its own session (stdout+stderr as text); if the test leaves it running, it and
    its whole process group (p2pd, a launcher's nodes started in the same group) are killed."""
    process = subprocess.Popen([sys.executable, "-m", "node", *args], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        kill_all([process])


def stop(process: subprocess.Popen, timeout: float) -> str:
    """SIGTERM, then its whole output once it has exited (TimeoutExpired after `timeout`)."""
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=timeout)[0]


@pytest.fixture
def make_swarm(tmp_path):
    swarms: list[LocalSwarm] = []

    def factory(num_nodes: int, node_args: list[str], name: str = "swarm", **options) -> LocalSwarm:
        swarm = LocalSwarm(num_nodes, tmp_path / name, node_args, **options)
        swarms.append(swarm)
        return swarm

    yield factory
    for swarm in swarms:
        swarm.stop(grace=20)
