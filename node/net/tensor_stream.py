"""Tensor transfers over a FrameStream: the pair exchange and the offered download.

The pair exchange (swap_tensors: both sides stream their tensors full duplex, then confirm) is
used by the gossip round (node/gossip/exchange.py) and by `gossiptrain bench exchange`, so the
benchmark measures exactly the code path that training uses. The offered download
(request_tensors / offer_tensors: request, offer or reject, the tensors one way, an ack) is
state sync's (node/join/statesync.py) and the audits' (node/verify/service.py).

A transfer is bounded by its progress, not by a total time: every wait on the peer by the I/O
timeout and by the minimum transfer rate (FrameStream.receiving/sending, node/net/limits.py). The
receiver requires the run's chunk size (a sender cannot pick 1-byte chunks). After a transfer the
partner's ack may take one I/O timeout plus the time the bytes still in flight (relays, kernel
buffers) need at the rate the transfer ran (`ack_timeout`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from protocol import NUMPY_DTYPES, ExchangeAck, ExchangeReject, Message, TensorAssembler, TensorSpec, tensor_messages

from node.net.streams import FrameStream

logger = logging.getLogger(__name__)

Offer = TypeVar("Offer", bound=Message)

# at most this much of what we sent may still be on its way when our last write returned: p2pd's yamux
# window (<= 16 MiB) plus socket buffers; the partner acks only after it has read all of it
IN_FLIGHT_BYTES = 16 * 2**20


class ExchangeAborted(RuntimeError):
    """The partner finished the transfer but did not confirm it (it will not apply the average)."""


def flat_spec(name: str, numel: int) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=(numel,))


async def send_tensors(stream: FrameStream, outgoing: dict[str, np.ndarray], chunk_bytes: int,
                       dtype: str = "float32") -> None:
    """`outgoing`: flat arrays already in `dtype` (its raw patterns for bfloat16, protocol/codecs.py)."""
    with stream.sending():
        for name, array in outgoing.items():
            spec = TensorSpec(name=name, dtype=dtype, shape=(array.size,))
            view = memoryview(np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype])).cast("B")
            messages = tensor_messages(spec, view, chunk_bytes)
            # hashing and copying a chunk runs on a worker thread (hashlib releases the GIL):
            # the event loop keeps serving heartbeats and other peers meanwhile
            while (message := await asyncio.to_thread(next, messages, None)) is not None:
                await stream.send(message)


async def receive_tensors(
    stream: FrameStream, expected: list[TensorSpec], buffers: dict[str, bytearray] | None = None,
    chunk_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Receive `expected` in order, each straight into its buffer (given, or allocated here): held once.
    `chunk_bytes`: the chunk size the sender must use (the run's)."""
    received = {}
    with stream.receiving():
        for spec in expected:
            buffer = buffers[spec.name] if buffers is not None else bytearray(spec.nbytes)
            assembler = TensorAssembler(spec, out=buffer, chunk_bytes=chunk_bytes)
            done = False
            while not done:
                done = await asyncio.to_thread(assembler.feed, await stream.recv())
            received[spec.name] = assembler.array()
    return received


async def transfer_tensors(
    stream: FrameStream,
    outgoing: dict[str, np.ndarray],
    expected: list[TensorSpec],
    chunk_bytes: int,
) -> dict[str, np.ndarray]:
    """Send ours while receiving theirs (full duplex), both in chunks of the run's `chunk_bytes`; returns
    theirs, validated.

    The first failure on either direction cancels the other at once (a broken send is
    not discovered only after the partner's whole tensor has arrived). Errors
    (ProtocolError, PeerGone, PeerTimeout, RemoteError) propagate; the caller closes the stream.
    """
    dtype = expected[0].dtype if expected else "float32"  # ours go as theirs come: an exchange is symmetric
    sender = asyncio.ensure_future(send_tensors(stream, outgoing, chunk_bytes, dtype))
    receiver = asyncio.ensure_future(receive_tensors(stream, expected, chunk_bytes=chunk_bytes))
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (receiver, sender):
            if task.done() and task.exception() is not None:
                raise task.exception()
        return receiver.result()
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


def ack_timeout(stream: FrameStream) -> float:
    """How long the partner's ack may take after our last transfer to it: one I/O timeout, plus the time
    what may still be in flight of it needs at the rate it ran (at least the minimum transfer rate)."""
    sent = stream.last_sent
    if sent is None or not sent.bytes:
        return stream.io_timeout
    rate = sent.bytes / sent.elapsed if sent.elapsed > 0 else float("inf")
    if sent.rule is not None:
        rate = max(rate, sent.rule.min_rate)
    return stream.io_timeout + min(sent.bytes, IN_FLIGHT_BYTES) / rate


async def confirm(stream: FrameStream, attestation: bytes = b"") -> bytes:
    """Swap acks: each side applies the average only once it knows the partner got everything too. Each ack
    carries its sender's attestation of what it sent (verification on; else empty). Returns the partner's.
    Bounded: our ack within the I/O timeout, the partner's within `ack_timeout`."""
    await stream.send(ExchangeAck(ok=True, reason="", attestation=attestation))
    ack = await stream.recv(ExchangeAck, timeout=ack_timeout(stream))
    if not ack.ok:
        raise ExchangeAborted(f"partner did not confirm: {ack.reason}")
    return ack.attestation


async def swap_tensors(
    stream: FrameStream,
    outgoing: dict[str, np.ndarray],
    expected: list[TensorSpec],
    chunk_bytes: int,
) -> dict[str, np.ndarray]:
    """transfer_tensors then confirm: the whole exchange, as the benchmark measures it."""
    received = await transfer_tensors(stream, outgoing, expected, chunk_bytes)
    await confirm(stream)
    return received


async def offer_tensors(stream: FrameStream, offer: Message, tensors: dict[str, np.ndarray], chunk_bytes: int) -> None:
    """Serve a download: the offer, then each tensor without waiting, then wait for the requester's ack.

    (Closing right after the last write could cut the stream's tail inside a relay such as p2pd,
    and the ack tells a completed upload from one abandoned mid-way.)
    """
    await stream.send(offer)
    await send_tensors(stream, tensors, chunk_bytes)
    await stream.recv(ExchangeAck, timeout=ack_timeout(stream))


async def request_tensors(
    stream: FrameStream,
    request: Message,
    offer_type: type[Offer],
    check_offer: Callable[[Offer], list[TensorSpec]],
    refused: Callable[[str], Exception],
    buffers: dict[str, bytearray] | None = None,
    chunk_bytes: int | None = None,
) -> tuple[Offer, dict[str, np.ndarray]]:
    """Download what a peer offers: (its offer, the tensors). The caller closes the stream.

    Sends `request`; an ExchangeReject raises `refused(reason)`; `check_offer` refuses a bad offer
    (raising a ProtocolError) before a single tensor byte is read and returns the specs to receive,
    in order (into `buffers` where given), in chunks of `chunk_bytes` (the run's). The ack afterwards is
    best effort: the download is complete either way.
    """
    await stream.send(request)
    reply = await stream.recv((offer_type, ExchangeReject))
    if isinstance(reply, ExchangeReject):
        raise refused(reply.reason)
    received = await receive_tensors(stream, check_offer(reply), buffers, chunk_bytes)
    try:  # everything arrived and checked out: the ack only tells the peer it may close
        await stream.send(ExchangeAck(ok=True, reason=""))
    except Exception as error:  # noqa: BLE001 - the download is complete either way
        logger.debug("ack of a complete %s download failed: %s", type(reply).__name__, error)
    return reply, received
