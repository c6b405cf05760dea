"""Initial peers from a file another node writes: how docker-compose trainers find the bootstrap node.

The file is either a node's `node.json` (written by every node in its work dir; usable once its
status is "running") or plain text with one multiaddr per line. A node.json on a shared volume
may be left over from an earlier run, so the bootstrap node deletes its own at start and a
reader waits, with a deadline, until a running node has rewritten it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

from protocol.records import InvalidRecord, NodeStatus


class PeersFileError(RuntimeError):
    """The peers file did not name a running peer before the deadline (or cannot be read)."""


def _is_loopback(maddr: str) -> bool:
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(parts[2]).is_loopback
        except ValueError:
            return False
    return False


def read_peers_file(path: str | Path) -> list[str] | None:
    """The multiaddrs the file names, or None while it is missing, partial or from a node not yet running.

    Loopback addresses are dropped when routable ones exist: another container's 127.0.0.1 is not
    the bootstrap node. On a single host (all addresses loopback) they are kept.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise PeersFileError(f"cannot read peers file {path}: {error}") from error
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith("{"):
        try:
            status = NodeStatus.loads(stripped)
        except InvalidRecord:
            return None  # being rewritten (node.json is replaced atomically, but a copy may not be), or not one
        if status.status != "running":
            return None
        maddrs = list(status.maddrs)  # multiaddrs only (the schema drops anything else)
    else:
        maddrs = [line.strip() for line in stripped.splitlines() if line.strip().startswith("/")]
    routable = [m for m in maddrs if not _is_loopback(m)]
    return (routable or maddrs) or None


def all_initial_peers(initial_peers: list[str], peers_file: str) -> list[str]:
    """--initial-peer addresses plus what --initial-peers-file names now (status, doctor: no waiting)."""
    return [*initial_peers, *((read_peers_file(peers_file) or []) if peers_file else [])]


async def wait_for_peers_file(path: str | Path, timeout: float, interval: float = 0.5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        maddrs = read_peers_file(path)
        if maddrs:
            return maddrs
        if time.monotonic() >= deadline:
            raise PeersFileError(
                f"no running peer in {path} after {timeout:.0f}s (is the bootstrap node up and writing it?)")
        await asyncio.sleep(interval)
