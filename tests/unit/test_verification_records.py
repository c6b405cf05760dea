"""The node's verification loop against records as they come out of the DHT: forged, malformed and valid ones."""

import asyncio
import types

from protocol.verification import (
    ACCEPT,
    REJECT,
    Commitment,
    Receipt,
    Tolerances,
    UpdateSignature,
    Vote,
    audit_seed,
    committee_ranking,
    envelope,
    signing_bytes,
)

from node.metrics import NodeMetrics
from node.net.identity import Identity
from node.net.stream_service import StreamSettings
from node.tasks import BackgroundTasks
from node.verify.service import Verification, VerifySettings

RUN = "run"


class FakeMembership:
    """The DHT as the verification loop sees it (`membership.client`): full keys -> {subkey: record with .value}."""

    def __init__(self, live):
        self.store: dict[str, dict] = {}
        self.live = {peer: None for peer in live}
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
    commitment = Commitment(RUN, audited.peer_id, 5, "ab" * 32, "cd" * 32, "{}", 10, 4,
                            UpdateSignature(b"\x01" * 32, (1.0,), 1.0))
    membership.store[f"{RUN}.commit.5"] = {audited.peer_id: types.SimpleNamespace(value=signed(audited, commitment))}
    return peers, membership, verification, commitment


def receipt_from(receiver: Identity, audited: Identity, nonce: str = "00" * 16) -> Receipt:
    return Receipt(RUN, audited.peer_id, receiver.peer_id, 5, "cd" * 32, nonce)


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
    assert audit.seed == audit_seed(RUN, audited.peer_id, 5, commitment.digest(), receipt.nonce)
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


def test_two_accepts_clear_and_nobody_is_flagged():
    peers, membership, verification, _ = setup()
    audited = peers["A"]
    membership.store[f"{RUN}.audits"] = {peers["C"].peer_id: receipts(signed(peers["C"], receipt_from(peers["C"], audited)))}
    asyncio.run(verification._discover())
    audit = verification.audits[(audited.peer_id, 5)]
    audit.voted = True
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
    receipt = Receipt(RUN, me.peer_id, peers["B"].peer_id, 9, "cd" * 32, "00" * 16)
    membership.store[f"{RUN}.audits"] = {peers["B"].peer_id: receipts(signed(peers["B"], receipt))}
    asyncio.run(verification._discover())
    assert 9 in verification._own_audits and not verification.audits
