"""Request/reply protocols over p2pd streams: their shared settings, the server side and the client side.

Gossip exchanges (`gossiptrain/exchange/2`), state sync (`gossiptrain/state/1`) and audits
(`gossiptrain/audit/1`) run alike (protocol/SPEC.md §1, §7):
 - a stream carries FrameStream frames: control frames (requests, replies, acks) of at most
   MAX_CONTROL_FRAME_BYTES, tensor transfers' frames of at most `max_frame_bytes`; every read and
   drain is bounded by the I/O timeout, a transfer also by the minimum transfer rate (it lives
   while its bytes flow, node/net/limits.py), and its bytes are counted under bytes_sent/received{kind};
 - the server admits at most `max_streams_per_peer` open streams per peer and `max_streams` in all
   (every protocol of the node together: one ConcurrencyLimiter per P2P instance, `stream_limiter`):
   a stream over a cap is told `busy` and closed before a byte of it is read, and counted under
   streams_refused{reason};
 - the dialer (open_stream) opens the stream within the I/O timeout and sends one request
   that names its own peer id; the server (StreamService) refuses the request as a protocol
   error unless that claim is the stream's peer, which libp2p authenticated;
 - on the server, a ProtocolError is counted under protocol_errors{kind} and told to the peer
   in an ErrorMessage (unless the stream ended inside a frame: nobody is left to tell); every
   failure, that one or any other (PeerGone, PeerTimeout, RemoteError, ...), goes to the
   protocol's own `failed` callback (its metrics, its log line), and the stream is always closed;
 - every incoming stream is counted once, under incoming_streams{kind, result}: served, protocol_error,
   timeout, peer_gone, remote_error, failed or busy (refused by a cap).
What a protocol does with a valid request stays in its own module.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2P, PeerID

from protocol import (
    MAX_CONTROL_FRAME_BYTES,
    ExchangeReject,
    InvalidField,
    ProtocolError,
    TruncatedFrame,
    encode_frame,
    encode_message,
)

from node.config import NodeConfig
from node.net.limits import ConcurrencyLimiter, RateRule
from node.net.streams import FrameStream, RemoteError

if TYPE_CHECKING:
    from node.metrics import NodeMetrics

logger = logging.getLogger(__name__)

# told to a stream refused by a cap, before its request is read: every protocol's requester takes an ExchangeReject
_BUSY_FRAME = encode_frame(encode_message(ExchangeReject(reason="busy", round=0)))


@dataclass(frozen=True)
class StreamSettings:
    """What every stream protocol of a node shares: its run, manifest and model size, and the wire limits."""

    run_id: str
    manifest_hash: str
    numel: int
    io_timeout: float
    max_frame_bytes: int
    chunk_bytes: int
    min_transfer_rate: float = NodeConfig.min_transfer_rate
    max_streams_per_peer: int = NodeConfig.max_streams_per_peer
    max_streams: int = NodeConfig.max_streams
    wire_dtype: str = NodeConfig.wire_dtype  # an exchange's tensors on the wire (protocol/codecs.py)

    @classmethod
    def from_config(cls, cfg: NodeConfig, manifest_hash: str, numel: int) -> StreamSettings:
        return cls(run_id=cfg.run_id, manifest_hash=manifest_hash, numel=numel, io_timeout=cfg.io_timeout,
                   max_frame_bytes=cfg.max_frame_bytes, chunk_bytes=cfg.chunk_bytes,
                   min_transfer_rate=cfg.min_transfer_rate, max_streams_per_peer=cfg.max_streams_per_peer,
                   max_streams=cfg.max_streams, wire_dtype=cfg.wire_dtype)

    @property
    def rate(self) -> RateRule:
        """The progress every transfer must make: min_transfer_rate, with one I/O timeout of slack."""
        return RateRule(self.min_transfer_rate, self.io_timeout)

    def frame_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, metrics: NodeMetrics,
                     kind: str) -> FrameStream:
        """A FrameStream with these limits, its bytes counted under bytes_sent/received{kind}."""
        return FrameStream(
            reader, writer, max_frame_bytes=self.max_frame_bytes, io_timeout=self.io_timeout,
            on_sent=metrics.bytes_sent.labels(kind=kind).inc, on_received=metrics.bytes_received.labels(kind=kind).inc,
            control_frame_bytes=MAX_CONTROL_FRAME_BYTES, rate=self.rate,
        )


_LIMITERS: weakref.WeakKeyDictionary[P2P, ConcurrencyLimiter] = weakref.WeakKeyDictionary()


def stream_limiter(p2p: P2P | None, settings: StreamSettings) -> ConcurrencyLimiter:
    """The open incoming streams of one node, all its protocols together: one limiter per P2P instance
    (its first service sets the caps). Without a P2P (tests over plain TCP) each service has its own."""
    limiter = _LIMITERS.get(p2p) if p2p is not None else None
    if limiter is None:
        limiter = ConcurrencyLimiter(settings.max_streams_per_peer, settings.max_streams)
        if p2p is not None:
            _LIMITERS[p2p] = limiter
    return limiter


def check_sender(claimed: str, peer: str) -> None:
    """A request's claimed sender must be the stream's authenticated peer."""
    if claimed != peer:
        raise InvalidField(f"request claims sender {claimed[:16]!r} but came from {peer}")


async def open_stream(p2p: P2P, peer: str, protocol: str, settings: StreamSettings, metrics: NodeMetrics,
                      kind: str) -> FrameStream:
    """Dial `peer`'s handler of `protocol`, within the I/O timeout; the caller sends the request and closes."""
    _info, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol), settings.io_timeout)
    return settings.frame_stream(reader, writer, metrics, kind)


