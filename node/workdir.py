"""A node's work dir: its lock, `{slot}` claims, and the files a node keeps there.

A work dir is its node's alone: an exclusive lock while the node runs, and `{slot}` work dirs.

Two nodes writing checkpoints into one work dir would corrupt each other's state, so a node
holds an exclusive flock on `<work_dir>/.lock` for its lifetime (the kernel drops it when the
process dies, kill -9 included). A work dir containing `{slot}` is claimed as the lowest
number whose lock is free: replicas of one container service sharing a volume each get a
stable dir (`/data/node-1`, `/data/node-2`, ...), so a re-created container resumes from the
checkpoints of the slot it claims instead of starting a new dir.

flock is per host: on a network file system shared by several machines (NFS, CIFS) it may
not exclude a node on another machine, so give such nodes distinct work dirs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from protocol.records import MAX_STATUS_BYTES, InvalidRecord, NodeStatus

logger = logging.getLogger(__name__)

MAX_SLOTS = 256
LOCK_FILE = ".lock"
LOCK_ATTEMPTS = 3  # a held lock costs a start-up 0.1 s per held slot
LOCK_RETRY_SECONDS = 0.05


class WorkDirBusy(RuntimeError):
    """The work dir (or every slot of it) is held by another running node."""


def _try_lock(directory: Path) -> int | None:
    """An fd holding the exclusive lock of `directory`, or None if another process holds it.

    A probe (`is_locked`, from a health check or doctor) holds a shared lock for an instant; a
    few short retries keep such a probe from pushing a starting node onto the next slot.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)  # close-on-exec: p2pd never inherits it
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(LOCK_RETRY_SECONDS)
    os.close(fd)
    return None


def candidates(template: str) -> list[Path]:
    if "{slot}" not in template:
        return [Path(template)]
    return [Path(template.replace("{slot}", str(n))) for n in range(1, MAX_SLOTS + 1)]


def claim_work_dir(template: str) -> tuple[Path, int]:
    """The work dir this node will use and the fd that holds its lock (keep it open while running)."""
    for directory in candidates(template):
        fd = _try_lock(directory)
        if fd is not None:
            return directory, fd
    if "{slot}" in template:
        raise WorkDirBusy(f"all {MAX_SLOTS} slots of {template} are in use by running nodes")
    raise WorkDirBusy(f"work dir {template} is in use by another running node "
                      "(two nodes must not share one: give each its own --work-dir)")


def is_locked(directory: Path) -> bool:
    """True while a running node holds `directory` (without taking the lock if it is free)."""
    path = directory / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock if we got it
    return False


def pid_namespace() -> int | None:
    """This process's PID namespace (one per container), to tell containers apart that share a host name."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def existing_work_dirs(template: str) -> list[Path]:
    """The dirs a template names that exist now (every slot dir for a `{slot}` template)."""
    return [d for d in candidates(template) if d.is_dir()]


STATUS_FILE = "node.json"  # NodeStatus: where this node is and how it is doing; read by launcher, health, peers files
SUMMARY_FILE = "summary.json"  # written once, when the node has left
HISTORY_FILE = "history.jsonl"  # one line per round, read by `gossiptrain report`
CHECKPOINT_DIR = "checkpoints"


class StatusUnreadable(RuntimeError):
    """A node.json exists but cannot be read, or is not a node status (too large, not JSON, not a map)."""


def read_status(directory: Path) -> NodeStatus:
    """The node.json of a work dir, parsed as hostile input (a shared volume): a malformed field is unknown (None).

    FileNotFoundError when there is none (yet); StatusUnreadable when it cannot be used.
    """
    path = directory / STATUS_FILE
    try:
        with open(path, "rb") as file:
            text = file.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StatusUnreadable(str(error)) from error
    try:
        return NodeStatus.loads(text)
    except InvalidRecord as error:
        raise StatusUnreadable(str(error)) from error


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Atomic small-file write: readers (the swarm launcher, health checks, tests) never see half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


class WorkDirFiles:
    """The files a running node keeps in its (locked) work dir, besides its checkpoints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.status_path = directory / STATUS_FILE
        self.history_path = directory / HISTORY_FILE
        self.checkpoint_dir = directory / CHECKPOINT_DIR

    def clear_status(self) -> None:
        """A node.json left by an earlier run (kill -9, a reused volume) must not tell others where we are."""
        self.status_path.unlink(missing_ok=True)

    def write_status(self, status: NodeStatus) -> None:
        write_json_atomic(self.status_path, status.to_wire())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.directory / SUMMARY_FILE, summary)

    def append_history(self, record: dict[str, Any]) -> None:
        """One line per round; a failed write (disk full) is logged and never stops training."""
        try:
            with open(self.history_path, "a") as file:
                file.write(json.dumps(record, default=str) + "\n")
        except OSError as error:
            logger.warning("could not append to %s: %s", self.history_path, error)
