"""Message types of the exchange protocol and their msgpack codec.

Every message body is a msgpack map holding ``"v"`` (protocol version), ``"t"``
(message type) and the message's fields. Decoding is strict because the bytes
come from untrusted peers: every field must be present with its exact type and
within its limits, otherwise a ``ProtocolError`` subclass is raised. Unknown
extra keys are ignored so that a later version can add optional fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Union

import msgpack

from protocol.errors import (
    InvalidField,
    MalformedMessage,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_STR_CHARS",
    "MAX_DIMS",
    "MAX_TENSORS",
    "MAX_UINT",
    "REJECT_REASONS",
    "MessageType",
    "ErrorMessage",
    "ExchangeRequest",
    "ExchangeAccept",
    "ExchangeReject",
    "TensorHeader",
    "TensorChunk",
    "TensorEnd",
    "ExchangeAck",
    "StateRequest",
    "StateOffer",
    "AuditRequest",
    "AuditOffer",
    "Message",
    "MESSAGE_CLASSES",
    "encode_message",
    "decode_message",
]

PROTOCOL_VERSION = 1

MAX_STR_CHARS = 256
MAX_DIMS = 8
MAX_TENSORS = 64
# msgpack cannot carry integers beyond uint64.
MAX_UINT = 2**64 - 1

REJECT_REASONS: tuple[str, ...] = (
    "busy",
    "not_ready",
    "stale",
    "manifest",
    "flagged",
    "shutting_down",
    "bad_request",
    "no_state",
)

# Caps on what the unpacker will materialise, so a small body cannot expand into
# a huge Python object graph. Strings and arrays of valid messages are far
# smaller; binary payloads are bounded by the frame size (the body length).
_MAX_UNPACK_STR = 64 * 1024
_MAX_UNPACK_ARRAY = 1024
_MAX_UNPACK_MAP = 64
_MAX_UNPACK_EXT = 64 * 1024


class MessageType(enum.IntEnum):
    """Value of the ``"t"`` key identifying each message."""

    ERROR = 0
    EXCHANGE_REQUEST = 1
    EXCHANGE_ACCEPT = 2
    EXCHANGE_REJECT = 3
    TENSOR_HEADER = 4
    TENSOR_CHUNK = 5
    TENSOR_END = 6
    EXCHANGE_ACK = 7
    STATE_REQUEST = 8
    STATE_OFFER = 9
    AUDIT_REQUEST = 10
    AUDIT_OFFER = 11


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Sent before closing a stream on a protocol error; ``kind`` is ``ProtocolError.kind``."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    kind: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorMessage:
        """Build the message for ``exc``, truncated so that it always encodes."""
        kind = getattr(exc, "kind", "internal")
        if not isinstance(kind, str):
            kind = "internal"
        return cls(kind=kind[:MAX_STR_CHARS], message=str(exc)[:MAX_STR_CHARS])


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """Opens a pair exchange: who asks, for which run/round, and which tensors will travel."""

    TYPE: ClassVar[MessageType] = MessageType.EXCHANGE_REQUEST
    run_id: str
    manifest_hash: str
    round: int
    sender: str
    tensors: tuple[str, ...]
    numel: int
    dtype: str


@dataclass(frozen=True, slots=True)
class ExchangeAccept:
    """Responder agrees to exchange for ``round``; both sides then stream their tensors."""

    TYPE: ClassVar[MessageType] = MessageType.EXCHANGE_ACCEPT
    round: int


@dataclass(frozen=True, slots=True)
class ExchangeReject:
    """Responder (or state donor) declines; ``reason`` is one of ``REJECT_REASONS``."""

    TYPE: ClassVar[MessageType] = MessageType.EXCHANGE_REJECT
    reason: str
    round: int


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """Announces one tensor transfer: what it is and how it is chunked."""

    TYPE: ClassVar[MessageType] = MessageType.TENSOR_HEADER
    name: str
    dtype: str
    shape: tuple[int, ...]
    chunk_bytes: int
    num_chunks: int


@dataclass(frozen=True, slots=True)
class TensorChunk:
    """One slice of a tensor's raw little-endian bytes; ``index`` counts from 0."""

    TYPE: ClassVar[MessageType] = MessageType.TENSOR_CHUNK
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TensorEnd:
    """Closes a tensor transfer with the checksum of all its bytes."""

    TYPE: ClassVar[MessageType] = MessageType.TENSOR_END
    name: str
    checksum: bytes


