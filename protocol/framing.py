"""Length-prefixed framing over a byte stream.

Each frame is a 4-byte big-endian unsigned body length followed by the body.
The length is checked against a limit before any body byte is read, so a peer
cannot make us buffer an arbitrarily large frame.
"""

from __future__ import annotations

import struct

from protocol.errors import FrameTooLarge, MalformedMessage

__all__ = [
    "HEADER_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_CONTROL_FRAME_BYTES",
    "encode_frame",
    "parse_frame_header",
    "FrameDecoder",
]

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 8 * 2**20
# Every frame but a tensor transfer's (requests, offers, replies, acks, errors) is a control frame: at most
# this long, whatever max_frame_bytes is, so a stream's first frame is refused from its header before the
# request has been read and checked (SPEC §9).
MAX_CONTROL_FRAME_BYTES = 64 * 2**10

_HEADER = struct.Struct(">I")


def _check_length(length: int, max_frame_bytes: int) -> None:
    """Refuse empty and oversized bodies with the matching error."""
    if length == 0:
        raise MalformedMessage("frame has an empty body")
    if length > max_frame_bytes:
        raise FrameTooLarge(
            f"frame of {length} bytes exceeds the {max_frame_bytes}-byte limit"
        )


def encode_frame(body: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """Return ``body`` prefixed with its length; refuses empty or oversized bodies."""
    length = len(body)
    _check_length(length, max_frame_bytes)
    return _HEADER.pack(length) + bytes(body)


def parse_frame_header(header: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """Return the body length announced by a 4-byte header, refusing it before the body is read."""
    if len(header) != HEADER_BYTES:
        raise MalformedMessage(
            f"frame header must be {HEADER_BYTES} bytes, got {len(header)}"
        )
    length: int = _HEADER.unpack(header)[0]
    _check_length(length, max_frame_bytes)
    return length


class FrameDecoder:
    """Incremental frame decoder for byte-stream consumers that are not asyncio (tests, tools)."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        """Create an empty decoder that refuses frames larger than ``max_frame_bytes``."""
        self._max = max_frame_bytes
        self._buf = bytearray()
        # Body length of the frame being assembled once its header has been parsed.
        self._need: int | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data`` and return every body completed by it, in order.

        Raises ``FrameTooLarge`` as soon as a header announces an oversized frame,
        without waiting for its body (``MalformedMessage`` for an empty one); the
        stream is unusable after that.
        """
        self._buf += data
        bodies: list[bytes] = []
        pos = 0
        buf = self._buf
        try:
            while True:
                if self._need is None:
                    if len(buf) - pos < HEADER_BYTES:
                        break
                    self._need = parse_frame_header(
                        bytes(buf[pos : pos + HEADER_BYTES]), self._max
                    )
                    pos += HEADER_BYTES
                if len(buf) - pos < self._need:
                    break
                bodies.append(bytes(buf[pos : pos + self._need]))
                pos += self._need
                self._need = None
        finally:
            # One deletion per feed keeps reassembly linear in the bytes fed.
            del buf[:pos]
        return bodies

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a complete body (headers included)."""
        return len(self._buf) + (HEADER_BYTES if self._need is not None else 0)
