"""State-sync messages: codec round trips, strict refusals, a full download into preallocated buffers, SPEC bytes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    DTYPE_SIZES,
    MAX_STR_CHARS,
    MAX_TENSORS,
    MESSAGE_CLASSES,
    NUMPY_DTYPES,
    REJECT_REASONS,
    ChecksumMismatch,
    ExchangeAccept,
    ExchangeReject,
    ExchangeRequest,
    FrameDecoder,
    InvalidField,
    Message,
    MessageType,
    StateOffer,
    StateRequest,
    TensorAssembler,
    TensorChunk,
    TensorHeader,
    TensorShapeMismatch,
    TensorSpec,
    UnexpectedMessage,
    decode_message,
    encode_frame,
    encode_message,
    tensor_messages,
)
from protocol.messages import MAX_U63, MAX_UINT

from tests.unit.conftest import assert_decode_refuses_field, pack, raw_map, read_spec

STATE_TENSORS = ("phi", "momentum")
HASH = "9f86d081"

# --- helpers ------------------------------------------------------------------


def _request(**overrides: Any) -> StateRequest:
    fields: dict[str, Any] = {"run_id": "run-1", "manifest_hash": HASH, "sender": "12D3KooWpeer"}
    fields.update(overrides)
    return StateRequest(**fields)


def _offer(**overrides: Any) -> StateOffer:
    fields: dict[str, Any] = {
        "round": 42,
        "global_step": 21000,
        "manifest_hash": HASH,
        "tensors": STATE_TENSORS,
        "numel": 1000,
        "dtype": "float32",
    }
    fields.update(overrides)
    return StateOffer(**fields)


def _frames(msgs: list[Message]) -> bytes:
    return b"".join(encode_frame(encode_message(m)) for m in msgs)



# --- types and exports ----------------------------------------------------------


def test_state_message_types_are_8_and_9_and_registered() -> None:
    assert StateRequest.TYPE == MessageType.STATE_REQUEST == 8
    assert StateOffer.TYPE == MessageType.STATE_OFFER == 9
    assert MESSAGE_CLASSES[MessageType.STATE_REQUEST] is StateRequest
    assert MESSAGE_CLASSES[MessageType.STATE_OFFER] is StateOffer
    assert {"StateRequest", "StateOffer"} <= set(protocol.__all__)


def test_state_messages_are_frozen() -> None:
    msg = _offer()
    with pytest.raises(AttributeError):
        msg.round = 1  # type: ignore[misc]


def test_reject_reasons_keep_their_order_and_cover_a_donor() -> None:
    # the list, in order, that SPEC.md gives for ExchangeReject's `reason`; `no_state` is a donor's (§11)
    spec = " ".join(read_spec().split())
    listed = re.search(r"`reason` must be one of (.*?) \(`REJECT_REASONS`", spec)
    assert listed is not None
    assert REJECT_REASONS == tuple(re.findall(r"`(\w+)`", listed.group(1)))
    assert REJECT_REASONS[-1] == "no_state"


@pytest.mark.parametrize("reason", ["busy", "manifest", "shutting_down", "no_state"])
def test_donor_rejects_round_trip(reason: str) -> None:
    msg = ExchangeReject(reason=reason, round=0)
    assert decode_message(encode_message(msg), expected=(StateOffer, ExchangeReject)) == msg


# --- round trips ----------------------------------------------------------------


def test_state_request_and_offer_round_trip() -> None:
    for msg in (_request(), _offer(), _offer(tensors=(), numel=0)):
        assert decode_message(encode_message(msg)) == msg
    assert raw_map(_request()) == {"v": protocol.PROTOCOL_VERSION, "t": 8, "run_id": "run-1", "manifest_hash": HASH,
                                   "sender": "12D3KooWpeer"}
    assert raw_map(_offer()) == {"v": protocol.PROTOCOL_VERSION, "t": 9, "round": 42, "global_step": 21000,
                                 "manifest_hash": HASH, "tensors": ["phi", "momentum"],
                                 "numel": 1000, "dtype": "float32"}


def test_decoded_offer_tensors_are_a_tuple() -> None:
    msg = decode_message(encode_message(_offer(tensors=["phi", "momentum"])))  # type: ignore[arg-type]
    assert isinstance(msg, StateOffer)
    assert msg.tensors == STATE_TENSORS


def test_limits_are_inclusive() -> None:
    longest = "x" * MAX_STR_CHARS
    for msg in (
        _request(run_id=longest, manifest_hash=longest, sender=longest),
        _offer(round=MAX_U63, global_step=MAX_UINT, numel=MAX_UINT, manifest_hash=longest,
               dtype=longest, tensors=(longest,) * MAX_TENSORS),
        _offer(round=0, global_step=0, numel=0, manifest_hash="", dtype="", tensors=("",)),
    ):
        assert decode_message(encode_message(msg)) == msg


def test_decode_ignores_unknown_extra_fields() -> None:
    raw = raw_map(_offer())
    raw["checkpoint_id"] = {"future": [1, 2]}
    assert decode_message(pack(raw)) == _offer()


# --- refusals -------------------------------------------------------------------

_BAD_STR = [None, 5, 1.5, True, b"bytes", ["a"], {"a": 1}, "s" * (MAX_STR_CHARS + 1)]
_BAD_UINT = [True, False, -1, -(2**63), 1.0, "1", None, b"\x01", [1]]
_BAD_NAMES = [
    "phi",
    b"phi",
    None,
    5,
    {"phi": 1},
    ["phi", 5],
    ["phi", None],
    ["phi", b"momentum"],
    [["phi"]],
    ["phi", "m" * (MAX_STR_CHARS + 1)],
    ["t"] * (MAX_TENSORS + 1),
]

_FIELD_CASES: list[tuple[Message, str, Any]] = (
    [(_request(), field, value) for field in ("run_id", "manifest_hash", "sender") for value in _BAD_STR]
    + [(_offer(), field, value) for field in ("manifest_hash", "dtype") for value in _BAD_STR]
    + [(_offer(), field, value) for field in ("round", "global_step", "numel") for value in _BAD_UINT]
    + [(_offer(), "tensors", value) for value in _BAD_NAMES]
)


@pytest.mark.parametrize("msg, field, value", _FIELD_CASES)
def test_decode_refuses_wrong_field_values(msg: Message, field: str, value: Any) -> None:
    assert_decode_refuses_field(msg, field, value)


@pytest.mark.parametrize("msg, field, value", _FIELD_CASES + [(_offer(), f, MAX_UINT + 1) for f in
                                                               ("round", "global_step", "numel")])
def test_encode_refuses_what_a_peer_would_refuse(msg: Message, field: str, value: Any) -> None:
    with pytest.raises(InvalidField, match=field):
        encode_message(dataclasses.replace(msg, **{field: value}))


@pytest.mark.parametrize("field", ["round", "global_step", "numel"])
@pytest.mark.parametrize("flag", [True, False])
def test_booleans_are_not_integers(field: str, flag: bool) -> None:
    raw = raw_map(_offer())
    raw[field] = flag
    with pytest.raises(InvalidField, match=f"'{field}' must be an integer, got bool"):
        decode_message(pack(raw))
    with pytest.raises(InvalidField, match=field):
        encode_message(_offer(**{field: flag}))


@pytest.mark.parametrize(
    "msg, field",
    [(_request(), f) for f in ("run_id", "manifest_hash", "sender")]
    + [(_offer(), f) for f in ("round", "global_step", "manifest_hash", "tensors", "numel", "dtype")],
)
def test_decode_refuses_missing_field(msg: Message, field: str) -> None:
    raw = raw_map(msg)
    del raw[field]
    with pytest.raises(InvalidField, match=f"{type(msg).__name__} is missing field '{field}'"):
        decode_message(pack(raw))


def test_reject_with_unknown_reason_is_refused() -> None:
    raw = raw_map(ExchangeReject(reason="no_state", round=0))
    raw["reason"] = "no_weights"
    with pytest.raises(InvalidField, match="reason"):
        decode_message(pack(raw))


@pytest.mark.parametrize(
    "msg, expected",
    [
        (TensorHeader("phi", "float32", (4,), 16, 1), (StateOffer, ExchangeReject)),  # tensor before the offer
        (ExchangeAccept(round=1), (StateOffer, ExchangeReject)),  # exchange answer on a state stream
        (_request(), ExchangeRequest),  # state request where an exchange request is due
        (_offer(), (ExchangeAccept, ExchangeReject)),
    ],
)
def test_state_and_exchange_messages_do_not_mix(msg: Message, expected: Any) -> None:
    with pytest.raises(UnexpectedMessage) as info:
        decode_message(encode_message(msg), expected=expected)
    assert info.value.kind == "unexpected"


# --- a whole download, pure -----------------------------------------------------


def _state(numel: int, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in STATE_TENSORS:
        values = rng.standard_normal(numel).astype("<f4")
        if dtype == "bfloat16":
            out[name] = (values.view("<u4") >> 16).astype("<u2")
        else:
            out[name] = values.astype(NUMPY_DTYPES[dtype])
    return out


def _donor_stream(offer: StateOffer, state: dict[str, np.ndarray], chunk_bytes: int) -> bytes:
    """What a donor writes on the stream: the offer, then one transfer per tensor, in order."""
    msgs: list[Message] = [offer]
    for name in offer.tensors:
        spec = TensorSpec(name, offer.dtype, (offer.numel,))
        msgs.extend(tensor_messages(spec, memoryview(state[name]), chunk_bytes))
    return _frames(msgs)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _download(
    stream: Iterator[bytes], manifest_hash: str, numel: int, dtype: str, buffers: dict[str, np.ndarray]
) -> StateOffer | ExchangeReject:
    """The joiner's side as SPEC §11 describes it: validate the offer, then receive into ``buffers``."""
    decoder = FrameDecoder()
    offer: StateOffer | ExchangeReject | None = None
    assemblers: list[TensorAssembler] = []
    for data in stream:
        for body in decoder.feed(data):
            if offer is None:
                msg = decode_message(body, expected=(StateOffer, ExchangeReject))
                if isinstance(msg, ExchangeReject):
                    return msg
                assert isinstance(msg, StateOffer)
                if msg.manifest_hash != manifest_hash:
                    raise InvalidField("field 'manifest_hash' differs from this node's")
                if msg.tensors != STATE_TENSORS:
                    raise InvalidField(f"field 'tensors' is {list(msg.tensors)}, expected {list(STATE_TENSORS)}")
                if msg.numel != numel or msg.dtype != dtype:
                    raise InvalidField("field 'numel' or 'dtype' does not match the model")
                offer = msg
                assemblers = [
                    TensorAssembler(TensorSpec(name, dtype, (numel,)), out=memoryview(buffers[name]))
                    for name in msg.tensors
                ]
                continue
            if not assemblers:
                raise UnexpectedMessage("message after the last tensor of the state")
            if assemblers[0].feed(decode_message(body)):
                assemblers.pop(0)
    if offer is None or assemblers or decoder.buffered:
        raise ConnectionError("stream ended before the state was complete")
    return offer


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPE_SIZES)),
    numel=st.integers(min_value=0, max_value=300),
    chunk_bytes=st.integers(min_value=1, max_value=200),
    piece=st.integers(min_value=1, max_value=97),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_offer_and_tensors_assemble_into_preallocated_buffers(
    dtype: str, numel: int, chunk_bytes: int, piece: int, seed: int
) -> None:
    state = _state(numel, dtype, seed)
    offer = _offer(numel=numel, dtype=dtype, round=7, global_step=1234)
    stream = _donor_stream(offer, state, chunk_bytes)
    buffers = {name: np.full(numel, 0xFF, dtype=NUMPY_DTYPES[dtype]) for name in STATE_TENSORS}
    before = {name: buf.ctypes.data for name, buf in buffers.items()}

    got = _download(_pieces(stream, piece), HASH, numel, dtype, buffers)

    assert got == offer
    for name in STATE_TENSORS:
        assert buffers[name].ctypes.data == before[name]  # written in place, never reallocated
        assert buffers[name].tobytes() == state[name].tobytes()


