"""Trustless verification: commitments, receipts, committee audits, votes, verdicts, exclusion.

Per round, on every node (protocol/SPEC.md §13; rules in protocol/verification.py):

1. commit — before it sends anything, a node signs and publishes a Commitment for its
   round: start-state digest, data assignment, digest of the tensors it will send, LSH
   signature of its update. It keeps that round's start state to serve audits.
2. receive — a node that received a partner's tensors applies them only if the
   partner's signed commitment exists and its digest matches what arrived; flagged
   peers' tensors are dropped. It then draws the audit lottery with a fresh random
   nonce: if this (partner, round) is sampled it publishes the signed Receipt (nonce
   included, with the partner's attestation of what it sent, given in the exchange's ack)
   under `{run}.audits`. The audited peer was bound by its commitment before
   the nonce existed, so it could not know whether, or by whom, it would be audited.
3. audit — every node polls `{run}.audits`; for each sampled (peer, round) it ranks the
   candidates (live peers and itself) by the seed. The top 3 replay the round from the
   peer's start state (fetched over `gossiptrain/audit/1`, checked against the committed
   digest) on the committed data and vote, signed, under `{run}.votes.{peer}.{round}`.
   Reserves step in, one per vote timeout, for members that have not voted.
4. verdict — anyone reads the votes: 2 of 3 rejects flag the peer. A flagged peer is
   excluded from pairing, its requests are refused and its tensors dropped.

Every DHT read and write is bounded by the DHT timeout, every stream read by the I/O
timeout, and the audit loop polls with a deadline; nothing here can stall training
beyond one replay on the trainer thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from protocol import (
    AuditOffer,
    AuditRequest,
    ExchangeReject,
    InvalidField,
    ProtocolError,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    TensorSpec,
)
from protocol.records import MAX_RECEIPTS, commit_key, receipts_key, votes_key
from protocol.verification import (
    ACCEPT,
    COMMITTEE_SIZE,
    MAX_ATTESTATION_SKEW,
    REJECT,
    Attestation,
    Commitment,
    Comparison,
    InvalidRecord,
    Receipt,
    Tolerances,
    Vote,
    attestation_is_timely,
    audit_seed,
    committee_ranking,
    compare,
    decide,
    envelope,
    is_sampled,
    nonce_commitment,
    open_envelope,
    receipt_is_current,
    signing_bytes,
    stand_in_rank,
)

from node.metrics import NodeMetrics
from node.net import identity as ident
from node.net.dht import DHTUnavailable
from node.net.membership import Membership
from node.net.stream_service import Incoming, StreamService, StreamSettings, open_stream
from node.net.tensor_stream import flat_spec, offer_tensors, request_tensors
from node.tasks import BackgroundTasks
from node.train.trainer import START_TENSORS, RoundStart, Trainer, outgoing_tensors
from node.verify.lsh import UpdateSigner
from node.verify.replay import (
    Replayer,
    ReplayError,
    describe_start,
    sent_digest,
    start_digest,
    start_from_wire,
)

logger = logging.getLogger(__name__)

AUDIT_PROTOCOL = "gossiptrain/audit/1"
POLL_INTERVAL = 1.0
MAX_RESERVES = 2
MAX_AUDITS_PER_POLL = 64  # bounds one poll's work whatever the DHT returns
# start states are kept for audit_window rounds and at least this long after the round was committed and after
# its last attestation: enough for the receipt of a drawn round to reach the audited peer, which then keeps that
# state until the audit is over. Above MAX_RECEIPT_AGE + MAX_ATTESTATION_SKEW (protocol/verification.py): a receipt
# older than that is no audit, so an honest peer never has to answer `no_state` to one.
RETAIN_MIN_SECONDS = 40.0


@dataclass(frozen=True)
class VerifySettings:
    stream: StreamSettings
    inner_steps: int
    rate: float
    tolerances: Tolerances
    vote_timeout: float
    audit_window: int
    record_ttl: float
    lsh_seed: int
    trusted: frozenset[str] = frozenset()  # `--trusted-peer`s: only they sit on committees (empty: every eligible peer)

    @property
    def run_id(self) -> str:
        """The run whose records (commitments, receipts, votes) are verified."""
        return self.stream.run_id


SENT_PREFIX = "sent."

# A verifier ranks the committee over its own view of the live peers; the audited peer checks a requester
# against its view, which may hold a few peers more (just joined, not yet expired): this many places spare.
AUDIT_RANK_SLACK = 2
# A peer sits on the committee of an audit only if it entered our live view at least this long before the audited
# exchange (the sender's attested time): identities made after the exchange, when its lottery seed could be known,
# cannot be seated, however well their keys were ground to rank first. The margin covers an audited sender whose
# clock runs a little ahead (NTP keeps clocks well within it; `doctor` measures skew).
ELIGIBLE_BEFORE_EXCHANGE = 3.0
SERVE_SLACK = 20.0  # the audited peer's cutoff is this much later than the verifiers' (see _audit_refusal)


def may_fetch_audit(seed: bytes, requester: str, candidates: set[str], audited: str) -> bool:
    """May `requester` fetch the start state of the audit with `seed`: is it on the committee or a reserve
    (with AUDIT_RANK_SLACK places spare), ranking `candidates` (this node's live view, flagged peers out)?"""
    if requester not in candidates or requester == audited:
        return False
    ranking = committee_ranking(seed, candidates, audited)
    return ranking.index(requester) < COMMITTEE_SIZE + MAX_RESERVES + AUDIT_RANK_SLACK


@dataclass(frozen=True)
class Judgement:
    verdict: str
    comparison: Comparison | None  # replay vs sent update under the audit's own projection
    reason: str


def sent_update(phi_start: np.ndarray, sent: dict[str, np.ndarray]) -> torch.Tensor:
    """Δ as sent: θ − φ_start (or, when γ ≠ β, the sent φ + Δ − φ_start), from the tensors sent (unprefixed)."""
    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.float32))

    theta = tensor(sent["theta"]) if "theta" in sent else tensor(sent["phi"]) + tensor(sent["delta_update"])
    return theta - tensor(phi_start)


