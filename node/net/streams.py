"""Protocol messages over one bidirectional byte stream (a p2pd stream or plain TCP).

Every read and every drain has a timeout: a frozen (SIGSTOPped) peer never errors by
itself, only our clock ends the wait. The waits use `asyncio.timeout`, not `asyncio.wait_for`:
on Python 3.11 wait_for swallows a cancellation that lands just as the awaited read or drain
completes, and a transfer cancelled because the other direction failed would run on.
Oversized frames are refused from the 4-byte header, before a single body byte is read.

Two kinds of frames (protocol/SPEC.md §9):
 - control frames (requests, offers, accepts, acks, errors) are small: at most
   `control_frame_bytes`, each read or written whole within the I/O timeout;
 - inside a transfer (`receiving()` / `sending()`: the tensors of an exchange, a state
   download, an audit) frames may be up to `max_frame_bytes`, and a transfer lives while its
   bytes flow: every wait on the peer is bounded by the I/O timeout (a stall), and, with a
   RateRule, by the transfer's allowance (node/net/limits.py: a peer that moves less than
   the minimum transfer rate runs out of it and the transfer is cut as too slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

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

from node.net.limits import RateRule, TransferMeter

WRITE_PIECE = 256 * 1024  # a transfer's frames are written (and their progress measured) in pieces of this size


class PeerGone(ConnectionError):
    """The remote side closed or reset the stream."""


class PeerTimeout(TimeoutError):
    """The remote side did not send or accept bytes within the I/O timeout."""


class TransferTooSlow(PeerTimeout):
    """A transfer moved less than the minimum transfer rate: it ran out of allowance (node/net/limits.py)."""

    def __init__(self, direction: str, meter: TransferMeter) -> None:
        rule = meter.rule
        super().__init__(
            f"{direction} {meter.bytes} bytes in {meter.waited:.1f}s of waiting: below the minimum transfer rate "
            f"of {rule.min_rate / 1e3:.0f} kB/s" if rule is not None else f"{direction} too slowly")
        self.direction = direction


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
        control_frame_bytes: int | None = None,
        rate: RateRule | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.max_frame_bytes = max_frame_bytes
        self.control_frame_bytes = max_frame_bytes if control_frame_bytes is None else control_frame_bytes
        self.io_timeout = io_timeout
        self.rate = rate
        self.bytes_sent = self.bytes_received = 0
        self._on_sent = on_sent or (lambda n: None)
        self._on_received = on_received or (lambda n: None)
        self._receiving: TransferMeter | None = None  # the receive direction's meter while in a transfer
        self._sending: TransferMeter | None = None
        self.last_received: TransferMeter | None = None  # the meters of the last transfer each way (kept after it)
        self.last_sent: TransferMeter | None = None
        # the rest of a transfer frame whose writing was interrupted (its sender cancelled between pieces):
        # written before any later frame, so the peer still reads a whole frame and then our ErrorMessage
        self._unfinished: memoryview | None = None

    # ------------------------------------------------------------------ transfers
    @contextlib.contextmanager
    def receiving(self) -> Iterator[TransferMeter]:
        """Inside: the peer's frames may be up to max_frame_bytes, each wait bounded by progress."""
        self._receiving = self.last_received = meter = TransferMeter(self.rate)
        started = time.monotonic()
        try:
            yield meter
        finally:
            self._receiving, meter.elapsed = None, time.monotonic() - started

    @contextlib.contextmanager
    def sending(self) -> Iterator[TransferMeter]:
        """Inside: our frames are written in pieces, each wait for the peer to take them bounded by progress."""
        self._sending = self.last_sent = meter = TransferMeter(self.rate)
        started = time.monotonic()
        try:
            yield meter
        finally:
            self._sending, meter.elapsed = None, time.monotonic() - started

    def _expired(self, meter: TransferMeter, waited: float, direction: str) -> PeerTimeout:
        """A wait bounded by `meter.timeout` expired: too slow if the allowance bounded it, else a stall."""
        slow = meter.too_slow(self.io_timeout)
        meter.record(waited, 0)
        if slow:
            return TransferTooSlow(direction, meter)
        return PeerTimeout(f"no progress for {self.io_timeout:.1f}s ({direction} {meter.bytes} bytes before)")

    # ------------------------------------------------------------------ reading
    def _received(self, count: int) -> None:
        self.bytes_received += count
        self._on_received(count)

    async def _read_exactly(self, count: int, at_boundary: bool = False, timeout: float | None = None) -> bytes:
        """A control read: all `count` bytes within one I/O timeout (or `timeout`)."""
        timeout = self.io_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.readexactly(count)
        except asyncio.IncompleteReadError as error:
            if at_boundary and not error.partial:
                raise PeerGone("stream closed") from None
            raise TruncatedFrame(f"stream ended after {len(error.partial)} of {count} bytes of a frame") from None
        except TimeoutError:
            raise PeerTimeout(f"no data for {timeout:.1f}s") from None
        except (ConnectionError, OSError) as error:
            raise PeerGone(str(error)) from None
        self._received(count)
        return data

    async def _read_metered(self, count: int, meter: TransferMeter, at_boundary: bool = False) -> bytes:
        """A transfer read: `count` bytes as they come, each wait bounded by the meter (stall or too slow)."""
        loop = asyncio.get_running_loop()
        parts: list[bytes] = []
        got = 0
        while got < count:
            started = loop.time()
            try:
                async with asyncio.timeout(meter.timeout(self.io_timeout)):
                    data = await self.reader.read(count - got)
            except TimeoutError:
                raise self._expired(meter, loop.time() - started, "received") from None
            except (ConnectionError, OSError) as error:
                raise PeerGone(str(error)) from None
            meter.record(loop.time() - started, len(data))
            if not data:
                if at_boundary and not got:
                    raise PeerGone("stream closed")
                raise TruncatedFrame(f"stream ended after {got} of {count} bytes of a frame")
            self._received(len(data))
            if meter.exhausted:
                raise TransferTooSlow("received", meter)
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def recv(self, expected: type | tuple[type, ...] | None = None, *, timeout: float | None = None) -> Message:
        """Read one message; ProtocolError for anything malformed, RemoteError for a peer's ErrorMessage.

        Outside `receiving()` the frame may be a control frame only (at most control_frame_bytes), and it
        must start within `timeout` (default: the I/O timeout)."""
        meter = self._receiving
        if meter is None:
            header = await self._read_exactly(HEADER_BYTES, at_boundary=True, timeout=timeout)
            body = await self._read_exactly(parse_frame_header(header, self.control_frame_bytes))
        else:
            header = await self._read_metered(HEADER_BYTES, meter, at_boundary=True)
            body = await self._read_metered(parse_frame_header(header, self.max_frame_bytes), meter)
        message = decode_message(body)
        if isinstance(message, ErrorMessage) and not (expected and isinstance(message, expected)):
            raise RemoteError(message.kind, message.message)
        if expected is not None and not isinstance(message, expected):
            names = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
            raise UnexpectedMessage(f"expected {names}, got {type(message).__name__}")
        return message

    # ------------------------------------------------------------------ writing
    async def send(self, message: Message) -> None:
        meter = self._sending
        await self._finish_interrupted_frame()
        frame = encode_frame(encode_message(message), self.max_frame_bytes if meter else self.control_frame_bytes)
        if meter is None:
            try:
                await self._write(frame, self.io_timeout)
            except TimeoutError:
                raise PeerTimeout(f"peer accepted no data for {self.io_timeout:.1f}s") from None
        else:
            await self._write_metered(frame, meter)
        self.bytes_sent += len(frame)
        self._on_sent(len(frame))

    async def _write(self, data: bytes, timeout: float) -> None:
        """Write `data` and wait until the peer took it (TimeoutError after `timeout`; PeerGone if it is gone)."""
        try:
            self.writer.write(data)
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            raise  # (an OSError too: not a vanished peer)
        except (ConnectionError, OSError) as error:
            raise PeerGone(str(error)) from None

    async def _write_metered(self, frame: bytes, meter: TransferMeter) -> None:
        """A transfer's frame, in pieces: each wait for the peer to take one bounded by the meter."""
        loop = asyncio.get_running_loop()
        whole = memoryview(frame)
        for start in range(0, len(frame), WRITE_PIECE):
            piece = frame[start:start + WRITE_PIECE] if len(frame) > WRITE_PIECE else frame
            end = start + len(piece)
            self._unfinished = whole[end:] if end < len(frame) else None  # `piece` is queued once _write starts
            started = loop.time()
            try:
                await self._write(piece, meter.timeout(self.io_timeout))
            except TimeoutError:
                self._unfinished = None  # the stream is given up: nothing more is owed on it
                raise self._expired(meter, loop.time() - started, "sent") from None
            except PeerGone:
                self._unfinished = None
                raise
            meter.record(loop.time() - started, len(piece))
            if meter.exhausted:
                raise TransferTooSlow("sent", meter)

    async def _finish_interrupted_frame(self) -> None:
        """Write what is left of a frame interrupted mid-way (at most one frame, bounded by the I/O timeout)."""
        rest, self._unfinished = self._unfinished, None
        if rest:
            try:
                await self._write(bytes(rest), self.io_timeout)
            except TimeoutError:
                raise PeerTimeout(f"peer accepted no data for {self.io_timeout:.1f}s") from None
            self.bytes_sent += len(rest)
            self._on_sent(len(rest))

    async def send_error(self, error: ProtocolError) -> None:
        """Best effort: tell the peer why we close (it may already be gone). A frame of ours cut off
        mid-way (a transfer cancelled because the other direction failed) is completed first, so the
        peer can read the ErrorMessage instead of a truncated frame."""
        try:
            await asyncio.wait_for(self._finish_interrupted_frame(), self.io_timeout)
            await asyncio.wait_for(self.send(ErrorMessage.from_exception(error)), 1.0)
        except Exception:  # noqa: BLE001 - the stream is being closed anyway
            pass

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - closing an already broken transport
            pass