def test_assembler_writes_each_chunk_straight_into_the_callers_array() -> None:
    numel = 8
    state = _state(numel, "float32")
    msgs = [decode_message(encode_message(m)) for m in
            tensor_messages(TensorSpec("phi", "float32", (numel,)), memoryview(state["phi"]), 16)]
    out = np.zeros(numel, dtype="<f4")
    asm = TensorAssembler(TensorSpec("phi", "float32", (numel,)), out=memoryview(out))
    asm.feed(msgs[0])
    asm.feed(msgs[1])  # first chunk: 16 bytes = 4 elements
    assert out[:4].tobytes() == state["phi"][:4].tobytes()
    assert not out[4:].any()
    for msg in msgs[2:]:
        asm.feed(msg)
    assert asm.complete
    assert np.shares_memory(asm.array(), out)


def test_download_stops_at_a_reject() -> None:
    reject = ExchangeReject(reason="no_state", round=0)
    got = _download(iter([_frames([reject])]), HASH, 4, "float32", {})
    assert got == reject


@pytest.mark.parametrize(
    "offer, match",
    [
        (_offer(numel=4, manifest_hash="0000"), "manifest_hash"),
        (_offer(numel=4, tensors=("momentum", "phi")), "tensors"),
        (_offer(numel=4, tensors=("phi",)), "tensors"),
        (_offer(numel=5), "numel"),
        (_offer(numel=4, dtype="float16"), "dtype"),
    ],
)
def test_joiner_refuses_a_wrong_offer_before_any_tensor_byte(offer: StateOffer, match: str) -> None:
    buffers = {name: np.zeros(4, dtype="<f4") for name in STATE_TENSORS}
    # Only the offer is on the stream: the joiner decides from it alone.
    with pytest.raises(InvalidField, match=match):
        _download(iter([_frames([offer])]), HASH, 4, "float32", buffers)
    assert not any(buf.any() for buf in buffers.values())


