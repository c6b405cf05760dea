"""Message types of the exchange protocol and their msgpack codec.

Every message body is a msgpack map holding ``"v"`` (protocol version), ``"t"``
(message type) and the message's fields. Decoding is strict because the bytes
come from untrusted peers: every field must be present with its exact type and
within its limits, otherwise a ``ProtocolError`` subclass is raised. Unknown
extra keys are ignored so that a later version can add optional fields.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import msgpack

from protocol.errors import (
    InvalidField,
    MalformedMessage,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)
from protocol.fields import (
    MAX_DIMS,
    MAX_STR_CHARS,
    MAX_TENSORS,
    MAX_U63,
    MAX_UINT,
    U63,
    Bool,
    Bytes,
    Names,
    Shape,
    Str,
    UInt,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_STR_CHARS",
    "MAX_DIMS",
    "MAX_TENSORS",
    "MAX_UINT",
    "MAX_U63",
    "REJECT_REASONS",
    "MessageType",
    "Message",
    "MESSAGE_CLASSES",
    "encode_message",
    "decode_message",
    # ...and every message class, appended below from the registry.
]

PROTOCOL_VERSION = 2  # 2: ExchangeAck carries the sender's attestation

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


# --- the message registry ----------------------------------------------------
# Each message class is declared once, with ``@_message(t)`` giving its wire type
# id; ``MessageType``, ``MESSAGE_CLASSES``, ``Message``, each class's ``TYPE`` and
# the codec's field table are all derived from these declarations. A field's
# annotation (``Str``, ``U63``, ...; see protocol/fields.py) names its wire type
# and thereby the checker it is validated with.

_Checker = Callable[[str, Any], Any]
_REGISTRY: dict[int, type] = {}
_FIELDS: dict[type, tuple[tuple[str, _Checker], ...]] = {}
_C = TypeVar("_C", bound=type)


def _message(type_id: int) -> Callable[[_C], _C]:
    """Make the decorated class a frozen message dataclass with wire type id ``type_id``."""

    def register(cls: _C) -> _C:
        if type_id in _REGISTRY:
            raise ValueError(f"message type {type_id} is taken by {_REGISTRY[type_id].__name__}")
        cls = dataclass(frozen=True, slots=True)(cls)
        hints = typing.get_type_hints(cls, include_extras=True)
        checkers = []
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is not typing.Annotated:
                raise TypeError(f"{cls.__name__}.{f.name} must be declared with a wire field type")
            checkers.append((f.name, hints[f.name].__metadata__[0]))
        _FIELDS[cls] = tuple(checkers)
        _REGISTRY[type_id] = cls
        return cls

    return register


def _constant_name(cls: type) -> str:
    """``ExchangeRequest`` -> ``EXCHANGE_REQUEST``; ``ErrorMessage`` -> ``ERROR``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Message")).upper()


@_message(0)
class ErrorMessage:
    """Sent before closing a stream on a protocol error; ``kind`` is ``ProtocolError.kind``."""

    kind: Str
    message: Str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorMessage:
        """Build the message for ``exc``, truncated so that it always encodes."""
        kind = getattr(exc, "kind", "internal")
        if not isinstance(kind, str):
            kind = "internal"
        return cls(kind=kind[:MAX_STR_CHARS], message=str(exc)[:MAX_STR_CHARS])


@_message(1)
class ExchangeRequest:
    """Opens a pair exchange: who asks, for which run/round, and which tensors will travel. `nonce_commitment`:
    the requester's commitment to its audit-lottery nonce for the responder's tensors (protocol/verification.py
    nonce_commitment, 32 bytes; empty when verification is off)."""

    run_id: Str
    manifest_hash: Str
    round: U63
    sender: Str
    tensors: Names
    numel: UInt
    dtype: Str
    nonce_commitment: Bytes = b""


@_message(2)
class ExchangeAccept:
    """Responder agrees to exchange for ``round``; both sides then stream their tensors. `nonce_commitment`: as in
    ExchangeRequest, the responder's for the requester's tensors."""

    round: U63
    nonce_commitment: Bytes = b""


@_message(3)
class ExchangeReject:
    """Responder (or state donor) declines; ``reason`` is one of ``REJECT_REASONS``."""

    reason: Str
    round: U63


@_message(4)
class TensorHeader:
    """Announces one tensor transfer: what it is and how it is chunked."""

    name: Str
    dtype: Str
    shape: Shape
    chunk_bytes: UInt
    num_chunks: UInt


@_message(5)
class TensorChunk:
    """One slice of a tensor's raw little-endian bytes; ``index`` counts from 0."""

    index: UInt
    data: Bytes


@_message(6)
class TensorEnd:
    """Closes a tensor transfer with the checksum of all its bytes."""

    name: Str
    checksum: Bytes


@_message(7)
class ExchangeAck:
    """Each side's verdict on what it received; the average is applied only if both are ok. In a pair exchange with
    verification on, `attestation` is the sender's signed Attestation envelope of what it sent (protocol/verification.py;
    the partner's receipt carries its signature); empty otherwise."""

    ok: Bool
    reason: Str
    attestation: Bytes = b""


@_message(8)
class StateRequest:
    """A joiner asks a donor for its current state (slow weights and outer momentum)."""

    run_id: Str
    manifest_hash: Str
    sender: Str


@_message(9)
class StateOffer:
    """The donor's answer: what state follows, then one tensor transfer per name of ``tensors``, in order.

    ``global_step`` counts the inner steps behind this state, so that the joiner's
    learning-rate schedule continues from it; every tensor is flat with ``numel``
    elements of ``dtype``.
    """

    round: U63
    global_step: UInt
    manifest_hash: Str
    tensors: Names
    numel: UInt
    dtype: Str


@_message(10)
class AuditRequest:
    """A verifier asks a peer for the state it started ``round`` from (to replay that round)."""

    run_id: Str
    manifest_hash: Str
    sender: Str
    round: U63


@_message(11)
class AuditOffer:
    """The audited peer's answer: one tensor transfer per name of ``tensors`` follows, in order.

    ``start_digest`` must equal the one in the peer's signed commitment for ``round``;
    the verifier recomputes it from what arrives.
    """

    round: U63
    start_digest: Str
    tensors: Names
    numel: UInt
    dtype: Str


MessageType = enum.IntEnum(  # type: ignore[misc]
    "MessageType", [(_constant_name(cls), t) for t, cls in sorted(_REGISTRY.items())], module=__name__
)
MessageType.__doc__ = "Value of the ``\"t\"`` key identifying each message."
MESSAGE_CLASSES: dict[MessageType, type] = {MessageType(t): cls for t, cls in sorted(_REGISTRY.items())}
for _type, _cls in MESSAGE_CLASSES.items():
    _cls.TYPE = _type  # type: ignore[attr-defined]
Message = Union[tuple(MESSAGE_CLASSES.values())]  # type: ignore[valid-type]  # noqa: UP007 - built from the registry
__all__ += [cls.__name__ for cls in MESSAGE_CLASSES.values()]
del _type, _cls


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
    if isinstance(tag, bool) or not isinstance(tag, int) or tag not in MESSAGE_CLASSES:
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
