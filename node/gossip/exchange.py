"""Random-pair gossip: matchmaking and the pair exchange at each round boundary.

A node whose round is done marks itself ready in the DHT and, until its sync deadline,
asks uniformly random ready peers to pair. It is in at most one exchange at a time:
 - while it waits, an incoming request is accepted (the requester becomes the partner);
 - while its own request to X is in flight, a request from anyone but X is refused as
   busy, and a crossing request from X itself is accepted only if X's peer id is the
   lower one; X applies the same rule, so exactly one of the two requests wins.
When the deadline passes without a completed exchange the round ends alone (local
outer step).

The deadline (`sync_timeout`) bounds the partner SEARCH only: dialing, the request and its
reply. Once a partner accepted, the exchange is not cut by it: it lives while its bytes flow
(every wait on the partner bounded by the I/O timeout and the minimum transfer rate, its acks
by `ack_timeout`), so a large model on a slow but working link completes, and a frozen or
trickling partner costs about one I/O timeout. Both sides run the same bounds, and each applies
the average only after both acks. A partner that broke an exchange by its own doing (too slow,
stalled, invalid data) is not paired with for a while (node/gossip/health.py: Penalties), and a
node whose exchanges keep failing says why in its log and its metrics. No step here waits
without a timeout.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hivemind.p2p import P2P

from protocol import (
    ExchangeAccept,
    ExchangeReject,
    ExchangeRequest,
    InvalidField,
    ProtocolError,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    TensorSpec,
    TruncatedFrame,
    codecs,
)
from protocol.verification import nonce_commitment

from node.gossip.health import ExchangeHealth, ExchangeRecord, Penalties
from node.gossip.pairing import PairingState, choose_partner, could_pair, partner_to_avoid, refusal_reason
from node.metrics import NodeMetrics
from node.net.membership import Membership
from node.net.stream_service import Incoming, StreamService, StreamSettings, open_stream
from node.net.streams import FrameStream, PeerTimeout, TransferTooSlow
from node.net.tensor_stream import IN_FLIGHT_BYTES, ExchangeAborted, confirm, transfer_tensors
from node.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

EXCHANGE_PROTOCOL = "gossiptrain/exchange/2"
POLL_INTERVAL = 0.2  # how often a waiting node re-reads the ready set


@dataclass(frozen=True)
class SyncOutcome:
    partner: str | None
    tensors: dict[str, np.ndarray] | None
    seconds: float
    partner_round: int | None = None
    attestation: bytes = b""  # the partner's signed word on what it sent (verification on; see `Gossip.attest`)
    nonce: bytes = b""  # our audit-lottery nonce for the partner's tensors, committed to before the transfer


@dataclass(frozen=True)
class GossipSettings:
    stream: StreamSettings
    tensor_names: tuple[str, ...]
    max_staleness: int
    reference: np.ndarray | None = None  # what blockwise8 weights are coded against (protocol/codecs.py)


def classify_failure(error: BaseException) -> str:
    """Map an exchange failure to its exchanges_total{result} label."""
    if isinstance(error, TruncatedFrame):
        return "peer_gone"  # a crash mid-chunk looks exactly like this; still counted as a protocol error
    if isinstance(error, ProtocolError):
        return "protocol_error"
    if isinstance(error, TransferTooSlow):
        return "too_slow"
    if isinstance(error, (PeerTimeout, asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(error, ExchangeAborted):
        return "aborted"
    return "peer_gone"


def partner_at_fault(error: BaseException) -> bool:
    """Did the partner break the exchange (too slow, stalled, invalid data), rather than vanish or hit our deadline?"""
    return isinstance(error, (PeerTimeout, ProtocolError)) and not isinstance(error, TruncatedFrame)


class Gossip:
    def __init__(
        self,
        p2p: P2P,
        membership: Membership,
        metrics: NodeMetrics,
        settings: GossipSettings,
        rng: random.Random,
        background: BackgroundTasks,
    ) -> None:
        self.p2p = p2p
        self.membership = membership
        self.metrics = metrics
        self.settings = settings
        self.peer_id = membership.peer_id
        self.rng = rng
        self.stopping = False
        # state of the current round boundary; None while training
        self._round: int | None = None
        self._outgoing: dict[str, np.ndarray] | None = None
        self._deadline = 0.0
        self._prefer_new_until = 0.0  # until then this round's search avoids the last partner
        self._last_partner: str | None = None  # of the last completed exchange
        self._paired: asyncio.Future | None = None
        # at most one exchange at a time: our request in flight, our accepted outgoing exchange,
        # or an accepted incoming one
        self._requesting: str | None = None
        self._outgoing_exchange = False
        self._incoming_task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self.background = background
        # peers never paired with (flagged by verifiers): set by the daemon when verification is on
        self.excluded: Callable[[], set[str]] = set
        # our signed attestation of what we send `partner` for our `round`, naming the partner's nonce commitment
        # (verification on; else empty): it travels in our ExchangeAck, and the partner's receipt carries it
        # (protocol/verification.py Attestation)
        self.attest: Callable[[str, int, bytes], bytes] = lambda partner, round_, their_commitment: b""
        self.service = StreamService(p2p, EXCHANGE_PROTOCOL, ExchangeRequest, settings.stream, metrics, "exchange",
                                     serve=self._serve_request, failed=self._incoming_failed,
                                     closed=self._incoming_closed)
        self.health = ExchangeHealth(window=10, min_rate=settings.stream.min_transfer_rate)
        self.penalties = Penalties()
        metrics.exchange_completion_ratio.set(self.health.completion_ratio)

    async def start(self) -> None:
        await self.service.start()

    def stop(self) -> None:
        """Leaving: refuse new requests, end the partner search now (an exchange under way finishes)."""
        self.stopping = True
        self._wakeup.set()

    def _expected_specs(self) -> list[TensorSpec]:
        wire = self.settings.stream
        shape = (codecs.wire_numel(wire.numel, wire.wire_dtype),)
        return [TensorSpec(name, wire.wire_dtype, shape) for name in self.settings.tensor_names]

    @property
    def exchange_bytes(self) -> int:
        """Tensor bytes each way of one exchange (in the run's wire dtype)."""
        wire = self.settings.stream
        return codecs.wire_bytes(wire.numel, wire.wire_dtype) * len(self.settings.tensor_names)

    async def _decode(self, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The partner's tensors, from the wire dtype back to float32 (protocol/codecs.py), before we ack them:
        blockwise8's scales and values are validated here (ProtocolError), bfloat16 is exact."""
        dtype, reference = self.settings.stream.wire_dtype, self.settings.reference
        if dtype == "float32":
            return received
        return await asyncio.to_thread(lambda: {name: codecs.decode(array, dtype, codecs.reference_for(name, reference))
                                                for name, array in received.items()})

    async def _encode(self, outgoing: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Our tensors (already rounded to the wire dtype by the trainer, so this loses nothing) in the wire dtype."""
        dtype, reference = self.settings.stream.wire_dtype, self.settings.reference
        if dtype == "float32":
            return outgoing
        return await asyncio.to_thread(lambda: {name: codecs.encode(a, dtype, codecs.reference_for(name, reference))
                                                for name, a in outgoing.items()})

    def exchange_limit(self) -> float:
        """A bound no accepted exchange can outlive (each of its waits is bounded by progress): its bytes at
        the minimum transfer rate, what may be in flight of them, and its I/O timeouts."""
        wire = self.settings.stream
        return wire.rate.seconds_for(int(self.exchange_bytes * 1.01) + IN_FLIGHT_BYTES) + 3 * wire.io_timeout

    @property
    def _in_exchange(self) -> bool:
        return self._outgoing_exchange or (self._incoming_task is not None and not self._incoming_task.done())

    @property
    def _busy(self) -> bool:
        return self._requesting is not None or self._in_exchange

    # ------------------------------------------------------------------ round boundary
    async def sync_round(self, round_: int, outgoing: dict[str, np.ndarray], timeout: float,
                         prefer_new_for: float = 0.0) -> SyncOutcome:
        """Find one partner within `timeout` and exchange with it, or give up (partner None).

        `timeout` bounds the search; an exchange accepted before it runs to its end, bounded by its
        progress (a stalled or too slow partner costs about one I/O timeout), not by `timeout`.
        For the first `prefer_new_for` seconds the last partner is neither asked nor accepted while another
        live peer could pair (pairing.partner_to_avoid).
        """
        started = time.monotonic()
        if not self._could_pair(round_):
            # nobody live can pair with this round (alone, or everyone is too far away): waiting is useless
            self.metrics.exchanges.labels(result="no_partner").inc()
            return SyncOutcome(None, None, time.monotonic() - started)
        outgoing = await self._encode(outgoing)
        self._round, self._outgoing = round_, outgoing
        self._deadline = started + timeout
        self._prefer_new_until = started + prefer_new_for
        self._paired = paired = asyncio.get_running_loop().create_future()
        tried: set[tuple[str, int]] = set()  # (peer, its ready round): asked once per announcement
        try:
            await asyncio.wait_for(self.membership.announce_ready(round_, ttl=timeout), timeout)
            while not paired.done() and (remaining := self._deadline - time.monotonic()) > 0:
                if self.stopping and not self._busy:
                    break  # leaving: no new pairing; an exchange already under way is finished first
                if self._busy:
                    await self._wait_for_news(remaining)
                    continue
                ready = await asyncio.wait_for(self.membership.ready_peers(), remaining)
                if paired.done() or self._busy:
                    continue
                exclude = {peer for peer, their_round in ready.items() if (peer, their_round) in tried}
                exclude |= self.excluded() | self.penalties.active(time.monotonic())
                if (avoid := self._avoiding(round_)) is not None:
                    exclude.add(avoid)
                partner = choose_partner(ready, round_, exclude, self.settings.max_staleness, self.rng)
                if partner is None:
                    await self._wait_for_news(min(POLL_INTERVAL, remaining))
                    continue
                # a refusing peer is not hammered; it is asked again once it announces a new round
                tried.add((partner, ready[partner]))
                received = await self._request(partner, round_)
                if received is not None and not paired.done():
                    paired.set_result((partner, *received))
        except TimeoutError:
            pass
        finally:
            await self._settle_incoming()
            self._round, self._outgoing = None, None
            self.background.spawn(self.membership.withdraw_ready(round_))
        elapsed = time.monotonic() - started
        if paired.done():
            partner, tensors, partner_round, attestation, nonce = paired.result()
            return SyncOutcome(partner, tensors, elapsed, partner_round, attestation, nonce)
        self.metrics.exchanges.labels(result="no_partner").inc()
        return SyncOutcome(None, None, elapsed)

    async def _settle_incoming(self) -> None:
        """At the deadline: an accepted incoming exchange runs to its end (bounded by its progress)."""
        incoming = self._incoming_task
        if incoming is None or incoming.done():
            return
        await asyncio.wait({incoming}, timeout=self.exchange_limit())
        if not incoming.done():  # cannot happen unless a bound above fails: never wait past the limit
            incoming.cancel()
            await asyncio.gather(incoming, return_exceptions=True)

    async def _wait_for_news(self, timeout: float) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    def _avoiding(self, round_: int | None) -> str | None:
        """Our last partner while this round's search still prefers another one (pairing.partner_to_avoid)."""
        if round_ is None or time.monotonic() >= self._prefer_new_until:
            return None
        live = {peer: record.round for peer, record in self.membership.live.items()}
        return partner_to_avoid(self._last_partner, live, round_, self.excluded(), self.settings.max_staleness)

    def _could_pair(self, round_: int) -> bool:
        excluded = self.excluded()
        rounds = (peer.round for peer_id, peer in self.membership.live.items() if peer_id not in excluded)
        return could_pair(rounds, round_, self.settings.max_staleness)

    async def _request(self, partner: str, round_: int) -> tuple[dict[str, np.ndarray], int, bytes, bytes] | None:
        """Ask `partner` to pair; on accept run the exchange. Returns (its tensors, its round, its attestation, our
        lottery nonce) or None."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            return None
        self._requesting = partner
        stream: FrameStream | None = None
        wire = self.settings.stream
        nonce = secrets.token_bytes(16)  # our audit-lottery nonce for the partner's tensors: committed to now
        try:
            async with asyncio.timeout(remaining):  # the search: dial, request, reply
                stream = await open_stream(self.p2p, partner, EXCHANGE_PROTOCOL, wire, self.metrics, "exchange")
                await stream.send(ExchangeRequest(
                    run_id=wire.run_id, manifest_hash=wire.manifest_hash, round=round_,
                    sender=self.peer_id, tensors=self.settings.tensor_names, numel=wire.numel,
                    dtype=wire.wire_dtype, nonce_commitment=bytes.fromhex(nonce_commitment(nonce)),
                ))
                reply = await stream.recv((ExchangeAccept, ExchangeReject))
            if isinstance(reply, ExchangeReject) or self._paired.done() or self._in_exchange:
                # (_in_exchange: a crossing request from this partner won, we serve that one instead)
                self.metrics.exchanges.labels(result="rejected").inc()
                logger.debug("%s refused pairing: %s", partner[-8:], getattr(reply, "reason", "paired meanwhile"))
                return None
            if abs(reply.round - round_) > self.settings.max_staleness:
                raise InvalidField(f"partner accepted with round {reply.round}, ours is {round_}")
            self._requesting, self._outgoing_exchange = None, True
            # accepted: from here on the exchange lives while its bytes flow, the search deadline does not cut it
            accepted = time.monotonic()
            received = await self._decode(
                await transfer_tensors(stream, self._outgoing, self._expected_specs(), wire.chunk_bytes))
            attestation = await confirm(stream, self.attest(partner, round_, reply.nonce_commitment))
            self._record_success(partner, stream, time.monotonic() - accepted)
            return received, reply.round, attestation, nonce
        except ProtocolError as error:
            self.metrics.protocol_errors.labels(kind=error.kind).inc()
            self._record_failure(partner, error, stream)
            if stream is not None and not isinstance(error, TruncatedFrame):
                await stream.send_error(error)
        except Exception as error:  # noqa: BLE001 - timeout, peer gone, p2pd dial errors: the round goes on
            self._record_failure(partner, error, stream)
        finally:
            self._requesting, self._outgoing_exchange = None, False
            if stream is not None:
                stream.close()
        return None

    def _record_success(self, partner: str, stream: FrameStream, seconds: float) -> None:
        self._last_partner = partner
        self.metrics.exchanges.labels(result="ok").inc()
        self.metrics.exchange_seconds.observe(seconds)
        self.penalties.forgive(partner)
        self._observe(partner, "ok", stream)

    def _record_failure(self, partner: str, error: BaseException, stream: FrameStream | None = None) -> None:
        result = classify_failure(error)
        self.metrics.exchanges.labels(result=result).inc()
        how_long = ""
        if partner_at_fault(error):
            how_long = f"; not pairing with it for {self.penalties.punish(partner, time.monotonic()):.0f}s"
        logger.info("exchange with %s failed (%s): %s%s", partner[-8:], result, error or type(error).__name__, how_long)
        self._observe(partner, result, stream)

    def _observe(self, partner: str, result: str, stream: FrameStream | None) -> None:
        """An accepted exchange ended (one that got to its transfer): the bytes/s and completion gauges, and a
        diagnosis in the log when most of the last ones failed."""
        transfer = stream.last_received if stream is not None else None
        if transfer is None:
            return  # refused, unreachable, or the search ended before the transfer: not an exchange that failed
        record = ExchangeRecord(result, self.exchange_bytes, transfer.bytes, transfer.elapsed)
        if record.rate is not None:
            self.metrics.exchange_bytes_per_second.set(record.rate)
        diagnosis = self.health.record(record)
        self.metrics.exchange_completion_ratio.set(self.health.completion_ratio)
        if diagnosis is not None:
            logger.warning("pair exchanges keep failing: %s", diagnosis)

    # ------------------------------------------------------------------ incoming requests
    async def _serve_request(self, incoming: Incoming, request: ExchangeRequest) -> None:
        """A request from its authenticated sender (StreamService counts, reports and closes)."""
        self._validate_request(request)
        refusal = self._refusal(request)
        if refusal is not None:
            round_ = self._round if self._round is not None else 0
            await incoming.stream.send(ExchangeReject(reason=refusal, round=round_))
            return
        exchange = incoming.task = self._incoming_task = asyncio.ensure_future(
            self._serve_exchange(incoming.stream, incoming.peer, request.round, self._paired, request.nonce_commitment)
        )
        try:
            await exchange
        except asyncio.CancelledError:
            if not exchange.cancelled() or asyncio.current_task().cancelling():
                raise  # we are shutting down, not just abandoning this exchange
            self.metrics.exchanges.labels(result="timeout").inc()

    def _incoming_failed(self, incoming: Incoming, error: Exception) -> None:
        if incoming.task is not None:  # the exchange had started
            self._record_failure(incoming.peer, error, incoming.stream)
        elif isinstance(error, ProtocolError):
            logger.warning("protocol error from %s: %s", incoming.peer[-8:], error)
        else:  # peer gone / timeout
            logger.debug("incoming stream from %s failed before a request: %s", incoming.peer[-8:], error)

    def _incoming_closed(self, incoming: Incoming) -> None:
        if incoming.task is None:
            return  # refused: nothing changed for the partner search
        if self._incoming_task is incoming.task:
            self._incoming_task = None
        self._wakeup.set()

    async def _serve_exchange(self, stream: FrameStream, sender: str, their_round: int, paired: asyncio.Future,
                              their_commitment: bytes) -> None:
        """Accepted: the exchange lives while its bytes flow (the search deadline does not cut it)."""
        accepted, round_ = time.monotonic(), self._round
        nonce = secrets.token_bytes(16)  # our audit-lottery nonce for the requester's tensors: committed to now
        await stream.send(ExchangeAccept(round=round_, nonce_commitment=bytes.fromhex(nonce_commitment(nonce))))
        received = await self._decode(
            await transfer_tensors(stream, self._outgoing, self._expected_specs(), self.settings.stream.chunk_bytes))
        attestation = await confirm(stream, self.attest(sender, round_, their_commitment))
        self._record_success(sender, stream, time.monotonic() - accepted)
        if not paired.done():
            paired.set_result((sender, received, their_round, attestation, nonce))

    def _validate_request(self, request: ExchangeRequest) -> None:
        """A request for tensors this run does not have is malformed input, not a polite refusal."""
        numel, dtype = self.settings.stream.numel, self.settings.stream.wire_dtype
        if request.dtype != dtype:
            raise TensorDtypeMismatch(f"exchange dtype {request.dtype!r}, this run's wire dtype is {dtype}")
        if request.numel != numel:
            raise TensorShapeMismatch(f"exchange of {request.numel} parameters, this model has {numel}")
        if tuple(request.tensors) != self.settings.tensor_names:
            raise InvalidField(f"tensors {list(request.tensors)} != {list(self.settings.tensor_names)}")

    def _refusal(self, request: ExchangeRequest) -> str | None:
        """Why this request cannot be served now (None: accept it)."""
        state = PairingState(
            me=self.peer_id,
            round=self._round,
            paired=self._paired is None or self._paired.done(),
            in_exchange=self._in_exchange,
            requesting=self._requesting,
            deadline_passed=time.monotonic() >= self._deadline,
            stopping=self.stopping,
            avoiding=self._avoiding(self._round),
        )
        if request.sender in self.excluded():
            return "flagged"
        if self.penalties.blocked(request.sender, time.monotonic()):
            return "busy"  # it broke an exchange with us lately (too slow, stalled, invalid data)
        wire = self.settings.stream
        same_manifest = request.run_id == wire.run_id and request.manifest_hash == wire.manifest_hash
        return refusal_reason(state, request.sender, request.round, same_manifest, self.settings.max_staleness)