@dataclass(frozen=True, slots=True)
class ExchangeAck:
    """Each side's verdict on what it received; the average is applied only if both are ok."""

    TYPE: ClassVar[MessageType] = MessageType.EXCHANGE_ACK
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class StateRequest:
    """A joiner asks a donor for its current state (slow weights and outer momentum)."""

    TYPE: ClassVar[MessageType] = MessageType.STATE_REQUEST
    run_id: str
    manifest_hash: str
    sender: str


@dataclass(frozen=True, slots=True)
class StateOffer:
    """The donor's answer: what state follows, then one tensor transfer per name of ``tensors``, in order.

    ``global_step`` counts the inner steps behind this state, so that the joiner's
    learning-rate schedule continues from it; every tensor is flat with ``numel``
    elements of ``dtype``.
    """

    TYPE: ClassVar[MessageType] = MessageType.STATE_OFFER
    round: int
    global_step: int
    manifest_hash: str
    tensors: tuple[str, ...]
    numel: int
    dtype: str


@dataclass(frozen=True, slots=True)
class AuditRequest:
    """A verifier asks a peer for the state it started ``round`` from (to replay that round)."""

    TYPE: ClassVar[MessageType] = MessageType.AUDIT_REQUEST
    run_id: str
    manifest_hash: str
    sender: str
    round: int


@dataclass(frozen=True, slots=True)
class AuditOffer:
    """The audited peer's answer: one tensor transfer per name of ``tensors`` follows, in order.

    ``start_digest`` must equal the one in the peer's signed commitment for ``round``;
    the verifier recomputes it from what arrives.
    """

    TYPE: ClassVar[MessageType] = MessageType.AUDIT_OFFER
    round: int
    start_digest: str
    tensors: tuple[str, ...]
    numel: int
    dtype: str


Message = Union[
    ErrorMessage,
    ExchangeRequest,
    ExchangeAccept,
    ExchangeReject,
    TensorHeader,
    TensorChunk,
    TensorEnd,
    ExchangeAck,
    StateRequest,
    StateOffer,
    AuditRequest,
    AuditOffer,
]

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        ErrorMessage,
        ExchangeRequest,
        ExchangeAccept,
        ExchangeReject,
        TensorHeader,
        TensorChunk,
        TensorEnd,
        ExchangeAck,
        StateRequest,
        StateOffer,
        AuditRequest,
        AuditOffer,
    )
}

_TYPE_VALUES = frozenset(int(t) for t in MessageType)


# --- field validation -------------------------------------------------------
# Each checker returns the normalised value or raises InvalidField. The same
# checkers run on encode and decode so we never send what a peer would refuse.


