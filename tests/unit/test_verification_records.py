"""The node's verification loop against records as they come out of the DHT: forged, malformed and valid ones."""

import asyncio
import types

import numpy as np
from hivemind.utils import get_dht_time

from protocol.verification import (
    ACCEPT,
    MAX_ATTESTATION_SKEW,
    MAX_RECEIPT_AGE,
    REJECT,
    Attestation,
    Commitment,
    Receipt,
    Tolerances,
    UpdateSignature,
    Vote,
    audit_seed,
    committee_ranking,
    envelope,
    lottery_nonce,
    nonce_commitment,
    open_envelope,
    signing_bytes,
)

from node.metrics import NodeMetrics
from node.net import identity as ident
from node.net.identity import Identity
from node.net.stream_service import StreamSettings
from node.tasks import BackgroundTasks
from node.verify.replay import sent_digest
from node.verify.service import (
    ELIGIBLE_BEFORE_EXCHANGE,
    SERVE_SLACK,
    RetainedStart,
    Verification,
    VerifySettings,
    audit_fetch_limit,
)
from tests.integration.adversary import ground_identity

RUN = "run"


class FakeMembership:
    """The DHT as the verification loop sees it (`membership.client`): full keys -> {subkey: record with .value}."""

    def __init__(self, live):
        self.store: dict[str, dict] = {}
        self.live = {peer: None for peer in live}
        self.live_since = dict.fromkeys(live, 0.0)  # live long before any exchange of these tests
        self.client = FakeDHTClient(self.store)


class FakeDHTClient:
    def __init__(self, store):
        self.records = store

    async def fetch(self, key):
        return self.records.get(key)

    async def store(self, key, value, expiration, subkey=None):
        self.records.setdefault(key, {})[subkey] = types.SimpleNamespace(value=value)
        return True


def signed(identity: Identity, record) -> bytes:
    return envelope(record, identity.sign(signing_bytes(record)))


def setup():
    peers = {name: Identity.generate() for name in "ABCDE"}
    me, audited = peers["E"], peers["A"]
    membership = FakeMembership([p.peer_id for n, p in peers.items() if n != "E"])
    settings = VerifySettings(StreamSettings(RUN, "m" * 64, 64, 1.0, 2**20, 2**16), 4, 1.0,
                              Tolerances(0.08, 0.1, 1.02), 10.0, 3, 3600.0, 7)
    verification = Verification(None, membership, NodeMetrics(), me, settings, None, None, None, BackgroundTasks())
    verification.started_at = 0.0  # running long before the exchanges audited here
    commitment = Commitment(RUN, audited.peer_id, 5, "ab" * 32, "cd" * 32, "{}", 10, 4,
                            UpdateSignature(b"\x01" * 32, (1.0,), 1.0))
    membership.store[f"{RUN}.commit.5"] = {audited.peer_id: types.SimpleNamespace(value=signed(audited, commitment))}
    return peers, membership, verification, commitment


def receipt_from(receiver: Identity, audited: Identity, nonce: str = "00" * 16, round_: int = 5,
                 sent_at: float | None = None, attested_by: Identity | None = None) -> Receipt:
    """`receiver`'s receipt of `audited`'s round, carrying the attestation `audited` (or `attested_by`) signed."""
    sent_at = get_dht_time() if sent_at is None else sent_at
    attested = Attestation(RUN, audited.peer_id, receiver.peer_id, round_, "cd" * 32, sent_at,
                           nonce_commitment(bytes.fromhex(nonce)))
    signature = (attested_by or audited).sign(signing_bytes(attested))
    return Receipt(RUN, audited.peer_id, receiver.peer_id, round_, "cd" * 32, nonce, sent_at, signature)


def receipts(*blobs: bytes) -> types.SimpleNamespace:
    """A receiver's entry under {run}.audits (subkey: the receiver): the list of its signed receipts."""
    return types.SimpleNamespace(value=list(blobs))


