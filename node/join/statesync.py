"""State sync: a joining node downloads the swarm's current φ, δ and round from a live donor.

Protocol `gossiptrain/state/1` (protocol/SPEC.md, "State sync"): the joiner sends a
StateRequest; the donor refuses (ExchangeReject: busy, manifest, shutting_down,
no_state) or sends a StateOffer and then φ and δ as checksummed chunked tensor
transfers; the joiner acks, so the donor closes only after everything arrived.

Donor side: the state served is the one the trainer published at its last round
boundary. φ and δ are replaced there, never mutated in place, so the donor streams
straight from them: no copy, and a round finishing meanwhile cannot tear the state.
A donor serves at most `max_uploads` joiners at a time and refuses the rest as busy.

Joiner side: the receive buffers are allocated once and every chunk is written
straight into them (the state is never held twice). Each read is bounded by the I/O
timeout, so a donor that dies or stalls mid-transfer costs at most that before the
joiner moves on to the next donor; the whole download is bounded by its own deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from hivemind.p2p import P2P, PeerID

from protocol import (
    ExchangeAck,
    ExchangeReject,
    InvalidField,
    ProtocolError,
    StateOffer,
    StateRequest,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    TruncatedFrame,
)

from node.net.tensor_stream import flat_spec, receive_tensors, send_tensors
from node.metrics import NodeMetrics
from node.net.streams import FrameStream

logger = logging.getLogger(__name__)

STATE_PROTOCOL = "gossiptrain/state/1"
STATE_TENSORS = ("phi", "momentum")
RETRY_PAUSE = 1.0  # between two passes over the donor list


@dataclass(frozen=True)
class StateSyncSettings:
    run_id: str
    manifest_hash: str
    numel: int
    io_timeout: float
    max_frame_bytes: int
    chunk_bytes: int


@dataclass(frozen=True)
class DonorState:
    """What a donor serves: its state at its last round boundary."""

    round: int
    global_step: int
    slow: np.ndarray
    momentum: np.ndarray


@dataclass(frozen=True)
class SyncedState:
    donor: str
    round: int
    global_step: int
    slow: np.ndarray
    momentum: np.ndarray
    seconds: float
    nbytes: int
    attempts: list[tuple[str, str]] = field(default_factory=list)  # (donor, what went wrong), before success


class StateSyncError(RuntimeError):
    """No donor delivered the swarm's state before the deadline."""