def _check_str(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidField(f"field '{field}' must be a string, got {type(value).__name__}")
    if len(value) > MAX_STR_CHARS:
        raise InvalidField(
            f"field '{field}' is {len(value)} characters long, the limit is {MAX_STR_CHARS}"
        )
    return value


def _check_uint(field: str, value: Any) -> int:
    # bool is a subclass of int in Python; on the wire it is a distinct type.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(f"field '{field}' must be an integer, got {type(value).__name__}")
    if value < 0 or value > MAX_UINT:
        raise InvalidField(f"field '{field}' must be a non-negative integer, got {value}")
    return value


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidField(f"field '{field}' must be a boolean, got {type(value).__name__}")
    return value


def _check_bytes(field: str, value: Any) -> bytes:
    # Encoding accepts any contiguous byte buffer; decoding always yields bytes.
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidField(f"field '{field}' must be binary, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _check_seq(field: str, value: Any, limit: int) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidField(f"field '{field}' must be an array, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidField(f"field '{field}' has {len(value)} entries, the limit is {limit}")
    return tuple(value)


def _check_names(field: str, value: Any) -> tuple[str, ...]:
    items = _check_seq(field, value, MAX_TENSORS)
    return tuple(_check_str(f"{field}[{i}]", item) for i, item in enumerate(items))


def _check_shape(field: str, value: Any) -> tuple[int, ...]:
    items = _check_seq(field, value, MAX_DIMS)
    return tuple(_check_uint(f"{field}[{i}]", item) for i, item in enumerate(items))


_Checker = Callable[[str, Any], Any]

_FIELDS: dict[type[Message], tuple[tuple[str, _Checker], ...]] = {
    ErrorMessage: (("kind", _check_str), ("message", _check_str)),
    ExchangeRequest: (
        ("run_id", _check_str),
        ("manifest_hash", _check_str),
        ("round", _check_uint),
        ("sender", _check_str),
        ("tensors", _check_names),
        ("numel", _check_uint),
        ("dtype", _check_str),
    ),
    ExchangeAccept: (("round", _check_uint),),
    ExchangeReject: (("reason", _check_str), ("round", _check_uint)),
    TensorHeader: (
        ("name", _check_str),
        ("dtype", _check_str),
        ("shape", _check_shape),
        ("chunk_bytes", _check_uint),
        ("num_chunks", _check_uint),
    ),
    TensorChunk: (("index", _check_uint), ("data", _check_bytes)),
    TensorEnd: (("name", _check_str), ("checksum", _check_bytes)),
    ExchangeAck: (("ok", _check_bool), ("reason", _check_str)),
    StateRequest: (
        ("run_id", _check_str),
        ("manifest_hash", _check_str),
        ("sender", _check_str),
    ),
    StateOffer: (
        ("round", _check_uint),
        ("global_step", _check_uint),
        ("manifest_hash", _check_str),
        ("tensors", _check_names),
        ("numel", _check_uint),
        ("dtype", _check_str),
    ),
    AuditRequest: (
        ("run_id", _check_str),
        ("manifest_hash", _check_str),
        ("sender", _check_str),
        ("round", _check_uint),
    ),
    AuditOffer: (
        ("round", _check_uint),
        ("start_digest", _check_str),
        ("tensors", _check_names),
        ("numel", _check_uint),
        ("dtype", _check_str),
    ),
}


def _validated_fields(cls: type[Message], get: Callable[[str], Any]) -> dict[str, Any]:
    """Check every field of ``cls`` as read through ``get`` and return the normalised values."""
    values: dict[str, Any] = {}
    for name, check in _FIELDS[cls]:
        values[name] = check(name, get(name))
    if cls is ExchangeReject and values["reason"] not in REJECT_REASONS:
        raise InvalidField(
            f"field 'reason' must be one of {', '.join(REJECT_REASONS)}, got {values['reason']!r}"
        )
    return values


_MISSING = object()


def encode_message(msg: Message) -> bytes:
    """Encode ``msg`` as a msgpack body (not framed); ``InvalidField`` if a peer would refuse it."""
    cls = type(msg)
    if cls not in _FIELDS:
        raise TypeError(f"not a protocol message: {cls.__name__}")
    values = _validated_fields(cls, lambda name: getattr(msg, name))
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": int(cls.TYPE)}
    body.update(values)
    return msgpack.packb(body, use_bin_type=True)


def _unpack(body: bytes) -> Any:
    """Unpack one msgpack object, turning every failure into ``MalformedMessage``."""
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=_MAX_UNPACK_STR,
            max_bin_len=len(body),
            max_array_len=_MAX_UNPACK_ARRAY,
            max_map_len=_MAX_UNPACK_MAP,
            max_ext_len=_MAX_UNPACK_EXT,
        )
    except Exception as exc:  # msgpack raises many unrelated types (ExtraData, ValueError, UnicodeDecodeError, ...)
        raise MalformedMessage(f"undecodable message body: {type(exc).__name__}: {exc}"[:512]) from exc


def _type_name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return expected.__name__


def decode_message(
    body: bytes,
    expected: type | tuple[type, ...] | None = None,
) -> Message:
    """Decode and validate one message body; raise a ``ProtocolError`` for anything we refuse.

    If ``expected`` is given, a valid message of another type raises ``UnexpectedMessage``.
    """
    obj = _unpack(body)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"message body must be a map, got {type(obj).__name__}")
    version = obj.get("v", _MISSING)
    if isinstance(version, bool) or not isinstance(version, int) or version != PROTOCOL_VERSION:
        shown = "missing" if version is _MISSING else repr(version)[:64]
        raise UnsupportedVersion(
            f"unsupported protocol version {shown}, this node speaks {PROTOCOL_VERSION}"
        )
    tag = obj.get("t", _MISSING)
    if isinstance(tag, bool) or not isinstance(tag, int) or tag not in _TYPE_VALUES:
        shown = "missing" if tag is _MISSING else repr(tag)[:64]
        raise UnknownMessageType(f"unknown message type {shown}")
    cls = MESSAGE_CLASSES[MessageType(tag)]

    def get(name: str) -> Any:
        value = obj.get(name, _MISSING)
        if value is _MISSING:
            raise InvalidField(f"{cls.__name__} is missing field '{name}'")
        return value

    msg = cls(**_validated_fields(cls, get))
    if expected is not None and not isinstance(msg, expected):
        raise UnexpectedMessage(f"expected {_type_name(expected)}, got {cls.__name__}")
    return msg
