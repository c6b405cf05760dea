"""Verification records and rules (SPEC.md §13): pure data and arithmetic, no torch, no network.

Three signed records live in the DHT:

- ``Commitment``: what a peer says it did in one round, published *before* it sends
  anything: the digest of the state it started from, its data assignment, the digest
  of the θ it will send, and an LSH signature of its update Δ = θ − φ.
- ``Receipt``: published by the partner that received that θ: the digest it actually
  got, plus a random nonce. The nonce seeds the audit lottery, so the sender could not
  know, when it committed, whether this round will be audited or by whom. It carries the
  sender's ``Attestation`` signature, given in the exchange itself (sender, receiver, round,
  digest, the sender's clock): nobody can publish a receipt for an exchange that did not
  happen, and one published after the sender may have let the round's state go is no audit.
- ``Vote``: a verifier's accept/reject after replaying the round, with the evidence.

Rules here: comparing two update signatures against tolerances, the audit seed and
sampling, the committee ranking (with reserves that step in for verifiers that do not
vote), and the 2-of-3 verdict. Signing and checking signatures happens in the node
(``node/net/identity.py``); this module only defines the exact bytes that are signed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, ClassVar

import msgpack

from protocol.errors import InvalidField
from protocol.fields import check_float, check_hex, check_str, check_u63

VERIFY_DOMAIN = b"gossiptrain/verify/1"
ACCEPT, REJECT = "accept", "reject"
VERDICTS = (ACCEPT, REJECT)
COMMITTEE_SIZE = 3
MAX_RECORD_BYTES = 16 * 1024
HEX_DIGEST_CHARS = 64  # a 32-byte digest in hex
MAX_SKETCH = 1024
MAX_BITS_BYTES = 512
# A receiver refuses an update whose attestation's clock is further than this from its own; a verifier audits a
# receipt only while its attestation is at most MAX_RECEIPT_AGE old. MAX_ATTESTATION_SKEW < MAX_RECEIPT_AGE, so a
# sender cannot backdate its attestations out of every audit; MAX_RECEIPT_AGE + MAX_ATTESTATION_SKEW stays below
# how long a sender keeps an attested round's start state (node/verify/service.py RETAIN_MIN_SECONDS).
MAX_ATTESTATION_SKEW = 10.0
MAX_RECEIPT_AGE = 20.0


class InvalidRecord(InvalidField):
    """A verification record in the DHT is malformed, oversized or badly signed."""

    kind = "record"


@dataclass(frozen=True)
class UpdateSignature:
    """Locality-sensitive summary of an update Δ: SimHash bits, a projection sketch, the exact L2 norm."""

    bits: bytes  # sign bits of the random projections, packed little-endian (bit i of byte i//8)
    sketch: tuple[float, ...]  # the first projections scaled by 1/sqrt(len): an L2-preserving sketch
    norm: float


@dataclass(frozen=True)
class Tolerances:
    """How far a replay may be from the committed signature and still be honest."""

    max_hamming: float  # fraction of differing SimHash bits
    max_rel_l2: float  # ‖Δ_committed − Δ_replayed‖ / ‖Δ_replayed‖, estimated from the sketches
    max_norm_ratio: float  # max(r, 1/r) with r = ‖Δ_committed‖ / ‖Δ_replayed‖


@dataclass(frozen=True)
class Comparison:
    hamming: float
    rel_l2: float
    norm_ratio: float
    failed: tuple[str, ...]  # names of the exceeded tolerances; empty: consistent

    @property
    def ok(self) -> bool:
        return not self.failed

    def evidence(self, tolerances: Tolerances) -> str:
        return (f"hamming {self.hamming:.4f} (max {tolerances.max_hamming:.4f}), rel-L2 {self.rel_l2:.4f} "
                f"(max {tolerances.max_rel_l2:.4f}), norm ratio {self.norm_ratio:.4f} "
                f"(max {tolerances.max_norm_ratio:.4f})")


def hamming_fraction(a: bytes, b: bytes) -> float:
    if len(a) != len(b) or not a:
        raise ValueError(f"SimHash lengths differ: {len(a)} vs {len(b)} bytes")
    differing = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
    return differing.bit_count() / (8 * len(a))


def sketch_rel_l2(committed: tuple[float, ...], replayed: tuple[float, ...]) -> float:
    if len(committed) != len(replayed) or not committed:
        raise ValueError(f"sketch lengths differ: {len(committed)} vs {len(replayed)}")
    difference = math.sqrt(sum((x - y) ** 2 for x, y in zip(committed, replayed)))
    reference = math.sqrt(sum(y * y for y in replayed))
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference


def norm_ratio(committed: float, replayed: float) -> float:
    """max(r, 1/r): 1.0 means equal norms; symmetric, so scaling up and down count alike."""
    if committed <= 0.0 or replayed <= 0.0:
        return 1.0 if committed == replayed else math.inf
    ratio = committed / replayed
    return max(ratio, 1.0 / ratio)


def compare(committed: UpdateSignature, replayed: UpdateSignature, tolerances: Tolerances) -> Comparison:
    """Is the committed update consistent with the replay? Each distance against its tolerance.

    SimHash sees direction only; the sketch and the norm see scale (a ×2 update has the same bits).
    """
    hamming = hamming_fraction(committed.bits, replayed.bits)
    rel_l2 = sketch_rel_l2(committed.sketch, replayed.sketch)
    ratio = norm_ratio(committed.norm, replayed.norm)
    failed = tuple(name for name, value, limit in (
        ("hamming", hamming, tolerances.max_hamming),
        ("rel_l2", rel_l2, tolerances.max_rel_l2),
        ("norm_ratio", ratio, tolerances.max_norm_ratio),
    ) if not value <= limit)  # NaN fails too
    return Comparison(hamming, rel_l2, ratio, failed)


# ----------------------------------------------------------------------------- records
# The shared field validators (protocol/fields.py), raising InvalidRecord. Integers are u63: < 2**63.
_str = partial(check_str, error=InvalidRecord)
_u63 = partial(check_u63, error=InvalidRecord)
_float = partial(check_float, error=InvalidRecord)
_hex = partial(check_hex, chars=HEX_DIGEST_CHARS, error=InvalidRecord)


@dataclass(frozen=True)
class Commitment:
    KIND: ClassVar[str] = "commitment"
    run_id: str
    peer: str
    round: int
    start_digest: str  # hex blake2b-256 of the start state (φ, Adam moments) and the replay meta
    theta_digest: str  # hex blake2b-256 of the θ this peer sends its partner
    data: str  # canonical JSON of the data assignment (shard, sampler state) and the replay meta
    global_step: int
    inner_steps: int
    update: UpdateSignature

    def to_wire(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "update"}
        body.update(bits=bytes(self.update.bits), sketch=list(self.update.sketch), norm=self.update.norm)
        return body

    @classmethod
    def from_wire(cls, body: Any) -> Commitment:
        body = _map(body)
        sketch = body.get("sketch")
        if not isinstance(sketch, list) or not 0 < len(sketch) <= MAX_SKETCH:
            raise InvalidRecord(f"field 'sketch' must be a list of 1..{MAX_SKETCH} numbers")
        bits = body.get("bits")
        if not isinstance(bits, bytes) or not 0 < len(bits) <= MAX_BITS_BYTES:
            raise InvalidRecord(f"field 'bits' must be 1..{MAX_BITS_BYTES} bytes")
        norm = _float("norm", body.get("norm"))
        if norm < 0:
            raise InvalidRecord("field 'norm' must be >= 0")
        return cls(
            run_id=_str("run_id", body.get("run_id")), peer=_str("peer", body.get("peer")),
            round=_u63("round", body.get("round")),
            start_digest=_hex("start_digest", body.get("start_digest")),
            theta_digest=_hex("theta_digest", body.get("theta_digest")),
            data=_str("data", body.get("data"), 4096), global_step=_u63("global_step", body.get("global_step")),
            inner_steps=_u63("inner_steps", body.get("inner_steps")),
            update=UpdateSignature(bits, tuple(_float("sketch", x) for x in sketch), norm),
        )

    def digest(self) -> bytes:
        return hashlib.blake2b(signing_bytes(self), digest_size=32).digest()


@dataclass(frozen=True)
class Attestation:
    """The sender's word, given to its partner at the end of an exchange (in its ExchangeAck): "I sent you θ with
    this digest for my round, at this time by my clock". Signed by the sender; the receiver checks it against what
    arrived and its own clock, and its receipt carries the signature."""

    KIND: ClassVar[str] = "attestation"
    run_id: str
    sender: str  # who signs this attestation
    receiver: str
    round: int  # the sender's round
    theta_digest: str  # what the sender sent
    time: float  # the sender's wall clock when it attested
    nonce_commitment: str  # the receiver's, from its ExchangeRequest/ExchangeAccept: blake2b of its lottery nonce

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, body: Any) -> Attestation:
        body = _map(body)
        return cls(
            run_id=_str("run_id", body.get("run_id")), sender=_str("sender", body.get("sender")),
            receiver=_str("receiver", body.get("receiver")), round=_u63("round", body.get("round")),
            theta_digest=_hex("theta_digest", body.get("theta_digest")), time=_float("time", body.get("time")),
            nonce_commitment=_hex("nonce_commitment", body.get("nonce_commitment")),
        )


@dataclass(frozen=True)
class Receipt:
    KIND: ClassVar[str] = "receipt"
    run_id: str
    sender: str  # whose θ was received
    receiver: str  # who signs this receipt
    round: int  # the sender's round (its commitment's round)
    theta_digest: str  # what actually arrived
    nonce: str  # 32 hex chars of the receiver's randomness, committed to before the exchange (see `lottery_nonce`)
    sent_at: float  # the sender's attested clock
    attestation: bytes  # the sender's signature over `attested()`

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    def attested(self) -> Attestation:
        """What the sender signed (its signature is `attestation`), with the commitment to this receipt's nonce."""
        return Attestation(self.run_id, self.sender, self.receiver, self.round, self.theta_digest, self.sent_at,
                           nonce_commitment(bytes.fromhex(self.nonce)))

    def lottery_nonce(self) -> str:
        """What seeds this receipt's audit lottery (`audit_seed`)."""
        return lottery_nonce(bytes.fromhex(self.nonce), self.attestation)

    @classmethod
    def from_wire(cls, body: Any) -> Receipt:
        body = _map(body)
        attestation = body.get("attestation")
        if not isinstance(attestation, bytes) or not 0 < len(attestation) <= 1024:
            raise InvalidRecord("field 'attestation' must be the sender's signature (1..1024 bytes)")
        return cls(
            run_id=_str("run_id", body.get("run_id")), sender=_str("sender", body.get("sender")),
            receiver=_str("receiver", body.get("receiver")), round=_u63("round", body.get("round")),
            theta_digest=_hex("theta_digest", body.get("theta_digest")), nonce=_hex("nonce", body.get("nonce"), chars=32),
            sent_at=_float("sent_at", body.get("sent_at")), attestation=attestation,
        )