def audit_signer(numel: int, seed: bytes) -> UpdateSigner:
    """A projection drawn from the audit seed: unknown to the peer when it committed, so nothing it
    sent can hide in this projection's null space (the run-wide one is public)."""
    return UpdateSigner(numel, int.from_bytes(seed[:8], "big"))


def make_commitment(run_id: str, peer: str, round_: int, start: RoundStart, outgoing: dict[str, np.ndarray],
                    update: torch.Tensor | None, signer: UpdateSigner, inner_steps: int,
                    ) -> tuple[Commitment, dict[str, np.ndarray]]:
    """A round's commitment (unsigned) and the tensors its peer must serve to verifiers. `update`: the
    update to sign; None (always, but for test-only fault injection): the update as sent, from `outgoing`."""
    tensors, data = describe_start(start)
    if update is None:
        update = sent_update(tensors["phi"], outgoing)
    commitment = Commitment(
        run_id=run_id, peer=peer, round=round_, start_digest=start_digest(tensors, data, start.global_step),
        theta_digest=sent_digest(outgoing), data=data, global_step=start.global_step, inner_steps=inner_steps,
        update=signer.sign(update),
    )
    return commitment, {**tensors, **{SENT_PREFIX + name: array for name, array in outgoing.items()}}


def audit_fetch_limit(wire: StreamSettings, tensors: int) -> float:
    """A bound no audit download of `tensors` float32 tensors can outlive: their bytes at the minimum transfer
    rate, plus I/O timeouts for the request and the offer. Each wait is bounded by progress anyway (a stalled
    or trickling peer is cut after about one I/O timeout); a fixed total would cut a large model's audit on a
    slow but working link (a 19M model's 5 tensors are 384 MB: 154 s at 20 Mbit/s)."""
    return wire.rate.seconds_for(4 * wire.numel * tensors) + 3 * wire.io_timeout


def replayed_as_sent(tensors: dict[str, np.ndarray], replayed: torch.Tensor, wire_dtype: str,
                     reference: np.ndarray | None = None) -> torch.Tensor:
    """The replayed update as the audited peer would have sent it: its outgoing tensors rebuilt from the
    replay like the trainer builds them, through the run's wire dtype (a no-op for float32; blockwise8
    against the swarm's `reference`, as the trainer codes it)."""
    if wire_dtype == "float32":
        return replayed
    phi = torch.from_numpy(np.asarray(tensors["phi"], dtype=np.float32))
    outgoing = outgoing_tensors(phi, phi + replayed, SENT_PREFIX + "theta" in tensors, wire_dtype, reference)
    return sent_update(tensors["phi"], outgoing)


def judge_audit(commitment: Commitment, seed: bytes, tensors: dict[str, np.ndarray], replayer: Replayer,
                run_signer: UpdateSigner, tolerances: Tolerances, inner_steps: int,
                wire_dtype: str = "float32", reference: np.ndarray | None = None) -> Judgement:
    """A verifier's verdict on one audited round, from what the peer served (start state and sent tensors).

    1. The served start state must hash to the committed start digest, the served sent tensors
       to the committed sent digest (the one its partner checked on receipt).
    2. The committed LSH signature must describe the update actually sent (else the peer
       committed to one update and sent another).
    3. The round is replayed on the committed data (and rounded to the wire dtype as the peer's
       sent tensors were); the sent update and the replay are signed with a projection drawn from
       the audit seed and compared against the tolerances.
    """
    sent = {name[len(SENT_PREFIX):]: array for name, array in tensors.items() if name.startswith(SENT_PREFIX)}
    if start_digest(tensors, commitment.data, commitment.global_step) != commitment.start_digest:
        return Judgement(REJECT, None, "start state does not match the committed digest")
    if sent_digest(sent) != commitment.theta_digest:
        return Judgement(REJECT, None, "sent tensors do not match the committed digest")
    if commitment.inner_steps != inner_steps:
        return Judgement(REJECT, None, f"committed {commitment.inner_steps} inner steps, the run uses {inner_steps}")
    delta_sent = sent_update(tensors["phi"], sent)
    committed = compare(commitment.update, run_signer.sign(delta_sent), tolerances)
    if not committed.ok:
        return Judgement(REJECT, committed, "committed signature does not describe the sent update")
    try:
        start = start_from_wire(tensors, commitment.data, commitment.global_step, replayer.numel)
        replayed = replayed_as_sent(tensors, replayer.replay(start, commitment.inner_steps).cpu(), wire_dtype,
                                    reference)
    except ReplayError as error:
        return Judgement(REJECT, None, f"cannot replay: {error}")
    signer = audit_signer(delta_sent.numel(), seed)
    comparison = compare(signer.sign(delta_sent), signer.sign(replayed), tolerances)
    if not comparison.ok:
        return Judgement(REJECT, comparison, "exceeds " + ",".join(comparison.failed))
    return Judgement(ACCEPT, comparison, "")


