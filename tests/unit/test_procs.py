"""node.tools.procs: stopping process groups (SIGTERM, then SIGKILL after a grace) and the /proc scanners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from node.tools import procs

# a shell that ignores SIGTERM (so does its `sleep`: an ignored signal stays ignored across exec) in its own group
STUBBORN = 'trap "" TERM; sleep 300 & echo ready; wait'


def start(*argv: str) -> subprocess.Popen:
    """argv in a session (and process group) of its own, as LocalSwarm starts a node."""
    return subprocess.Popen(argv, start_new_session=True)


def start_stubborn() -> subprocess.Popen:
    process = subprocess.Popen(["sh", "-c", STUBBORN], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout.readline() == "ready\n"
    return process


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_stop_processes_terminates_then_kills_the_group_of_what_ignores_sigterm():
    polite, stubborn = start("sleep", "300"), start_stubborn()
    try:
        assert len(procs.session_members(stubborn.pid)) == 2  # the shell and its sleep
        started = time.monotonic()
        procs.stop_processes([polite, stubborn], grace=1.0)
        assert polite.returncode == -signal.SIGTERM
        assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - started >= 1.0
        assert wait_until(lambda: not procs.session_members(stubborn.pid))  # its sleep is gone too
    finally:
        procs.kill_all([polite, stubborn], check=False)


def test_terminate_all_thaws_a_stopped_process_so_it_can_leave():
    frozen = start("sleep", "300")
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        assert procs.terminate_all([frozen], thaw=True) == [frozen]
        assert procs.wait_all([frozen], grace=10) == []
        assert frozen.returncode == -signal.SIGTERM
        assert procs.terminate_all([frozen]) == []  # nothing left to signal
    finally:
        procs.kill_all([frozen], check=False)


def test_signals_to_a_vanished_group_are_ignored():
    gone = start("true")
    gone.wait(timeout=10)
    assert not procs.signal_group(gone.pid, signal.SIGKILL)
    procs.kill_group(gone)
    procs.kill_all([gone])


def test_scanners_find_processes_by_command_line_parent_and_session():
    token = f"procs-test-{uuid.uuid4().hex}"
    child = start(sys.executable, "-c", "import time; time.sleep(300)", token)
    sleeper = start("sleep", "300")
    try:
        assert wait_until(lambda: procs.processes_mentioning(token) == [child.pid])
        assert sleeper.pid in procs.children_named("sleep")
        assert sleeper.pid not in procs.children_named("sleep", parent=child.pid)
        assert child.pid not in procs.children_named("sleep")
        assert procs.session_members(child.pid) == [child.pid]
        assert procs.p2pd_children() == []
    finally:
        procs.kill_all([child, sleeper])
    assert procs.processes_mentioning(token) == []
    assert procs.session_members(child.pid) == [] and sleeper.pid not in procs.children_named("sleep")