@dataclass(frozen=True)
class Vote:
    KIND: ClassVar[str] = "vote"
    run_id: str
    peer: str  # the audited peer
    round: int
    verifier: str
    verdict: str  # accept | reject
    reason: str  # failed tolerances, "start_digest", "unavailable", ... ("" when accepted)
    hamming: float
    rel_l2: float
    norm_ratio: float

    def to_wire(self) -> dict[str, Any]:
        body = asdict(self)
        for name in ("hamming", "rel_l2", "norm_ratio"):  # inf is not JSON-friendly evidence: cap it
            body[name] = min(float(body[name]), 1e30)
        return body

    @classmethod
    def from_wire(cls, body: Any) -> Vote:
        body = _map(body)
        verdict = _str("verdict", body.get("verdict"))
        if verdict not in VERDICTS:
            raise InvalidRecord(f"field 'verdict' must be one of {VERDICTS}")
        return cls(
            run_id=_str("run_id", body.get("run_id")), peer=_str("peer", body.get("peer")),
            round=_u63("round", body.get("round")), verifier=_str("verifier", body.get("verifier")),
            verdict=verdict, reason=_str("reason", body.get("reason")),
            hamming=_float("hamming", body.get("hamming")), rel_l2=_float("rel_l2", body.get("rel_l2")),
            norm_ratio=_float("norm_ratio", body.get("norm_ratio")),
        )