def test_two_committee_rejects_flag_and_forged_votes_do_not_count():
    peers, membership, verification, commitment = setup()
    audited = peers["A"]
    receipt = receipt_from(peers["B"], audited)
    membership.store[f"{RUN}.audits"] = {peers["B"].peer_id: receipts(signed(peers["B"], receipt))}
    asyncio.run(verification._discover())
    audit = verification.audits[(audited.peer_id, 5)]
    assert audit.seed == audit_seed(RUN, audited.peer_id, 5, commitment.digest(), receipt.lottery_nonce())
    ranking = committee_ranking(audit.seed, [p.peer_id for p in peers.values()], audited.peer_id)
    others = [p for p in ranking if p != peers["E"].peer_id][:2]  # two committee members that are not us
    by_id = {p.peer_id: p for p in peers.values()}
    votes = membership.store.setdefault(f"{RUN}.votes.{audited.peer_id}.5", {})
    # a forged vote: claims to be from the first member but is signed by the audited peer itself
    forged = Vote(RUN, audited.peer_id, 5, others[0], REJECT, "forged", 1.0, 9.0, 9.0)
    votes[others[0]] = types.SimpleNamespace(value=signed(audited, forged))
    votes["garbage"] = types.SimpleNamespace(value=b"\x93\x01")
    verification.audits[(audited.peer_id, 5)].voted = True  # this node does not replay in this test
    asyncio.run(verification.tally())
    assert audit.verdict is None and not verification.flagged
    for member in others:
        votes[member] = types.SimpleNamespace(value=signed(by_id[member], Vote(
            RUN, audited.peer_id, 5, member, REJECT, "exceeds rel_l2", 0.5, 1.9, 1.0)))
    asyncio.run(verification.tally())
    assert audit.verdict == REJECT and list(verification.flagged) == [audited.peer_id]
    assert audited.peer_id in verification.excluded()
    assert "rel-L2 1.9" in verification.flagged[audited.peer_id]


def discovered_audit(peers, membership, verification, receiver: str):
    """`receiver`'s receipt of A's round 5 is published and discovered; this node does not replay (voted)."""
    audited = peers["A"]
    membership.store[f"{RUN}.audits"] = {
        peers[receiver].peer_id: receipts(signed(peers[receiver], receipt_from(peers[receiver], audited)))}
    asyncio.run(verification._discover())
    audit = verification.audits[(audited.peer_id, 5)]
    audit.voted = True
    return audited, audit


def test_two_accepts_clear_and_nobody_is_flagged():
    peers, membership, verification, _ = setup()
    audited, audit = discovered_audit(peers, membership, verification, "C")
    ranking = committee_ranking(audit.seed, [p.peer_id for p in peers.values()], audited.peer_id)
    by_id = {p.peer_id: p for p in peers.values()}
    votes = membership.store.setdefault(f"{RUN}.votes.{audited.peer_id}.5", {})
    for member in [p for p in ranking if p != peers["E"].peer_id][:2]:
        votes[member] = types.SimpleNamespace(value=signed(by_id[member], Vote(
            RUN, audited.peer_id, 5, member, ACCEPT, "", 0.0, 0.001, 1.0)))
    asyncio.run(verification.tally())
    assert audit.verdict == ACCEPT and not verification.flagged


def test_receipts_that_do_not_check_out_are_ignored_once():
    peers, membership, verification, _ = setup()
    audited = peers["A"]
    bad_signature = signed(peers["D"], receipt_from(peers["B"], audited))  # B's receipt signed by D
    self_receipt = signed(audited, receipt_from(audited, audited))  # a peer cannot draw its own audit
    membership.store[f"{RUN}.audits"] = {
        peers["B"].peer_id: receipts(bad_signature, b"garbage"),
        audited.peer_id: receipts(self_receipt),
        "not-a-list": types.SimpleNamespace(value=b""),
    }
    for _ in range(3):
        asyncio.run(verification._discover())
    assert not verification.audits
    errors = verification.metrics.registry.get_sample_value("gossiptrain_protocol_errors_total", {"kind": "record"})
    assert errors == 3  # counted once each, not once per pass


def test_our_own_drawn_rounds_are_kept_for_the_audit():
    peers, membership, verification, _ = setup()
    me = peers["E"]
    receipt = receipt_from(peers["B"], me, round_=9)
    membership.store[f"{RUN}.audits"] = {peers["B"].peer_id: receipts(signed(peers["B"], receipt))}
    asyncio.run(verification._discover())
    assert 9 in verification._own_audits and not verification.audits


