"""The pair exchange itself: both sides stream their tensors full duplex, then confirm.

Used by the gossip round (node/gossip/exchange.py) and by `gossiptrain bench exchange`, so the
benchmark measures exactly the code path that training uses.
"""

from __future__ import annotations

import asyncio

import numpy as np

from protocol import ExchangeAck, TensorAssembler, TensorSpec, tensor_messages

from node.net.streams import FrameStream


class ExchangeAborted(RuntimeError):
    """The partner finished the transfer but did not confirm it (it will not apply the average)."""


def flat_spec(name: str, numel: int) -> TensorSpec:
    return TensorSpec(name=name, dtype="float32", shape=(numel,))


async def send_tensors(stream: FrameStream, outgoing: dict[str, np.ndarray], chunk_bytes: int) -> None:
    for name, array in outgoing.items():
        spec = flat_spec(name, array.size)
        messages = tensor_messages(spec, memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B"), chunk_bytes)
        # hashing and copying a chunk runs on a worker thread (hashlib releases the GIL):
        # the event loop keeps serving heartbeats and other peers meanwhile
        while (message := await asyncio.to_thread(next, messages, None)) is not None:
            await stream.send(message)


async def receive_tensors(
    stream: FrameStream, expected: list[TensorSpec], buffers: dict[str, bytearray] | None = None
) -> dict[str, np.ndarray]:
    """Receive `expected` in order, each straight into its buffer (given, or allocated here): held once."""
    received = {}
    for spec in expected:
        buffer = buffers[spec.name] if buffers is not None else bytearray(spec.nbytes)
        assembler = TensorAssembler(spec, out=buffer)
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
    """Send ours while receiving theirs (full duplex); returns theirs, validated.

    The first failure on either direction cancels the other at once (a broken send is
    not discovered only after the partner's whole tensor has arrived). Errors
    (ProtocolError, PeerGone, PeerTimeout, RemoteError) propagate; the caller closes the stream.
    """
    sender = asyncio.ensure_future(send_tensors(stream, outgoing, chunk_bytes))
    receiver = asyncio.ensure_future(receive_tensors(stream, expected))
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


async def confirm(stream: FrameStream) -> None:
    """Swap acks: each side applies the average only once it knows the partner got everything too."""
    await stream.send(ExchangeAck(ok=True, reason=""))
    ack = await stream.recv(ExchangeAck)
    if not ack.ok:
        raise ExchangeAborted(f"partner did not confirm: {ack.reason}")


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
