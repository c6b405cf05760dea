"""Behaviour of chunked tensor transfer: exact round trips and refusal of every kind of bad transfer."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    CHECKSUM_BYTES,
    DTYPE_SIZES,
    MAX_CHUNK_BYTES,
    ChecksumMismatch,
    ChunkSequenceError,
    ExchangeAck,
    ExchangeReject,
    FrameDecoder,
    InvalidField,
    Message,
    NonFiniteTensor,
    TensorAssembler,
    TensorChunk,
    TensorDtypeMismatch,
    TensorEnd,
    TensorHeader,
    TensorShapeMismatch,
    TensorSpec,
    UnexpectedMessage,
    decode_message,
    encode_frame,
    encode_message,
    tensor_checksum,
    tensor_messages,
)

from tests.unit.conftest import read_spec

THETA = TensorSpec("theta", "float32", (4, 3))


def _raw_bytes(dtype: str, shape: tuple[int, ...], seed: int = 0) -> bytes:
    """Finite little-endian bytes for ``dtype`` (bfloat16 as the top half of float32; blockwise8 as the bytes
    its header's shape counts)."""
    values = np.random.default_rng(seed).standard_normal(math.prod(shape)).astype("<f4")
    if dtype == "blockwise8":
        return np.random.default_rng(seed).integers(0, 256, math.prod(shape), dtype="u1").tobytes()
    if dtype == "float32":
        return values.tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    return (values.view("<u4") >> 16).astype("<u2").tobytes()


def _transfer(spec: TensorSpec, data: bytes, chunk_bytes: int = 16) -> list[Message]:
    return list(tensor_messages(spec, data, chunk_bytes))


def _feed_all(asm: TensorAssembler, msgs: list[Message]) -> bool:
    done = False
    for msg in msgs:
        done = asm.feed(msg)
    return done


# --- round trips ----------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPE_SIZES)),
    shape=st.lists(st.integers(min_value=0, max_value=6), max_size=4).map(tuple),
    chunk_bytes=st.integers(min_value=1, max_value=100),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_tensor_round_trips_through_messages_and_assembler(
    dtype: str, shape: tuple[int, ...], chunk_bytes: int, seed: int
) -> None:
    spec = TensorSpec("theta", dtype, shape)
    data = _raw_bytes(dtype, shape, seed)
    stream = b"".join(
        encode_frame(encode_message(m)) for m in tensor_messages(spec, data, chunk_bytes)
    )
    asm = TensorAssembler(spec)
    results = [asm.feed(decode_message(body)) for body in FrameDecoder().feed(stream)]
    assert results[-1] is True and not any(results[:-1])
    assert bytes(asm.buffer) == data
    array = asm.array()
    assert array.shape == shape
    assert array.tobytes() == data


def test_messages_are_header_chunks_end_with_checksum() -> None:
    data = _raw_bytes("float32", THETA.shape)
    msgs = _transfer(THETA, data, chunk_bytes=20)
    assert msgs[0] == TensorHeader("theta", "float32", (4, 3), 20, 3)
    assert [m.index for m in msgs[1:-1]] == [0, 1, 2]  # type: ignore[union-attr]
    assert [len(m.data) for m in msgs[1:-1]] == [20, 20, 8]  # type: ignore[union-attr]
    assert all(type(m.data) is bytes for m in msgs[1:-1])  # type: ignore[union-attr]
    assert msgs[-1] == TensorEnd("theta", tensor_checksum(data))
    assert len(tensor_checksum(data)) == CHECKSUM_BYTES


def test_zero_size_tensor_has_no_chunks_and_round_trips() -> None:
    spec = TensorSpec("theta", "float16", (0, 5))
    msgs = _transfer(spec, b"")
    assert len(msgs) == 2
    assert isinstance(msgs[0], TensorHeader) and msgs[0].num_chunks == 0
    asm = TensorAssembler(spec)
    assert _feed_all(asm, msgs)
    assert asm.array().shape == (0, 5)


def test_assembler_receives_straight_into_callers_buffer() -> None:
    source = np.arange(12, dtype="<f4").reshape(4, 3)
    target = np.zeros((4, 3), dtype="<f4")
    asm = TensorAssembler(THETA, out=target.data)
    assert _feed_all(asm, _transfer(THETA, source.tobytes(), 7))
    np.testing.assert_array_equal(target, source)
    assert np.shares_memory(asm.array(), target)


def test_array_views_bfloat16_as_raw_uint16() -> None:
    spec = TensorSpec("phi", "bfloat16", (2,))
    data = np.array([0x3F80, 0xC000], dtype="<u2").tobytes()  # 1.0, -2.0
    asm = TensorAssembler(spec)
    assert _feed_all(asm, _transfer(spec, data))
    assert asm.array().dtype == np.dtype("<u2")
    assert asm.array().tolist() == [0x3F80, 0xC000]


def test_tensor_messages_accepts_numpy_memoryview() -> None:
    source = np.arange(12, dtype="<f4").reshape(4, 3)
    msgs = _transfer(THETA, memoryview(source))  # type: ignore[arg-type]
    asm = TensorAssembler(THETA)
    assert _feed_all(asm, msgs)
    np.testing.assert_array_equal(asm.array(), source)


# --- sender-side refusals -------------------------------------------------------


def test_tensor_messages_refuses_data_of_wrong_length() -> None:
    with pytest.raises(ValueError, match="needs 48 bytes"):
        list(tensor_messages(THETA, b"\x00" * 47))


@pytest.mark.parametrize("chunk_bytes", [0, -1, MAX_CHUNK_BYTES + 1])
def test_tensor_messages_refuses_bad_chunk_size(chunk_bytes: int) -> None:
    with pytest.raises(ValueError):
        list(tensor_messages(THETA, b"\x00" * 48, chunk_bytes))


def test_tensor_spec_refuses_unknown_dtype_and_bad_shape() -> None:
    with pytest.raises(ValueError):
        TensorSpec("theta", "float64", (1,))
    with pytest.raises(ValueError):
        TensorSpec("theta", "float32", (2, -1))
    with pytest.raises(ValueError):
        TensorSpec("theta", "float32", (1,) * 9)


def test_tensor_spec_normalises_shape_to_int_tuple() -> None:
    spec = TensorSpec("theta", "float16", [np.int64(2), 3])  # type: ignore[arg-type]
    assert spec.shape == (2, 3) and spec.numel == 6 and spec.nbytes == 12


def test_assembler_refuses_output_buffer_of_wrong_size_or_readonly() -> None:
    with pytest.raises(ValueError):
        TensorAssembler(THETA, out=bytearray(47))
    with pytest.raises(ValueError):
        TensorAssembler(THETA, out=memoryview(bytes(48)))


# --- receiver-side refusals -----------------------------------------------------


@pytest.fixture
def good() -> list[Message]:
    return _transfer(THETA, _raw_bytes("float32", THETA.shape), chunk_bytes=16)


def test_assembler_refuses_wrong_shape() -> None:
    spec = TensorSpec("theta", "float32", (3, 4))
    with pytest.raises(TensorShapeMismatch) as info:
        TensorAssembler(THETA).feed(_transfer(spec, bytes(48))[0])
    assert "[3, 4]" in str(info.value) and "[4, 3]" in str(info.value)
    assert info.value.kind == "shape"


def test_assembler_refuses_wrong_dtype() -> None:
    spec = TensorSpec("theta", "float16", (4, 3))
    with pytest.raises(TensorDtypeMismatch) as info:
        TensorAssembler(THETA).feed(_transfer(spec, bytes(24))[0])
    assert "float16" in str(info.value) and "float32" in str(info.value)


def test_assembler_refuses_wrong_tensor_name() -> None:
    spec = TensorSpec("phi", "float32", (4, 3))
    with pytest.raises(UnexpectedMessage):
        TensorAssembler(THETA).feed(_transfer(spec, bytes(48))[0])


def test_assembler_refuses_first_message_other_than_header(good: list[Message]) -> None:
    with pytest.raises(UnexpectedMessage, match="expected TensorHeader, got TensorChunk"):
        TensorAssembler(THETA).feed(good[1])


@pytest.mark.parametrize(
    "chunk_bytes, num_chunks",
    [(16, 2), (16, 4), (0, 0), (MAX_CHUNK_BYTES + 1, 1)],
)
def test_assembler_refuses_inconsistent_chunking(chunk_bytes: int, num_chunks: int) -> None:
    header = TensorHeader("theta", "float32", (4, 3), chunk_bytes, num_chunks)
    with pytest.raises(InvalidField):
        TensorAssembler(THETA).feed(header)


def test_assembler_refuses_out_of_order_chunk(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    with pytest.raises(ChunkSequenceError, match="expected chunk 0, got 1"):
        asm.feed(good[2])


def test_assembler_refuses_duplicate_chunk(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    asm.feed(good[1])
    with pytest.raises(ChunkSequenceError):
        asm.feed(good[1])


def test_assembler_refuses_end_with_missing_chunk(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    asm.feed(good[1])
    with pytest.raises(ChunkSequenceError, match="after 1 of 3 chunks"):
        asm.feed(good[-1])


def test_assembler_refuses_extra_chunk_after_last(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    for msg in good[:-1]:
        asm.feed(msg)
    with pytest.raises(ChunkSequenceError):
        asm.feed(TensorChunk(index=3, data=b"\x00" * 16))


@pytest.mark.parametrize("index, size", [(0, 15), (0, 17), (2, 8), (2, 32)])
def test_assembler_refuses_chunk_of_wrong_size(good: list[Message], index: int, size: int) -> None:
    # Chunks are 16 bytes except the last (index 2), which carries the remaining 16.
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    for msg in good[1 : 1 + index]:
        asm.feed(msg)
    with pytest.raises(ChunkSequenceError, match=f"chunk {index} has {size} bytes"):
        asm.feed(TensorChunk(index=index, data=b"\x00" * size))


def test_assembler_refuses_short_last_chunk() -> None:
    msgs = _transfer(THETA, bytes(48), chunk_bytes=20)  # last chunk is 8 bytes
    asm = TensorAssembler(THETA)
    for msg in msgs[:3]:
        asm.feed(msg)
    with pytest.raises(ChunkSequenceError, match="expected 8"):
        asm.feed(TensorChunk(index=2, data=b"\x00" * 7))


def test_assembler_refuses_bad_checksum(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    _feed_all(asm, good[:-1])
    with pytest.raises(ChecksumMismatch) as info:
        asm.feed(TensorEnd("theta", b"\x00" * CHECKSUM_BYTES))
    assert info.value.kind == "checksum"


def test_assembler_refuses_checksum_of_wrong_length(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    _feed_all(asm, good[:-1])
    end = good[-1]
    assert isinstance(end, TensorEnd)
    with pytest.raises(ChecksumMismatch):
        asm.feed(TensorEnd("theta", end.checksum[:8]))


def test_assembler_refuses_end_for_other_tensor(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    _feed_all(asm, good[:-1])
    end = good[-1]
    assert isinstance(end, TensorEnd)
    with pytest.raises(UnexpectedMessage):
        asm.feed(TensorEnd("phi", end.checksum))


@settings(max_examples=100, deadline=None)
@given(position=st.integers(min_value=0, max_value=47), flip=st.integers(min_value=1, max_value=255))
def test_assembler_detects_any_corrupted_byte(position: int, flip: int) -> None:
    data = _raw_bytes("float32", THETA.shape)
    msgs = _transfer(THETA, data, chunk_bytes=16)
    chunk = msgs[1 + position // 16]
    assert isinstance(chunk, TensorChunk)
    corrupted = bytearray(chunk.data)
    corrupted[position % 16] ^= flip
    msgs[1 + position // 16] = TensorChunk(chunk.index, bytes(corrupted))
    asm = TensorAssembler(THETA)
    with pytest.raises(ChecksumMismatch):
        _feed_all(asm, msgs)


def test_assembler_refuses_message_after_completion(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    assert _feed_all(asm, good)
    with pytest.raises(UnexpectedMessage, match="after the transfer"):
        asm.feed(good[0])


def test_assembler_refuses_foreign_message_mid_transfer(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    with pytest.raises(UnexpectedMessage):
        asm.feed(ExchangeAck(ok=False, reason="x"))


def test_assembler_refuses_input_after_a_failure(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    with pytest.raises(UnexpectedMessage):
        asm.feed(good[1])
    with pytest.raises(UnexpectedMessage, match="failed"):
        asm.feed(good[0])
    assert not asm.complete


def test_array_is_unavailable_before_completion(good: list[Message]) -> None:
    asm = TensorAssembler(THETA)
    asm.feed(good[0])
    with pytest.raises(RuntimeError):
        asm.array()


# --- finiteness -------------------------------------------------------------------

_F32_BAD = [np.nan, np.inf, -np.inf]
_BF16_BAD = [0x7FC0, 0x7F80, 0xFF80, 0xFFC1]  # nan, +inf, -inf, negative nan with payload


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", _F32_BAD)
def test_assembler_refuses_non_finite_float(dtype: str, bad: float) -> None:
    spec = TensorSpec("theta", dtype, (2, 5))
    values = np.ones(10, dtype=np.float32)
    values[[1, 4, 9]] = bad
    data = values.astype("<f4" if dtype == "float32" else "<f2").tobytes()
    asm = TensorAssembler(spec)
    with pytest.raises(NonFiniteTensor) as info:
        _feed_all(asm, _transfer(spec, data, chunk_bytes=6))
    assert str(info.value) == "tensor 'theta' has 3 non-finite values"
    assert info.value.kind == "non_finite"


@pytest.mark.parametrize("bad", _BF16_BAD)
def test_assembler_refuses_non_finite_bfloat16(bad: int) -> None:
    spec = TensorSpec("phi", "bfloat16", (6,))
    data = np.array([0x3F80, bad, 0x0000, 0x7F7F, bad, 0x8001], dtype="<u2").tobytes()
    asm = TensorAssembler(spec)
    with pytest.raises(NonFiniteTensor, match="tensor 'phi' has 2 non-finite values"):
        _feed_all(asm, _transfer(spec, data))


def test_assembler_accepts_extreme_finite_values() -> None:
    spec = TensorSpec("theta", "float16", (4,))
    data = np.array([65504.0, -65504.0, 6e-8, -0.0], dtype="<f2").tobytes()
    assert _feed_all(TensorAssembler(spec), _transfer(spec, data))
    spec = TensorSpec("phi", "bfloat16", (3,))
    data = np.array([0x7F7F, 0xFF7F, 0x0001], dtype="<u2").tobytes()  # max, -max, subnormal
    assert _feed_all(TensorAssembler(spec), _transfer(spec, data))


def test_finiteness_check_spans_blocks_of_a_large_tensor() -> None:
    n = (1 << 20) * 2 + 5  # crosses the internal scan block boundary
    spec = TensorSpec("theta", "float32", (n,))
    values = np.zeros(n, dtype="<f4")
    values[[0, (1 << 20) + 1, n - 1]] = np.nan
    asm = TensorAssembler(spec)
    with pytest.raises(NonFiniteTensor, match="has 3 non-finite"):
        _feed_all(asm, _transfer(spec, values.tobytes(), chunk_bytes=1 << 22))


def test_spec_worked_example_transfer_bytes_are_exact() -> None:
    # The hex dumps in protocol/SPEC.md must be what the code actually sends.
    spec_text = re.sub(r"\s", "", read_spec())
    spec = TensorSpec("theta", "float32", (1,))
    messages: list[Message] = list(tensor_messages(spec, bytes.fromhex("0000803f"), chunk_bytes=4))
    messages.append(ExchangeReject(reason="busy", round=7))
    for msg in messages:
        assert encode_frame(encode_message(msg)).hex() in spec_text, msg