# ----------------------------------------------------------------------------- receipts co-signed by the sender
def test_a_receipt_the_audited_peer_never_attested_is_no_audit():
    """The forged-receipt attack: any identity publishes a receipt naming an honest peer's old round (its commitment
    is public), grinds the nonce until the lottery draws it, and the honest peer, long past that state, answers
    `no_state` to the committee: flagged. A receipt now needs the sender's signature, given only in an exchange."""
    peers, membership, verification, _ = setup()
    audited, stranger = peers["A"], peers["D"]
    forged = receipt_from(stranger, audited, attested_by=stranger)  # the stranger signs in the sender's place
    membership.store[f"{RUN}.audits"] = {stranger.peer_id: receipts(signed(stranger, forged))}
    for _ in range(2):
        asyncio.run(verification._discover())
    assert not verification.audits
    errors = verification.metrics.registry.get_sample_value("gossiptrain_protocol_errors_total", {"kind": "record"})
    assert errors == 1


def test_a_receipt_published_after_the_sender_may_have_let_the_state_go_is_no_audit():
    """A genuine receipt withheld and published late (or a backdated one) is not an audit: no vote, no flag."""
    peers, membership, verification, _ = setup()
    audited = peers["A"]
    late = receipt_from(peers["B"], audited, sent_at=get_dht_time() - MAX_RECEIPT_AGE - 1)
    future = receipt_from(peers["C"], audited, sent_at=get_dht_time() + MAX_ATTESTATION_SKEW + 5)
    membership.store[f"{RUN}.audits"] = {peers["B"].peer_id: receipts(signed(peers["B"], late)),
                                         peers["C"].peer_id: receipts(signed(peers["C"], future))}
    asyncio.run(verification._discover())
    assert not verification.audits
    assert not verification.metrics.registry.get_sample_value("gossiptrain_protocol_errors_total", {"kind": "record"})
    # the same receipt, fresh, is an audit
    membership.store[f"{RUN}.audits"] = {peers["B"].peer_id: receipts(signed(peers["B"], receipt_from(peers["B"], audited)))}
    asyncio.run(verification._discover())
    assert (audited.peer_id, 5) in verification.audits


def exchange_setup():
    """We (E) received `tensors` from A for its round 5, whose signed commitment names their digest."""
    peers, membership, verification, _ = setup()
    audited = peers["A"]
    tensors = {"theta": np.arange(8, dtype=np.float32)}
    commitment = Commitment(RUN, audited.peer_id, 5, "ab" * 32, sent_digest(tensors), "{}", 10, 4,
                            UpdateSignature(b"\x01" * 32, (1.0,), 1.0))
    membership.store[f"{RUN}.commit.5"] = {audited.peer_id: types.SimpleNamespace(value=signed(audited, commitment))}
    verification.settings = VerifySettings(verification.settings.stream, 4, 1.0,  # rate 1: every update drawn
                                           Tolerances(0.08, 0.1, 1.02), 10.0, 3, 3600.0, 7)
    return peers, membership, verification, tensors, commitment


NONCE = bytes(range(16))  # our lottery nonce for the exchange, committed to in our request


def attestation_of(sender: Identity, receiver: Identity, digest: str, at: float | None = None, round_: int = 5,
                   signer: Identity | None = None, nonce: bytes = NONCE) -> bytes:
    attested = Attestation(RUN, sender.peer_id, receiver.peer_id, round_, digest, get_dht_time() if at is None else at,
                           nonce_commitment(nonce))
    return signed(signer or sender, attested)


def refused(verification: Verification, reason: str) -> float:
    return verification.metrics.registry.get_sample_value("gossiptrain_updates_refused_total", {"reason": reason})


