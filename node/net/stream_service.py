"""Request/reply protocols over p2pd streams: their shared settings, the server side and the client side.

Gossip exchanges (`gossiptrain/exchange/1`), state sync (`gossiptrain/state/1`) and audits
(`gossiptrain/audit/1`) run alike (protocol/SPEC.md §1, §7):
 - a stream carries FrameStream frames of at most `max_frame_bytes`, every read and drain is
   bounded by the I/O timeout, and its bytes are counted under bytes_sent/received{kind};
 - the dialer (open_stream) opens the stream within the I/O timeout and sends one request
   that names its own peer id; the server (StreamService) refuses the request as a protocol
   error unless that claim is the stream's peer, which libp2p authenticated;
 - on the server, a ProtocolError is counted under protocol_errors{kind} and told to the peer
   in an ErrorMessage (unless the stream ended inside a frame: nobody is left to tell); every
   failure, that one or any other (PeerGone, PeerTimeout, RemoteError, ...), goes to the
   protocol's own `failed` callback (its metrics, its log line), and the stream is always closed.
What a protocol does with a valid request stays in its own module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hivemind.p2p import P2P, PeerID

from protocol import InvalidField, ProtocolError, TruncatedFrame

from node.net.streams import FrameStream

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.metrics import NodeMetrics


@dataclass(frozen=True)
class StreamSettings:
    """What every stream protocol of a node shares: its run, manifest and model size, and the wire limits."""

    run_id: str
    manifest_hash: str
    numel: int
    io_timeout: float
    max_frame_bytes: int
    chunk_bytes: int

    @classmethod
    def from_config(cls, cfg: NodeConfig, manifest_hash: str, numel: int) -> StreamSettings:
        return cls(run_id=cfg.run_id, manifest_hash=manifest_hash, numel=numel, io_timeout=cfg.io_timeout,
                   max_frame_bytes=cfg.max_frame_bytes, chunk_bytes=cfg.chunk_bytes)

    def frame_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, metrics: NodeMetrics,
                     kind: str) -> FrameStream:
        """A FrameStream with these limits, its bytes counted under bytes_sent/received{kind}."""
        return FrameStream(
            reader, writer, max_frame_bytes=self.max_frame_bytes, io_timeout=self.io_timeout,
            on_sent=metrics.bytes_sent.labels(kind=kind).inc, on_received=metrics.bytes_received.labels(kind=kind).inc,
        )


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
        p2p: P2P,
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

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(self.protocol, self.handle)

    async def handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = self.settings.frame_stream(reader, writer, self.metrics, self.kind)
        incoming = Incoming(info.peer_id.to_base58(), stream)
        try:
            request = await incoming.stream.recv(self.request_type)
            check_sender(request.sender, incoming.peer)
            await self.serve(incoming, request)
        except ProtocolError as error:
            self.metrics.protocol_errors.labels(kind=error.kind).inc()
            self.failed(incoming, error)
            if not isinstance(error, TruncatedFrame):
                await incoming.stream.send_error(error)
        except Exception as error:  # noqa: BLE001 - the peer vanished or stalled; the node carries on
            self.failed(incoming, error)
        finally:
            incoming.stream.close()
            if self.closed is not None:
                self.closed(incoming)
