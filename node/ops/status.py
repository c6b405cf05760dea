"""Read a swarm's state from the DHT as a client: no training, no serving (`gossiptrain status`, `doctor`).

A client runs its own p2pd and joins the DHT in client mode: it reads the presence
records every member refreshes (round, losses, last exchange, flagged peers, wall
clock), each checked by the signed-record validator, and takes the swarm's manifest
to be the one most of them carry, then leaves. Nothing is stored on its behalf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from protocol.records import InvalidRecord, Presence, agreed_manifest, check_peer_id, presence_key

from node.net.dht import DHTClient, DHTUnavailable, entries
from node.net.p2pd import start_p2p
from node.net.signed_records import SignedRecordValidator

logger = logging.getLogger(__name__)

CLIENT_START_TIMEOUT = 30.0  # p2pd start plus the first contact with an initial peer
READ_TIMEOUT = 10.0  # one DHT read
CLOCK_SLACK = 30.0  # peers drop expired records by their own clocks; ours may be off (doctor measures by how much)


class SwarmUnreachable(RuntimeError):
    """The client could not start or reach any initial peer, or the DHT did not answer."""


@dataclass
class PeerStatus:
    peer_id: str
    round: int | None
    manifest: str | None
    age_seconds: float  # since the record was published (by the publisher's clock, if it sent one)
    eval_loss: float | None = None
    train_loss: float | None = None
    tokens_per_second: float | None = None
    utilisation: float | None = None
    rounds_done: int | None = None
    version: str | None = None
    last_exchange_partner: str | None = None
    last_exchange_age: float | None = None
    exchanges: dict[str, int] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)  # peers this one has flagged
    flagged_by: list[str] = field(default_factory=list)  # live peers that flagged this one
    clock_offset: float | None = None  # its published wall clock minus ours when we read it (<= true skew)
    maddrs: list[str] = field(default_factory=list)


@dataclass
class SwarmStatus:
    run_id: str
    manifest: str | None
    peers: list[PeerStatus]  # live, same manifest as the swarm
    other_manifest: list[PeerStatus]  # live but running something else (cannot average with the swarm)
    left: list[str]  # peers whose last record says they left cleanly
    queried_at: float
    malformed: int = 0  # records skipped as malformed (not shown)

    @property
    def flagged(self) -> dict[str, list[str]]:
        """Flagged peer -> the live peers that flagged it."""
        result: dict[str, set[str]] = {}
        for peer in self.peers:
            for target in peer.flagged:
                result.setdefault(target, set()).add(peer.peer_id)
        return {target: sorted(by) for target, by in sorted(result.items())}

    def to_json(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:  # JSON has no NaN: a non-finite loss is reported as a string
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean({
            "run_id": self.run_id, "manifest": self.manifest, "queried_at": self.queried_at,
            "live_peers": len(self.peers), "peers": [vars(p) for p in self.peers],
            "other_manifest": [vars(p) for p in self.other_manifest], "left": self.left, "flagged": self.flagged,
        })


@contextlib.asynccontextmanager
async def dht_client(initial_peers: list[str], timeout: float = CLIENT_START_TIMEOUT) -> AsyncIterator[DHTNode]:
    """A client-mode DHT node over its own p2pd, shut down on exit whatever happens."""
    if not initial_peers:
        raise SwarmUnreachable("no initial peers: pass --initial-peer MULTIADDR (any live node's address)")
    p2p = dht = None
    try:
        p2p = await start_p2p(timeout, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        # strict=False: a skewed local clock is reported (by doctor), not a reason to refuse to look
        # a validator without an identity: it checks every record it reads and signs nothing
        dht = await asyncio.wait_for(DHTNode.create(
            p2p=p2p, initial_peers=initial_peers, client_mode=True, cache_locally=False, strict=False,
            record_validator=SignedRecordValidator()), timeout)
    except TimeoutError:
        await _shutdown(p2p, dht)
        raise SwarmUnreachable(f"no initial peer answered within {timeout:.0f}s: {' '.join(initial_peers)}") from None
    except Exception as error:  # noqa: BLE001 - hivemind raises assorted errors for unreachable peers
        await _shutdown(p2p, dht)
        raise SwarmUnreachable(f"could not join through {' '.join(initial_peers)}: {error}") from error
    try:
        yield dht
    finally:
        await _shutdown(p2p, dht)


async def _shutdown(p2p: P2P | None, dht: DHTNode | None) -> None:
    """Best effort, bounded: the client's p2pd must go down whatever the DHT does."""
    for name, closing, timeout in (("DHT", dht, 5), ("p2pd", p2p, 10)):
        if closing is None:
            continue
        try:
            await asyncio.wait_for(closing.shutdown(), timeout)
        except Exception as error:  # noqa: BLE001 - nothing to do about it but say so
            logger.warning("client %s shutdown failed: %s", name, error or type(error).__name__)


async def _get(dht: DHTNode, key: str) -> Any:
    try:
        return await DHTClient(dht, READ_TIMEOUT).fetch(key)
    except DHTUnavailable as error:
        raise SwarmUnreachable(f"DHT read of {key} {error.reason}") from error.__cause__