def test_an_update_comes_with_its_senders_attestation_and_the_receipt_carries_it():
    peers, membership, verification, tensors, commitment = exchange_setup()
    sender, me = peers["A"], peers["E"]
    bad = {
        "missing": b"",
        "signed by another": attestation_of(sender, me, commitment.theta_digest, signer=peers["B"]),
        "for another receiver": attestation_of(sender, peers["B"], commitment.theta_digest),
        "for other tensors": attestation_of(sender, me, "ee" * 32),
        "for another round": attestation_of(sender, me, commitment.theta_digest, round_=4),
        "clock too far behind": attestation_of(sender, me, commitment.theta_digest,
                                               at=get_dht_time() - MAX_ATTESTATION_SKEW - 2),
        "for another nonce": attestation_of(sender, me, commitment.theta_digest, nonce=b"\x01" * 16),
        "garbage": b"\x93\x01",
    }

    async def receive(blob: bytes) -> bool:
        accepted = await verification.accept_update(sender.peer_id, 5, tensors, blob, NONCE)
        for _ in range(3):  # the receipt is stored in the background
            await asyncio.sleep(0)
        return accepted

    for what, blob in bad.items():
        assert not asyncio.run(receive(blob)), what
    assert refused(verification, "no_attestation") == len(bad)
    assert f"{RUN}.audits" not in membership.store  # nothing to audit was published

    assert asyncio.run(receive(attestation_of(sender, me, commitment.theta_digest)))
    (blob,) = membership.store[f"{RUN}.audits"][me.peer_id].value
    receipt, signature = open_envelope(blob, Receipt)
    assert verification._signed_by_receiver(receipt, me.peer_id, signature)  # ours, and co-signed by the sender


def test_we_attest_only_rounds_we_committed_and_keep_their_state_for_the_receipt():
    peers, _, verification, _ = setup()
    me, partner = peers["E"], peers["B"]
    commitment = bytes.fromhex(nonce_commitment(NONCE))
    assert verification.attest(partner.peer_id, 7, commitment) == b""  # not committed: nothing to attest
    verification.retained[7] = RetainedStart({}, "ab" * 32, created=0.0, theta_digest="cd" * 32)
    assert verification.attest(partner.peer_id, 7, b"") == b""  # the partner committed to no nonce
    attested, signature = open_envelope(verification.attest(partner.peer_id, 7, commitment), Attestation)
    assert (attested.sender, attested.receiver, attested.round, attested.theta_digest, attested.nonce_commitment) == (
        me.peer_id, partner.peer_id, 7, "cd" * 32, commitment.hex())
    assert ident.verify(me.peer_id, signing_bytes(attested), signature)
    # made long ago but attested just now: kept past the audit window, until no receipt of it can be current
    for later in range(8, 14):
        verification.retained[later] = RetainedStart({}, "ab" * 32, created=0.0)
    verification._prune_retained()
    assert 7 in verification.retained and 8 not in verification.retained


def test_neither_partner_can_steer_the_audit_lottery():
    """The receiver commits to its nonce before any tensor moves; the draw mixes in the sender's attestation
    signature, made after that commitment without knowing the nonce. So the receiver cannot grind a draw (it would
    need the signature before committing) and the sender cannot (it would need the nonce)."""
    peers, _, _, _ = setup()
    receipt = receipt_from(peers["B"], peers["A"], nonce="11" * 16)
    assert receipt.lottery_nonce() == lottery_nonce(bytes.fromhex("11" * 16), receipt.attestation)
    other_signature = receipt_from(peers["B"], peers["A"], nonce="11" * 16, sent_at=receipt.sent_at + 1)
    assert other_signature.lottery_nonce() != receipt.lottery_nonce()  # the sender's signature moves the draw
    # a receipt revealing another nonce than the one the sender attested does not carry the sender's signature
    swapped = Receipt(**{**receipt.to_wire(), "nonce": "22" * 16})
    assert not ident.verify(peers["A"].peer_id, signing_bytes(swapped.attested()), swapped.attestation)
    assert ident.verify(peers["A"].peer_id, signing_bytes(receipt.attested()), receipt.attestation)


