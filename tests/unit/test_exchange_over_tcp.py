"""The pair exchange and the offered download over plain loopback TCP: the tensors arrive, or a typed error."""

import asyncio
import contextlib

import numpy as np

from protocol import ChecksumMismatch, ExchangeReject, InvalidField, NonFiniteTensor, StateOffer, StateRequest, TensorEnd

from node.net.streams import FrameStream, PeerGone, RemoteError
from node.net.tensor_stream import flat_spec, offer_tensors, request_tensors, swap_tensors

NUMEL = 300_001  # not a multiple of the chunk size


async def pair(serve, call):
    """Run serve(stream) on the accepting side and call(stream) on the dialing side.

    Returns (call outcome, serve outcome); an outcome is the result or the exception raised.
    """
    served = asyncio.get_running_loop().create_future()

    async def on_connect(reader, writer):
        stream = FrameStream(reader, writer, max_frame_bytes=2**20, io_timeout=5)
        try:
            served.set_result(await serve(stream))
        except Exception as error:  # noqa: BLE001 - handed to the test
            served.set_result(error)
        finally:
            stream.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        stream = FrameStream(reader, writer, max_frame_bytes=2**20, io_timeout=5)
        try:
            called = await asyncio.wait_for(call(stream), 20)
        except Exception as error:  # noqa: BLE001
            called = error
        finally:
            stream.close()
        return called, await asyncio.wait_for(served, 20)
    finally:
        server.close()


async def test_swap_delivers_each_side_the_others_tensor():
    mine = np.random.default_rng(0).standard_normal(NUMEL).astype(np.float32)
    theirs = np.random.default_rng(1).standard_normal(NUMEL).astype(np.float32)
    spec = [flat_spec("theta", NUMEL)]
    got_theirs, got_mine = await pair(
        lambda s: swap_tensors(s, {"theta": theirs}, spec, chunk_bytes=100_000),
        lambda s: swap_tensors(s, {"theta": mine}, spec, chunk_bytes=100_000),
    )
    assert np.array_equal(got_theirs["theta"], theirs)
    assert np.array_equal(got_mine["theta"], mine)


async def test_chunks_of_another_size_than_the_runs_are_refused():
    data = np.zeros(NUMEL, dtype=np.float32)
    spec = [flat_spec("theta", NUMEL)]
    outcomes = await pair(
        lambda s: swap_tensors(s, {"theta": data}, spec, chunk_bytes=256 * 1024),
        lambda s: swap_tensors(s, {"theta": data}, spec, chunk_bytes=100_000),
    )
    # each refuses the other's header (or sees the other close first)
    assert any(isinstance(outcome, InvalidField) for outcome in outcomes), outcomes
    assert all(isinstance(outcome, (InvalidField, PeerGone)) for outcome in outcomes), outcomes


async def test_nan_tensor_is_refused_and_the_sender_is_told():
    good = np.zeros(NUMEL, dtype=np.float32)
    bad = good.copy()
    bad[7] = np.nan
    spec = [flat_spec("theta", NUMEL)]

    async def refuse(stream):
        try:
            return await swap_tensors(stream, {"theta": good}, spec, chunk_bytes=2**18)
        except NonFiniteTensor as error:
            await stream.send_error(error)
            raise

    sender_error, receiver_error = await pair(
        refuse, lambda s: swap_tensors(s, {"theta": bad}, spec, chunk_bytes=2**18))
    assert isinstance(receiver_error, NonFiniteTensor)
    assert isinstance(sender_error, (RemoteError, PeerGone)), sender_error
    if isinstance(sender_error, RemoteError):
        assert sender_error.kind == "non_finite"


async def test_corrupted_checksum_is_refused():
    spec = [flat_spec("theta", 1000)]
    data = np.ones(1000, dtype=np.float32)

    async def corrupting_sender(stream):
        from protocol import tensor_messages

        for message in tensor_messages(spec[0], data.tobytes(), 1024):
            if isinstance(message, TensorEnd):
                message = TensorEnd(name=message.name, checksum=bytes(16))
            await stream.send(message)
        with contextlib.suppress(Exception):  # drain the receiver's own tensor until it closes the stream
            for _ in range(1000):
                await stream.recv()

    async def receiver(stream):
        return await swap_tensors(stream, {"theta": data}, spec, chunk_bytes=1024)

    _, receiver_error = await pair(receiver, corrupting_sender)
    assert isinstance(receiver_error, ChecksumMismatch)


async def test_offered_download_lands_in_the_given_buffers_and_a_reject_raises_the_refusal():
    numel = 5000
    rng = np.random.default_rng(2)
    tensors = {name: rng.standard_normal(numel, dtype=np.float32) for name in ("phi", "momentum")}
    specs = [flat_spec(name, numel) for name in tensors]
    request = StateRequest(run_id="run", manifest_hash="m" * 64, sender="joiner")
    offer = StateOffer(round=3, global_step=9, manifest_hash="m" * 64, tensors=tuple(tensors), numel=numel,
                       dtype="float32")
    buffers = {name: bytearray(numel * 4) for name in tensors}

    async def donor(stream):
        assert await stream.recv(StateRequest) == request
        await offer_tensors(stream, offer, tensors, chunk_bytes=4096)  # returns once the joiner acked

    offered = []
    downloaded, served = await pair(donor, lambda s: request_tensors(
        s, request, StateOffer, lambda o: offered.append(o) or specs, RuntimeError, buffers))
    assert served is None, served
    got_offer, received = downloaded
    assert got_offer == offer and offered == [offer]
    for name, array in tensors.items():
        assert np.array_equal(received[name], array)
        assert bytes(buffers[name]) == array.tobytes()  # received straight into the given buffer

    async def busy_donor(stream):
        await stream.recv(StateRequest)
        await stream.send(ExchangeReject(reason="busy", round=0))

    refused, _ = await pair(busy_donor, lambda s: request_tensors(s, request, StateOffer, lambda o: specs, LookupError))
    assert isinstance(refused, LookupError) and str(refused) == "busy"
