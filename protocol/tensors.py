"""Chunked tensor transfer: sender-side message generation and receiver-side validation.

A tensor travels as ``TensorHeader`` (name, dtype, shape, chunking), its raw
little-endian bytes in ``TensorChunk`` messages, and ``TensorEnd`` carrying a
blake2b-128 checksum over all of those bytes. The receiver checks everything
against what it expects *before* trusting the data: names, dtype, shape,
chunk order and sizes, checksum, and finally that every value is finite.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from protocol.errors import (
    ChecksumMismatch,
    ChunkSequenceError,
    InvalidField,
    NonFiniteTensor,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    UnexpectedMessage,
)
from protocol.fields import MAX_DIMS, MAX_STR_CHARS
from protocol.messages import Message, TensorChunk, TensorEnd, TensorHeader

__all__ = [
    "DTYPE_SIZES",
    "NUMPY_DTYPES",
    "CHECKSUM_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "TensorSpec",
    "tensor_checksum",
    "tensor_messages",
    "TensorAssembler",
]

# blockwise8 (protocol/codecs.py) travels as its packed bytes: block scales, then codes. Its header's shape
# counts those bytes (codecs.wire_numel); the scales and the decoded values are checked by codecs.decode.
DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "blockwise8": 1}
# numpy has no bfloat16, so it is viewed as its raw 16-bit pattern.
NUMPY_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "blockwise8": "u1"}
CHECKSUM_BYTES = 16
DEFAULT_CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_BYTES = 64 * 2**20

# Elements checked per step of the finiteness scan; bounds temporary memory.
_FINITE_BLOCK = 1 << 20
_BF16_EXPONENT = 0x7F80


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one tensor, as both sides of an exchange expect it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or len(self.name) > MAX_STR_CHARS:
            raise ValueError(f"tensor name must be a string of at most {MAX_STR_CHARS} characters")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"unsupported dtype {self.dtype!r}, expected one of {', '.join(DTYPE_SIZES)}"
            )
        shape = tuple(operator.index(d) for d in self.shape)
        if len(shape) > MAX_DIMS or any(d < 0 for d in shape):
            raise ValueError(
                f"shape {shape} must have at most {MAX_DIMS} non-negative dimensions"
            )
        # Normalise lists / numpy ints so that equality with decoded headers is exact.
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the raw encoding in bytes."""
        return self.numel * DTYPE_SIZES[self.dtype]


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """View any C-contiguous buffer as flat unsigned bytes."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _num_chunks(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


def tensor_checksum(data: bytes | bytearray | memoryview) -> bytes:
    """Checksum carried by ``TensorEnd``: blake2b with a 16-byte digest over the raw bytes."""
    return hashlib.blake2b(_as_bytes_view(data), digest_size=CHECKSUM_BYTES).digest()


def tensor_messages(
    spec: TensorSpec,
    data: bytes | bytearray | memoryview,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[TensorHeader | TensorChunk | TensorEnd]:
    """Yield the header, chunks and end message that transfer ``data`` as tensor ``spec``.

    ``data`` must be the raw little-endian encoding (``spec.nbytes`` long); it is
    read lazily, so it must not change while the iterator is consumed.
    """
    view = _as_bytes_view(data)
    nbytes = spec.nbytes
    if len(view) != nbytes:
        raise ValueError(
            f"tensor '{spec.name}' needs {nbytes} bytes for {spec.dtype}{list(spec.shape)}, got {len(view)}"
        )
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
    num_chunks = _num_chunks(nbytes, chunk_bytes)
    yield TensorHeader(
        name=spec.name,
        dtype=spec.dtype,
        shape=spec.shape,
        chunk_bytes=chunk_bytes,
        num_chunks=num_chunks,
    )
    digest = hashlib.blake2b(digest_size=CHECKSUM_BYTES)
    for index in range(num_chunks):
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        digest.update(piece)
        yield TensorChunk(index=index, data=bytes(piece))
    yield TensorEnd(name=spec.name, checksum=digest.digest())


def _count_non_finite(dtype: str, flat: np.ndarray) -> int:
    """Count NaN/inf values in a flat array, scanning in blocks to bound temporaries."""
    bad = 0
    if dtype == "blockwise8":
        return 0  # bytes: codecs.decode checks its scales and values
    for start in range(0, flat.size, _FINITE_BLOCK):
        block = flat[start : start + _FINITE_BLOCK]
        if dtype == "bfloat16":
            # All exponent bits set encodes inf (zero mantissa) or NaN.
            bad += int(np.count_nonzero((block & _BF16_EXPONENT) == _BF16_EXPONENT))
        else:
            bad += block.size - int(np.count_nonzero(np.isfinite(block)))
    return bad


class TensorAssembler:
    """Receives one tensor transfer into a preallocated buffer and validates it against what the receiver expects."""

    _HEADER = 0
    _CHUNKS = 1
    _END = 2
    _DONE = 3
    _FAILED = 4

    def __init__(
        self,
        expected: TensorSpec,
        out: bytearray | memoryview | None = None,
        *,
        chunk_bytes: int | None = None,
    ) -> None:
        """Prepare to receive ``expected``, writing into ``out`` (a writable buffer of ``expected.nbytes``) if given.

        ``chunk_bytes``: the chunk size the sender must use (the run's, from its manifest); a header with
        any other is refused. None accepts any size in range.
        """
        if chunk_bytes is not None and not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        self._expected = expected
        self._required_chunk_bytes = chunk_bytes
        nbytes = expected.nbytes
        if out is None:
            out = bytearray(nbytes)
        view = _as_bytes_view(out)
        if view.readonly:
            raise ValueError("output buffer must be writable")
        if len(view) != nbytes:
            raise ValueError(
                f"output buffer for tensor '{expected.name}' must be {nbytes} bytes, got {len(view)}"
            )
        self._buf = view
        self._nbytes = nbytes
        self._state = self._HEADER
        self._chunk_bytes = 0
        self._num_chunks = 0
        self._next_index = 0
        self._digest = hashlib.blake2b(digest_size=CHECKSUM_BYTES)

    @property
    def buffer(self) -> memoryview:
        """The flat byte buffer the tensor is received into."""
        return self._buf

    @property
    def complete(self) -> bool:
        """True once the transfer has been received and validated."""
        return self._state == self._DONE

    def array(self) -> np.ndarray:
        """Zero-copy numpy view of the received tensor (bfloat16 as raw ``<u2``)."""
        if self._state != self._DONE:
            raise RuntimeError(f"tensor '{self._expected.name}' is not completely received")
        return np.frombuffer(
            self._buf, dtype=NUMPY_DTYPES[self._expected.dtype]
        ).reshape(self._expected.shape)

    def feed(self, msg: Message) -> bool:
        """Consume the next message of the transfer; True when it is complete and valid.

        Raises a ``ProtocolError`` subclass on anything invalid; the assembler then
        refuses further input.
        """
        state = self._state
        if state in (self._DONE, self._FAILED):
            what = "complete" if state == self._DONE else "failed"
            raise UnexpectedMessage(
                f"got {type(msg).__name__} after the transfer of tensor '{self._expected.name}' {what}"
            )
        try:
            if state == self._HEADER:
                self._on_header(msg)
            elif state == self._CHUNKS:
                self._on_chunk(msg)
            else:
                self._on_end(msg)
        except BaseException:
            self._state = self._FAILED
            raise
        return self._state == self._DONE

    def _on_header(self, msg: Message) -> None:
        exp = self._expected
        if not isinstance(msg, TensorHeader):
            raise UnexpectedMessage(f"expected TensorHeader, got {type(msg).__name__}")
        if msg.name != exp.name:
            raise UnexpectedMessage(f"expected tensor '{exp.name}', got '{msg.name}'")
        if msg.dtype != exp.dtype:
            raise TensorDtypeMismatch(
                f"tensor '{exp.name}' has dtype {msg.dtype}, expected {exp.dtype}"
            )
        if tuple(msg.shape) != exp.shape:
            raise TensorShapeMismatch(
                f"tensor '{exp.name}' has shape {list(msg.shape)}, expected {list(exp.shape)}"
            )
        if not 0 < msg.chunk_bytes <= MAX_CHUNK_BYTES:
            raise InvalidField(
                f"field 'chunk_bytes' must be in 1..{MAX_CHUNK_BYTES}, got {msg.chunk_bytes}"
            )
        required = self._required_chunk_bytes
        if required is not None and msg.chunk_bytes != required:
            raise InvalidField(
                f"tensor '{exp.name}' comes in chunks of {msg.chunk_bytes} bytes, this run's chunk size is {required}"
            )
        want = _num_chunks(self._nbytes, msg.chunk_bytes)
        if msg.num_chunks != want:
            raise InvalidField(
                f"field 'num_chunks' is {msg.num_chunks}, but {self._nbytes} bytes "
                f"in chunks of {msg.chunk_bytes} need {want}"
            )
        self._chunk_bytes = msg.chunk_bytes
        self._num_chunks = want
        self._state = self._CHUNKS if want else self._END

    def _on_chunk(self, msg: Message) -> None:
        name = self._expected.name
        if isinstance(msg, TensorEnd):
            raise ChunkSequenceError(
                f"tensor '{name}' ended after {self._next_index} of {self._num_chunks} chunks"
            )
        if not isinstance(msg, TensorChunk):
            raise UnexpectedMessage(f"expected TensorChunk, got {type(msg).__name__}")
        index = self._next_index
        if msg.index != index:
            raise ChunkSequenceError(f"tensor '{name}': expected chunk {index}, got {msg.index}")
        start = index * self._chunk_bytes
        size = min(self._chunk_bytes, self._nbytes - start)
        if len(msg.data) != size:
            raise ChunkSequenceError(
                f"tensor '{name}': chunk {index} has {len(msg.data)} bytes, expected {size}"
            )
        self._buf[start : start + size] = msg.data
        self._digest.update(msg.data)
        self._next_index = index + 1
        if self._next_index == self._num_chunks:
            self._state = self._END

    def _on_end(self, msg: Message) -> None:
        exp = self._expected
        if isinstance(msg, TensorChunk):
            raise ChunkSequenceError(
                f"tensor '{exp.name}': got chunk {msg.index} but all {self._num_chunks} chunks were received"
            )
        if not isinstance(msg, TensorEnd):
            raise UnexpectedMessage(f"expected TensorEnd, got {type(msg).__name__}")
        if msg.name != exp.name:
            raise UnexpectedMessage(f"expected end of tensor '{exp.name}', got end of '{msg.name}'")
        if not hmac.compare_digest(bytes(msg.checksum), self._digest.digest()):
            raise ChecksumMismatch(f"tensor '{exp.name}' checksum does not match its bytes")
        flat = np.frombuffer(self._buf, dtype=NUMPY_DTYPES[exp.dtype])
        bad = _count_non_finite(exp.dtype, flat)
        if bad:
            raise NonFiniteTensor(f"tensor '{exp.name}' has {bad} non-finite values")
        self._state = self._DONE