@dataclass
class Incoming:
    """One accepted stream, as a protocol's callbacks see it."""

    peer: str  # the stream's peer, authenticated by libp2p (unlike any field of the request)
    stream: FrameStream
    task: asyncio.Future | None = None  # work the protocol started for this stream, if any (for its callbacks)


Serve = Callable[[Incoming, Any], Awaitable[None]]  # (stream, its request, sender already checked)
Failed = Callable[[Incoming, Exception], None]  # a failure, ProtocolErrors already counted
Closed = Callable[[Incoming], None]  # after the stream is closed, whatever happened


class StreamService:
    """The server side of one stream protocol: read the request, check its sender, serve it, report, close."""

    def __init__(
        self,
        p2p: P2P | None,
        protocol: str,
        request_type: type,
        settings: StreamSettings,
        metrics: NodeMetrics,
        kind: str,
        *,
        serve: Serve,
        failed: Failed,
        closed: Closed | None = None,
    ) -> None:
        self.p2p, self.protocol, self.request_type = p2p, protocol, request_type
        self.settings, self.metrics, self.kind = settings, metrics, kind
        self.serve, self.failed, self.closed = serve, failed, closed
        self.limiter = stream_limiter(p2p, settings)

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.protocol, self.handle)

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        limiter = self.limiter
        refusal = limiter.admit(peer)
        if refusal is not None:  # over a cap: not a byte of it is read
            self.metrics.streams_refused.labels(reason=refusal).inc()
            self.metrics.incoming_streams.labels(kind=self.kind, result="busy").inc()
            try:
                writer.write(_BUSY_FRAME)  # best effort: the requester may take it as a refusal
                writer.close()
            except Exception:  # noqa: BLE001 - the stream may be broken already
                pass
            return
        try:
            await self._handle(peer, reader, writer)
        finally:
            limiter.release(peer)

    async def _handle(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = self.settings.frame_stream(reader, writer, self.metrics, self.kind)
        incoming = Incoming(peer, stream)
        result = "failed"
        try:
            request = await incoming.stream.recv(self.request_type)
            check_sender(request.sender, incoming.peer)
            await self.serve(incoming, request)
            result = "served"
        except ProtocolError as error:
            result = "protocol_error"
            self.metrics.protocol_errors.labels(kind=error.kind).inc()
            self._report(incoming, error)
            if not isinstance(error, TruncatedFrame):
                await incoming.stream.send_error(error)
        except Exception as error:  # noqa: BLE001 - the peer vanished or stalled; the node carries on
            result = stream_failure(error)
            self._report(incoming, error)
        finally:
            incoming.stream.close()
            self.metrics.incoming_streams.labels(kind=self.kind, result=result).inc()
            if self.closed is not None:
                self._closed(incoming)

    def _report(self, incoming: Incoming, error: Exception) -> None:
        """The protocol's `failed` callback; a bug in it is logged, never let out of the stream handler."""
        try:
            self.failed(incoming, error)
        except Exception:  # noqa: BLE001 - the node carries on; the stream is closed and counted anyway
            logger.exception("%s: the failure callback raised", self.protocol)

    def _closed(self, incoming: Incoming) -> None:
        try:
            self.closed(incoming)
        except Exception:  # noqa: BLE001 - see _report
            logger.exception("%s: the close callback raised", self.protocol)


def stream_failure(error: BaseException) -> str:
    """The incoming_streams result of a stream that failed other than by a ProtocolError."""
    if isinstance(error, RemoteError):  # the peer sent an ErrorMessage where a request belongs
        return "remote_error"
    if isinstance(error, TimeoutError):  # PeerTimeout, TransferTooSlow
        return "timeout"
    if isinstance(error, (ConnectionError, OSError)):  # PeerGone, resets
        return "peer_gone"
    return "failed"