def receipt_blobs(entries: Any) -> Iterator[tuple[str, Any]]:
    """(receiver, envelope) for every receipt under {run}.audits: one entry per receiver, its recent receipts."""
    for receiver, entry in entries.items() if isinstance(entries, dict) else ():
        blobs = getattr(entry, "value", None)
        if isinstance(receiver, str) and isinstance(blobs, list):
            for blob in blobs[:MAX_RECEIPTS]:
                yield receiver, blob


@dataclass
class Audit:
    peer: str
    round: int
    seed: bytes
    commitment: Commitment
    first_seen: float
    exchanged_at: float = 0.0  # the receipt's attested time: committee seats go to peers live before it
    voted: bool = False
    verdict: str | None = None
    unavailable_since: float | None = None  # the start state could not be fetched since then
    votes: dict[str, Vote] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """A round's commitment with what is sent to the partner and served to its auditors (from the trainer thread)."""

    commitment: Commitment
    outgoing: dict[str, np.ndarray]
    served: dict[str, np.ndarray]
    seconds: float


@dataclass
class RetainedStart:
    tensors: dict[str, np.ndarray]  # the start state (START_TENSORS) and the sent tensors ("sent.<name>")
    digest: str
    created: float
    theta_digest: str = ""  # of the tensors sent (what our attestations name)
    attested: float = 0.0  # monotonic time of our last attestation of this round (0: none)


