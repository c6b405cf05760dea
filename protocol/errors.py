"""Protocol error hierarchy.

Every way a peer can send us something we refuse maps to one subclass, and each
subclass carries a short ``kind`` label so the node can count refusals per
reason (as a Prometheus label) and tell the peer why in an ``ErrorMessage``.
"""

from __future__ import annotations

__all__ = [
    "ProtocolError",
    "MalformedMessage",
    "FrameTooLarge",
    "UnsupportedVersion",
    "UnknownMessageType",
    "UnexpectedMessage",
    "InvalidField",
    "TensorShapeMismatch",
    "TensorDtypeMismatch",
    "NonFiniteTensor",
    "ChecksumMismatch",
    "ChunkSequenceError",
    "TruncatedFrame",
]


class ProtocolError(Exception):
    """Base of every refusal of peer input; the stream is closed, the node keeps running."""

    kind: str = "malformed"


class MalformedMessage(ProtocolError):
    """Body is not decodable msgpack, not a map, or a frame is structurally broken."""

    kind = "malformed"


class FrameTooLarge(ProtocolError):
    """A frame announces (or would need) more bytes than the configured limit."""

    kind = "oversized"


class UnsupportedVersion(ProtocolError):
    """The message's ``v`` is not a protocol version this code speaks."""

    kind = "version"


class UnknownMessageType(ProtocolError):
    """The message's ``t`` is not a known ``MessageType``."""

    kind = "type"


class UnexpectedMessage(ProtocolError):
    """A valid message arrived where the exchange expected a different one."""

    kind = "unexpected"


class InvalidField(ProtocolError):
    """A field is missing, has the wrong type, or is out of range."""

    kind = "field"


class TensorShapeMismatch(ProtocolError):
    """A tensor header's shape differs from what the receiver expects."""

    kind = "shape"


class TensorDtypeMismatch(ProtocolError):
    """A tensor header's dtype differs from what the receiver expects."""

    kind = "dtype"


class NonFiniteTensor(ProtocolError):
    """A received tensor contains NaN or infinity; averaging it in would poison the model."""

    kind = "non_finite"


class ChecksumMismatch(ProtocolError):
    """The checksum in ``TensorEnd`` does not match the bytes received."""

    kind = "checksum"


class ChunkSequenceError(ProtocolError):
    """Chunks arrived out of order, duplicated, missing, or with the wrong size."""

    kind = "sequence"


class TruncatedFrame(ProtocolError):
    """The stream ended inside a frame: a header or body was cut short."""

    kind = "truncated"
