"""Wire protocol of gossiptrain (pair exchange, state sync): framing, messages, tensor transfer, manifest hash.

Pure data handling only (stdlib, msgpack, numpy): no torch, no networking, no
asyncio, so it can be used and tested in isolation. See SPEC.md for the
protocol itself.
"""

from protocol.errors import (
    ChecksumMismatch,
    ChunkSequenceError,
    FrameTooLarge,
    InvalidField,
    MalformedMessage,
    NonFiniteTensor,
    ProtocolError,
    TensorDtypeMismatch,
    TensorShapeMismatch,
    TruncatedFrame,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)
from protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    FrameDecoder,
    encode_frame,
    parse_frame_header,
)
from protocol.manifest import canonical_manifest_bytes, manifest_hash
from protocol.messages import (
    MAX_DIMS,
    MAX_STR_CHARS,
    MAX_TENSORS,
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    AuditOffer,
    AuditRequest,
    ErrorMessage,
    ExchangeAccept,
    ExchangeAck,
    ExchangeReject,
    ExchangeRequest,
    Message,
    MessageType,
    StateOffer,
    StateRequest,
    TensorChunk,
    TensorEnd,
    TensorHeader,
    decode_message,
    encode_message,
)
from protocol.tensors import (
    CHECKSUM_BYTES,
    DEFAULT_CHUNK_BYTES,
    DTYPE_SIZES,
    MAX_CHUNK_BYTES,
    NUMPY_DTYPES,
    TensorAssembler,
    TensorSpec,
    tensor_checksum,
    tensor_messages,
)

__all__ = [
    "PROTOCOL_VERSION",
    # errors
    "ProtocolError",
    "MalformedMessage",
    "FrameTooLarge",
    "UnsupportedVersion",
    "UnknownMessageType",
    "UnexpectedMessage",
    "InvalidField",
    "TensorShapeMismatch",
    "TruncatedFrame",
    "TensorDtypeMismatch",
    "NonFiniteTensor",
    "ChecksumMismatch",
    "ChunkSequenceError",
    # framing
    "HEADER_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "encode_frame",
    "parse_frame_header",
    "FrameDecoder",
    # messages
    "MAX_STR_CHARS",
    "MAX_DIMS",
    "MAX_TENSORS",
    "REJECT_REASONS",
    "MESSAGE_CLASSES",
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
    "encode_message",
    "decode_message",
    # tensors
    "DTYPE_SIZES",
    "NUMPY_DTYPES",
    "CHECKSUM_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "TensorSpec",
    "tensor_checksum",
    "tensor_messages",
    "TensorAssembler",
    # manifest
    "manifest_hash",
    "canonical_manifest_bytes",
]
