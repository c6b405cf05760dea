"""Behaviour of length-prefixed framing: limits are enforced before bodies are read."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    FrameDecoder,
    FrameTooLarge,
    MalformedMessage,
    ProtocolError,
    encode_frame,
    parse_frame_header,
)


def test_encode_frame_prefixes_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


def test_encode_frame_refuses_empty_body() -> None:
    with pytest.raises(MalformedMessage):
        encode_frame(b"")


def test_encode_frame_refuses_body_over_limit() -> None:
    with pytest.raises(FrameTooLarge, match="frame of 11 bytes exceeds the 10-byte limit"):
        encode_frame(b"x" * 11, max_frame_bytes=10)


def test_encode_frame_accepts_body_exactly_at_limit() -> None:
    assert len(encode_frame(b"x" * 10, max_frame_bytes=10)) == 10 + HEADER_BYTES


def test_parse_frame_header_returns_body_length() -> None:
    assert parse_frame_header(b"\x00\x01\x00\x00") == 65536


def test_parse_frame_header_refuses_oversized_announcement_with_clear_message() -> None:
    with pytest.raises(FrameTooLarge) as info:
        parse_frame_header(b"\xff\xff\xff\xff")
    assert str(info.value) == (
        f"frame of 4294967295 bytes exceeds the {DEFAULT_MAX_FRAME_BYTES}-byte limit"
    )
    assert info.value.kind == "oversized"


def test_parse_frame_header_refuses_zero_length() -> None:
    with pytest.raises(MalformedMessage):
        parse_frame_header(b"\x00\x00\x00\x00")


@pytest.mark.parametrize("header", [b"", b"\x00", b"\x00\x00\x01", b"\x00\x00\x00\x01\x00"])
def test_parse_frame_header_refuses_wrong_header_size(header: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_frame_header(header)


def test_decoder_refuses_oversized_header_before_body_is_available() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    # Only the header has arrived: the refusal must not wait for 101 body bytes.
    with pytest.raises(FrameTooLarge):
        decoder.feed((101).to_bytes(4, "big"))


def test_decoder_refuses_oversized_frame_after_valid_ones_in_same_feed() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"ok") + (1000).to_bytes(4, "big"))


def test_decoder_returns_nothing_until_frame_complete() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(b"hello")
    assert decoder.feed(frame[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(frame[2:6]) == []
    assert decoder.buffered == 6
    assert decoder.feed(frame[6:]) == [b"hello"]
    assert decoder.buffered == 0


def test_decoder_returns_several_frames_from_one_feed() -> None:
    decoder = FrameDecoder()
    data = encode_frame(b"a") + encode_frame(b"bc") + encode_frame(b"def")[:5]
    assert decoder.feed(data) == [b"a", b"bc"]
    assert decoder.buffered == 5
    assert decoder.feed(b"ef") == [b"def"]


def test_decoder_reassembles_byte_by_byte_feed() -> None:
    decoder = FrameDecoder()
    bodies = [b"x", b"y" * 300, b"z" * 7]
    stream = b"".join(encode_frame(b) for b in bodies)
    out: list[bytes] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == bodies
    assert decoder.buffered == 0


@settings(max_examples=150, deadline=None)
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=200), max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
)
def test_decoder_reassembles_arbitrary_splits_of_a_stream(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in zip(points, points[1:]):
        out += decoder.feed(stream[start:end])
    assert out == bodies
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), limit=st.integers(min_value=1, max_value=64))
def test_decoder_on_arbitrary_bytes_raises_only_protocol_errors(data: bytes, limit: int) -> None:
    decoder = FrameDecoder(max_frame_bytes=limit)
    try:
        bodies = decoder.feed(data)
    except ProtocolError:
        return
    assert all(0 < len(b) <= limit for b in bodies)
