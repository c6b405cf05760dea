"""Stream limits: the transfer rate rule, the caps on streams and upload slots, the run's chunk size, the
control-frame cap, the audit committee rule, and the exchange-failure bookkeeping (issues 12 and 13).

The rules are pure (node/net/limits.py, node/gossip/health.py, may_fetch_audit); the stream tests run them
over loopback TCP with a hostile peer written out byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import types

import numpy as np
import pytest

from protocol import (
    ExchangeAck,
    ExchangeReject,
    FrameTooLarge,
    InvalidField,
    StateOffer,
    StateRequest,
    TensorAssembler,
    TensorChunk,
    TensorSpec,
    encode_frame,
    encode_message,
    tensor_messages,
)
from protocol.errors import TruncatedFrame
from protocol.verification import COMMITTEE_SIZE, committee_ranking

from node.config import ConfigError, NodeConfig
from node.gossip.exchange import classify_failure, partner_at_fault
from node.gossip.health import ExchangeHealth, ExchangeRecord, Penalties
from node.join.statesync import DonorState, StateServer
from node.metrics import NodeMetrics
from node.net.limits import PEER_LIMIT, TOTAL_LIMIT, ConcurrencyLimiter, RateRule, TransferMeter
from node.net.stream_service import StreamService, StreamSettings, stream_limiter
from node.net.streams import FrameStream, PeerGone, PeerTimeout, RemoteError, TransferTooSlow
from node.net.tensor_stream import IN_FLIGHT_BYTES, ack_timeout, flat_spec, receive_tensors
from node.verify.service import AUDIT_RANK_SLACK, MAX_RESERVES, may_fetch_audit

KB = 1024


# ----------------------------------------------------------------------------- the rate rule (pure)
def cut_after(rule: RateRule, rate: float, step: float = 0.01, limit: float = 1000.0) -> float | None:
    """Seconds of waiting until a transfer moving `rate` bytes/s (in steps of `step` s) is too slow; None if never."""
    meter, t = TransferMeter(rule), 0.0
    while t < limit:
        meter.record(step, int(rate * step))
        t += step
        if meter.exhausted:
            return t
    return None


def test_a_transfer_at_or_above_the_minimum_rate_is_never_cut():
    rule = RateRule(min_rate=256 * KB, window=5.0)
    assert cut_after(rule, 256 * KB, step=0.5) is None
    assert cut_after(rule, 2.5e6) is None  # a 20 Mbit/s home link, ~10x over the default


def test_a_stall_or_a_trickle_is_cut_after_about_the_window():
    rule = RateRule(min_rate=256 * KB, window=5.0)
    assert cut_after(rule, 0.0) == pytest.approx(5.0, abs=0.02)
    assert cut_after(rule, 100.0) == pytest.approx(5.0, abs=0.05)  # 1-byte chunks, or 100 bytes/s
    assert cut_after(rule, 128 * KB) == pytest.approx(10.0, abs=0.1)  # half the rate: window / (1 - 1/2)


def test_a_fast_start_buys_at_most_one_window_of_silence():
    rule = RateRule(min_rate=256 * KB, window=5.0)
    meter = TransferMeter(rule)
    meter.record(0.1, 100 * 2**20)  # 100 MiB at once: the allowance is capped at the window
    assert meter.allowance == 5.0
    meter.record(4.9, 0)
    assert not meter.exhausted
    assert meter.too_slow(io_timeout=5.0)
    meter.record(0.2, 0)
    assert meter.exhausted


def test_only_waiting_on_the_peer_is_charged_and_the_wait_is_bounded_by_the_allowance():
    rule = RateRule(min_rate=1000.0, window=2.0)
    meter = TransferMeter(rule)
    assert meter.timeout(io_timeout=5.0) == 2.0  # never longer than the allowance
    meter.record(1.5, 0)
    assert meter.timeout(io_timeout=5.0) == pytest.approx(0.5)
    assert meter.timeout(io_timeout=0.2) == 0.2  # nor the I/O timeout
    # a wait bounded by the allowance that expires is too slow; one bounded by the I/O timeout is a stall
    assert meter.too_slow(io_timeout=5.0) and not meter.too_slow(io_timeout=0.2)
    assert not TransferMeter(RateRule(min_rate=1000.0, window=2.0)).too_slow(io_timeout=2.0)
    assert TransferMeter(None).timeout(io_timeout=3.0) == 3.0  # no rule: counts only
    with pytest.raises(ValueError):
        RateRule(min_rate=0, window=1.0)


def test_config_refuses_a_zero_rate_and_inconsistent_stream_caps():
    with pytest.raises(ConfigError, match="min_transfer_rate"):
        NodeConfig(min_transfer_rate=0).validate()
    with pytest.raises(ConfigError, match="max_streams_per_peer"):
        NodeConfig(max_streams_per_peer=8, max_streams=4).validate()
    settings = StreamSettings.from_config(NodeConfig(min_transfer_rate=1e6, io_timeout=3), "m" * 64, 10)
    assert settings.rate == RateRule(1e6, 3.0)
    assert (settings.max_streams_per_peer, settings.max_streams) == (4, 32)


def test_one_node_has_one_stream_limiter_for_all_its_protocols():
    settings = StreamSettings(**SETTINGS)
    class FakeP2P:  # stand-ins for two nodes' P2P instances
        pass

    node, other = FakeP2P(), FakeP2P()
    assert stream_limiter(node, settings) is stream_limiter(node, settings)
    assert stream_limiter(node, settings) is not stream_limiter(other, settings)
    assert stream_limiter(None, settings) is not stream_limiter(None, settings)


# ----------------------------------------------------------------------------- caps (pure)
def test_concurrency_limiter_caps_each_peer_and_the_total():
    limiter = ConcurrencyLimiter(per_peer=2, total=3)
    assert [limiter.admit("a"), limiter.admit("a"), limiter.admit("a")] == [None, None, PEER_LIMIT]
    assert limiter.admit("b") is None
    assert limiter.admit("c") == TOTAL_LIMIT
    limiter.release("a")
    assert limiter.admit("c") is None
    assert limiter.open_total == 3
    with pytest.raises(ValueError):
        limiter.release("nobody")


# ----------------------------------------------------------------------------- the run's chunk size (pure)
def test_chunks_of_another_size_than_the_runs_are_refused_from_the_header():
    spec = TensorSpec("theta", "float32", (1000,))
    data = np.arange(1000, dtype="<f4").tobytes()
    one_byte = list(tensor_messages(spec, data, chunk_bytes=1))
    assembler = TensorAssembler(spec, chunk_bytes=1024)
    with pytest.raises(InvalidField, match="chunks of 1 bytes, this run's chunk size is 1024"):
        assembler.feed(one_byte[0])
    assembler = TensorAssembler(spec, chunk_bytes=1024)
    for message in tensor_messages(spec, data, chunk_bytes=1024):
        assembler.feed(message)
    assert assembler.complete
    with pytest.raises(ValueError):
        TensorAssembler(spec, chunk_bytes=0)


# ----------------------------------------------------------------------------- the audit committee rule (pure)
def peer(i: int) -> str:
    return f"12D3KooW{hashlib.sha256(str(i).encode()).hexdigest()[:20]}"


def test_only_the_committee_and_reserves_of_an_audit_may_fetch_its_start_state():
    seed, audited = b"s" * 32, peer(0)
    live = {peer(i) for i in range(1, 30)}
    ranking = committee_ranking(seed, live, audited)
    allowed = COMMITTEE_SIZE + MAX_RESERVES + AUDIT_RANK_SLACK
    assert all(may_fetch_audit(seed, p, live, audited) for p in ranking[:allowed])
    assert not any(may_fetch_audit(seed, p, live, audited) for p in ranking[allowed:])
    outsider = peer(99)
    assert not may_fetch_audit(seed, outsider, live, audited)  # not in this node's live view
    assert not may_fetch_audit(seed, audited, live | {audited}, audited)
    # a small swarm: every live peer is on the committee or a reserve
    small = {peer(i) for i in range(1, 5)}
    assert all(may_fetch_audit(seed, p, small, audited) for p in small)


# ----------------------------------------------------------------------------- exchange bookkeeping (pure)
def test_failures_are_classified_and_only_the_partners_own_are_punished():
    slow = TransferTooSlow("received", TransferMeter(RateRule(1000.0, 1.0)))
    assert classify_failure(slow) == "too_slow" and partner_at_fault(slow)
    assert classify_failure(PeerTimeout("stall")) == "timeout" and partner_at_fault(PeerTimeout("stall"))
    assert partner_at_fault(InvalidField("x"))
    assert not partner_at_fault(TruncatedFrame("x"))  # a crash mid-frame
    assert not partner_at_fault(PeerGone("x")) and not partner_at_fault(TimeoutError())  # our own deadline


def test_penalties_double_per_strike_and_are_forgiven_by_a_completed_exchange():
    penalties = Penalties(base=30.0, cap=100.0)
    assert penalties.punish("a", now=0.0) == 30.0
    assert penalties.blocked("a", 29.0) and not penalties.blocked("a", 31.0)
    assert penalties.punish("a", now=40.0) == 60.0
    assert penalties.punish("a", now=200.0) == 100.0  # capped
    assert penalties.active(250.0) == {"a"}
    penalties.forgive("a")
    assert not penalties.blocked("a", 250.0)
    assert penalties.punish("a", now=300.0) == 30.0


def test_a_node_whose_exchanges_keep_failing_says_why():
    health = ExchangeHealth(window=10, min_rate=256 * KB)
    assert health.completion_ratio == 1.0
    nbytes = 77_000_000
    lines = [health.record(ExchangeRecord("too_slow", nbytes, 1_200_000, 10.0)) for _ in range(10)]
    assert lines[:9] == [None] * 9
    assert lines[9] == (
        "0 of the last 10 exchanges completed (10 too_slow): 77.0 MB each way at ~0.12 MB/s takes ~642s, but a "
        "transfer slower than the minimum transfer rate of 0.26 MB/s is cut: this link is too slow for this model "
        "(min_transfer_rate)")
    assert health.completion_ratio == 0.0 and health.rate == pytest.approx(120_000)
    # said once per window, not after every exchange
    assert [health.record(ExchangeRecord("timeout", nbytes, 0, 5.0)) for _ in range(9)] == [None] * 9
    stalled = health.record(ExchangeRecord("timeout", nbytes, 0, 5.0))
    assert stalled.startswith("0 of the last 10 exchanges completed (10 timeout): no partner's tensors arrived")
    healthy = ExchangeHealth(window=10)
    assert all(healthy.record(ExchangeRecord("ok", 100, 100, 0.1)) is None for _ in range(30))
    assert healthy.completion_ratio == 1.0


# ----------------------------------------------------------------------------- streams over loopback TCP
@contextlib.asynccontextmanager
async def connected(io_timeout: float = 5.0, rate: RateRule | None = None, control: int | None = None):
    """(our FrameStream, the peer's raw reader and writer) over loopback TCP."""
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        peer_reader, peer_writer = await asyncio.wait_for(accepted, 5)
        stream = FrameStream(reader, writer, max_frame_bytes=2**21, io_timeout=io_timeout, rate=rate,
                             control_frame_bytes=control)
        try:
            yield stream, peer_reader, peer_writer
        finally:
            stream.close()
            peer_writer.close()
    finally:
        server.close()


async def trickle(writer: asyncio.StreamWriter, data: bytes, piece: int, pause: float) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
            await writer.drain()
            await asyncio.sleep(pause)


async def test_a_trickled_transfer_is_cut_within_about_the_window():
    spec = TensorSpec("theta", "float32", (64 * KB,))
    frames = b"".join(encode_frame(encode_message(m)) for m in tensor_messages(spec, bytes(spec.nbytes), 64 * KB))
    async with connected(io_timeout=1.0, rate=RateRule(min_rate=64 * KB, window=1.0)) as (stream, _, peer_writer):
        sender = asyncio.ensure_future(trickle(peer_writer, frames, piece=64, pause=0.02))  # ~3 kB/s, never silent
        started = time.monotonic()
        with pytest.raises(TransferTooSlow, match="below the minimum transfer rate"):
            await receive_tensors(stream, [spec], chunk_bytes=64 * KB)
        assert 0.9 < time.monotonic() - started < 2.0
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_a_transfer_at_full_speed_passes_and_a_stall_is_a_timeout():
    spec = TensorSpec("theta", "float32", (256 * KB,))
    data = np.random.default_rng(0).standard_normal(spec.numel).astype("<f4").tobytes()
    frames = [encode_frame(encode_message(m)) for m in tensor_messages(spec, data, 256 * KB)]
    async with connected(io_timeout=1.0, rate=RateRule(min_rate=1e6, window=1.0)) as (stream, _, peer_writer):
        peer_writer.write(b"".join(frames))
        received = await receive_tensors(stream, [spec], chunk_bytes=256 * KB)
        assert received["theta"].tobytes() == data
        assert stream.last_received.bytes == sum(map(len, frames))
    async with connected(io_timeout=0.5, rate=RateRule(min_rate=1e6, window=0.5)) as (stream, _, peer_writer):
        peer_writer.write(frames[0] + frames[1][:1000])  # header, then 1000 bytes of the chunk, then nothing
        started = time.monotonic()
        with pytest.raises(PeerTimeout):
            await receive_tensors(stream, [spec], chunk_bytes=256 * KB)
        assert time.monotonic() - started < 1.5


async def test_a_peer_that_does_not_read_our_transfer_times_out_and_is_not_taken_for_gone():
    async with connected(io_timeout=0.5, rate=RateRule(min_rate=1e6, window=0.5)) as (stream, _, _writer):
        started = time.monotonic()
        with pytest.raises(PeerTimeout) as stalled, stream.sending():  # the peer never reads: buffers fill up
            for index in range(64):
                await stream.send(TensorChunk(index=index, data=bytes(2**20)))
        assert not isinstance(stalled.value, PeerGone)
        assert time.monotonic() - started < 10


async def test_a_frame_cut_off_by_cancellation_is_completed_before_our_error():
    """Full duplex: when the receive direction fails, the send task is cancelled between two pieces of a
    frame; the ErrorMessage must still reach the peer as a frame of its own, not inside a truncated one."""
    async with connected(io_timeout=5.0, rate=RateRule(min_rate=1e3, window=5.0)) as (stream, peer_reader, peer_writer):
        chunk = TensorChunk(index=0, data=bytes(2 * 2**20 - 1024))  # many write pieces in one frame

        async def send() -> None:
            with stream.sending():
                for _ in range(8):  # more than the socket buffers take: the send waits on the peer
                    await stream.send(chunk)

        sender = asyncio.ensure_future(send())
        peer = FrameStream(peer_reader, peer_writer, max_frame_bytes=2**21, io_timeout=5.0)
        with peer.receiving():
            assert await peer.recv(TensorChunk) == chunk  # the peer reads a little, then the sender is cut
        deadline = time.monotonic() + 5
        while stream._unfinished is None and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # until the sender waits inside a frame
        assert stream._unfinished is not None
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

        async def read_to_the_error() -> None:
            with pytest.raises(RemoteError, match="field"), peer.receiving():
                for _ in range(16):  # whole frames (the rest of the cut one included), then the error
                    assert await peer.recv(TensorChunk) == chunk

        reader = asyncio.ensure_future(read_to_the_error())  # the peer reads while we finish the frame
        await stream.send_error(InvalidField("the partner sent garbage"))
        await asyncio.wait_for(reader, 10)


async def test_outside_a_transfer_only_control_frames_are_read_and_the_header_decides():
    async with connected(control=64 * KB) as (stream, _, peer_writer):
        peer_writer.write((1 * 2**20).to_bytes(4, "big"))  # a 1 MiB "request": refused from its 4-byte header
        with pytest.raises(FrameTooLarge, match="65536-byte limit"):
            await stream.recv()
        assert stream.bytes_received == 4
    async with connected(control=64 * KB) as (stream, _, peer_writer):
        chunk = TensorChunk(index=0, data=bytes(100 * KB))
        peer_writer.write(encode_frame(encode_message(chunk), 2**21))
        with stream.receiving():  # inside a transfer the same frame is fine
            assert await stream.recv(TensorChunk) == chunk


async def test_the_partners_ack_may_take_what_is_still_in_flight():
    async with connected(io_timeout=2.0, rate=RateRule(min_rate=1e6, window=2.0)) as (stream, _, _writer):
        assert ack_timeout(stream) == 2.0  # nothing sent yet
        with stream.sending() as meter:
            meter.record(0.0, 100 * 2**20)
        meter.elapsed = 50.0  # 100 MiB in 50 s: ~2 MB/s, 16 MiB of it may still be on its way
        assert ack_timeout(stream) == pytest.approx(2.0 + IN_FLIGHT_BYTES / (100 * 2**20 / 50.0))
        meter.elapsed = 1000.0  # slower than the minimum rate: the minimum rate bounds the wait
        assert ack_timeout(stream) == pytest.approx(2.0 + IN_FLIGHT_BYTES / 1e6)


# ----------------------------------------------------------------------------- the server side
SETTINGS = dict(run_id="run", manifest_hash="m" * 64, numel=1000, io_timeout=2.0, max_frame_bytes=2**20,
                chunk_bytes=1024)


@contextlib.asynccontextmanager
async def serving(service: StreamService):
    """Connect as any peer: `connect(peer)` -> a FrameStream to `service`, authenticated as `peer`."""
    streams: list[FrameStream] = []

    async def connect(peer_id: str) -> FrameStream:
        info = types.SimpleNamespace(peer_id=types.SimpleNamespace(to_base58=lambda: peer_id))
        server = await asyncio.start_server(lambda r, w: service.handle(info, r, w), "127.0.0.1", 0)
        servers.append(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        stream = FrameStream(reader, writer, max_frame_bytes=2**21, io_timeout=5)
        streams.append(stream)
        return stream

    servers: list[asyncio.AbstractServer] = []
    try:
        yield connect
    finally:
        for stream in streams:
            stream.close()
        for server in servers:
            server.close()


async def test_streams_over_a_peers_cap_are_refused_unread_and_counted():
    metrics, held = NodeMetrics(), asyncio.Event()

    async def serve(incoming, request):
        await asyncio.wait_for(held.wait(), 10)  # keep the stream open
        await incoming.stream.send(ExchangeReject(reason="busy", round=0))

    settings = StreamSettings(**SETTINGS, max_streams_per_peer=2, max_streams=3)
    service = StreamService(None, "test/1", StateRequest, settings, metrics, "state", serve=serve,
                            failed=lambda incoming, error: None)
    async with serving(service) as connect:
        request = StateRequest(run_id="run", manifest_hash="m" * 64, sender="a")
        first = [await connect("a") for _ in range(2)]
        for stream in first:
            await stream.send(request)
        await asyncio.sleep(0.2)
        assert service.limiter.open_total == 2
        third = await connect("a")  # over a's cap: told busy before a byte of its request is read
        reply = await third.recv()
        assert isinstance(reply, ExchangeReject) and reply.reason == "busy"
        other = await connect("b")
        await other.send(StateRequest(run_id="run", manifest_hash="m" * 64, sender="b"))
        await asyncio.sleep(0.2)
        over_total = await connect("c")  # over the total cap
        assert (await over_total.recv()).reason == "busy"
        assert metrics.streams_refused.labels(reason="peer_limit")._value.get() == 1
        assert metrics.streams_refused.labels(reason="total_limit")._value.get() == 1
        held.set()
        for stream in (*first, other):
            assert (await stream.recv()).reason == "busy"
        for _ in range(100):
            if service.limiter.open_total == 0:
                break
            await asyncio.sleep(0.02)
        assert service.limiter.open_total == 0  # every admitted stream released once closed


async def test_an_oversized_request_is_refused_from_its_header():
    metrics, served = NodeMetrics(), []
    service = StreamService(None, "test/1", StateRequest, StreamSettings(**SETTINGS), metrics, "state",
                            serve=lambda incoming, request: served.append(request),
                            failed=lambda incoming, error: None)
    async with serving(service) as connect:
        stream = await connect("a")
        stream.writer.write((8 * 2**20).to_bytes(4, "big") + bytes(64 * KB))  # announces 8 MiB
        with pytest.raises(RemoteError) as refused:
            await stream.recv()
        assert refused.value.kind == "oversized"
    assert metrics.protocol_errors.labels(kind="oversized")._value.get() == 1
    assert served == []


async def test_one_requester_holds_at_most_one_upload_slot():
    settings = StreamSettings(**SETTINGS)
    rng = np.random.default_rng(1)
    state = DonorState(3, 7, rng.standard_normal(1000, dtype=np.float32), rng.standard_normal(1000, dtype=np.float32))
    metrics = NodeMetrics()
    server = StateServer(None, settings, metrics, lambda: state, max_uploads=2)
    async with serving(server.service) as connect:
        holder = await connect("a")  # takes an upload and never acks it: it keeps the slot meanwhile
        await holder.send(StateRequest(run_id="run", manifest_hash="m" * 64, sender="a"))
        assert isinstance(await holder.recv(), StateOffer)
        second = await connect("a")
        await second.send(StateRequest(run_id="run", manifest_hash="m" * 64, sender="a"))
        reply = await second.recv()
        assert isinstance(reply, ExchangeReject) and reply.reason == "busy"
        assert server.uploads == 1
        other = await connect("b")  # the other slot is still free for someone else
        await other.send(StateRequest(run_id="run", manifest_hash="m" * 64, sender="b"))
        assert isinstance(await other.recv(), StateOffer)
        received = await receive_tensors(other, [flat_spec("phi", 1000), flat_spec("momentum", 1000)],
                                         chunk_bytes=1024)
        assert np.array_equal(received["momentum"], state.momentum)
        await other.send(ExchangeAck(ok=True, reason=""))
    assert metrics.state_uploads.labels(result="refused")._value.get() == 1