def test_donor_sending_tensors_of_another_size_is_refused() -> None:
    offer = _offer(numel=4)
    # The offer claims 4 elements but the donor streams 5.
    stream = _frames([offer]) + _donor_stream(_offer(numel=5), _state(5, "float32"), 8)[
        len(encode_frame(encode_message(_offer(numel=5)))) :
    ]
    buffers = {name: np.zeros(4, dtype="<f4") for name in STATE_TENSORS}
    with pytest.raises(TensorShapeMismatch):
        _download(iter([stream]), HASH, 4, "float32", buffers)


def test_corrupted_chunk_is_refused() -> None:
    offer = _offer(numel=8)
    msgs: list[Message] = [offer]
    state = _state(8, "float32")
    for name in STATE_TENSORS:
        msgs.extend(tensor_messages(TensorSpec(name, "float32", (8,)), memoryview(state[name]), 8))
    chunk = msgs[-2]
    assert isinstance(chunk, TensorChunk)
    msgs[-2] = TensorChunk(index=chunk.index, data=bytes([chunk.data[0] ^ 1]) + chunk.data[1:])
    buffers = {name: np.zeros(8, dtype="<f4") for name in STATE_TENSORS}
    with pytest.raises(ChecksumMismatch):
        _download(iter([_frames(msgs)]), HASH, 8, "float32", buffers)


