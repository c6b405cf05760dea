"""Protocol messages over one bidirectional byte stream (a p2pd stream or plain TCP).

Every read and every drain has a timeout: a frozen (SIGSTOPped) peer never errors by
itself, only our clock ends the wait. Oversized frames are refused from the 4-byte
header, before a single body byte is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from protocol import (
    HEADER_BYTES,
    ErrorMessage,
    Message,
    ProtocolError,
    TruncatedFrame,
    UnexpectedMessage,
    decode_message,
    encode_frame,
    encode_message,
    parse_frame_header,
)


class PeerGone(ConnectionError):
    """The remote side closed or reset the stream."""


class PeerTimeout(TimeoutError):
    """The remote side did not send or accept bytes within the I/O timeout."""


class RemoteError(RuntimeError):
    """The remote side reported a protocol error and closed the stream."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"peer reported {kind}: {message}")
        self.kind = kind


ByteCounter = Callable[[int], None]


class FrameStream:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_bytes: int,
        io_timeout: float,
        on_sent: ByteCounter | None = None,
        on_received: ByteCounter | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.max_frame_bytes = max_frame_bytes
        self.io_timeout = io_timeout
        self._on_sent = on_sent or (lambda n: None)
        self._on_received = on_received or (lambda n: None)

    async def _read_exactly(self, count: int, at_boundary: bool = False) -> bytes:
        try:
            data = await asyncio.wait_for(self.reader.readexactly(count), self.io_timeout)
        except asyncio.IncompleteReadError as error:
            if at_boundary and not error.partial:
                raise PeerGone("stream closed") from None
            raise TruncatedFrame(f"stream ended after {len(error.partial)} of {count} bytes of a frame") from None
        except TimeoutError:
            raise PeerTimeout(f"no data for {self.io_timeout:.1f}s") from None
        except (ConnectionError, OSError) as error:
            raise PeerGone(str(error)) from None
        self._on_received(count)
        return data

    async def recv(self, expected: type | tuple[type, ...] | None = None) -> Message:
        """Read one message; ProtocolError for anything malformed, RemoteError for a peer's ErrorMessage."""
        length = parse_frame_header(await self._read_exactly(HEADER_BYTES, at_boundary=True), self.max_frame_bytes)
        message = decode_message(await self._read_exactly(length))
        if isinstance(message, ErrorMessage) and not (expected and isinstance(message, expected)):
            raise RemoteError(message.kind, message.message)
        if expected is not None and not isinstance(message, expected):
            names = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
            raise UnexpectedMessage(f"expected {names}, got {type(message).__name__}")
        return message

    async def send(self, message: Message) -> None:
        frame = encode_frame(encode_message(message), self.max_frame_bytes)
        try:
            self.writer.write(frame)
            await asyncio.wait_for(self.writer.drain(), self.io_timeout)
        except TimeoutError:
            raise PeerTimeout(f"peer accepted no data for {self.io_timeout:.1f}s") from None
        except (ConnectionError, OSError) as error:
            raise PeerGone(str(error)) from None
        self._on_sent(len(frame))

    async def send_error(self, error: ProtocolError) -> None:
        """Best effort: tell the peer why we close (it may already be gone)."""
        try:
            await asyncio.wait_for(self.send(ErrorMessage.from_exception(error)), 1.0)
        except Exception:  # noqa: BLE001 - the stream is being closed anyway
            pass

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing an already broken transport
            pass

