"""Behaviour of the message codec: exact round trips and strict refusal of bad input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_DIMS,
    MAX_STR_CHARS,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    AuditOffer,
    AuditRequest,
    ChecksumMismatch,
    ChunkSequenceError,
    ErrorMessage,
    ExchangeAccept,
    ExchangeAck,
    ExchangeReject,
    ExchangeRequest,
    FrameDecoder,
    FrameTooLarge,
    InvalidField,
    MalformedMessage,
    Message,
    MessageType,
    NonFiniteTensor,
    ProtocolError,
    StateOffer,
    StateRequest,
    TensorChunk,
    TensorDtypeMismatch,
    TensorEnd,
    TensorHeader,
    TensorShapeMismatch,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
    decode_message,
    encode_frame,
    encode_message,
)

from tests.unit.conftest import assert_decode_refuses_field, pack, raw_map

# --- strategies ---------------------------------------------------------------

_text = st.text(max_size=MAX_STR_CHARS)
_uint = st.integers(min_value=0, max_value=2**64 - 1)
_round = st.integers(min_value=0, max_value=2**63 - 1)  # rounds are u63 (SPEC.md §3)
# the tensor list an exchange request, a state offer and an audit offer announce
_TENSOR_LIST = {"tensors": st.lists(_text, max_size=MAX_TENSORS).map(tuple), "numel": _uint, "dtype": _text}

MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(ErrorMessage, kind=_text, message=_text),
    st.builds(
        ExchangeRequest,
        run_id=_text,
        manifest_hash=_text,
        round=_round,
        sender=_text,
        **_TENSOR_LIST,
    ),
    st.builds(ExchangeAccept, round=_round),
    st.builds(ExchangeReject, reason=st.sampled_from(REJECT_REASONS), round=_round),
    st.builds(
        TensorHeader,
        name=_text,
        dtype=_text,
        shape=st.lists(_uint, max_size=MAX_DIMS).map(tuple),
        chunk_bytes=_uint,
        num_chunks=_uint,
    ),
    st.builds(TensorChunk, index=_uint, data=st.binary(max_size=512)),
    st.builds(TensorEnd, name=_text, checksum=st.binary(max_size=32)),
    st.builds(ExchangeAck, ok=st.booleans(), reason=_text),
    st.builds(StateRequest, run_id=_text, manifest_hash=_text, sender=_text),
    st.builds(
        StateOffer,
        round=_round,
        global_step=_uint,
        manifest_hash=_text,
        **_TENSOR_LIST,
    ),
    st.builds(AuditRequest, run_id=_text, manifest_hash=_text, sender=_text, round=_round),
    st.builds(
        AuditOffer,
        round=_round,
        start_digest=_text,
        **_TENSOR_LIST,
    ),
)

_any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=300)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10)
    | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=12,
)


def _request(**overrides: Any) -> ExchangeRequest:
    fields: dict[str, Any] = dict(
        run_id="run-1",
        manifest_hash="ab" * 32,
        round=3,
        sender="12D3KooWpeer",
        tensors=("theta",),
        numel=10,
        dtype="float32",
    )
    fields.update(overrides)
    return ExchangeRequest(**fields)


# --- round trips ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(msg=MESSAGES)
def test_every_message_type_round_trips_exactly(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(msg=MESSAGES, piece=st.integers(min_value=1, max_value=64))
def test_every_message_round_trips_through_split_frames(msg: Message, piece: int) -> None:
    frame = encode_frame(encode_message(msg))
    decoder = FrameDecoder()
    bodies = [body for i in range(0, len(frame), piece) for body in decoder.feed(frame[i : i + piece])]
    assert len(bodies) == 1
    assert decode_message(bodies[0]) == msg


@settings(max_examples=100, deadline=None)
@given(msg=MESSAGES)
def test_encoded_body_carries_version_and_type(msg: Message) -> None:
    raw = raw_map(msg)
    assert raw["v"] == PROTOCOL_VERSION
    assert raw["t"] == int(msg.TYPE)


def test_message_classes_cover_every_message_type() -> None:
    classes: list[type[Message]] = [ErrorMessage, ExchangeRequest, ExchangeAccept, ExchangeReject,
               TensorHeader, TensorChunk, TensorEnd, ExchangeAck, StateRequest, StateOffer,
               AuditRequest, AuditOffer]
    assert sorted(c.TYPE for c in classes) == list(MessageType)


def test_spec_worked_example_bytes_are_exact() -> None:
    # Kept in sync with the worked example in protocol/SPEC.md.
    frame = encode_frame(encode_message(ExchangeAccept(round=7)))
    assert frame.hex(" ") == ("00 00 00 21 84 a1 76 02 a1 74 02 a5 72 6f 75 6e 64 07 "
                              "b0 6e 6f 6e 63 65 5f 63 6f 6d 6d 69 74 6d 65 6e 74 c4 00")
    chunk = encode_frame(encode_message(TensorChunk(index=0, data=bytes.fromhex("0000803f"))))
    assert chunk.hex(" ") == (
        "00 00 00 19 84 a1 76 02 a1 74 05 a5 69 6e 64 65 78 00 a4 64 61 74 61 c4 04 00 00 80 3f"
    )


def test_decoded_sequences_are_tuples() -> None:
    msg = decode_message(pack({"v": PROTOCOL_VERSION, "t": 4, "name": "theta", "dtype": "float32",
                               "shape": [2, 3], "chunk_bytes": 8, "num_chunks": 3}))
    assert isinstance(msg, TensorHeader)
    assert msg.shape == (2, 3)


def test_decode_ignores_unknown_extra_fields() -> None:
    raw = raw_map(ExchangeAccept(round=5))
    raw["future_field"] = {"anything": [1, 2, 3]}
    assert decode_message(pack(raw)) == ExchangeAccept(round=5)


def test_encode_accepts_bytearray_and_memoryview_chunk_data() -> None:
    for data in (bytearray(b"abc"), memoryview(b"abc")):
        decoded = decode_message(encode_message(TensorChunk(index=1, data=data)))  # type: ignore[arg-type]
        assert decoded == TensorChunk(index=1, data=b"abc")


# --- refusals -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_raises_only_protocol_errors(body: bytes) -> None:
    try:
        decode_message(body)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    msg=MESSAGES,
    changes=st.lists(
        st.tuples(
            st.sampled_from(["v", "t", "round", "name", "data", "shape", "tensors", "ok", "reason", "index",
                             "checksum", "kind", "run_id", "manifest_hash", "sender", "global_step", "numel",
                             "dtype", "extra"]),
            st.none() | _any_value,
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_decode_of_mutated_maps_raises_only_protocol_errors(
    msg: Message, changes: list[tuple[str, Any]]
) -> None:
    raw = raw_map(msg)
    for key, value in changes:
        if value is None and key in raw:
            del raw[key]
        else:
            raw[key] = value
    try:
        decoded = decode_message(pack(raw))
    except ProtocolError:
        return
    assert encode_message(decoded)  # anything accepted is itself valid to send


@pytest.mark.parametrize("version", [0, 1, 3, -1, 2**64 - 1, "1", 1.0, True, None, [1]])
def test_decode_refuses_wrong_version(version: Any) -> None:
    raw = raw_map(ExchangeAccept(round=1))
    raw["v"] = version
    with pytest.raises(UnsupportedVersion) as info:
        decode_message(pack(raw))
    assert info.value.kind == "version"


def test_decode_refuses_missing_version() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_message(pack({"t": 2, "round": 1}))


@pytest.mark.parametrize("tag", [max(MessageType) + 1, 99, -1, "2", 2.0, True, None])
def test_decode_refuses_unknown_type(tag: Any) -> None:
    with pytest.raises(UnknownMessageType) as info:
        decode_message(pack({"v": PROTOCOL_VERSION, "t": tag, "round": 1}))
    assert info.value.kind == "type"


def test_decode_refuses_missing_type() -> None:
    with pytest.raises(UnknownMessageType):
        decode_message(pack({"v": PROTOCOL_VERSION, "round": 1}))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        pack([1, 2, 3]),
        pack("a string"),
        pack(7),
        pack({"v": PROTOCOL_VERSION, "t": 2, "round": 1}) + b"\x00",  # trailing bytes
        pack({"v": PROTOCOL_VERSION, "t": 2, "round": 1})[:-1],  # truncated
        pack({1: 1, "t": 2}),  # non-string key
        b"\x81\xa1v\xa2\xff\xfe",  # invalid UTF-8 string
        b"\x91" * 5000 + b"\xc0",  # absurdly nested arrays
        b"\xdd\xff\xff\xff\xff",  # array announcing 4 billion entries
    ],
)
def test_decode_refuses_malformed_bodies(body: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_message(body)
    assert info.value.kind == "malformed"


@pytest.mark.parametrize(
    "msg, field, value",
    [
        (ExchangeAccept(round=1), "round", True),  # bool is not an int
        (ExchangeAccept(round=1), "round", -1),  # negative round
        (ExchangeAccept(round=1), "round", 1.0),
        (ExchangeAccept(round=1), "round", "1"),
        (TensorChunk(index=0, data=b"ab"), "data", "ab"),  # str is not bytes
        (TensorChunk(index=0, data=b"ab"), "index", -3),
        (TensorChunk(index=0, data=b"ab"), "index", False),
        (TensorEnd(name="theta", checksum=b"x" * 16), "checksum", [1, 2]),
        (ExchangeAck(ok=True, reason=""), "ok", 1),  # int is not a bool
        (ExchangeAck(ok=True, reason=""), "reason", b"bytes"),
        (_request(), "tensors", "theta"),
        (_request(), "tensors", ["theta", 5]),
        (_request(), "tensors", ["t"] * (MAX_TENSORS + 1)),
        (_request(), "run_id", "r" * (MAX_STR_CHARS + 1)),
        (_request(), "numel", -10),
        (_request(), "sender", None),
        (TensorHeader("theta", "float32", (2,), 8, 1), "shape", [2, -1]),
        (TensorHeader("theta", "float32", (2,), 8, 1), "shape", [1] * (MAX_DIMS + 1)),
        (TensorHeader("theta", "float32", (2,), 8, 1), "shape", [2.0]),
        (TensorHeader("theta", "float32", (2,), 8, 1), "shape", [True]),
        (TensorHeader("theta", "float32", (2,), 8, 1), "shape", 2),
        (ExchangeReject(reason="busy", round=1), "reason", "because"),
    ],
)
def test_decode_refuses_wrong_field_values(msg: Message, field: str, value: Any) -> None:
    assert_decode_refuses_field(msg, field, value)


@pytest.mark.parametrize("field", ["run_id", "manifest_hash", "round", "sender", "tensors", "numel", "dtype"])
def test_decode_refuses_missing_field(field: str) -> None:
    raw = raw_map(_request())
    del raw[field]
    with pytest.raises(InvalidField, match=field):
        decode_message(pack(raw))


def test_decode_accepts_string_at_length_limit() -> None:
    msg = _request(sender="s" * MAX_STR_CHARS)
    assert decode_message(encode_message(msg)) == msg


def test_decode_refuses_valid_message_of_unexpected_type() -> None:
    body = encode_message(TensorChunk(index=0, data=b""))
    with pytest.raises(UnexpectedMessage) as info:
        decode_message(body, expected=(ExchangeAccept, ExchangeReject))
    assert str(info.value) == "expected ExchangeAccept or ExchangeReject, got TensorChunk"
    assert info.value.kind == "unexpected"


def test_decode_returns_message_of_expected_type() -> None:
    body = encode_message(ExchangeReject(reason="stale", round=4))
    assert decode_message(body, expected=ExchangeReject) == ExchangeReject("stale", 4)


def test_encode_refuses_what_a_peer_would_refuse() -> None:
    with pytest.raises(InvalidField):
        encode_message(ExchangeReject(reason="nope", round=1))
    with pytest.raises(InvalidField):
        encode_message(ExchangeAccept(round=-1))
    with pytest.raises(InvalidField):
        encode_message(ExchangeAck(ok=1, reason=""))  # type: ignore[arg-type]


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode_message({"v": 1})  # type: ignore[arg-type]


def test_error_message_from_exception_is_always_encodable() -> None:
    exc = ChecksumMismatch("x" * 10_000)
    msg = ErrorMessage.from_exception(exc)
    assert msg.kind == "checksum"
    assert decode_message(encode_message(msg)) == msg
    assert ErrorMessage.from_exception(RuntimeError("boom")).kind == "internal"


def test_error_kinds_are_distinct_labels() -> None:
    kinds = {
        MalformedMessage: "malformed",
        FrameTooLarge: "oversized",
        UnsupportedVersion: "version",
        UnknownMessageType: "type",
        UnexpectedMessage: "unexpected",
        InvalidField: "field",
        TensorShapeMismatch: "shape",
        TensorDtypeMismatch: "dtype",
        NonFiniteTensor: "non_finite",
        ChecksumMismatch: "checksum",
        ChunkSequenceError: "sequence",
    }
    for cls, kind in kinds.items():
        assert issubclass(cls, ProtocolError)
        assert cls.kind == kind
    assert len(set(kinds.values())) == len(kinds)


# --- the registry and the u63 round bound ---------------------------------------


def test_registry_derives_types_classes_and_exports() -> None:
    import protocol
    from protocol.messages import MESSAGE_CLASSES

    assert [int(t) for t in MessageType] == list(range(len(MessageType)))
    assert MessageType.ERROR is ErrorMessage.TYPE
    assert MessageType.EXCHANGE_REQUEST is ExchangeRequest.TYPE
    for type_, cls in MESSAGE_CLASSES.items():
        assert cls.TYPE is type_
        assert cls.__name__ in protocol.__all__
        assert getattr(protocol, cls.__name__) is cls
    assert set(Message.__args__) == set(MESSAGE_CLASSES.values())


_ROUND_MESSAGES: list[Message] = [
    _request(),
    ExchangeAccept(round=1),
    ExchangeReject(reason="busy", round=1),
    StateOffer(round=1, global_step=0, manifest_hash="h", tensors=("phi",), numel=1, dtype="float32"),
    AuditRequest(run_id="r", manifest_hash="h", sender="s", round=1),
    AuditOffer(round=1, start_digest="d", tensors=("phi",), numel=1, dtype="float32"),
]


@pytest.mark.parametrize("msg", _ROUND_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_of_2_pow_63_is_refused_on_the_wire(msg: Message) -> None:
    import dataclasses

    largest = dataclasses.replace(msg, round=2**63 - 1)
    assert decode_message(encode_message(largest)) == largest
    with pytest.raises(InvalidField, match="'round' must be at most"):
        encode_message(dataclasses.replace(msg, round=2**63))
    raw = raw_map(msg)
    raw["round"] = 2**63  # msgpack carries it as uint64; the codec refuses it
    with pytest.raises(InvalidField, match="'round' must be at most") as info:
        decode_message(pack(raw))
    assert info.value.kind == "field"


def test_records_and_wire_share_the_round_bound() -> None:
    from protocol.verification import InvalidRecord, Receipt

    good = Receipt("run", "a", "b", 2**63 - 1, "cd" * 32, "ef" * 16, 1.5e9, b"att")
    assert Receipt.from_wire(good.to_wire()) == good
    with pytest.raises(InvalidRecord, match="'round' must be at most") as info:
        Receipt.from_wire({**good.to_wire(), "round": 2**63})
    assert info.value.kind == "record"
