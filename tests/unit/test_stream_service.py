"""StreamService over loopback TCP: the sender claim checked, a protocol error counted and told, the stream closed."""

import asyncio
import types

from protocol import ExchangeReject, StateRequest

from node.metrics import NodeMetrics
from node.net.stream_service import StreamService, StreamSettings
from node.net.streams import FrameStream, RemoteError

SETTINGS = StreamSettings(run_id="run", manifest_hash="m" * 64, numel=10, io_timeout=5, max_frame_bytes=2**20,
                          chunk_bytes=2**16)
PEER = "the-authenticated-peer"


async def call(service: StreamService, request: StateRequest) -> Exception | object:
    """Send `request` to the service as PEER; returns the reply, or the error reading it."""
    info = types.SimpleNamespace(peer_id=types.SimpleNamespace(to_base58=lambda: PEER))
    server = await asyncio.start_server(lambda r, w: service.handle(info, r, w), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        stream = FrameStream(reader, writer, max_frame_bytes=2**20, io_timeout=5)
        try:
            await stream.send(request)
            return await stream.recv()
        except Exception as error:  # noqa: BLE001 - handed to the test
            return error
        finally:
            stream.close()
    finally:
        server.close()


def recording_service(metrics: NodeMetrics, events: list) -> StreamService:
    async def serve(incoming, request):
        events.append(("serve", incoming.peer, request.sender))
        await incoming.stream.send(ExchangeReject(reason="busy", round=0))

    return StreamService(None, "test/1", StateRequest, SETTINGS, metrics, "state", serve=serve,
                         failed=lambda incoming, error: events.append(("failed", type(error).__name__)),
                         closed=lambda incoming: events.append(("closed",)))


async def wait_closed(events: list) -> None:
    for _ in range(200):
        if ("closed",) in events:
            return
        await asyncio.sleep(0.01)


async def test_request_from_its_claimed_sender_is_served():
    metrics, events = NodeMetrics(), []
    reply = await call(recording_service(metrics, events), StateRequest(run_id="run", manifest_hash="m" * 64,
                                                                         sender=PEER))
    await wait_closed(events)
    assert isinstance(reply, ExchangeReject) and reply.reason == "busy"
    assert events == [("serve", PEER, PEER), ("closed",)]
    assert metrics.bytes_received.labels(kind="state")._value.get() > 0


async def test_false_sender_claim_is_a_counted_protocol_error_told_to_the_peer():
    metrics, events = NodeMetrics(), []
    reply = await call(recording_service(metrics, events), StateRequest(run_id="run", manifest_hash="m" * 64,
                                                                         sender="someone-else"))
    await wait_closed(events)
    assert isinstance(reply, RemoteError) and reply.kind == "field", reply
    assert events == [("failed", "InvalidField"), ("closed",)]  # never served
    assert metrics.protocol_errors.labels(kind="field")._value.get() == 1