def parse_presence(peer_id: str, value: Any, now: float) -> PeerStatus:
    """One presence record, as hostile input (protocol/records.py): a missing or malformed field is unknown.

    InvalidRecord if the record as a whole is malformed."""
    return _peer_status(peer_id, Presence.from_wire(value), now)


def _peer_status(peer_id: str, presence: Presence, now: float) -> PeerStatus:
    report = presence.report
    published = report.time
    exchange_time = report.last_exchange.time if report.last_exchange is not None else None
    return PeerStatus(
        peer_id=peer_id,
        round=presence.round,
        manifest=presence.manifest,
        age_seconds=max(0.0, now - published) if published is not None else math.nan,
        eval_loss=presence.eval_loss,
        train_loss=report.train_loss,
        tokens_per_second=report.tokens_per_second,
        utilisation=report.utilisation,
        rounds_done=report.rounds_done,
        version=report.version,
        last_exchange_partner=report.last_exchange.partner if report.last_exchange is not None else None,
        last_exchange_age=(now - exchange_time) if exchange_time is not None and published is not None
        else None,
        exchanges=dict(report.exchanges),
        flagged=list(report.flagged),
        clock_offset=(published - now) if published is not None else None,
        maddrs=list(presence.maddrs),
    )


async def read_swarm(dht: DHTNode, run_id: str) -> SwarmStatus:
    """The swarm's manifest (the one most live presences carry) and every live presence record, split by
    whether it runs the swarm's manifest."""
    found = await _get(dht, presence_key(run_id))
    now = time.time()
    live, left, malformed = [], [], 0
    for entry in entries(found):
        if entry.expiration < now - CLOCK_SLACK:
            continue
        try:
            peer_id = check_peer_id(entry.subkey, "subkey")
            presence = Presence.from_wire(entry.value)
        except InvalidRecord as error:
            malformed += 1
            logger.debug("skipping a malformed presence record under %.60r: %s", entry.subkey, error)
            continue
        if presence.left:
            left.append(peer_id)
            continue
        live.append(_peer_status(peer_id, presence, now))
    manifest = agreed_manifest(status.manifest for status in live)
    peers = sorted((p for p in live if manifest is None or p.manifest == manifest), key=lambda p: p.peer_id)
    other = [p for p in live if manifest is not None and p.manifest != manifest]
    swarm = SwarmStatus(run_id, manifest, peers, other, sorted(left), now, malformed)
    flagged = swarm.flagged
    for peer in peers:
        peer.flagged_by = flagged.get(peer.peer_id, [])
    return swarm


async def measure_clock(dht: DHTNode, peer_id: str, maddrs: list[str], tries: int = 3,
                        timeout: float = 5.0) -> tuple[float, float] | None:
    """(offset, round trip) of a peer's DHT clock against ours, from the quickest of a few DHT pings.

    A ping reply carries the peer's clock; with t0/t1 our clock around the call, the offset is
    reply - (t0 + t1) / 2, off by at most half the round trip. None if the peer did not answer.
    """
    from hivemind.p2p import PeerID
    from hivemind.proto import dht_pb2
    from hivemind.utils.multiaddr import Multiaddr

    try:
        peer = PeerID.from_base58(peer_id)
        addresses = [Multiaddr(m) for m in maddrs]
    except Exception:  # noqa: BLE001 - a malformed id or address in someone's presence record
        return None
    try:  # known addresses help p2pd dial; the pings below decide whether the peer answers
        await asyncio.wait_for(dht.protocol.p2p._client.connect(peer, addresses), timeout)
    except Exception as error:  # noqa: BLE001
        logger.debug("connecting to %s failed: %s", peer_id, error or type(error).__name__)
    best = None
    for _ in range(tries):
        request = dht_pb2.PingRequest(peer=dht.protocol.node_info, validate=False)
        started = time.time()
        try:
            response = await asyncio.wait_for(dht.protocol.get_stub(peer).rpc_ping(request), timeout)
        except Exception:  # noqa: BLE001 - unreachable or gone: try again, then give up
            continue
        finished = time.time()
        if not response.dht_time:
            continue
        round_trip = finished - started
        if best is None or round_trip < best[1]:
            best = (response.dht_time - (started + finished) / 2, round_trip)
    return best


async def sample_clock_offsets(dht: DHTNode, run_id: str, window: float, interval: float = 0.5) -> dict[str, float]:
    """Per peer, the largest (published wall clock - our clock at read) seen over `window` seconds.

    A record is read some time after it was published, so each reading underestimates the
    peer's clock offset by the record's age; peers republish every heartbeat, so the largest
    reading over two heartbeats is within about `interval` (plus DHT latency) of the true skew.
    """
    best: dict[str, float] = {}
    deadline = time.monotonic() + window
    while True:
        swarm = await read_swarm(dht, run_id)
        for peer in swarm.peers + swarm.other_manifest:
            if peer.clock_offset is not None:
                best[peer.peer_id] = max(best.get(peer.peer_id, -math.inf), peer.clock_offset)
        if time.monotonic() + interval > deadline:
            return best
        await asyncio.sleep(interval)
