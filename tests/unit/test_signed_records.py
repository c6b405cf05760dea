"""Owner-signed DHT records (SPEC.md §15): the record validator every node runs, the record kinds it knows,
the manifest agreement rule, and the bounded clock catch-up / checkpoint round checks that lean on them."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import msgpack
import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from protocol.records import (
    EXPIRATION_SLACK,
    KIND_RULES,
    MAX_RECEIPTS,
    InvalidRecord,
    Presence,
    Ready,
    agreed_manifest,
    entry_signing_bytes,
    pack_entry,
    parse_key,
)
from protocol.verification import Commitment, Receipt, UpdateSignature, Vote, envelope, signing_bytes

from node.gossip.pairing import catch_up_step, clock_catch_up, supported_round
from node.join.procedure import checkpoint_round_problem
from node.net.dht import DHTClient
from node.net.identity import Identity
from node.net.signed_records import SignedRecordValidator, dht_key_id

RUN = "run"
MANIFEST = "ab" * 32
NOW = 1_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture
def bob() -> Identity:
    return Identity.generate()


def validator(identity: Identity | None = None, now: float = NOW) -> SignedRecordValidator:
    return SignedRecordValidator(identity, clock=Clock(now))


def record(key: str, subkey, value, expiration: float) -> DHTRecord:
    """What hivemind hands a validator: the hashed key, msgpack subkey and value bytes."""
    subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
    return DHTRecord(dht_key_id(key), subkey_bytes, MSGPackSerializer.dumps(value), expiration)


def signed(identity: Identity, key: str, value, expiration: float = NOW + 5, subkey: str | None = None) -> DHTRecord:
    """`identity`'s entry under `key` as its own DHT node would sign it (subkey: its peer id unless given)."""
    signer = SignedRecordValidator(identity)
    signer.note_key(key)
    plain = record(key, subkey or identity.peer_id, value, expiration)
    return dataclasses.replace(plain, value=signer.sign_value(plain))


def forged(signer: Identity, key: str, subkey: str, value, expiration: float = NOW + 5) -> DHTRecord:
    """An entry in the right format under someone else's subkey, signed with the forger's own key."""
    plain = record(key, subkey, value, expiration)
    signature = signer.sign(entry_signing_bytes(key, subkey, expiration, plain.value))
    return dataclasses.replace(plain, value=pack_entry(key, plain.value, signature))


def presence(round_: int = 3, manifest: str = MANIFEST) -> dict:
    return Presence(manifest, round_, 2.5, ("/ip4/127.0.0.1/tcp/1",)).to_wire()


# ----------------------------------------------------------------------------- the validator
def test_an_honest_record_is_accepted_and_stripped_back_to_its_value(alice):
    entry = signed(alice, f"{RUN}.peers", presence())
    checker = validator()  # a read-only client: no identity
    assert checker.validate(entry)
    assert MSGPackSerializer.loads(checker.strip_value(entry)) == presence()
    assert checker.sign_value(record(f"{RUN}.peers", alice.peer_id, presence(), NOW + 5)) == \
        MSGPackSerializer.dumps(presence())  # no identity: signs nothing
    for key, value in ((f"{RUN}.ready", Ready(3, MANIFEST).to_wire()),
                       (f"{RUN}.peers", Presence.departure(MANIFEST).to_wire())):
        assert checker.validate(signed(alice, key, value))


def test_a_forged_signature_is_refused(alice, bob):
    key = f"{RUN}.peers"
    left = Presence.departure(MANIFEST).to_wire()
    assert not validator().validate(forged(bob, key, alice.peer_id, left))  # bob writes "alice left"
    entry = signed(alice, key, presence())
    tampered_value = dataclasses.replace(entry, value=entry.value.replace(MANIFEST.encode(), b"cd" * 32))
    later = dataclasses.replace(entry, expiration_time=entry.expiration_time + 1)  # the expiration is signed too
    for bad in (tampered_value, later):
        assert not validator().validate(bad)
    assert validator().validate(entry)