def test_anything_after_the_last_tensor_is_refused() -> None:
    offer = _offer(numel=2)
    stream = _donor_stream(offer, _state(2, "float32"), 8) + _frames([ExchangeAccept(round=1)])
    buffers = {name: np.zeros(2, dtype="<f4") for name in STATE_TENSORS}
    with pytest.raises(UnexpectedMessage):
        _download(iter([stream]), HASH, 2, "float32", buffers)


def test_stream_ending_mid_state_is_not_a_download() -> None:
    offer = _offer(numel=16)
    stream = _donor_stream(offer, _state(16, "float32"), 8)
    buffers = {name: np.zeros(16, dtype="<f4") for name in STATE_TENSORS}
    with pytest.raises(ConnectionError):
        _download(iter([stream[:-10]]), HASH, 16, "float32", buffers)


# --- SPEC.md -------------------------------------------------------------------

_HEX_LINE = re.compile(r"[0-9a-f]{2}( [0-9a-f]{2})*")


def _spec_hex_dumps() -> list[bytes]:
    """Every hex dump in SPEC.md's code blocks: runs of lines holding only hex bytes, one frame each."""
    dumps: list[bytes] = []
    current: list[str] = []
    in_block = False
    for line in read_spec().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = not in_block
        if in_block and _HEX_LINE.fullmatch(stripped):
            current.append(stripped)
            continue
        if current:
            dumps.append(bytes.fromhex(" ".join(current)))
            current = []
    return dumps


def test_every_spec_hex_dump_is_one_valid_frame() -> None:
    dumps = _spec_hex_dumps()
    assert len(dumps) >= 7
    for dump in dumps:
        decoder = FrameDecoder()
        bodies = decoder.feed(dump)
        assert len(bodies) == 1 and decoder.buffered == 0, dump.hex(" ")
        decode_message(bodies[0])


@pytest.mark.parametrize(
    "msg",
    [
        StateRequest(run_id="run-1", manifest_hash="9f86d081", sender="12D3KooWpeer"),
        StateOffer(round=42, global_step=21000, manifest_hash="9f86d081", tensors=("phi", "momentum"),
                   numel=1000, dtype="float32"),
        ExchangeReject(reason="no_state", round=0),
    ],
)
def test_spec_state_sync_examples_decode_and_are_byte_exact(msg: Message) -> None:
    frame = encode_frame(encode_message(msg))
    assert frame in _spec_hex_dumps()
    assert decode_message(frame[4:]) == msg


def test_spec_describes_state_sync() -> None:
    text = read_spec()
    assert "## 11. State sync" in text
    assert "`gossiptrain/state/1`" in text
    assert "| 8 | `StateRequest` |" in text and "| 9 | `StateOffer` |" in text
    for reason in REJECT_REASONS:
        assert f"`{reason}`" in text
