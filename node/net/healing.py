"""Partition healing: put the peers hivemind's DHT routing table lost, but this node still knows, back into it.

hivemind removes a peer from its Kademlia routing table after one unanswered request and never
bootstraps again. After a network outage the node that was cut off has an empty routing table
(every heartbeat store timed out) and the others have dropped it: neither side ever sends the
other a request again, so the swarm stays split after the network is back (measured with
`python -m node.bench.partition`: after a 30 s cut, still split more than 3 minutes later).

`DHTHealer` runs next to the heartbeat. Every HEAL_INTERVAL_S it compares the routing table with
the peers this node knows:

- its initial peers (the --initial-peer / --initial-peers-file multiaddrs), never forgotten;
- every peer it has seen live (a valid presence record of our swarm; its signed peer id and the
  addresses it announced), remembered for REMEMBER_S after it was last seen, forgotten at once
  when it leaves cleanly.

A known peer that is missing from the routing table, or missing from the live view while still
remembered, is "lost". A lost peer is re-dialled at its last known addresses (p2pd connect,
bounded) and pinged through hivemind's DHTProtocol (bounded): a ping that is answered puts the
peer back into our routing table and, on its side, us into its table (rpc_ping adds the sender).
A ping that times out over a connection p2pd still holds went into a connection the outage killed
(TCP retransmits into it at exponentially growing intervals): if the peer is out of our live view
too (no presence for a TTL: an outage, not a peer slow under load, whose exchange streams must not
be cut), it is hung up (p2pd disconnect), so the next attempt dials afresh instead of waiting for
that connection's next retransmission.
Once a lost peer answered, the node re-runs hivemind's bootstrap traversal (find_nearest_nodes of
its own id, bounded) to find the rest of the swarm through it. Each lost peer is retried with
exponential backoff (BACKOFF_BASE_S doubling up to BACKOFF_CAP_S: short enough that a peer is
retried within seconds of the network returning; after FAST_RETRY_S lost, every SLOW_BACKOFF_CAP_S;
an initial peer not seen for REMEMBER_S, every STALE_BACKOFF_CAP_S). A dial into a network that drops
packets hangs until its timeout, so a retry may start while the previous attempt still waits (at most
MAX_IN_FLIGHT_PER_PEER per peer, MAX_IN_FLIGHT in all, MAX_ATTEMPTS_PER_TICK started per tick): a
peer is dialled afresh within about BACKOFF_CAP_S of the network returning. Every network wait is
bounded. When a lost peer answers, the node also re-publishes its presence and reloads its live view
at once (`on_heal`), instead of at its next heartbeat.

`KnownPeers` is the pure bookkeeping (no I/O, unit-tested in tests/unit/test_healing.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import raise_if_failed, read_pbmsg_safe, write_pbmsg
from hivemind.proto import p2pd_pb2 as p2pd_pb
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

HEAL_INTERVAL_S = 0.5  # how often the routing table is compared with the known peers
CONNECT_TIMEOUT_S = 2.0  # one p2pd dial of a lost peer's last known addresses (timed out: no ping either)
PING_TIMEOUT_S = 3.0  # one DHT ping (hivemind's own rpc timeout is 3 s)
DISCONNECT_TIMEOUT_S = 1.0  # hanging up a connection that died under the outage
REBOOTSTRAP_TIMEOUT_S = 10.0  # one bootstrap traversal (find_nearest_nodes of our own id) and presence refresh
BACKOFF_BASE_S = 0.5  # first retry of a lost peer
BACKOFF_CAP_S = 1.0  # retries of a recently lost peer: at most this far apart (attempts may overlap, see below)
MAX_IN_FLIGHT_PER_PEER = 2  # a dial into a dropped network hangs until its timeout: a second one may start meanwhile
MAX_IN_FLIGHT = 16  # attempts in flight, all peers together
FAST_RETRY_S = 120.0  # a peer lost for longer (a partition that long, or a crash) ...
SLOW_BACKOFF_CAP_S = 15.0  # ... is retried at most this often
STALE_BACKOFF_CAP_S = 60.0  # an initial peer not seen for REMEMBER_S: retried this rarely
REMEMBER_S = 600.0  # a peer seen live is looked for this long after it was last seen
MAX_KNOWN = 256  # peers remembered (the least recently seen non-initial ones are forgotten first)
MAX_ATTEMPTS_PER_TICK = 8
MAX_ADDRESSES = 8  # per peer, dialled


class HealingError(RuntimeError):
    """A lost peer could not be reached (dial or ping failed or timed out)."""


def split_maddr(maddr: str) -> tuple[str, str] | None:
    """(peer id, transport address without /p2p/...) of a multiaddr ending in /p2p/ID; None if it has no
    peer id or does not parse."""
    try:
        address = Multiaddr(maddr)
        peer_id = address.value_for_protocol("p2p")
        transport = address.decapsulate(Multiaddr(f"/p2p/{peer_id}"))
    except Exception:  # noqa: BLE001 - multiaddr raises assorted errors on malformed input
        return None
    return (str(peer_id), str(transport)) if peer_id else None


@dataclass
class KnownPeer:
    """A peer this node would look for if the DHT lost it."""

    peer_id: str
    maddrs: tuple[str, ...] = ()  # transport addresses (no /p2p/ part) to dial
    initial: bool = False
    last_seen: float = -math.inf  # monotonic time it was last live in our view
    attempts: int = 0  # tries since it went missing
    next_try: float = 0.0
    lost_since: float | None = None  # when it went missing (None: not missing)


class KnownPeers:
    """Who this node knows and when to look for each lost one (pure bookkeeping; times are monotonic seconds)."""

    def __init__(self, self_id: str, initial_maddrs: Iterable[str] = (), *, remember: float = REMEMBER_S,
                 max_known: int = MAX_KNOWN) -> None:
        self.self_id = self_id
        self.remember = remember
        self.max_known = max_known
        self.peers: dict[str, KnownPeer] = {}
        for maddr in initial_maddrs:
            parsed = split_maddr(maddr)
            if parsed is None or parsed[0] == self_id:
                continue
            peer = self.peers.setdefault(parsed[0], KnownPeer(parsed[0], initial=True))
            if parsed[1] not in peer.maddrs:
                peer.maddrs += (parsed[1],)

    def saw(self, peer_id: str, maddrs: Sequence[str], now: float) -> None:
        """`peer_id` is live in our view, announcing `maddrs` (only those naming `peer_id` itself are kept)."""
        if peer_id == self.self_id:
            return
        transports = []
        for maddr in maddrs:
            parsed = split_maddr(maddr)
            if parsed is not None and parsed[0] == peer_id and parsed[1] not in transports:
                transports.append(parsed[1])
        peer = self.peers.get(peer_id)
        if peer is None:
            peer = self.peers[peer_id] = KnownPeer(peer_id)
        peer.last_seen = now
        if transports:
            peer.maddrs = tuple(transports[:MAX_ADDRESSES])
        self._bound()

    def departed(self, peer_id: str) -> None:
        """`peer_id` left cleanly: stop looking for it (an initial peer is kept, it may come back)."""
        peer = self.peers.get(peer_id)
        if peer is not None and not peer.initial:
            del self.peers[peer_id]

    def forget_old(self, now: float) -> list[str]:
        """Forget the non-initial peers not seen for `remember` seconds; returns their ids."""
        old = [p.peer_id for p in self.peers.values() if not p.initial and now - p.last_seen > self.remember]
        for peer_id in old:
            del self.peers[peer_id]
        return old

    def _bound(self) -> None:
        if len(self.peers) <= self.max_known:
            return
        others = sorted((p for p in self.peers.values() if not p.initial), key=lambda p: p.last_seen)
        for peer in others[: len(self.peers) - self.max_known]:
            del self.peers[peer.peer_id]

    def update_missing(self, missing: set[str], now: float) -> list[KnownPeer]:
        """Mark which known peers are lost now; returns those that were lost and are not any more (healed)."""
        healed = []
        for peer in self.peers.values():
            if peer.peer_id in missing:
                if peer.lost_since is None:
                    peer.lost_since, peer.attempts, peer.next_try = now, 0, now
            elif peer.lost_since is not None:
                healed.append(KnownPeer(peer.peer_id, peer.maddrs, peer.initial, peer.last_seen, peer.attempts,
                                        peer.next_try, peer.lost_since))
                peer.lost_since, peer.attempts, peer.next_try = None, 0, 0.0
        return healed

    def due(self, now: float, busy: set[str] = frozenset(), limit: int = MAX_ATTEMPTS_PER_TICK) -> list[KnownPeer]:
        """Lost peers whose next try is due (not those with an attempt in flight), soonest first, at most `limit`."""
        ready = [p for p in self.peers.values()
                 if p.lost_since is not None and p.next_try <= now and p.peer_id not in busy]
        return sorted(ready, key=lambda p: p.next_try)[:limit]

    def backoff(self, peer: KnownPeer, now: float) -> float:
        """Seconds until the retry after this attempt: doubling from BACKOFF_BASE_S up to BACKOFF_CAP_S while the
        peer has been lost for up to FAST_RETRY_S, then SLOW_BACKOFF_CAP_S; STALE_BACKOFF_CAP_S for a peer not
        seen live for `remember` seconds (only an initial peer is still known then)."""
        if now - peer.last_seen > self.remember:
            cap = STALE_BACKOFF_CAP_S
        elif peer.lost_since is not None and now - peer.lost_since > FAST_RETRY_S:
            cap = SLOW_BACKOFF_CAP_S
        else:
            cap = BACKOFF_CAP_S
        return min(cap, BACKOFF_BASE_S * 2 ** min(peer.attempts, 16))

    def tried(self, peer_id: str, now: float) -> None:
        """An attempt on `peer_id` started: schedule the next one."""
        peer = self.peers.get(peer_id)
        if peer is not None:
            peer.next_try = now + self.backoff(peer, now)
            peer.attempts += 1


def lost_peers(known: KnownPeers, routing: set[str], live: set[str], now: float, bucket_size: int) -> set[str]:
    """The known peers to look for: out of the live view although seen within `remember` seconds (its presence
    expired: it may have dropped us from its routing table, and a ping puts us back), or out of the routing table
    while the table is short (with more known peers than a k-bucket holds, Kademlia keeps only some of them)."""
    table_short = len(routing) < min(len(known.peers), bucket_size)
    return {p.peer_id for p in known.peers.values()
            if (table_short and p.peer_id not in routing)
            or (p.peer_id not in live and now - p.last_seen <= known.remember)}


@dataclass(frozen=True)
class ViewPeer:
    """What the healer reads of one live peer of the membership view."""

    peer_id: str
    maddrs: tuple[str, ...]


class DHTHealer:
    """The bounded healing task of one node (see the module doc). `run()` loops until cancelled.

    `on_heal` (optional, awaited under REBOOTSTRAP_TIMEOUT_S) runs when lost peers answered: the node
    re-publishes its presence and reloads its view there (Membership.republish)."""

    def __init__(self, dht: DHTNode, p2p: Any, self_id: str, initial_peers: Sequence[str],
                 live_view: Callable[[], Iterable[ViewPeer]], departed: Callable[[], Iterable[str]],
                 metrics: Any = None, *, on_heal: Callable[[], Awaitable[Any]] | None = None,
                 interval: float = HEAL_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.dht, self.p2p = dht, p2p
        self.known = KnownPeers(self_id, initial_peers)
        self.live_view, self.departed = live_view, departed
        self.metrics = metrics
        self.on_heal = on_heal
        self.interval = interval
        self.clock = clock
        self.attempts: dict[str, list[asyncio.Task]] = {}  # per lost peer, the attempts in flight
        self.rebootstrap_task: asyncio.Task | None = None
        self.answered: set[str] = set()  # lost peers that answered since the last re-bootstrap
        self.rebootstraps = 0

    def routing_peers(self) -> set[str]:
        """Peer ids (base58) in the DHT routing table."""
        return {peer_id.to_base58() for peer_id in list(self.dht.protocol.routing_table.peer_id_to_uid)}

    def in_flight(self) -> list[asyncio.Task]:
        return [task for tasks in self.attempts.values() for task in tasks]

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.tick()
                except Exception as error:  # noqa: BLE001 - healing must outlive any one bad tick
                    logger.warning("partition healing tick failed: %s", error or type(error).__name__)
                await asyncio.sleep(self.interval)
        finally:
            for task in [*self.in_flight(), self.rebootstrap_task]:
                if task is not None:
                    task.cancel()

    def tick(self) -> None:
        """Compare the routing table with the known peers; start attempts on the lost ones that are due."""
        now = self.clock()
        for peer_id in self.departed():
            self.known.departed(peer_id)
        live = set()
        for peer in self.live_view():
            self.known.saw(peer.peer_id, peer.maddrs, now)
            live.add(peer.peer_id)
        self.known.forget_old(now)
        routing = self.routing_peers()
        if self.metrics is not None:
            self.metrics.dht_routing_peers.set(len(routing))
        missing = lost_peers(self.known, routing, live, now, self.dht.protocol.bucket_size)
        healed = self.known.update_missing(missing, now)
        if healed:
            logger.info("partition healed: %d peer(s) back in the DHT routing table and live view (%s) after %.1fs "
                        "apart; routing table: %d peers", len(healed), ", ".join(p.peer_id[-8:] for p in healed),
                        max(now - (p.lost_since or now) for p in healed), len(routing))
        if self.answered and (self.rebootstrap_task is None or self.rebootstrap_task.done()):
            answered, self.answered = self.answered, set()
            self.rebootstrap_task = asyncio.create_task(self._rebootstrap(answered))
        self.attempts = {peer_id: running for peer_id, tasks in self.attempts.items()
                         if (running := [task for task in tasks if not task.done()])}
        busy = {peer_id for peer_id, tasks in self.attempts.items() if len(tasks) >= MAX_IN_FLIGHT_PER_PEER}
        room = MAX_IN_FLIGHT - len(self.in_flight())
        for peer in self.known.due(now, busy, limit=min(MAX_ATTEMPTS_PER_TICK, max(0, room))):
            self.known.tried(peer.peer_id, now)
            # hang up a connection only for a peer out of our view too (no presence for a TTL: an outage, not a
            # slow peer whose ping timed out under load; its exchange streams must not be cut)
            hang_up = peer.peer_id not in live
            task = asyncio.create_task(self._attempt(peer.peer_id, peer.maddrs, peer.attempts, hang_up))
            self.attempts.setdefault(peer.peer_id, []).append(task)

    async def _attempt(self, peer_id: str, maddrs: tuple[str, ...], attempt: int, hang_up: bool) -> None:
        """Dial a lost peer at its last known addresses, then DHT-ping it (each bounded); never raises."""
        try:
            await self.reach(peer_id, maddrs, hang_up)
        except HealingError as error:
            log = logger.info if attempt == 1 else logger.debug
            log("lost DHT peer %s not reachable yet (attempt %d): %s", peer_id[-8:], attempt, error)
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - never let a healing attempt kill the task's owner
            logger.warning("healing attempt on %s failed unexpectedly: %r", peer_id[-8:], error)
            return
        self.answered.add(peer_id)
        logger.debug("lost DHT peer %s answered a ping (attempt %d): back in the routing table", peer_id[-8:], attempt)

    async def reach(self, peer_id: str, maddrs: Sequence[str], hang_up: bool = True) -> None:
        """p2pd connect (if we have addresses), then a DHT ping; HealingError if the peer did not answer.

        A ping that times out although p2pd holds a connection to the peer went into a connection that
        died under the outage (TCP retransmits into it at exponentially growing intervals, so it may only
        come back tens of seconds after the network did): with `hang_up` the attempt hangs it up, so that
        the next one dials afresh."""
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception as error:  # noqa: BLE001 - a malformed id is never reachable
            raise HealingError(f"bad peer id: {error}") from error
        if maddrs:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self.dial(peer, [Multiaddr(m) for m in maddrs])
            except TimeoutError:  # packets dropped (a ping would dial and hang likewise): the next attempt retries
                raise HealingError(f"dial timed out after {CONNECT_TIMEOUT_S:.0f}s") from None
            except Exception as error:  # noqa: BLE001 - p2pd reports a failed dial as assorted errors
                logger.debug("dial of %s failed: %s; pinging anyway", peer_id[-8:], error)
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                node_id = await self.dht.protocol.call_ping(peer)
        except TimeoutError:
            if not hang_up:
                raise HealingError(f"ping timed out after {PING_TIMEOUT_S:.0f}s") from None
            await self.hang_up(peer)
            raise HealingError(f"ping timed out after {PING_TIMEOUT_S:.0f}s (connection closed, to be dialled "
                               "afresh)") from None
        if node_id is None:
            raise HealingError("no answer to a DHT ping")

    async def dial(self, peer: PeerID, maddrs: list[Multiaddr]) -> None:
        """p2pd CONNECT to `peer` at `maddrs` (p2pd keeps the addresses for the DHT's next request to it)."""
        connect = p2pd_pb.ConnectRequest(peer=peer.to_bytes(), addrs=[m.to_bytes() for m in maddrs])
        await self._daemon_call(p2pd_pb.Request(type=p2pd_pb.Request.CONNECT, connect=connect),
                                "connect", peer, maddrs)

    async def hang_up(self, peer: PeerID) -> None:
        """p2pd DISCONNECT from `peer` (bounded; a failure is only logged)."""
        disconnect = p2pd_pb.DisconnectRequest(peer=peer.to_bytes())
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await self._daemon_call(p2pd_pb.Request(type=p2pd_pb.Request.DISCONNECT, disconnect=disconnect),
                                        "disconnect", peer)
        except Exception as error:  # noqa: BLE001 - p2pd reports assorted errors; the next attempt copes
            logger.debug("disconnect from %s failed: %s", peer.to_base58()[-8:], error or type(error).__name__)

    async def _daemon_call(self, request: Any, fallback: str, *args: Any) -> None:
        """One p2pd control request; its control connection is closed whatever happens (hivemind's
        ControlClient methods leave it open when cancelled, e.g. by our timeout while p2pd still dials a
        dropped host). Without hivemind's control client (a test double) it calls `p2p._client.<fallback>`."""
        client = getattr(self.p2p, "_client", None)
        control = getattr(client, "control", None)
        if control is None or not hasattr(control, "daemon_connector"):
            if client is not None and hasattr(client, fallback):
                await getattr(client, fallback)(*args)
            return
        reader, writer = await control.daemon_connector.open_connection()
        try:
            await write_pbmsg(writer, request)
            response = p2pd_pb.Response()
            await read_pbmsg_safe(reader, response)
        finally:
            writer.close()
        raise_if_failed(response)

    async def _rebootstrap(self, answered: set[str]) -> None:
        """hivemind's bootstrap traversal again (find our own nearest nodes) and `on_heal`, together bounded;
        counted and logged."""
        before = len(self.routing_peers())
        jobs = [self.dht.find_nearest_nodes([self.dht.node_id])]
        if self.on_heal is not None:
            jobs.append(self.on_heal())
        try:
            async with asyncio.timeout(REBOOTSTRAP_TIMEOUT_S):
                results = await asyncio.gather(*jobs, return_exceptions=True)
        except TimeoutError:
            results = [f"timed out after {REBOOTSTRAP_TIMEOUT_S:.0f}s"]
        problems = [str(r) or type(r).__name__ for r in results if isinstance(r, (BaseException, str))]
        self.rebootstraps += 1
        if self.metrics is not None:
            self.metrics.dht_rebootstraps.inc()
        logger.info("DHT re-bootstrapped after %s answered again: routing table %d -> %d peers%s",
                    ", ".join(p[-8:] for p in sorted(answered)), before, len(self.routing_peers()),
                    f" ({'; '.join(problems)})" if problems else "")