Record = Commitment | Attestation | Receipt | Vote
RECORD_KINDS: dict[str, type] = {cls.KIND: cls for cls in (Commitment, Receipt, Vote)}


def _map(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRecord(f"record must be a map, got {type(body).__name__}")
    return body


def signing_bytes(record: Record) -> bytes:
    """The exact bytes a record's author signs: domain, kind, then the fields in sorted order."""
    body = record.to_wire()
    return VERIFY_DOMAIN + b"/" + record.KIND.encode() + b"\n" + msgpack.packb(
        sorted(body.items()), use_bin_type=True)


def envelope(record: Record, signature: bytes) -> bytes:
    """What is stored in the DHT: the record and its author's signature."""
    return msgpack.packb({"k": record.KIND, "r": record.to_wire(), "s": signature}, use_bin_type=True)


def open_envelope(blob: Any, kind: type) -> tuple[Record, bytes]:
    """Parse a stored envelope of the expected kind: (record, signature). The signature is NOT checked here."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"envelope must be at most {MAX_RECORD_BYTES} bytes of msgpack")
    try:
        body = msgpack.unpackb(bytes(blob), raw=False, strict_map_key=True, max_array_len=MAX_SKETCH,
                               max_map_len=32, max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RECORD_BYTES)
    except Exception as error:
        raise InvalidRecord(f"undecodable envelope: {type(error).__name__}") from error
    body = _map(body)
    if body.get("k") != kind.KIND:
        raise InvalidRecord(f"expected a {kind.KIND} record, got {str(body.get('k'))[:32]!r}")
    signature = body.get("s")
    if not isinstance(signature, bytes) or not 0 < len(signature) <= 1024:
        raise InvalidRecord("missing or oversized signature")
    return kind.from_wire(body.get("r")), signature


# ----------------------------------------------------------------------------- lottery, committee, verdict
def data_assignment(shard: int, sampler_state: Mapping[str, Any], adam_step: int, micro_batches: int = 1,
                    ranks: int = 1) -> str:
    """Canonical JSON of what a replay needs besides tensors (big integers stay exact in JSON). `ranks`, a
    data-parallel node's rank count, appears only when above 1, so a one-process node commits what it always did."""
    meta = {"shard": shard, "sampler": sampler_state, "adam_step": adam_step, "micro_batches": micro_batches}
    if ranks != 1:
        meta["ranks"] = ranks
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def nonce_commitment(nonce: bytes) -> str:
    """A receiver's commitment to its lottery nonce, sent in its ExchangeRequest / ExchangeAccept before any tensor
    and signed by the sender in its attestation: the receiver cannot choose the nonce after the fact."""
    return hashlib.blake2b(nonce, digest_size=32, person=b"gt-nonce-commit").hexdigest()


def lottery_nonce(nonce: bytes, attestation_signature: bytes) -> str:
    """The audit lottery's nonce: the receiver's nonce (committed before the exchange) mixed with the sender's
    attestation signature (made after it, knowing only the commitment). Neither side can grind the draw: the
    receiver committed before it could see the signature, the sender signed without knowing the nonce."""
    return hashlib.blake2b(nonce + attestation_signature, digest_size=16, person=b"gt-lottery").hexdigest()


def attestation_is_timely(attested_at: float, now: float) -> bool:
    """May a receiver accept an attestation made at `attested_at` (sender's clock) at `now` (its own)?"""
    return abs(now - attested_at) <= MAX_ATTESTATION_SKEW


def receipt_is_current(sent_at: float, now: float) -> bool:
    """Is a receipt whose exchange was attested at `sent_at` still an audit at `now` (the verifier's clock)? Later
    than MAX_RECEIPT_AGE, the sender may rightly have let the round's start state go: it would answer `no_state`."""
    return -MAX_ATTESTATION_SKEW <= now - sent_at <= MAX_RECEIPT_AGE


def audit_seed(run_id: str, peer: str, round_: int, commitment_digest: bytes, receipt_nonce: str) -> bytes:
    material = json.dumps([run_id, peer, round_, commitment_digest.hex(), receipt_nonce]).encode()
    return hashlib.blake2b(material, digest_size=32, person=b"gt-audit-seed").digest()


def is_sampled(seed: bytes, rate: float) -> bool:
    """Whether this (peer, round) is audited: a uniform draw from the seed below `rate`."""
    draw = int.from_bytes(hashlib.blake2b(seed, digest_size=8, person=b"gt-audit-draw").digest(), "big")
    return draw < rate * 2**64


def committee_ranking(seed: bytes, candidates: Iterable[str], audited: str) -> list[str]:
    """Every candidate but the audited peer, in committee order (rendezvous hashing on the seed).

    The first COMMITTEE_SIZE are the committee; the rest are reserves, in order, for members
    that do not vote in time. The order of two candidates does not depend on who else is a
    candidate, so nodes whose views differ slightly still agree on it.
    """
    def score(peer: str) -> bytes:
        return hashlib.blake2b(seed + peer.encode(), digest_size=16, person=b"gt-committee").digest()
    return sorted((peer for peer in set(candidates) if peer != audited), key=score)


def decide(votes: Mapping[str, str], ranking: list[str], max_reserves: int) -> str | None:
    """The verdict on one audit from the votes cast so far: REJECT (flag), ACCEPT, or None (pending).

    Only the committee and its first `max_reserves` reserves may vote. The votes of the
    best-ranked COMMITTEE_SIZE voters count; 2 of 3 rejects flag, 2 of 3 accepts clear.
    Missing votes are never counted as accepts.
    """
    eligible = ranking[: COMMITTEE_SIZE + max_reserves]
    counted = [votes[peer] for peer in eligible if peer in votes][:COMMITTEE_SIZE]
    majority = COMMITTEE_SIZE // 2 + 1
    if counted.count(REJECT) >= majority:
        return REJECT
    if counted.count(ACCEPT) >= majority:
        return ACCEPT
    return None


def stand_in_rank(ranking: list[str], voted: Iterable[str], me: str, elapsed: float, vote_timeout: float) -> bool:
    """Should `me` audit now? Committee members at once; reserve k once k vote timeouts have
    passed and the better-ranked peers have still not cast COMMITTEE_SIZE votes."""
    if me not in ranking:
        return False
    rank = ranking.index(me)
    if rank < COMMITTEE_SIZE:
        return True
    reserve = rank - COMMITTEE_SIZE + 1
    better_votes = len(set(voted) & set(ranking[:rank]))
    return elapsed >= reserve * vote_timeout and better_votes < COMMITTEE_SIZE
