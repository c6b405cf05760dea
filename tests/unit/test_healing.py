"""Partition healing's bookkeeping (node/net/healing.py) and the partition bench's one-view measure
(node/bench/partition.py): pure logic, plus one healer tick against a fake DHT (no network)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from hivemind.p2p import PeerID

from node.bench.partition import Sample, one_view_since, smallest_view
from node.net import healing
from node.net.healing import DHTHealer, KnownPeers, ViewPeer, lost_peers, split_maddr
from node.net.identity import Identity

A, B, ME, *OTHERS = (Identity.generate().peer_id for _ in range(6))
PEERS = [PeerID.from_base58(peer) for peer in OTHERS]


def maddr(peer: str, port: int = 4001) -> str:
    return f"/ip4/10.0.0.1/tcp/{port}/p2p/{peer}"


def test_split_maddr_needs_a_peer_id_and_rejects_garbage():
    assert split_maddr(maddr(A)) == (A, "/ip4/10.0.0.1/tcp/4001")
    assert split_maddr("/ip4/10.0.0.1/tcp/4001") is None
    assert split_maddr("not a multiaddr") is None


def test_known_peers_keep_initial_peers_and_only_addresses_that_name_the_peer_itself():
    known = KnownPeers(ME, [maddr(A), maddr(A, 4002), maddr(ME), "garbage"])
    assert set(known.peers) == {A} and known.peers[A].initial
    assert known.peers[A].maddrs == ("/ip4/10.0.0.1/tcp/4001", "/ip4/10.0.0.1/tcp/4002")
    known.saw(B, [maddr(B), maddr(A, 9999)], now=10.0)  # an address naming another peer is not B's
    assert known.peers[B].maddrs == ("/ip4/10.0.0.1/tcp/4001",) and known.peers[B].last_seen == 10.0
    known.saw(ME, [maddr(ME)], now=10.0)
    assert ME not in known.peers


def test_a_clean_leave_or_a_long_absence_forgets_a_seen_peer_but_never_an_initial_one():
    known = KnownPeers(ME, [maddr(A)], remember=100.0)
    known.saw(A, [maddr(A)], now=0.0)
    known.saw(B, [maddr(B)], now=0.0)
    known.departed(A)
    assert A in known.peers
    assert known.forget_old(now=50.0) == []
    assert known.forget_old(now=101.0) == [B] and set(known.peers) == {A}
    known.saw(B, [maddr(B)], now=102.0)
    known.departed(B)
    assert B not in known.peers


def test_known_peers_are_bounded_dropping_the_least_recently_seen():
    known = KnownPeers(ME, [maddr(A)], max_known=3)
    for i, peer in enumerate(PEERS):
        known.saw(peer.to_base58(), [], now=float(i))
    assert set(known.peers) == {A, PEERS[1].to_base58(), PEERS[2].to_base58()}


def test_lost_peers_are_those_out_of_the_view_or_out_of_a_short_routing_table():
    known = KnownPeers(ME, [maddr(A)], remember=100.0)
    known.saw(B, [maddr(B)], now=0.0)
    # both in the routing table and B live: nothing lost
    assert lost_peers(known, {A, B}, {B}, now=1.0, bucket_size=20) == set()
    # the initial peer A was never live: only its absence from the routing table makes it lost
    assert lost_peers(known, {B}, {B}, now=1.0, bucket_size=20) == {A}
    # B's presence expired although it is still in the table: it may have dropped us
    assert lost_peers(known, {A, B}, set(), now=1.0, bucket_size=20) == {B}
    assert lost_peers(known, {A, B}, set(), now=200.0, bucket_size=20) == set()  # not seen for too long
    # a full routing table (more known peers than a k-bucket) is not a sign of loss
    assert lost_peers(known, {A}, {B}, now=1.0, bucket_size=1) == set()


def test_retries_back_off_to_a_short_cap_then_slower_and_reset_when_healed():
    known = KnownPeers(ME, [maddr(A)], remember=1000.0)
    known.saw(A, [maddr(A)], now=0.0)
    assert known.update_missing({A}, now=1.0) == []
    delays, now = [], 1.0
    for _ in range(6):
        due = known.due(now)
        assert [p.peer_id for p in due] == [A]
        known.tried(A, now)
        delays.append(known.peers[A].next_try - now)
        assert known.due(now) == []  # not due again before its backoff
        now = known.peers[A].next_try
    assert delays == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]  # capped: a peer is retried soon after the network returns
    assert known.due(now, busy={A}) == []  # an attempt in flight: no second one
    now = 1.0 + healing.FAST_RETRY_S + 1
    known.tried(A, now)
    assert known.peers[A].next_try - now == healing.SLOW_BACKOFF_CAP_S
    healed = known.update_missing(set(), now=now + 1)
    assert [p.peer_id for p in healed] == [A] and healed[0].lost_since == 1.0
    assert known.peers[A].lost_since is None and known.peers[A].attempts == 0
    assert known.update_missing(set(), now=now + 2) == []  # healed once, reported once


def test_an_initial_peer_never_seen_live_is_retried_rarely():
    known = KnownPeers(ME, [maddr(A)], remember=100.0)
    known.update_missing({A}, now=500.0)
    for _ in range(10):
        known.tried(A, 500.0)
    assert known.peers[A].next_try - 500.0 == healing.STALE_BACKOFF_CAP_S


class FakeProtocol:
    """A DHTProtocol stand-in: a routing table and a ping that answers for `up` peers (and then adds them)."""

    def __init__(self, table: set[PeerID], up: set[PeerID]) -> None:
        self.routing_table = SimpleNamespace(peer_id_to_uid={peer: object() for peer in table})
        self.bucket_size = 20
        self.up = up
        self.pinged: list[PeerID] = []

    async def call_ping(self, peer: PeerID):
        self.pinged.append(peer)
        if peer not in self.up:
            return None
        self.routing_table.peer_id_to_uid[peer] = object()
        return object()


class FakeDHT:
    def __init__(self, protocol: FakeProtocol) -> None:
        self.protocol = protocol
        self.node_id = object()
        self.traversals = 0

    async def find_nearest_nodes(self, ids):
        self.traversals += 1
        return {}


class FakeClient:
    def __init__(self) -> None:
        self.dialled: list[tuple[PeerID, list]] = []

    async def connect(self, peer, maddrs):
        self.dialled.append((peer, [str(m) for m in maddrs]))


def test_a_healer_tick_dials_and_pings_lost_peers_then_rebootstraps_and_logs_the_heal(caplog):
    one, two, three = (p.to_base58() for p in PEERS)
    protocol = FakeProtocol(table={PEERS[2]}, up={PEERS[0]})
    dht, client = FakeDHT(protocol), FakeClient()
    metrics = SimpleNamespace(dht_routing_peers=SimpleNamespace(set=lambda v: setattr(metrics, "routing", v)),
                              dht_rebootstraps=SimpleNamespace(inc=lambda: setattr(metrics, "reboots", 1)))
    clock = [100.0]
    view = [ViewPeer(one, (maddr(one),)), ViewPeer(two, (maddr(two),)), ViewPeer(three, (maddr(three),))]
    republished = []

    async def republish():
        republished.append(1)

    healer = DHTHealer(dht, SimpleNamespace(_client=client), ME, [], lambda: view, lambda: set(), metrics,
                       on_heal=republish, clock=lambda: clock[0])

    async def scenario():
        healer.tick()  # one and two are out of the routing table: both attempted
        assert metrics.routing == 1
        await asyncio.gather(*healer.in_flight())
        assert sorted(p.to_base58() for p, _ in client.dialled) == sorted([one, two])
        assert set(protocol.pinged) == {PEERS[0], PEERS[1]}
        clock[0] += 0.1
        with caplog.at_level("INFO", logger="node.net.healing"):
            healer.tick()  # one answered: back in the table, healed; a re-bootstrap starts; two is not due yet
            await healer.rebootstrap_task
        assert dht.traversals == 1 and healer.rebootstraps == 1 and metrics.reboots == 1 and republished == [1]
        assert protocol.pinged.count(PEERS[1]) == 1
        assert "partition healed: 1 peer(s) back" in caplog.text and one[-8:] in caplog.text
        assert "DHT re-bootstrapped after" in caplog.text
        clock[0] += healing.BACKOFF_BASE_S
        healer.tick()  # two is due again
        await asyncio.gather(*healer.in_flight())
        assert protocol.pinged.count(PEERS[1]) == 2 and protocol.pinged.count(PEERS[0]) == 1

    asyncio.run(scenario())


def samples(*rows: tuple[float, tuple]) -> list[Sample]:
    return [Sample(t, views) for t, views in rows]


def test_one_view_starts_at_the_first_full_sample_of_a_run_that_holds():
    full, split, silent = (2, 2, 2), (2, 1, 2), (2, 2, None)
    trace = samples((0, full), (1, silent), (2, full), (3, full), (4, split), (5, full), (6, full), (9, full))
    assert one_view_since(trace, after=1.0, hold=3.0) == 5  # the run from 2 broke at 4 (a stale gauge, then the split)
    assert one_view_since(trace, after=1.0, hold=5.0) is None  # not held long enough yet
    assert one_view_since(trace, after=0.0, hold=0.0) == 0
    assert smallest_view(trace, after=1.0) == 1 and smallest_view(trace, after=5.0) == 2
    assert smallest_view(trace, after=0.0, until=0.5) == 2


class HangingClient:
    """A dial into a network that drops packets: it never returns."""

    async def connect(self, peer, maddrs):
        await asyncio.Event().wait()


def test_a_hanging_dial_is_bounded_and_a_retry_overlaps_it(monkeypatch):
    monkeypatch.setattr(healing, "CONNECT_TIMEOUT_S", 0.2)
    one = PEERS[0].to_base58()
    protocol = FakeProtocol(table=set(), up={PEERS[0]})
    clock = [0.0]
    healer = DHTHealer(FakeDHT(protocol), SimpleNamespace(_client=HangingClient()), ME, [maddr(one)],
                       lambda: [], lambda: set(), clock=lambda: clock[0])

    async def scenario():
        healer.tick()
        clock[0] += healing.BACKOFF_BASE_S
        healer.tick()
        assert len(healer.attempts[one]) == 2  # the second starts while the first still dials
        clock[0] += healing.BACKOFF_CAP_S
        healer.tick()
        assert len(healer.attempts[one]) == 2  # at most MAX_IN_FLIGHT_PER_PEER
        await asyncio.wait_for(asyncio.gather(*healer.in_flight()), 5)  # each bounded by CONNECT_TIMEOUT_S
        assert protocol.pinged == []  # a timed-out dial is not followed by a ping that would hang likewise

    asyncio.run(scenario())


def test_membership_republish_stores_the_last_presence_again_and_reloads_the_view():
    from node.net.membership import Membership

    calls = []

    class Recording(Membership):
        async def publish_presence(self, round_, eval_loss, addresses):
            calls.append(("publish", round_, eval_loss, addresses))
            self._last_presence = (round_, eval_loss, list(addresses))

        async def refresh_view(self):
            calls.append(("refresh",))
            return {}

    membership = Recording(SimpleNamespace(), "run", ME, "0" * 64, 6.0)
    asyncio.run(membership.republish())
    assert calls == []  # nothing published yet: nothing to repeat
    asyncio.run(membership.publish_presence(3, 1.5, ["/ip4/1.2.3.4/tcp/1"]))
    asyncio.run(membership.republish())
    assert calls[1:] == [("publish", 3, 1.5, ["/ip4/1.2.3.4/tcp/1"]), ("refresh",)]


class SlowProtocol(FakeProtocol):
    async def call_ping(self, peer: PeerID):
        self.pinged.append(peer)
        await asyncio.Event().wait()


class RecordingClient(FakeClient):
    def __init__(self) -> None:
        super().__init__()
        self.hung_up: list[PeerID] = []

    async def disconnect(self, peer):
        self.hung_up.append(peer)


def test_a_timed_out_ping_hangs_up_only_a_peer_that_is_out_of_the_view_too(monkeypatch):
    monkeypatch.setattr(healing, "PING_TIMEOUT_S", 0.1)
    in_view, gone = PEERS[0].to_base58(), PEERS[1].to_base58()
    protocol, client = SlowProtocol(table=set(), up=set()), RecordingClient()
    clock = [0.0]
    view = [ViewPeer(in_view, (maddr(in_view),))]
    healer = DHTHealer(FakeDHT(protocol), SimpleNamespace(_client=client), ME, [maddr(gone)], lambda: view,
                       lambda: set(), clock=lambda: clock[0])

    async def scenario():
        healer.tick()  # both out of the (empty) routing table: both pinged, both pings time out
        await asyncio.wait_for(asyncio.gather(*healer.in_flight()), 5)
        assert set(protocol.pinged) == {PEERS[0], PEERS[1]}
        # the peer still in our view may just be slow under load: its connection (and exchange streams) stay
        assert client.hung_up == [PEERS[1]]

    asyncio.run(scenario())
