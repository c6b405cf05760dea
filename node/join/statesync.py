"""State sync: a joining node downloads the swarm's current φ, δ and round from a live donor.

Protocol `gossiptrain/state/1` (protocol/SPEC.md, "State sync"): the joiner sends a
StateRequest; the donor refuses (ExchangeReject: busy, manifest, shutting_down,
no_state) or sends a StateOffer and then φ and δ as checksummed chunked tensor
transfers; the joiner acks, so the donor closes only after everything arrived.

Donor side: the state served is the one the trainer published at its last round
boundary. φ and δ are replaced there, never mutated in place, so the donor streams
straight from them: no copy, and a round finishing meanwhile cannot tear the state.
A donor serves at most `max_uploads` joiners at a time, at most one upload to each requester
(a joiner downloads from one donor at a time, so one identity cannot hold every slot), and
refuses the rest as busy. An upload lives while its bytes flow: a joiner that stalls or reads
slower than the minimum transfer rate loses its slot after about one I/O timeout.

Joiner side: the receive buffers are allocated once and every chunk is written
straight into them (the state is never held twice). A state that arrived is vetted before it is
adopted (the joiner's held-out loss check, node/join/procedure.py); a refused one is counted and
the next donor is tried, and that donor is not asked again. Each read is bounded by the I/O
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
from hivemind.p2p import P2P

from protocol import (
    ExchangeReject,
    InvalidField,
    ProtocolError,
    StateOffer,
    StateRequest,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    TensorSpec,
)

from node.metrics import NodeMetrics
from node.net.limits import ConcurrencyLimiter
from node.net.stream_service import Incoming, StreamService, StreamSettings, open_stream
from node.net.tensor_stream import flat_spec, offer_tensors, request_tensors

logger = logging.getLogger(__name__)

STATE_PROTOCOL = "gossiptrain/state/1"
STATE_TENSORS = ("phi", "momentum")
RETRY_PAUSE = 1.0  # between two passes over the donor list
UPLOADS_PER_REQUESTER = 1  # upload slots one requester may hold at once


StateSyncSettings = StreamSettings  # state sync needs nothing beyond the settings every stream protocol shares


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
        self.slots = ConcurrencyLimiter(UPLOADS_PER_REQUESTER, max_uploads)
        self.stopping = False
        self.service = StreamService(p2p, STATE_PROTOCOL, StateRequest, settings, metrics, "state",
                                     serve=self._serve, failed=self._failed)

    async def start(self) -> None:
        await self.service.start()

    @property
    def uploads(self) -> int:
        """Uploads running now."""
        return self.slots.open_total

    def _refusal(self, request: StateRequest) -> str | None:
        if request.run_id != self.settings.run_id or request.manifest_hash != self.settings.manifest_hash:
            return "manifest"
        if self.stopping:
            return "shutting_down"
        return None

    async def _serve(self, incoming: Incoming, request: StateRequest) -> None:
        """A request from its authenticated sender (StreamService counts, reports and closes)."""
        state = self.get_state()
        reason = self._refusal(request) or (None if state is not None else "no_state")
        if reason is None and self.slots.admit(incoming.peer) is not None:
            reason = "busy"  # every slot taken, or this requester holds its share already
        if reason is not None:
            await incoming.stream.send(ExchangeReject(reason=reason, round=state.round if state else 0))
            self.metrics.state_uploads.labels(result="refused").inc()
            return
        try:
            started = time.monotonic()
            offer = StateOffer(
                round=state.round, global_step=state.global_step, manifest_hash=self.settings.manifest_hash,
                tensors=STATE_TENSORS, numel=self.settings.numel, dtype="float32",
            )
            tensors = {"phi": state.slow, "momentum": state.momentum}
            await offer_tensors(incoming.stream, offer, tensors, self.settings.chunk_bytes)
        finally:
            self.slots.release(incoming.peer)
        self.metrics.state_uploads.labels(result="ok").inc()
        logger.info("sent state of round %d to joiner %s in %.2fs", state.round, incoming.peer[-8:],
                    time.monotonic() - started)

    def _failed(self, incoming: Incoming, error: Exception) -> None:
        self.metrics.state_uploads.labels(result="failed").inc()
        if isinstance(error, ProtocolError):
            logger.warning("state request from %s: protocol error: %s", incoming.peer[-8:], error)
        else:  # the joiner vanished or stalled; it will ask someone else
            logger.info("state upload to %s failed: %s", incoming.peer[-8:], error or type(error).__name__)


def _check_offer(offer: StateOffer, settings: StateSyncSettings) -> list[TensorSpec]:
    """The offer, checked before accepting a single byte of tensor data; the tensors to receive."""
    if offer.manifest_hash != settings.manifest_hash:
        raise InvalidField(f"donor offers state of manifest {offer.manifest_hash[:12]}, ours is "
                           f"{settings.manifest_hash[:12]}")
    if tuple(offer.tensors) != STATE_TENSORS:
        raise InvalidField(f"donor offers tensors {list(offer.tensors)}, expected {list(STATE_TENSORS)}")
    if offer.numel != settings.numel:
        raise TensorShapeMismatch(f"donor offers {offer.numel} parameters, this model has {settings.numel}")
    if offer.dtype != "float32":
        raise TensorDtypeMismatch(f"donor offers dtype {offer.dtype!r}, expected float32")
    return [flat_spec(name, settings.numel) for name in STATE_TENSORS]


async def _fetch(
    p2p: P2P, donor: str, settings: StateSyncSettings, metrics: NodeMetrics, me: str, buffers: dict[str, bytearray]
) -> tuple[StateOffer, dict[str, np.ndarray]]:
    stream = await open_stream(p2p, donor, STATE_PROTOCOL, settings, metrics, "state")
    try:
        request = StateRequest(run_id=settings.run_id, manifest_hash=settings.manifest_hash, sender=me)
        return await request_tensors(stream, request, StateOffer, lambda offer: _check_offer(offer, settings),
                                     DonorRefused, buffers, settings.chunk_bytes)
    finally:
        stream.close()


async def download_state(
    p2p: P2P,
    settings: StateSyncSettings,
    metrics: NodeMetrics,
    donors: Callable[[], Awaitable[list[str]]],
    timeout: float,
    vet: Callable[[dict[str, np.ndarray]], Awaitable[str | None]] | None = None,
) -> SyncedState:
    """Download φ and δ from the first donor that delivers a state `vet` passes; `donors()` gives the order to try.

    Donors are tried one by one, and the list is re-read for each pass, until the deadline. `vet` returns why a
    delivered state must not be adopted (None: adopt it); such a donor is not asked again.
    Raises StateSyncError with every attempt's outcome if none delivered in time.
    """
    me = p2p.peer_id.to_base58()
    started = time.monotonic()
    deadline = started + timeout
    nbytes = settings.numel * 4
    buffers = {name: bytearray(nbytes) for name in STATE_TENSORS}  # reused across donors: held once
    attempts: list[tuple[str, str]] = []
    refused: set[str] = set()  # donors whose state failed `vet`
    for _pass in range(10_000):  # bounded by the deadline long before this
        candidates = await asyncio.wait_for(donors(), max(0.1, deadline - time.monotonic()))
        for donor in (d for d in candidates if d not in refused):
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
                problem = None if vet is None else await vet(received)
                if problem is None:
                    seconds = time.monotonic() - started
                    return SyncedState(donor, offer.round, offer.global_step, received["phi"], received["momentum"],
                                       seconds, 2 * nbytes, attempts)
                refused.add(donor)
                metrics.states_refused.inc()
                attempts.append((donor, f"state refused: {problem}"))
                logger.warning("state from %s refused: %s", donor[-8:], problem)
            logger.info("state sync from %s failed (%s); trying the next donor", donor[-8:], attempts[-1][1])
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        await asyncio.sleep(min(RETRY_PAUSE, remaining))  # every donor refused or failed: pause, re-read the view
    tried = "; ".join(f"{donor[-8:]}: {outcome}" for donor, outcome in attempts[-6:]) or "no donor was live"
    raise StateSyncError(f"no donor delivered the swarm state within {timeout:.0f}s ({tried})")
