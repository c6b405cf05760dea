"""What nodes publish about themselves (protocol/records.py): presence, ready and node.json records, their wire
form, and their parsing as hostile input; the DHT client (node/net/dht.py) and its readers (membership, status)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import types

import pytest
from hivemind.utils import get_dht_time

from protocol.records import (
    MAX_FLAGGED,
    MAX_RECORD_FIELDS,
    MAX_STATUS_BYTES,
    RECORD_KINDS,
    InvalidRecord,
    LastExchange,
    NodeStatus,
    Presence,
    Ready,
    Report,
    check_peer_id,
    validate,
)

from node.net.dht import DHTClient, DHTUnavailable
from node.net.membership import UNKNOWN_ROUND, Membership
from node.ops import status
from node.ops.status import SwarmUnreachable, read_swarm
from node.workdir import StatusUnreadable, WorkDirFiles, read_status

PEER = "12D3KooWPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
OTHER = "12D3KooWPeerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
MANIFEST = "ab" * 32
ADDRESS = "/ip4/127.0.0.1/tcp/4001/p2p/" + PEER


def full_presence(now: float) -> Presence:
    return Presence(
        manifest=MANIFEST, round=7, eval_loss=2.5, maddrs=(ADDRESS,),
        report=Report(time=now, version="0.1.0", started=now - 60, rounds_done=5, train_loss=2.6,
                      tokens_per_second=1000.0, utilisation=0.75, last_exchange=LastExchange(now - 4, OTHER),
                      exchanges={"ok": 3, "timeout": 1}, flagged=(OTHER,)),
    )


# ----------------------------------------------------------------------------- wire form
def test_presence_wire_form_is_the_flat_map_nodes_have_always_published():
    now = time.time()
    wire = full_presence(now).to_wire()
    assert wire == {
        "time": now, "version": "0.1.0", "started": now - 60, "rounds_done": 5, "train_loss": 2.6,
        "tokens_per_second": 1000.0, "utilisation": 0.75, "last_exchange": {"time": now - 4, "partner": OTHER},
        "exchanges": {"ok": 3, "timeout": 1}, "flagged": [OTHER],
        "round": 7, "manifest": MANIFEST, "eval_loss": 2.5, "maddrs": [ADDRESS],
    }
    assert Presence.from_wire(wire) == full_presence(now)
    validate("presence", wire)  # what we publish passes the strict check a DHT validator will run
    assert Presence.departure(MANIFEST).to_wire() == {"manifest": MANIFEST, "left": True}
    assert Presence.from_wire({"manifest": MANIFEST, "left": True}) == Presence.departure(MANIFEST)
    # a node that has not trained yet publishes Nones: all unknown, nothing malformed
    fresh = Presence(MANIFEST, 0, None, (ADDRESS,), Report(time=now)).to_wire()
    validate("presence", fresh)
    assert Presence.from_wire(fresh).report.last_exchange is None


def test_ready_wire_form():
    assert Ready(4, MANIFEST).to_wire() == {"round": 4, "manifest": MANIFEST}
    assert Ready(4, MANIFEST, done=True).to_wire() == {"round": 4, "manifest": MANIFEST, "done": True}
    assert Ready.from_wire({"round": -1, "manifest": MANIFEST, "done": True}) == Ready(-1, MANIFEST, True)
    for body in (Ready(4, MANIFEST).to_wire(), Ready(-1, MANIFEST, done=True).to_wire()):
        validate("ready", body)


def test_node_status_wire_form_keeps_the_node_json_keys_and_order(tmp_path):
    status = NodeStatus("running", PEER, (ADDRESS,), 4242, 9100, "host", 4026531836, str(tmp_path), "run",
                        MANIFEST, 470528, "fresh", "", 3, 5.5)
    assert list(status.to_wire()) == ["status", "peer_id", "maddrs", "pid", "metrics_port", "hostname",
                                      "pid_namespace", "work_dir", "run_id", "manifest", "parameters", "start",
                                      "start_detail", "round", "initial_eval_loss"]
    WorkDirFiles(tmp_path).write_status(status)
    assert json.loads((tmp_path / "node.json").read_text())["maddrs"] == [ADDRESS]
    assert read_status(tmp_path) == status
    validate("node_status", status.to_wire())
    assert set(RECORD_KINDS) == {"presence", "ready", "node_status"}


# ----------------------------------------------------------------------------- hostile input
def test_hostile_presence_fields_are_unknown_and_strict_mode_refuses_them():
    now = time.time()
    wire = full_presence(now).to_wire()
    hostile = {
        "round": True, "eval_loss": "2.5", "train_loss": [1.0], "tokens_per_second": -5.0, "rounds_done": 2**63,
        "utilisation": 1.5, "time": math.inf, "started": "yesterday", "version": "0.1\x1b[31m", "manifest": 7,
        "last_exchange": {"time": False, "partner": "evil\npeer"}, "exchanges": {"ok": -1, "timeout": 2, 3: 4},
        "flagged": [OTHER, 5, "\x00"], "maddrs": [ADDRESS, "not-an-address", 9],
    }
    parsed = Presence.from_wire({**wire, **hostile})
    assert (parsed.round, parsed.eval_loss, parsed.manifest) == (None, None, None)
    report = parsed.report
    assert (report.train_loss, report.tokens_per_second, report.utilisation, report.rounds_done, report.time,
            report.started, report.version) == (None, None, None, None, None, None, None)
    assert report.last_exchange == LastExchange(None, None)
    assert report.exchanges == {"timeout": 2} and report.flagged == (OTHER,) and parsed.maddrs == (ADDRESS,)
    for name, value in hostile.items():
        with pytest.raises(InvalidRecord):
            Presence.from_wire({**wire, name: value}, strict=True)
    # too many entries: the whole field is unknown
    assert Presence.from_wire({**wire, "flagged": [OTHER] * (MAX_FLAGGED + 1)}).report.flagged == ()
    assert Presence.from_wire({**wire, "exchanges": {str(i): 1 for i in range(33)}}).report.exchanges == {}
    # a diverged loss is news: NaN stays NaN
    assert math.isnan(Presence.from_wire({**wire, "eval_loss": math.nan}).eval_loss)


@pytest.mark.parametrize("body", [
    None, [], "presence", 5, {str(i): i for i in range(MAX_RECORD_FIELDS + 1)},
    {"manifest": MANIFEST, "left": "yes"}, {"manifest": MANIFEST, "left": 1},
])
def test_a_malformed_presence_record_is_refused_as_a_whole(body):
    with pytest.raises(InvalidRecord):
        Presence.from_wire(body)


@pytest.mark.parametrize("body", [
    {"round": True, "manifest": MANIFEST}, {"round": "3", "manifest": MANIFEST}, {"round": -1, "manifest": MANIFEST},
    {"round": 2**63, "manifest": MANIFEST}, {"round": 3}, {"round": 3, "manifest": 3},
    {"round": 3, "manifest": MANIFEST, "done": "no"}, {"round": 3, "manifest": "\x07"}, [3, MANIFEST],
])
def test_a_malformed_ready_record_is_refused(body):
    with pytest.raises(InvalidRecord):
        Ready.from_wire(body)


def test_peer_ids_are_bounded_base58():
    assert check_peer_id(PEER) == PEER
    for bad in ("", "0OIl", "peer id", "12D3\n", "a" * 129, 5, b"12D3", None):
        with pytest.raises(InvalidRecord):
            check_peer_id(bad)


def test_node_status_is_read_as_hostile_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_status(tmp_path)
    path = tmp_path / "node.json"
    for content in (b'{"status": "runn', b"[1, 2]", b"\xff\xfe{}", b" " * (MAX_STATUS_BYTES + 1)):
        path.write_bytes(content)
        with pytest.raises(StatusUnreadable):
            read_status(tmp_path)
    path.write_text(json.dumps({"status": "sleeping", "pid": 0, "metrics_port": 70000, "maddrs": "x",
                                "hostname": "h\x1b]0;", "round": -3, "pid_namespace": True}))
    status = read_status(tmp_path)
    assert status == NodeStatus(None)  # every field unknown: health reports it unhealthy, never crashes
    path.write_text(json.dumps({"status": "running", "pid": -1}))
    assert read_status(tmp_path).pid is None  # os.kill(-1, 0) would probe every process


def test_random_garbage_never_raises_anything_but_invalid_record():
    rng = random.Random(11)
    atoms = [None, True, 0, -1, 2**64, 1.5, math.nan, "", "x" * 300, "\x00", PEER, ADDRESS, b"\x01", [], {}]

    keys = ["round", "manifest", "left", "done", "last_exchange", "exchanges", "flagged", "maddrs", "time", "status",
            "pid", "partner", "eval_loss", "tokens_per_second", "ok", None, True, 3, 1.5, b"k"]

    def garbage(depth: int = 0):
        kind = rng.random()
        if depth < 3 and kind < 0.2:
            return [garbage(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 3 and kind < 0.5:
            return {rng.choice(keys): garbage(depth + 1) for _ in range(rng.randint(0, 8))}
        return rng.choice(atoms)

    for _ in range(3000):
        body = garbage()
        for kind in RECORD_KINDS.values():
            for strict in (False, True):
                try:
                    kind.from_wire(body, strict)
                except InvalidRecord:
                    pass


# ----------------------------------------------------------------------------- the DHT client and its readers
class FakeDHT:
    """hivemind's DHTNode as the client sees it: get(key, latest) -> value with .value, store(...) -> bool."""

    def __init__(self):
        self.values: dict[str, dict] = {}
        self.stored: list[tuple] = []
        self.hang = False

    def put_entry(self, key, subkey, value, expiration):
        self.values.setdefault(key, {})[subkey] = types.SimpleNamespace(value=value, expiration_time=expiration)

    async def get(self, key, latest=False):
        if self.hang:
            await asyncio.sleep(60)
        if key not in self.values:
            return None
        return types.SimpleNamespace(value=self.values[key], expiration_time=math.inf)

    async def store(self, key, value, expiration_time, subkey=None):
        if self.hang:
            raise RuntimeError("broken peer")
        self.stored.append((key, subkey, value))
        self.put_entry(key, subkey, value, expiration_time)
        return True