# ----------------------------------------------------------------------------- who sits on a committee
def test_keys_ground_after_the_exchange_never_sit_on_its_committee():
    """Before: every voter joined the candidates, so two keys ground to rank first for a known seed, voting
    reject, flagged an honest peer. Now a seat needs to have been live before the audited exchange."""
    peers, membership, verification, _ = setup()
    audited, audit = discovered_audit(peers, membership, verification, "B")
    honest = [p.peer_id for p in peers.values()]
    sybils = [ground_identity(audit.seed, audited.peer_id, honest, top=1), None]
    sybils[1] = ground_identity(audit.seed, audited.peer_id, [*honest, sybils[0].peer_id], top=2)
    votes = membership.store.setdefault(f"{RUN}.votes.{audited.peer_id}.5", {})
    for key in sybils:
        votes[key.peer_id] = types.SimpleNamespace(value=signed(key, Vote(
            RUN, audited.peer_id, 5, key.peer_id, REJECT, "exceeds rel_l2", 0.5, 1.9, 1.0)))
    # they even show up live, after the exchange (a presence is one signed store away)
    for key in sybils:
        membership.live[key.peer_id] = None
        membership.live_since[key.peer_id] = audit.exchanged_at + 1.0
    asyncio.run(verification.tally())
    assert audit.verdict is None and not verification.flagged
    assert not {k.peer_id for k in sybils} & set(verification._ranking(audit))
    # the same keys, live since long before the exchange, are ordinary candidates (the fraction-of-identities
    # risk the README states): then their votes count
    for key in sybils:
        membership.live_since[key.peer_id] = 0.0
    asyncio.run(verification.tally())
    assert audit.verdict == REJECT


def test_trusted_peers_alone_sit_on_committees():
    peers, membership, verification, _ = setup()
    trusted = frozenset(peers[name].peer_id for name in "BCD")
    verification.settings = VerifySettings(**{**verification.settings.__dict__, "trusted": trusted})
    everyone = {p.peer_id for p in peers.values()}
    assert verification.eligible(everyone, exchanged_at=100.0) == trusted
    verification.flagged[peers["B"].peer_id] = "evidence"
    assert verification.eligible(everyone, exchanged_at=100.0) == trusted - {peers["B"].peer_id}
    membership.live_since[peers["C"].peer_id] = 98.0  # entered our view 2 s before the exchange: not yet
    assert verification.eligible(everyone, exchanged_at=100.0) == {peers["D"].peer_id}


def test_the_audited_peer_serves_a_verifier_it_saw_arrive_a_little_later_than_the_verifier_did():
    """Views differ: a verifier counts itself live from its own start, we from when we first saw it. Serving is
    generous by SERVE_SLACK so that a verifier seated in its own view is never refused and made to vote reject."""
    peers, membership, verification, _ = setup()
    me, receiver = peers["E"], peers["B"]
    commitment = Commitment(RUN, me.peer_id, 7, "ab" * 32, "cd" * 32, "{}", 10, 4,
                            UpdateSignature(b"\x01" * 32, (1.0,), 1.0))
    membership.store[f"{RUN}.commit.7"] = {me.peer_id: types.SimpleNamespace(value=signed(me, commitment))}
    receipt = receipt_from(receiver, me, round_=7)
    membership.store[f"{RUN}.audits"] = {receiver.peer_id: receipts(signed(receiver, receipt))}
    exchanged = receipt.sent_at
    late, too_late = peers["C"].peer_id, peers["D"].peer_id
    membership.live_since[late] = exchanged - ELIGIBLE_BEFORE_EXCHANGE + 5  # seated in its own view, not in ours
    membership.live_since[too_late] = exchanged + SERVE_SLACK + 5  # arrived after the exchange, in anyone's view
    assert asyncio.run(verification._audit_refusal(late, 7)) is None
    assert asyncio.run(verification._audit_refusal(too_late, 7)) == "bad_request"
    assert asyncio.run(verification._audit_refusal(peers["A"].peer_id, 8)) == "bad_request"  # no audit of round 8


def test_an_audit_download_is_bounded_by_its_size_at_the_minimum_rate_not_a_fixed_time():
    """A 19M model's audit (5 float32 tensors, 384 MB) takes 154 s at 20 Mbit/s: it must not be cut while it
    progresses (each wait is bounded by the I/O timeout and the minimum rate on its own)."""
    big = StreamSettings(RUN, "m" * 64, 19_210_240, 5.0, 8 * 2**20, 2 * 2**20, min_transfer_rate=256 * 2**10)
    assert audit_fetch_limit(big, 5) > 5 * 4 * 19_210_240 / (20e6 / 8)
    small = StreamSettings(RUN, "m" * 64, 470_528, 5.0, 8 * 2**20, 2 * 2**20, min_transfer_rate=256 * 2**10)
    assert audit_fetch_limit(small, 5) < 60  # a tiny model's dead audit still ends within a minute
