"""Process helpers shared by the local-swarm tools (swarm.py, chaos.py) and the tests; Linux (/proc).

Stopping: a node runs in a session (and process group) of its own (``start_new_session=True``),
with its p2pd in the same group. A clean stop is SIGTERM to the node process only (its clean leave
shuts its p2pd down itself); what is still running after a grace period gets SIGKILL to its whole
group, so no p2pd is left behind.

Finding: scanners over /proc for processes left over by a test (by command line, by parent, by
session).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

KILL_WAIT_S = 10.0  # a SIGKILLed process is reaped within this


# ---------------------------------------------------------------------------------------------- stopping
def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid` (a process started with start_new_session=True leads one).

    False if the group is gone (or not ours to signal)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its process group (its p2pd), not only the Python process."""
    if not signal_group(process.pid, signal.SIGKILL):
        process.kill()


def terminate_all(processes: Iterable[subprocess.Popen], *, thaw: bool = False) -> list[subprocess.Popen]:
    """SIGTERM every running process (the process only); returns those signalled.

    thaw: SIGCONT each one's whole group first (a SIGSTOPped node cannot act on its SIGTERM)."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        if thaw:
            signal_group(process.pid, signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
    return running


def wait_all(processes: Iterable[subprocess.Popen], grace: float) -> list[subprocess.Popen]:
    """Wait until every process has exited or `grace` seconds have passed; returns those still running."""
    deadline = time.monotonic() + grace
    left = []
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            left.append(process)
    return left


def kill_all(processes: Iterable[subprocess.Popen], *, wait: float = KILL_WAIT_S, check: bool = True) -> None:
    """SIGKILL the group of every process still running and reap it within `wait` seconds.

    check: a process not reaped in time raises subprocess.TimeoutExpired (else it is ignored)."""
    for process in processes:
        if process.poll() is None:
            kill_group(process)
            try:
                process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                if check:
                    raise


def stop_processes(processes: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM every running process (a clean leave), SIGKILL the group of what still runs after `grace` seconds."""
    terminate_all(processes)
    kill_all(wait_all(processes, grace))


# ---------------------------------------------------------------------------------------------- finding
def _stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, name, the /proc/<pid>/stat fields after the name: state ppid pgrp session ...) of every process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            name_end = stat.rindex(")")  # the name may itself contain ")"
            yield int(entry.name), stat[stat.index("(") + 1:name_end], stat[name_end + 2:].split()


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (p2pd's carries the identity path in the node's work dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def children_named(name: str, parent: int | None = None) -> list[int]:
    """Pids of processes called `name` whose parent is `parent` (default: this process)."""
    parent = os.getpid() if parent is None else parent
    return [pid for pid, comm, fields in _stats() if comm == name and int(fields[1]) == parent]


def p2pd_children(parent: int | None = None) -> list[int]:
    """p2pd processes started by `parent` (default: this process)."""
    return children_named("p2pd", parent)


def session_members(session_id: int) -> list[int]:
    """Live (not zombie) processes in a session, e.g. a node's own: LocalSwarm starts each node in a new one."""
    return [pid for pid, _, fields in _stats() if int(fields[3]) == session_id and fields[0] != "Z"]