def test_the_dht_client_bounds_every_call():
    dht = FakeDHT()
    client = DHTClient(dht, timeout=0.05)

    async def scenario():
        assert await client.fetch("run.peers") is None
        assert await client.store("run.peers", {"a": 1}, get_dht_time() + 10, subkey=PEER)
        assert [e.subkey for e in await client.fetch_entries("run.peers")] == [PEER]
        dht.hang = True
        with pytest.raises(DHTUnavailable, match="timed out after 0s"):
            await client.fetch("run.peers")
        assert await client.store("run.peers", {}, get_dht_time() + 10) is False

    asyncio.run(scenario())


def test_membership_publishes_through_the_schema_and_skips_malformed_records():
    dht = FakeDHT()
    membership = Membership(dht, "run", PEER, MANIFEST, presence_ttl=10.0)
    now = get_dht_time()
    good = full_presence(time.time()).to_wire()
    dht.put_entry("run.peers", OTHER, good, now + 10)
    for subkey, value in (("12D3KooWNoRound", {"manifest": MANIFEST, "round": "3"}),
                          ("12D3KooWLeft", {"manifest": MANIFEST, "left": True}),
                          ("12D3KooWAnother", {**good, "manifest": "cd" * 32}),
                          ("12D3KooWExpired", good),
                          ("12D3KooWGarbage", ["not", "a", "map"]),
                          ("bad id\x1b", good), (7, good)):
        dht.put_entry("run.peers", subkey, value, now - 1 if subkey == "12D3KooWExpired" else now + 10)
    dht.put_entry("run.ready", OTHER, Ready(7, MANIFEST).to_wire(), now + 10)
    dht.put_entry("run.ready", "12D3KooWDone", Ready(7, MANIFEST, done=True).to_wire(), now + 10)
    dht.put_entry("run.ready", "12D3KooWBoo", {"round": True, "manifest": MANIFEST}, now + 10)
    membership.presence_extra = lambda: Report(time=1.0, version="v")

    async def scenario():
        await membership.heartbeat(3, 2.0, [ADDRESS])
        return await membership.ready_peers()

    ready = asyncio.run(scenario())
    assert {p: r.round for p, r in membership.live.items()} == {OTHER: 7, "12D3KooWNoRound": UNKNOWN_ROUND}
    assert membership.live[OTHER].eval_loss == 2.5
    assert ready == {OTHER: 7}
    assert membership.malformed_records == 4  # garbage, two bad subkeys, the bool round
    ours = next(value for key, subkey, value in dht.stored if key == "run.peers" and subkey == PEER)
    assert Presence.from_wire(ours, strict=True) == Presence(MANIFEST, 3, 2.0, (ADDRESS,), Report(time=1.0, version="v"))