class Verification:
    def __init__(
        self,
        p2p: P2P,
        membership: Membership,
        metrics: NodeMetrics,
        identity: ident.Identity,
        settings: VerifySettings,
        trainer: Trainer,
        replayer: Replayer,
        compute: Callable[..., Awaitable[Any]],
        background: BackgroundTasks,
    ) -> None:
        self.background = background
        self.p2p, self.membership, self.metrics, self.identity = p2p, membership, metrics, identity
        self.settings, self.trainer, self.replayer, self.compute = settings, trainer, replayer, compute
        self.me = identity.peer_id
        self.started_at = get_dht_time()  # our own committee eligibility counts from here
        self.signer = UpdateSigner(settings.stream.numel, settings.lsh_seed, device="cpu")
        self.retained: dict[int, RetainedStart] = {}
        self.audits: dict[tuple[str, int], Audit] = {}
        self.flagged: dict[str, str] = {}  # peer -> evidence
        self.distrusted: set[str] = set()  # peers caught by this node sending what they did not commit
        self._commitments: dict[tuple[str, int], Commitment] = {}
        self._own_audits: dict[int, float] = {}  # our rounds drawn for audit -> when we saw the receipt
        self._ignored: set[bytes] = set()  # digests of receipts under {run}.audits that failed validation
        self.keys = {"audits": receipts_key(settings.run_id)}
        # our receipts still published (when stored, signed receipt), newest last: all of them are our one
        # entry under {run}.audits (subkey: our peer id), re-stored whole, with an ever later expiration
        self._receipts: list[tuple[float, bytes]] = []
        self._receipts_expiration = 0.0
        self.stopping = False
        self.service = StreamService(p2p, AUDIT_PROTOCOL, AuditRequest, settings.stream, metrics, "audit",
                                     serve=self._serve_audit, failed=self._audit_upload_failed)

    @property
    def audit_tensors(self) -> tuple[str, ...]:
        """What an audited peer serves: its start state, then the tensors it sent its partner."""
        return START_TENSORS + tuple(SENT_PREFIX + name for name in self.trainer.tensor_names())

    def _commit_key(self, round_: int) -> str:
        return commit_key(self.settings.run_id, round_)

    def _votes_key(self, peer: str, round_: int) -> str:
        return votes_key(self.settings.run_id, peer, round_)

    async def start(self) -> None:
        await self.service.start()

    def excluded(self) -> set[str]:
        """Peers this node will not pair with or take tensors from."""
        return set(self.flagged) | self.distrusted

    # ------------------------------------------------------------------ 1. commit
    def _prepare(self, round_: int, committed_update: torch.Tensor | None) -> Prepared | None:
        """On the trainer thread: this round's commitment and what it sends and serves, or None if it
        cannot be committed. Reads the trainer only; the loop does the bookkeeping (see `commit`)."""
        started = time.perf_counter()
        start = self.trainer.round_start
        if start is None or not self.trainer.round_complete:
            return None  # resumed mid-round: the start state is gone, so the round cannot be audited
        outgoing = self.trainer.outgoing_tensors()  # as they arrive: the update signed is the one sent
        commitment, served = make_commitment(self.settings.run_id, self.me, round_, start, outgoing,
                                             committed_update, self.signer, self.settings.inner_steps)
        return Prepared(commitment, outgoing, served, time.perf_counter() - started)

    def _prune_retained(self) -> None:
        """Keep the start states of the last `audit_window` rounds, and of older rounds drawn for audit
        until their audit is over. (A round's receipt appears seconds after its exchange, so a round
        not drawn by then never will be; the peer learns it was drawn only after it was bound.)"""
        now = time.monotonic()
        horizon = self.give_up_seconds
        self._own_audits = {r: seen for r, seen in self._own_audits.items() if now - seen < horizon}
        for old in sorted(self.retained)[: -self.settings.audit_window]:
            retained = self.retained[old]
            if old not in self._own_audits and now - max(retained.created, retained.attested) > RETAIN_MIN_SECONDS:
                del self.retained[old]

    @property
    def give_up_seconds(self) -> float:
        """An audit with no majority this long after it was drawn is abandoned (undecided)."""
        return (MAX_RESERVES + 2) * self.settings.vote_timeout

    async def commit(self, round_: int, committed_update: torch.Tensor | None = None) -> dict[str, np.ndarray] | None:
        """Publish this round's signed commitment; returns the tensors to send (None: do not pair this round).

        committed_update: test-only fault injection ("+hide"): the update to sign instead of the one sent."""
        prepared = await self.prepare(round_, committed_update)
        return None if prepared is None else await self.publish(prepared)

    async def prepare(self, round_: int, committed_update: torch.Tensor | None = None) -> Prepared | None:
        """The first half of `commit`, no network: the commitment, made on the trainer thread from the round's
        state (so before the outer step moves it), and the start state kept for audits. None: not committed."""
        prepared = await self.compute(self._prepare, round_, committed_update)
        if prepared is None:
            self.metrics.commitments.labels(result="skipped").inc()
            logger.info("round %d was resumed mid-way: its start state is gone, so it is not committed "
                        "and not paired", round_)
            return None
        self.retained[round_] = RetainedStart(prepared.served, prepared.commitment.start_digest, time.monotonic(),
                                              prepared.commitment.theta_digest)
        self._prune_retained()
        self.metrics.verify_compute_seconds.inc(prepared.seconds)
        return prepared

    async def publish(self, prepared: Prepared) -> dict[str, np.ndarray] | None:
        """The second half of `commit`: sign and store the commitment in the DHT. Returns the tensors to send;
        None if it was not stored (then the round is not paired). `overlap on` runs it in the background."""
        commitment = prepared.commitment
        blob = envelope(commitment, self.identity.sign(signing_bytes(commitment)))
        stored = await self.membership.client.store(self._commit_key(commitment.round), blob,
                                                    get_dht_time() + self.settings.record_ttl, subkey=self.me)
        self.metrics.commitments.labels(result="ok" if stored else "failed").inc()
        if not stored:
            logger.warning("commitment for round %d was not stored: this round is not paired", commitment.round)
            return None
        return prepared.outgoing

    # ------------------------------------------------------------------ 2. receive
    async def _commitment(self, peer: str, round_: int) -> Commitment | None:
        cached = self._commitments.get((peer, round_))
        if cached is not None:
            return cached
        entries = await self.membership.client.fetch(self._commit_key(round_))
        entry = entries.get(peer) if isinstance(entries, dict) else None
        if entry is None:
            return None
        try:
            commitment, signature = open_envelope(entry.value, Commitment)
        except InvalidRecord as error:
            self.metrics.protocol_errors.labels(kind=error.kind).inc()
            logger.warning("commitment of %s for round %d is malformed: %s", peer[-8:], round_, error)
            return None
        if (commitment.peer != peer or commitment.round != round_ or commitment.run_id != self.settings.run_id
                or not ident.verify(peer, signing_bytes(commitment), signature)):
            self.metrics.protocol_errors.labels(kind="record").inc()
            logger.warning("commitment under %s for round %d is not signed by it: ignored", peer[-8:], round_)
            return None
        if len(self._commitments) > 4096:
            self._commitments.clear()
        self._commitments[(peer, round_)] = commitment
        return commitment

    def attest(self, partner: str, round_: int, their_commitment: bytes) -> bytes:
        """Our signed word to `partner`, at the end of an exchange, on what we sent it for our round `round_`,
        naming its nonce commitment (from its ExchangeRequest / ExchangeAccept): it travels in our ExchangeAck and
        the partner's receipt carries its signature. Empty if that round was not committed (then the partner will
        not apply our tensors anyway) or the partner sent no commitment. The round's start state is kept at least
        RETAIN_MIN_SECONDS from now: an audit drawn on this exchange finds it."""
        retained = self.retained.get(round_)
        if retained is None or not retained.theta_digest or len(their_commitment) != 32:
            return b""
        retained.attested = time.monotonic()
        attestation = Attestation(self.settings.run_id, self.me, partner, round_, retained.theta_digest,
                                  get_dht_time(), their_commitment.hex())
        return envelope(attestation, self.identity.sign(signing_bytes(attestation)))

    def _attestation(self, partner: str, partner_round: int, received: str, blob: bytes,
                     nonce: bytes) -> tuple[Attestation, bytes] | None:
        """(the partner's attestation, its signature) if it is the partner's, for this exchange (us, its round, the
        digest that arrived, the commitment to our `nonce`), made within MAX_ATTESTATION_SKEW of our clock; else None."""
        try:
            attestation, signature = open_envelope(blob, Attestation)
        except InvalidRecord:
            return None
        expected = (self.settings.run_id, partner, self.me, partner_round, received, nonce_commitment(nonce))
        if (attestation.run_id, attestation.sender, attestation.receiver, attestation.round, attestation.theta_digest,
                attestation.nonce_commitment) != expected or not attestation_is_timely(attestation.time, get_dht_time()):
            return None
        return (attestation, signature) if ident.verify(partner, signing_bytes(attestation), signature) else None

    async def accept_update(self, partner: str, partner_round: int, tensors: dict[str, np.ndarray],
                            attestation: bytes = b"", nonce: bytes = b"") -> bool:
        """May the partner's tensors be applied? Also draws the audit lottery for them. `attestation` is the
        partner's signed word on what it sent (from its ExchangeAck), `nonce` our lottery nonce for this exchange
        (committed to in our request or accept): without a valid, timely attestation of that commitment nothing
        could ever audit this update, so it is not applied."""
        if partner in self.flagged or partner in self.distrusted:
            self.metrics.updates_refused.labels(reason="flagged").inc()
            logger.warning("dropped the update of flagged peer %s", partner[-8:])
            return False
        try:
            commitment = await self._commitment(partner, partner_round)
        except DHTUnavailable as error:
            logger.warning("cannot read %s's commitment (%s): its update is not applied", partner[-8:], error)
            commitment = None
        if commitment is None:
            self.metrics.updates_refused.labels(reason="no_commitment").inc()
            logger.warning("%s sent an update for round %d without a signed commitment: not applied",
                           partner[-8:], partner_round)
            return False
        received = await asyncio.to_thread(sent_digest, tensors)
        if received != commitment.theta_digest:
            self.metrics.updates_refused.labels(reason="digest_mismatch").inc()
            self.distrusted.add(partner)
            logger.error("%s sent tensors that differ from its signed commitment for round %d: not applied, and "
                         "this node will not pair with it again", partner[-8:], partner_round)
            return False
        attested = self._attestation(partner, partner_round, received, attestation, nonce)
        if attested is None:
            self.metrics.updates_refused.labels(reason="no_attestation").inc()
            logger.warning("%s sent no valid attestation of its round %d update (signed, for us, for what arrived, "
                           "its clock within %.0f s of ours): not applied", partner[-8:], partner_round,
                           MAX_ATTESTATION_SKEW)
            return False
        attested, signature = attested
        receipt = Receipt(self.settings.run_id, partner, self.me, partner_round, received, nonce.hex(), attested.time,
                          signature)
        seed = audit_seed(self.settings.run_id, partner, partner_round, commitment.digest(), receipt.lottery_nonce())
        if is_sampled(seed, self.settings.rate):
            self._publish_receipt(envelope(receipt, self.identity.sign(signing_bytes(receipt))))
            logger.info("round %d of %s drawn for audit", partner_round, partner[-8:])
        return True

    def _publish_receipt(self, blob: bytes) -> None:
        """Store our receipts entry under {run}.audits: our latest MAX_RECEIPTS receipts younger than the record
        TTL, this one included. Built now, stored in the background: a later store carries a superset and a
        later expiration, so whichever lands last is the newest."""
        now = get_dht_time()
        kept = [(at, old) for at, old in self._receipts if now - at < self.settings.record_ttl]
        self._receipts = [*kept, (now, blob)][-MAX_RECEIPTS:]
        self._receipts_expiration = max(now + self.settings.record_ttl, self._receipts_expiration + 0.01)
        self.background.spawn(self.membership.client.store(
            self.keys["audits"], [b for _, b in self._receipts], self._receipts_expiration, subkey=self.me))

    # ------------------------------------------------------------------ 3. serve and run audits
    async def _serve_audit(self, incoming: Incoming, request: AuditRequest) -> None:
        """A request from its authenticated sender (StreamService counts, reports and closes). Only a member
        (or reserve) of the committee of an audit drawn on that round gets the start state."""
        retained = self.retained.get(request.round)
        wire = self.settings.stream
        if request.run_id != wire.run_id or request.manifest_hash != wire.manifest_hash:
            reason = "manifest"
        elif self.stopping:
            reason = "shutting_down"
        elif retained is None:
            reason = "no_state"
        else:
            reason = await self._audit_refusal(incoming.peer, request.round)
        if reason is not None:
            await incoming.stream.send(ExchangeReject(reason=reason, round=request.round))
            self.metrics.audit_uploads.labels(result="not_committee" if reason == "bad_request" else "refused").inc()
            if reason == "bad_request":
                logger.info("refused the start state of round %d to %s: not on the committee of an audit drawn "
                            "on it", request.round, incoming.peer[-8:])
            return
        offer = AuditOffer(round=request.round, start_digest=retained.digest, tensors=tuple(retained.tensors),
                           numel=wire.numel, dtype="float32")
        await offer_tensors(incoming.stream, offer, retained.tensors, wire.chunk_bytes)
        self.metrics.audit_uploads.labels(result="ok").inc()
        logger.info("served the start state of round %d to verifier %s", request.round, incoming.peer[-8:])

    async def _audit_refusal(self, peer: str, round_: int) -> str | None:
        """None if `peer` may fetch our start state of `round_`; else the reject reason: `bad_request` for a
        peer on no committee of an audit drawn on that round, `busy` when the DHT did not answer."""
        live = set(self.membership.live) - {self.me}
        if peer not in live:
            return "bad_request"  # a verifier is a live peer (a new one: it asks again in a second)
        try:
            drawn = await self._drawn_audit_seeds(round_)
        except DHTUnavailable:
            return "busy"
        # served generously: with the cutoff SERVE_SLACK later than the verifiers' own, so a verifier that is seated
        # in its view (it saw itself start before we saw it) is never turned away and made to vote reject
        return None if any(may_fetch_audit(seed, peer, self.eligible(live, exchanged_at + SERVE_SLACK), self.me)
                           for seed, exchanged_at in drawn) else "bad_request"

    async def _drawn_audit_seeds(self, round_: int) -> list[tuple[bytes, float]]:
        """(seed, attested exchange time) of the audits drawn on our round `round_`: one per valid receipt for it
        under {run}.audits (signed by its receiver and by us, for the tensors we committed to, drawn by the lottery)."""
        commitment = await self._commitment(self.me, round_)
        if commitment is None:
            return []
        run_id, seeds = self.settings.run_id, []
        for receiver, blob in receipt_blobs(await self.membership.client.fetch(self.keys["audits"])):
            try:
                receipt, signature = open_envelope(blob, Receipt)
            except InvalidRecord:
                continue
            if (receipt.sender != self.me or receipt.round != round_ or receipt.theta_digest != commitment.theta_digest
                    or not self._signed_by_receiver(receipt, receiver, signature)):
                continue
            seed = audit_seed(run_id, self.me, round_, commitment.digest(), receipt.lottery_nonce())
            if is_sampled(seed, self.settings.rate):
                seeds.append((seed, receipt.sent_at))
        return seeds

    def _signed_by_receiver(self, receipt: Receipt, receiver: str, signature: bytes) -> bool:
        """A receipt of this run, published under its receiver's own entry, signed by it, and carrying the
        sender's attestation of that very exchange (nobody can publish a receipt for an exchange that did not
        happen: the sender signs at the end of each exchange)."""
        return (receipt.receiver == receiver and receipt.run_id == self.settings.run_id
                and ident.verify(receiver, signing_bytes(receipt), signature)
                and ident.verify(receipt.sender, signing_bytes(receipt.attested()), receipt.attestation))


    def _audit_upload_failed(self, incoming: Incoming, error: Exception) -> None:
        self.metrics.audit_uploads.labels(result="failed").inc()
        if isinstance(error, ProtocolError):
            logger.warning("audit request from %s: protocol error: %s", incoming.peer[-8:], error)
        else:  # the verifier vanished or stalled
            logger.info("audit upload to %s failed: %s", incoming.peer[-8:], error or type(error).__name__)

    def _check_offer(self, offer: AuditOffer, round_: int) -> list[TensorSpec]:
        """The offer, checked before accepting a single byte of tensor data; the tensors to receive."""
        numel = self.settings.stream.numel
        if offer.round != round_ or tuple(offer.tensors) != self.audit_tensors:
            raise InvalidField(f"audit offer for round {offer.round} with tensors {list(offer.tensors)}")
        if offer.numel != numel:
            raise TensorShapeMismatch(f"audit offer of {offer.numel} parameters, model has {numel}")
        if offer.dtype != "float32":
            raise TensorDtypeMismatch(f"audit offer of dtype {offer.dtype!r}")
        return [flat_spec(name, numel) for name in self.audit_tensors]

    async def _fetch_start(self, peer: str, round_: int) -> tuple[str, dict[str, np.ndarray]]:
        """The audited peer's start state of `round_`: (digest it claims, tensors). Raises on any failure."""
        wire = self.settings.stream
        stream = await open_stream(self.p2p, peer, AUDIT_PROTOCOL, wire, self.metrics, "audit")
        try:
            request = AuditRequest(run_id=wire.run_id, manifest_hash=wire.manifest_hash, sender=self.me, round=round_)
            offer, received = await request_tensors(stream, request, AuditOffer,
                                                    lambda offer: self._check_offer(offer, round_),
                                                    lambda reason: ReplayError(f"refused: {reason}"),
                                                    chunk_bytes=wire.chunk_bytes)
            return offer.start_digest, received
        finally:
            stream.close()

    def _judge(self, commitment: Commitment, seed: bytes, tensors: dict[str, np.ndarray]) -> Judgement:
        """On the trainer thread (immutable inputs only): replay and judge, timed as verification compute."""
        started = time.perf_counter()
        try:
            return judge_audit(commitment, seed, tensors, self.replayer, self.signer,
                               self.settings.tolerances, self.settings.inner_steps, self.settings.stream.wire_dtype,
                               self.trainer.wire_reference)
        finally:
            seconds = time.perf_counter() - started
            self.metrics.replay_seconds.observe(seconds)
            self.metrics.verify_compute_seconds.inc(seconds)

    async def _audit(self, audit: Audit) -> None:
        """Replay the audited round and publish this node's signed vote."""
        peer, round_ = audit.peer, audit.round
        comparison, reason, verdict = None, "", REJECT
        try:
            # (asyncio.timeout, not wait_for: no inner task whose late failure nobody retrieves on shutdown)
            async with asyncio.timeout(audit_fetch_limit(self.settings.stream, len(self.audit_tensors))):
                claimed, tensors = await self._fetch_start(peer, round_)
        except Exception as error:  # noqa: BLE001 - refused, gone, frozen, malformed
            explicit = isinstance(error, (ProtocolError, ReplayError))  # it answered, but not with the state
            if isinstance(error, ProtocolError):
                self.metrics.protocol_errors.labels(kind=error.kind).inc()
            now = time.monotonic()
            if audit.unavailable_since is None:
                audit.unavailable_since = now
            if now - audit.unavailable_since < self.settings.vote_timeout / 2:
                audit.voted = False  # maybe a passing glitch: ask again at the next poll
                logger.info("audit of %s round %d: start state not fetched (%s); retrying", peer[-8:], round_,
                            error or type(error).__name__)
                return
            if not explicit or peer not in self.membership.live:
                # unreachable or silent: it may have crashed or left (or be frozen); an honest peer can
                # look exactly like this, so no vote. Reserves may still reach it.
                logger.info("audit of %s round %d: the peer did not answer (%s); not voting", peer[-8:], round_,
                            error or type(error).__name__)
                return
            # live and answering, yet unable or unwilling to show the state it committed to
            reason = f"start state refused by a live peer: {error}"
        else:
            if claimed != audit.commitment.start_digest:
                reason = "offered start state is not the committed one"
            else:
                judgement = await self.compute(self._judge, audit.commitment, audit.seed, tensors)
                verdict, comparison, reason = judgement.verdict, judgement.comparison, judgement.reason
        vote = Vote(self.settings.run_id, peer, round_, self.me, verdict, reason[:200],
                    comparison.hamming if comparison else 1.0, comparison.rel_l2 if comparison else 1e30,
                    comparison.norm_ratio if comparison else 1e30)
        blob = envelope(vote, self.identity.sign(signing_bytes(vote)))
        await self.membership.client.store(self._votes_key(peer, round_), blob,
                                           get_dht_time() + self.settings.record_ttl, subkey=self.me)
        audit.votes[self.me] = vote
        self.metrics.verifications.labels(verdict=verdict).inc()
        evidence = comparison.evidence(self.settings.tolerances) if comparison else reason
        log = logger.warning if verdict == REJECT else logger.info
        log("audit of %s round %d: vote %s (%s)", peer[-8:], round_, verdict, evidence)

    # ------------------------------------------------------------------ 4. verdicts
    async def _read_votes(self, audit: Audit) -> None:
        entries = await self.membership.client.fetch(self._votes_key(audit.peer, audit.round))
        for verifier, entry in (entries or {}).items() if isinstance(entries, dict) else ():
            if verifier in audit.votes or not isinstance(verifier, str):
                continue
            try:
                vote, signature = open_envelope(entry.value, Vote)
            except InvalidRecord:
                self.metrics.protocol_errors.labels(kind="record").inc()
                continue
            if (vote.verifier != verifier or vote.peer != audit.peer or vote.round != audit.round
                    or not ident.verify(verifier, signing_bytes(vote), signature)):
                self.metrics.protocol_errors.labels(kind="record").inc()
                continue
            audit.votes[verifier] = vote

    def eligible(self, peers: set[str], exchanged_at: float) -> set[str]:
        """Who of `peers` may sit on the committee of an audit of an exchange made at `exchanged_at`: trusted (when
        `--trusted-peer`s are set), not flagged, and live in our view since ELIGIBLE_BEFORE_EXCHANGE before it. A
        voter that was seated keeps its seat after it leaves; a key never live before the exchange never gets one."""
        since = self.membership.live_since
        cutoff = exchanged_at - ELIGIBLE_BEFORE_EXCHANGE
        trusted = self.settings.trusted
        return {peer for peer in peers - set(self.flagged)
                if since.get(peer, self.started_at if peer == self.me else math.inf) <= cutoff
                and (not trusted or peer in trusted)}

    def _ranking(self, audit: Audit) -> list[str]:
        candidates = self.eligible(set(self.membership.live) | {self.me} | set(audit.votes), audit.exchanged_at)
        return committee_ranking(audit.seed, candidates, audit.peer)

    def _conclude(self, audit: Audit, verdict: str, ranking: list[str]) -> None:
        audit.verdict = verdict
        self.metrics.audit_verdicts.labels(verdict=verdict).inc()
        voters = [peer for peer in ranking[:5] if peer in audit.votes][:3]
        evidence = "; ".join(
            f"{v[-8:]}: {audit.votes[v].verdict} ({audit.votes[v].reason or 'within tolerances'}; hamming "
            f"{audit.votes[v].hamming:.4f}, rel-L2 {audit.votes[v].rel_l2:.4g}, norm ratio "
            f"{audit.votes[v].norm_ratio:.4g})" for v in voters)
        tol = self.settings.tolerances
        if verdict == REJECT:
            if audit.peer not in self.flagged:
                self.flagged[audit.peer] = evidence
                self.metrics.peers_flagged.set(len(self.flagged))
                logger.error("FLAGGED %s: round %d rejected by a verifier majority [%s] (tolerances: hamming %.3f, "
                             "rel-L2 %.3f, norm ratio %.3f); no longer pairing with it", audit.peer, audit.round,
                             evidence, tol.max_hamming, tol.max_rel_l2, tol.max_norm_ratio)
        else:
            logger.info("audit of %s round %d: accepted by a verifier majority [%s]", audit.peer[-8:], audit.round,
                        evidence)

    async def _discover(self) -> None:
        """Read the sampled (peer, round) pairs and start tracking new ones.

        `{run}.audits` holds one entry per receiver (subkey: its peer id, signed by it, checked by the
        DHT's record validator): the list of its recent receipts."""
        examined = 0
        for receiver, blob in receipt_blobs(await self.membership.client.fetch(self.keys["audits"])):
            if examined >= MAX_AUDITS_PER_POLL:
                return  # the rest waits for the next pass
            marker = hashlib.blake2b(blob, digest_size=16).digest() if isinstance(blob, bytes) else None
            if marker is None or marker in self._ignored:
                continue
            try:
                receipt, signature = open_envelope(blob, Receipt)
            except InvalidRecord:
                self._ignore(marker)
                continue
            peer, round_ = receipt.sender, receipt.round
            if (peer, round_) in self.audits:
                continue
            if peer == self.me and receipt.receiver == receiver:
                # one of our rounds was drawn: keep its start state until the audit is over
                self._own_audits.setdefault(round_, time.monotonic())
                continue
            if peer in self.flagged:
                continue
            examined += 1
            if peer == receiver or not self._signed_by_receiver(receipt, receiver, signature):
                self._ignore(marker)
                continue
            if not receipt_is_current(receipt.sent_at, get_dht_time()):
                # published (or first seen) after the sender may have let the round's state go: not an audit.
                # (Withholding a genuine receipt and publishing it late cannot get an honest peer flagged.)
                self._ignore(marker, bad=False)
                continue
            commitment = await self._commitment(peer, round_)
            if commitment is None or commitment.theta_digest != receipt.theta_digest:
                continue  # not visible yet (tried again next poll) or a receipt for other tensors
            seed = audit_seed(self.settings.run_id, peer, round_, commitment.digest(), receipt.lottery_nonce())
            if not is_sampled(seed, self.settings.rate):
                self._ignore(marker)  # a receipt published although the lottery said no: not an audit
                continue
            self.audits[(peer, round_)] = Audit(peer, round_, seed, commitment, time.monotonic(), receipt.sent_at)

    def _ignore(self, marker: bytes, bad: bool = True) -> None:
        """A bad (counted once) or stale receipt (by the digest of its bytes): not re-read every pass."""
        if bad:
            self.metrics.protocol_errors.labels(kind="record").inc()
        if len(self._ignored) > 10_000:
            self._ignored.clear()
        self._ignored.add(marker)

    def _decide(self, audit: Audit) -> str | None:
        """Conclude the audit if its votes decide it; returns the verdict (None: pending)."""
        ranking = self._ranking(audit)
        verdict = decide({v: vote.verdict for v, vote in audit.votes.items()}, ranking, MAX_RESERVES)
        if verdict is not None:
            self._conclude(audit, verdict, ranking)
        return verdict

    def _pending(self) -> list[Audit]:
        pending = []
        for audit in self.audits.values():
            if audit.verdict is None and audit.peer in self.flagged:
                audit.verdict = REJECT  # already excluded; nothing left to decide
            elif audit.verdict is None:
                pending.append(audit)
        return pending

    async def tally(self) -> None:
        """Discover drawn audits and conclude what the votes cast so far decide (cheap DHT reads only)."""
        await self._discover()
        now = time.monotonic()
        for audit in self._pending()[:MAX_AUDITS_PER_POLL]:
            if self.stopping:
                return
            await self._read_votes(audit)
            if self._decide(audit) is None and now - audit.first_seen > self.give_up_seconds:
                audit.verdict = "undecided"
                self.metrics.audit_verdicts.labels(verdict="undecided").inc()
                logger.warning("audit of %s round %d: no majority after %.0fs (%d votes)", audit.peer[-8:],
                               audit.round, self.give_up_seconds, len(audit.votes))
        if len(self.audits) > 10_000:  # forget old concluded audits (their records expire anyway)
            for key in [k for k, a in self.audits.items() if a.verdict is not None][:5_000]:
                del self.audits[key]

    async def poll(self) -> None:
        """One pass of the audit loop: cast the votes this node owes (replays, the slow part)."""
        for audit in self._pending()[:MAX_AUDITS_PER_POLL]:
            if self.stopping:
                return
            if audit.verdict is not None or audit.voted or self.me in audit.votes:
                continue
            ranking = self._ranking(audit)
            if stand_in_rank(ranking, audit.votes, self.me, time.monotonic() - audit.first_seen,
                             self.settings.vote_timeout):
                audit.voted = True
                await self._audit(audit)
                self._decide(audit)

    async def run(self) -> None:
        """The verification loops (background tasks of the daemon). Discovering drawn audits and
        tallying votes run on their own, so a slow audit (a replay, a silent peer) never delays a
        flag, nor learning that one of our own rounds was drawn (we must then keep its start state)."""
        await asyncio.gather(self._loop(self.tally, "tally"), self._loop(self.poll, "audit"))

    async def _loop(self, step: Callable[[], Awaitable[None]], name: str) -> None:
        while not self.stopping:
            try:
                await step()  # every DHT call and stream read in it has its own timeout
            except (DHTUnavailable, TimeoutError) as error:
                logger.info("verification %s: %s", name, error or type(error).__name__)
            except Exception:  # noqa: BLE001 - a bug in one pass must not end verification
                logger.exception("verification %s failed", name)
            await asyncio.sleep(POLL_INTERVAL)