def test_a_record_under_a_subkey_that_is_not_its_signer_is_refused(alice, bob):
    key = f"{RUN}.ready"
    signer = SignedRecordValidator(alice)
    signer.note_key(key)
    plain = record(key, bob.peer_id, Ready(3, MANIFEST).to_wire(), NOW + 5)
    assert signer.sign_value(plain) == plain.value  # alice's node will not sign under bob's subkey ...
    assert not validator().validate(plain)  # ... and the unsigned value is refused
    for subkey in ("alice", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", 7):  # no Ed25519 key in it
        assert not validator().validate(forged(alice, key, subkey, Ready(3, MANIFEST).to_wire()))
    checker = validator()
    assert not checker.validate(forged(alice, key, bob.peer_id, Ready(3, MANIFEST).to_wire()))
    assert checker.refused["signature"] == 1


def test_plain_values_are_refused(alice):
    key = f"{RUN}.ready"
    assert not validator().validate(record(key, None, "ready!", NOW + 5))  # the old attack: a plain value
    entry = signed(alice, key, Ready(3, MANIFEST).to_wire())
    assert not validator().validate(dataclasses.replace(entry, subkey=DHTProtocol.IS_REGULAR_VALUE))
    assert not validator().validate(dataclasses.replace(entry, subkey=DHTProtocol.IS_DICTIONARY))
    assert not validator().validate(record(key, alice.peer_id, Ready(3, MANIFEST).to_wire(), NOW + 5))  # unsigned


@pytest.mark.parametrize("kind_key, value_of", [
    (f"{RUN}.peers", lambda me: presence()),
    (f"{RUN}.ready", lambda me: Ready(3, MANIFEST).to_wire()),
    (f"{RUN}.commit.7", lambda me: commitment_blob(me, 7)),
])
def test_an_expiration_beyond_the_kinds_ttl_is_refused(alice, kind_key, value_of):
    kind = parse_key(kind_key).kind
    limit = NOW + KIND_RULES[kind].ttl + EXPIRATION_SLACK
    assert validator().validate(signed(alice, kind_key, value_of(alice), limit - 1))
    for expiration in (limit + 1, NOW + 10 * 365 * 86400, float("inf"), float("nan")):
        assert not validator().validate(signed(alice, kind_key, value_of(alice), expiration)), expiration
    # relative to the validator's own clock: the same record is fine for a reader whose clock is ahead
    assert validator(now=NOW + 3600).validate(signed(alice, kind_key, value_of(alice), limit + 1))


def test_a_key_mismatch_or_an_unknown_kind_is_refused(alice):
    entry = signed(alice, f"{RUN}.peers", presence())
    moved = dataclasses.replace(entry, key=dht_key_id(f"{RUN}.ready"))  # a valid entry replayed under another key
    assert not validator().validate(moved)
    other_run = dataclasses.replace(entry, key=dht_key_id("other.peers"))
    assert not validator().validate(other_run)
    assert not validator().validate(signed(alice, f"{RUN}.manifest", MANIFEST))  # no such record kind anymore
    assert not validator().validate(signed(alice, f"{RUN}.commit.{2**63}", commitment_blob(alice, 5)))
    for key in ("run.commit.01", "run.votes.x.y", "", "x" * 600, ".peers"):
        with pytest.raises(InvalidRecord):
            parse_key(key)
    assert parse_key("a.b.votes.12D3KooWx.5") == parse_key("a.b.votes.12D3KooWx.5")
    assert (parse_key("a.b.votes.12D3KooWx.5").run_id, parse_key("a.b.votes.12D3KooWx.5").peer) == ("a.b", "12D3KooWx")


def commitment_blob(author: Identity, round_: int, peer: str | None = None, run: str = RUN) -> bytes:
    commitment = Commitment(run, peer or author.peer_id, round_, "ab" * 32, "cd" * 32, "{}", 10, 4,
                            UpdateSignature(b"\x01" * 32, (1.0,), 1.0))
    return envelope(commitment, author.sign(signing_bytes(commitment)))


def receipt_blob(receiver: Identity, sender: str, round_: int = 5) -> bytes:
    receipt = Receipt(RUN, sender, receiver.peer_id, round_, "cd" * 32, "00" * 16, 1.5e9, b"sender's signature")
    return envelope(receipt, receiver.sign(signing_bytes(receipt)))


def vote_blob(verifier: Identity, peer: str, round_: int) -> bytes:
    vote = Vote(RUN, peer, round_, verifier.peer_id, "accept", "", 0.0, 0.01, 1.0)
    return envelope(vote, verifier.sign(signing_bytes(vote)))


def test_each_kind_has_its_schema(alice, bob):
    ok = validator()
    assert ok.validate(signed(alice, f"{RUN}.commit.7", commitment_blob(alice, 7)))
    assert ok.validate(signed(alice, f"{RUN}.audits", [receipt_blob(alice, bob.peer_id, r) for r in range(3)]))
    assert ok.validate(signed(alice, f"{RUN}.votes.{bob.peer_id}.7", vote_blob(alice, bob.peer_id, 7)))
    refused = [
        signed(alice, f"{RUN}.peers", presence(2**64 - 1)),  # rounds are u63
        signed(alice, f"{RUN}.peers", presence(2**63)),
        signed(alice, f"{RUN}.peers", {"manifest": MANIFEST, "left": "yes"}),
        signed(alice, f"{RUN}.peers", (1, 2)),  # a msgpack extension type (hivemind's tuple)
        signed(alice, f"{RUN}.ready", "junk"),
        signed(alice, f"{RUN}.ready", {"round": 2**63, "manifest": MANIFEST}),
        signed(alice, f"{RUN}.commit.7", commitment_blob(alice, 8)),  # another round than its key's
        signed(alice, f"{RUN}.commit.7", commitment_blob(alice, 7, peer=bob.peer_id)),  # someone else's
        signed(alice, f"{RUN}.commit.7", commitment_blob(alice, 7, run="other")),
        signed(alice, f"{RUN}.commit.7", b"\x00" * 100),
        signed(alice, f"{RUN}.audits", [receipt_blob(bob, alice.peer_id)]),  # bob's receipt in alice's entry
        signed(alice, f"{RUN}.audits", [receipt_blob(alice, bob.peer_id)] * (MAX_RECEIPTS + 1)),
        signed(alice, f"{RUN}.votes.{bob.peer_id}.7", vote_blob(alice, bob.peer_id, 6)),
        signed(alice, f"{RUN}.votes.{bob.peer_id}.7", vote_blob(bob, bob.peer_id, 7)),
        signed(alice, f"{RUN}.peers", {**presence(), "pad": "x" * (KIND_RULES["presence"].max_value_bytes + 1)}),
    ]
    for index, entry in enumerate(refused):
        assert not ok.validate(entry), index


def test_every_read_rechecks_what_a_peer_returns(alice, bob):
    """hivemind validates each entry of a dictionary a peer returns to a get (DHTProtocol._validate_dictionary):
    one forged entry and that peer's whole answer is dropped; honest answers pass (again and again)."""
    now = get_dht_time()  # a DictionaryDHTValue drops what has expired by the real clock
    reader = types.SimpleNamespace(record_validator=validator(bob, now=now), serializer=MSGPackSerializer)
    key = f"{RUN}.peers"
    honest = signed(alice, key, presence(), now + 5)
    answer = DictionaryDHTValue()
    answer.store(alice.peer_id, honest.value, honest.expiration_time)
    for _ in range(3):
        assert len(answer) == 1 and DHTProtocol._validate_dictionary(reader, dht_key_id(key), answer)
    evil = forged(Identity.generate(), key, bob.peer_id, Presence.departure(MANIFEST).to_wire(), now + 5)
    answer.store(bob.peer_id, evil.value, evil.expiration_time)
    assert len(answer) == 2 and not DHTProtocol._validate_dictionary(reader, dht_key_id(key), answer)
    plain = types.SimpleNamespace(record_validator=reader.record_validator, serializer=MSGPackSerializer)
    assert not DHTProtocol._validate_record(plain, dht_key_id(f"{RUN}.ready"), DHTProtocol.IS_REGULAR_VALUE,
                                            MSGPackSerializer.dumps("junk"), NOW + 5)


def test_the_dht_client_names_its_keys_and_keeps_expirations_within_the_kinds_ttl(alice):
    own = SignedRecordValidator(alice)
    stored = []

    class Node:
        protocol = types.SimpleNamespace(record_validator=own)

        async def store(self, key, value, expiration, subkey=None):
            stored.append((key, expiration))
            plain = record(key, subkey, value, expiration)
            return own.validate(dataclasses.replace(plain, value=own.sign_value(plain)))

    client = DHTClient(Node())

    async def scenario():
        assert await client.store(f"{RUN}.peers", presence(), get_dht_time() + 10 * 365 * 86400, subkey=alice.peer_id)
        assert not await client.store(f"{RUN}.ready", Ready(3, MANIFEST).to_wire(), get_dht_time() + 5)  # plain
        assert not await client.store(f"{RUN}.manifest", MANIFEST, get_dht_time() + 5, subkey=alice.peer_id)

    asyncio.run(scenario())
    assert stored[0][1] <= get_dht_time() + KIND_RULES["presence"].ttl


# ----------------------------------------------------------------------------- manifest agreement
def test_the_swarms_manifest_is_what_most_live_members_carry():
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    assert agreed_manifest([]) is None and agreed_manifest([None, 5]) is None  # a lone first node starts
    assert agreed_manifest([a, a, b]) == a
    assert agreed_manifest([a, a, b], ours=b) == a  # a joiner with another manifest is refused
    assert agreed_manifest([a, b], ours=b) == b  # a tie that includes ours: not refused
    assert agreed_manifest([c, b]) == b  # any other tie: the same answer for every reader


# ----------------------------------------------------------------------------- clock catch-up, checkpoints
def test_the_clock_catches_up_only_as_far_as_the_median_supports_and_in_bounded_steps():
    assert clock_catch_up([40, 35, 52], 10, 8) == 35  # the nearest peer ahead, as before
    assert clock_catch_up([12, 2**63 - 1], 10, 8) is None  # a peer within the window: no jump
    assert clock_catch_up([2**63 - 1, 50, 60], 10, 8) == 50  # one liar cannot pull the median
    assert clock_catch_up([2**63 - 1, 2**63 - 1, 0], 100, 8) == 100 + catch_up_step(8)  # a lying majority: slowly
    assert clock_catch_up([0, 1, 2**63 - 1], 100, 8) is None  # the median is behind us: peers catch up with us
    assert clock_catch_up([2**64 - 1, -1], 10, 8) is None  # not a round at all: ignored
    assert clock_catch_up([10_000], 10, 8, max_step=100) == 110
    assert supported_round([5, 2**63 - 1]) == 5 and supported_round([]) is None


def test_an_absurd_checkpoint_round_is_refused():
    assert checkpoint_round_problem({"round": 30, "rounds_done": 30}, [25, 31, 29], 136) is None
    assert checkpoint_round_problem({"round": 30, "rounds_done": 30}, [], 136) is None  # a lone node resumes
    for meta in ({"round": 2**64 - 1, "rounds_done": 3}, {"round": 2**63, "rounds_done": 3},
                 {"round": 5, "rounds_done": 2**63}, {"round": "5", "rounds_done": 1}, {"round": True, "rounds_done": 1}):
        assert "below 2**63" in checkpoint_round_problem(meta, [], 136), meta
    assert "far beyond" in checkpoint_round_problem({"round": 10**6, "rounds_done": 5}, [20, 21, 2**63 - 1], 136)


def test_subkeys_are_peer_ids_in_msgpack(alice):
    # what hivemind sends as a subkey is its msgpack form: the validator reads it back the same way
    assert record(f"{RUN}.peers", alice.peer_id, {}, NOW).subkey == msgpack.packb(alice.peer_id)


def test_a_node_does_not_resume_a_checkpoint_with_an_absurd_round(tmp_path):
    """The crash loop of issue 13: a checkpoint written at round 2**64 - 1 is refused at start-up, not resumed."""
    import random

    import torch

    from node.config import NodeConfig
    from node.join.plan import StartMode
    from node.join.procedure import Joiner
    from node.metrics import NodeMetrics
    from node.train.checkpoint import save_checkpoint

    restored = []
    trainer = types.SimpleNamespace(numel=4, restore=lambda meta, tensors: restored.append(meta["round"]))
    membership = types.SimpleNamespace(live={}, refresh_view=lambda: asyncio.sleep(0))

    async def compute(function, *args):
        return function(*args)

    def start(round_: int) -> tuple:
        directory = tmp_path / str(round_)
        save_checkpoint(directory, {"manifest": MANIFEST, "numel": 4, "round": round_, "rounds_done": 3},
                        {"phi": torch.zeros(4)})
        metrics = NodeMetrics()
        joiner = Joiner(NodeConfig(), None, membership, metrics, trainer, compute, None, MANIFEST, directory,
                        asyncio.Event(), random.Random(0))
        return asyncio.run(joiner.join()), metrics

    outcome, metrics = start(2**64 - 1)
    assert (outcome.mode, outcome.round, restored) == (StartMode.FRESH, 0, [])
    assert metrics.registry.get_sample_value("gossiptrain_checkpoints_damaged_total") == 1
    outcome, _ = start(12)
    assert (outcome.mode, outcome.round, restored) == (StartMode.RESUME, 12, [12])


def test_a_store_one_replica_refused_counts_if_the_record_reads_back(alice):
    """hivemind returns the answer of the replica that replied last: a hostile DHT node saying no must not make
    a node believe its commitment (or presence) was not stored when honest replicas hold it."""
    held = {}

    class Node:
        async def store(self, key, value, expiration, subkey=None):
            if subkey == alice.peer_id:
                held[subkey] = types.SimpleNamespace(value=value, expiration_time=expiration)
            return False  # the last replica to answer refused

        async def get(self, key, latest=False):
            return types.SimpleNamespace(value=dict(held), expiration_time=NOW)

    client = DHTClient(Node())
    now = get_dht_time()
    assert asyncio.run(client.store(f"{RUN}.commit.3", b"blob", now + 60, subkey=alice.peer_id))
    assert not asyncio.run(client.store(f"{RUN}.commit.3", b"blob", now + 60, subkey="12D3KooWother"))


def test_a_joiner_checks_its_manifest_against_what_the_live_signed_presences_agree_on():
    from node.net.membership import ManifestMismatch, Membership

    other = "cd" * 32
    peers = [Identity.generate().peer_id for _ in range(4)]

    def joiner(records: dict) -> Membership:
        now = get_dht_time()
        value = {peer: types.SimpleNamespace(value=body, expiration_time=now + expires)
                 for peer, (body, expires) in records.items()}

        class Node:
            async def get(self, key, latest=False):
                assert key == f"{RUN}.peers"
                return types.SimpleNamespace(value=value, expiration_time=now + 10) if value else None

        return Membership(Node(), RUN, peers[3], MANIFEST, presence_ttl=6.0)

    assert asyncio.run(joiner({}).check_manifest()) is False  # a lone first node starts the swarm
    ok = {peers[0]: (presence(), 6), peers[1]: (presence(manifest=other), 6)}
    assert asyncio.run(joiner(ok).check_manifest()) is True  # a 1:1 split including ours: not refused
    majority = {peers[0]: (presence(manifest=other), 6), peers[1]: (presence(manifest=other), 6),
                peers[2]: (presence(), 6)}
    with pytest.raises(ManifestMismatch, match=f"swarm has {other[:12]}, this node has {MANIFEST[:12]}"):
        asyncio.run(joiner(majority).check_manifest())
    gone = {peers[0]: (Presence.departure(other).to_wire(), 6), peers[1]: (presence(manifest=other), -1),
            peers[3]: (presence(manifest=other), 6), peers[2]: (presence(), 6)}  # left, expired, our own old one
    assert asyncio.run(joiner(gone).check_manifest()) is True