def test_status_reads_the_same_schema_and_counts_what_it_skips(monkeypatch):
    dht = FakeDHT()
    now = time.time()
    # no manifest key: the swarm's manifest is what the live presences agree on (here a 1:1 tie, which
    # goes to the smaller hash, MANIFEST)
    dht.put_entry("run.peers", OTHER, full_presence(now).to_wire(), now + 10)
    dht.put_entry("run.peers", PEER, Presence.departure(MANIFEST).to_wire(), now + 10)
    dht.put_entry("run.peers", "12D3KooWAnother", {"manifest": "cd" * 32, "round": 1}, now + 10)
    dht.put_entry("run.peers", "12D3KooWGarbage", "garbage", now + 10)
    dht.put_entry("run.peers", "\x1b[2J", {"manifest": MANIFEST}, now + 10)
    swarm = asyncio.run(read_swarm(dht, "run"))
    assert [p.peer_id for p in swarm.peers] == [OTHER] and swarm.left == [PEER] and swarm.malformed == 2
    assert [p.peer_id for p in swarm.other_manifest] == ["12D3KooWAnother"]
    peer = swarm.peers[0]
    assert (peer.round, peer.eval_loss, peer.train_loss, peer.rounds_done, peer.version) == (7, 2.5, 2.6, 5, "0.1.0")
    assert (peer.exchanges, peer.flagged, peer.maddrs, peer.last_exchange_partner) == (
        {"ok": 3, "timeout": 1}, [OTHER], [ADDRESS], OTHER)
    assert peer.last_exchange_age == pytest.approx(4, abs=1) and peer.clock_offset == pytest.approx(0, abs=1)
    assert "malformed" not in swarm.to_json()  # what status prints is unchanged

    dht.hang = True
    monkeypatch.setattr(status, "READ_TIMEOUT", 0.05)
    with pytest.raises(SwarmUnreachable, match="DHT read of run.peers timed out after 0s"):
        asyncio.run(read_swarm(dht, "run"))