class DonorRefused(RuntimeError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


def _stream(reader, writer, settings: StateSyncSettings, metrics: NodeMetrics) -> FrameStream:
    return FrameStream(
        reader, writer, max_frame_bytes=settings.max_frame_bytes, io_timeout=settings.io_timeout,
        on_sent=metrics.bytes_sent.labels(kind="state").inc, on_received=metrics.bytes_received.labels(kind="state").inc,
    )


class StateServer:
    """Serves this node's state to joiners (registered on every node once it has a state)."""

    def __init__(
        self,
        p2p: P2P,
        settings: StateSyncSettings,
        metrics: NodeMetrics,
        get_state: Callable[[], DonorState | None],
        max_uploads: int,
    ) -> None:
        self.p2p, self.settings, self.metrics = p2p, settings, metrics
        self.get_state = get_state
        self.max_uploads = max_uploads
        self.uploads = 0
        self.stopping = False

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(STATE_PROTOCOL, self._handle)

    def _refusal(self, request: StateRequest) -> str | None:
        if request.run_id != self.settings.run_id or request.manifest_hash != self.settings.manifest_hash:
            return "manifest"
        if self.stopping:
            return "shutting_down"
        if self.uploads >= self.max_uploads:
            return "busy"
        return None

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = _stream(reader, writer, self.settings, self.metrics)
        sender = info.peer_id.to_base58()  # authenticated by libp2p
        uploads = self.metrics.state_uploads
        try:
            request = await stream.recv(StateRequest)
            if request.sender != sender:
                raise InvalidField(f"request claims sender {request.sender[:16]!r} but came from {sender}")
            state = self.get_state()
            reason = self._refusal(request) or (None if state is not None else "no_state")
            if reason is not None:
                await stream.send(ExchangeReject(reason=reason, round=state.round if state else 0))
                uploads.labels(result="refused").inc()
                return
            self.uploads += 1
            try:
                started = time.monotonic()
                await stream.send(StateOffer(
                    round=state.round, global_step=state.global_step, manifest_hash=self.settings.manifest_hash,
                    tensors=STATE_TENSORS, numel=self.settings.numel, dtype="float32",
                ))
                await send_tensors(stream, {"phi": state.slow, "momentum": state.momentum}, self.settings.chunk_bytes)
                await stream.recv(ExchangeAck)
            finally:
                self.uploads -= 1
            uploads.labels(result="ok").inc()
            logger.info("sent state of round %d to joiner %s in %.2fs", state.round, sender[-8:],
                        time.monotonic() - started)
        except ProtocolError as error:
            self.metrics.protocol_errors.labels(kind=error.kind).inc()
            uploads.labels(result="failed").inc()
            logger.warning("state request from %s: protocol error: %s", sender[-8:], error)
            if not isinstance(error, TruncatedFrame):
                await stream.send_error(error)
        except Exception as error:  # noqa: BLE001 - the joiner vanished or stalled; it will ask someone else
            uploads.labels(result="failed").inc()
            logger.info("state upload to %s failed: %s", sender[-8:], error or type(error).__name__)
        finally:
            stream.close()


async def _fetch(
    p2p: P2P, donor: str, settings: StateSyncSettings, metrics: NodeMetrics, me: str, buffers: dict[str, bytearray]
) -> tuple[StateOffer, dict[str, np.ndarray]]:
    _info, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(donor), STATE_PROTOCOL), settings.io_timeout)
    stream = _stream(reader, writer, settings, metrics)
    try:
        await stream.send(StateRequest(run_id=settings.run_id, manifest_hash=settings.manifest_hash, sender=me))
        reply = await stream.recv((StateOffer, ExchangeReject))
        if isinstance(reply, ExchangeReject):
            raise DonorRefused(reply.reason)
        # check the offer before accepting a single byte of tensor data
        if reply.manifest_hash != settings.manifest_hash:
            raise InvalidField(f"donor offers state of manifest {reply.manifest_hash[:12]}, ours is "
                               f"{settings.manifest_hash[:12]}")
        if tuple(reply.tensors) != STATE_TENSORS:
            raise InvalidField(f"donor offers tensors {list(reply.tensors)}, expected {list(STATE_TENSORS)}")
        if reply.numel != settings.numel:
            raise TensorShapeMismatch(f"donor offers {reply.numel} parameters, this model has {settings.numel}")
        if reply.dtype != "float32":
            raise TensorDtypeMismatch(f"donor offers dtype {reply.dtype!r}, expected float32")
        specs = [flat_spec(name, settings.numel) for name in STATE_TENSORS]
        received = await receive_tensors(stream, specs, buffers)
        try:  # everything arrived and checked out: the ack only tells the donor it may close
            await stream.send(ExchangeAck(ok=True, reason=""))
        except Exception as error:  # noqa: BLE001 - the state is complete either way
            logger.debug("state ack to %s failed: %s", donor[-8:], error)
        return reply, received
    finally:
        stream.close()


async def download_state(
    p2p: P2P,
    settings: StateSyncSettings,
    metrics: NodeMetrics,
    donors: Callable[[], Awaitable[list[str]]],
    timeout: float,
) -> SyncedState:
    """Download φ and δ from the first donor that delivers; `donors()` gives the order to try.

    Donors are tried one by one, and the list is re-read for each pass, until the deadline.
    Raises StateSyncError with every attempt's outcome if none delivered in time.
    """
    me = p2p.peer_id.to_base58()
    started = time.monotonic()
    deadline = started + timeout
    nbytes = settings.numel * 4
    buffers = {name: bytearray(nbytes) for name in STATE_TENSORS}  # reused across donors: held once
    attempts: list[tuple[str, str]] = []
    for _pass in range(10_000):  # bounded by the deadline long before this
        candidates = await asyncio.wait_for(donors(), max(0.1, deadline - time.monotonic()))
        for donor in candidates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    offer, received = await _fetch(p2p, donor, settings, metrics, me, buffers)
            except DonorRefused as error:
                attempts.append((donor, str(error)))
                continue
            except ProtocolError as error:
                metrics.protocol_errors.labels(kind=error.kind).inc()
                attempts.append((donor, f"protocol error: {error}"))
            except Exception as error:  # noqa: BLE001 - dead, frozen or unreachable donor: try the next
                attempts.append((donor, f"{type(error).__name__}: {error}"))
            else:
                seconds = time.monotonic() - started
                return SyncedState(donor, offer.round, offer.global_step, received["phi"], received["momentum"],
                                   seconds, 2 * nbytes, attempts)
            logger.info("state sync from %s failed (%s); trying the next donor", donor[-8:], attempts[-1][1])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(RETRY_PAUSE, remaining))  # every donor refused or failed: pause, re-read the view
    tried = "; ".join(f"{donor[-8:]}: {outcome}" for donor, outcome in attempts[-6:]) or "no donor was live"
    raise StateSyncError(f"no donor delivered the swarm state within {timeout:.0f}s ({tried})")
