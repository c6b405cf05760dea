"""A hostile client sends garbage to a running node: it refuses, counts, and keeps training."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import numpy as np
import pytest
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from protocol import (
    PROTOCOL_VERSION,
    ErrorMessage,
    ExchangeAccept,
    ExchangeReject,
    ExchangeRequest,
    TensorSpec,
    codecs,
    encode_frame,
    encode_message,
    tensor_messages,
)

from node.config import NodeConfig
from node.gossip.exchange import EXCHANGE_PROTOCOL
from node.net.dht import DHTClient
from node.net.identity import Identity
from node.net.signed_records import SignedRecordValidator
from node.net.streams import FrameStream, RemoteError
from tests.integration.conftest import TINY, poll

pytestmark = pytest.mark.integration
RUN = "gossiptrain-default"


@pytest.fixture(scope="module")
def lone_node(tmp_path_factory):
    from node.tools.swarm import LocalSwarm

    swarm = LocalSwarm(1, tmp_path_factory.mktemp("lone"), TINY + ["--inner-steps", "5", "--sync-timeout", "10",
                                                                     "--max-staleness", "100000"])
    swarm.start()
    try:
        yield swarm
    finally:
        swarm.stop()


class HostileClient:
    """A peer that joins the node's DHT like any other, then misbehaves on the exchange protocol."""

    def __init__(self, p2p: P2P, dht: DHTNode, target: PeerID, manifest: str) -> None:
        self.p2p, self.dht, self.target, self.manifest = p2p, dht, target, manifest
        self.peer_id = p2p.peer_id.to_base58()

    async def announce(self, round_: int) -> None:
        """Presence record: makes the node expect a partner (and wait for one) at its round boundary."""
        value = {"round": round_, "manifest": self.manifest, "eval_loss": None, "maddrs": []}
        assert await DHTClient(self.dht).store(f"{RUN}.peers", value, get_dht_time() + 60, subkey=self.peer_id)

    async def open(self) -> FrameStream:
        _info, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(self.target, EXCHANGE_PROTOCOL), 10)
        return FrameStream(reader, writer, max_frame_bytes=2**24, io_timeout=15)

    async def send_raw_and_read_error(self, raw: bytes) -> ErrorMessage:
        stream = await self.open()
        try:
            stream.writer.write(raw)
            await stream.writer.drain()
            return await stream.recv(ErrorMessage)
        finally:
            stream.close()

    async def node_record(self, key: str) -> dict | None:
        found = await self.dht.get(f"{RUN}.{key}", latest=True)
        entry = (found.value if found else {}).get(self.target.to_base58())
        return entry.value if entry is not None and entry.expiration_time > get_dht_time() else None

    async def node_ready_round(self) -> int | None:
        """The round the node is waiting to pair at, if it is at a round boundary now."""
        ready = await self.node_record("ready")
        return ready["round"] if ready and not ready.get("done") else None

    async def accepted_stream(self, numel: int, timeout: float = 90, dtype: str = NodeConfig.wire_dtype) -> FrameStream:
        """Keep asking until the node (ready at a round boundary) accepts our pairing request."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            round_ = await self.node_ready_round()
            if round_ is not None:
                stream = await self.open()
                await stream.send(self.request(round_, numel, dtype))
                reply = await stream.recv((ExchangeAccept, ExchangeReject))
                if isinstance(reply, ExchangeAccept):
                    return stream
                stream.close()
            await asyncio.sleep(0.3)
        pytest.fail("node never accepted a pairing request")

    def request(self, round_: int, numel: int, dtype: str = NodeConfig.wire_dtype) -> ExchangeRequest:
        return ExchangeRequest(run_id=RUN, manifest_hash=self.manifest, round=round_, sender=self.peer_id,
                               tensors=("theta",), numel=numel, dtype=dtype)


@contextlib.asynccontextmanager
async def hostile_client(node, tmp_path):
    # a peer of the swarm: its presence is its own, signed with its Ed25519 identity (SPEC.md §15)
    identity = Identity.generate()
    identity.save(tmp_path / "hostile.key")
    p2p = await P2P.create(initial_peers=[node.maddr], identity_path=str(tmp_path / "hostile.key"),
                           check_if_identity_free=False)
    dht = await DHTNode.create(p2p=p2p, initial_peers=[node.maddr], cache_locally=False,
                               record_validator=SignedRecordValidator(identity))
    try:
        client = HostileClient(p2p, dht, PeerID.from_base58(node.status["peer_id"]), node.status["manifest"])
        await client.announce(0)
        yield client
    finally:
        await dht.shutdown()
        await p2p.shutdown()


async def read_until_error(stream: FrameStream, limit: int = 10_000) -> str:
    """Skip the node's own tensor frames (it streams full duplex) until its ErrorMessage; returns its kind."""
    for _ in range(limit):
        try:
            await stream.recv()
        except RemoteError as error:
            return error.kind
    pytest.fail("no ErrorMessage from the node")


def frame(body: dict) -> bytes:
    return encode_frame(msgpack.packb(body))


async def test_node_refuses_malformed_frames_with_typed_errors(lone_node, tmp_path):
    node = lone_node.nodes[0]
    async with hostile_client(node, tmp_path) as client:
        assert (await client.send_raw_and_read_error(b"\x00\x00\x00\x05hello")).kind == "malformed"
        assert (await client.send_raw_and_read_error(b"\xff\xff\xff\xff")).kind == "oversized"
        assert (await client.send_raw_and_read_error(frame({"v": 99, "t": 1}))).kind == "version"
        assert (await client.send_raw_and_read_error(frame({"v": PROTOCOL_VERSION, "t": 42}))).kind == "type"
        assert (await client.send_raw_and_read_error(frame({"v": PROTOCOL_VERSION, "t": 1, "round": "x"}))).kind == "field"
        stream = await client.open()  # truncated: a header promising 100 bytes, 10 bytes, then gone
        stream.writer.write(b"\x00\x00\x00\x64" + b"\x00" * 10)
        await stream.writer.drain()
        stream.close()
        # keep the client's p2pd up until the node has seen the cut stream: shutting it down at once
        # can kill the relay before the 10 bytes and the close reach the node (then it is a reset)
        key = 'gossiptrain_protocol_errors_total{kind="truncated"}'
        await asyncio.to_thread(poll, lambda: lone_node.metrics(0).get(key, 0) >= 1, 30,
                                what="protocol_errors_total{kind=truncated} to count the cut stream")
    for kind in ("malformed", "oversized", "version", "type", "field", "truncated"):
        key = f'gossiptrain_protocol_errors_total{{kind="{kind}"}}'
        poll(lambda key=key: lone_node.metrics(0).get(key, 0) >= 1,
             timeout=30, what=f"protocol_errors_total{{kind={kind}}} to count the refusal")


async def test_node_refuses_wrong_shape_dtype_and_nan_tensors(lone_node, tmp_path):
    node = lone_node.nodes[0]
    numel = node.status["parameters"]
    async with hostile_client(node, tmp_path) as client:
        wrong_numel = await client.send_raw_and_read_error(
            encode_frame(encode_message(client.request(0, numel + 1))))
        assert wrong_numel.kind == "shape"
        wrong_dtype = await client.send_raw_and_read_error(
            encode_frame(encode_message(client.request(0, numel, dtype="float16"))))
        assert wrong_dtype.kind == "dtype"

        stream = await client.accepted_stream(numel)  # a real pairing, then a poisoned tensor
        poisoned = np.zeros(numel, dtype="<u2")  # the run's wire dtype, bfloat16: raw 16-bit patterns
        poisoned[::1000] = 0x7FC0  # a bfloat16 NaN
        # in the run's chunk size (the default 2 MiB): chunks of another size are refused from the header
        for message in tensor_messages(TensorSpec("theta", "bfloat16", (numel,)), poisoned.tobytes(), 2 * 2**20):
            await stream.send(message)
        kind = await read_until_error(stream)
        stream.close()
        assert kind == "non_finite"

        stream = await client.accepted_stream(numel)
        for message in tensor_messages(TensorSpec("theta", "bfloat16", (numel - 1,)), bytes(2 * (numel - 1))):
            await stream.send(message)
            break  # the header alone is refused
        assert await read_until_error(stream) == "shape"
        stream.close()

        round_before = lone_node.metrics(0)["gossiptrain_round"]
        await client.announce(10**7)  # now beyond its staleness window: the node stops waiting for us
        poll(lambda: lone_node.metrics(0).get("gossiptrain_round", 0) >= round_before + 3,
             timeout=120, what="the node to keep training after the attacks")
    samples = lone_node.metrics(0)
    for kind in ("shape", "dtype", "non_finite"):
        assert samples[f'gossiptrain_protocol_errors_total{{kind="{kind}"}}'] >= 1, kind
    assert samples['gossiptrain_exchanges_total{result="ok"}'] == 0
    assert node.process.poll() is None


def test_node_with_mismatched_manifest_is_refused(lone_node):
    first = lone_node.nodes[0]
    other = lone_node.start_node(1, [first.maddr], extra=["--inner-steps", "6"])
    assert other.process.wait(timeout=120) == 2
    log = other.log_tail()
    assert "run manifest mismatch" in log
    assert log.count("error") == 1  # one clear line, no traceback
    assert first.process.poll() is None


def test_busy_metrics_port_is_a_clear_config_error(lone_node):
    first = lone_node.nodes[0]
    busy = str(first.status["metrics_port"])
    other = lone_node.start_node(2, [first.maddr], extra=["--metrics-port", busy])
    assert other.process.wait(timeout=120) == 2
    assert f"cannot serve metrics on 127.0.0.1:{busy}" in other.log_tail()


@pytest.fixture(scope="module")
def blockwise8_node(tmp_path_factory):
    from node.tools.swarm import LocalSwarm

    swarm = LocalSwarm(1, tmp_path_factory.mktemp("lone8"), TINY + [
        "--inner-steps", "5", "--sync-timeout", "10", "--max-staleness", "100000", "--wire-dtype", "blockwise8"])
    swarm.start()
    try:
        yield swarm
    finally:
        swarm.stop()


async def test_a_blockwise8_node_refuses_bad_scales_and_codes_before_its_ack(blockwise8_node, tmp_path):
    """blockwise8 bytes pass the stream's checks as bytes: the node decodes them before it acks and refuses
    a NaN, a negative or a non-power-of-two block scale and a -128 code (protocol/SPEC.md §4.2)."""
    node = blockwise8_node.nodes[0]
    numel = node.status["parameters"]
    size = codecs.wire_numel(numel, "blockwise8")
    blocks = (size - numel) // 4
    cases = [(float("nan"), 0, "non_finite"), (-1.0, 0, "non_finite"), (0.75, 0, "field"), (0.5, -128, "field")]
    for scale, code, kind in cases:  # a fresh identity each: the node shuns a peer that broke an exchange
        async with hostile_client(node, tmp_path) as client:
            wire = np.zeros(size, dtype="u1")
            wire[:4 * blocks].view("<f4")[:] = 0.5
            wire[:4].view("<f4")[0] = scale
            wire[4 * blocks + 7] = np.array(code, dtype="i1").view("u1")
            stream = await client.accepted_stream(numel, dtype="blockwise8")
            spec = TensorSpec("theta", "blockwise8", (size,))
            for message in tensor_messages(spec, wire.tobytes(), 2 * 2**20):
                await stream.send(message)
            assert await read_until_error(stream) == kind, (scale, code)
            stream.close()
    async with hostile_client(node, tmp_path) as client:
        round_before = blockwise8_node.metrics(0)["gossiptrain_round"]
        await client.announce(10**7)
        poll(lambda: blockwise8_node.metrics(0).get("gossiptrain_round", 0) >= round_before + 3,
             timeout=120, what="the node to keep training after the attacks")
    samples = blockwise8_node.metrics(0)
    assert samples['gossiptrain_exchanges_total{result="ok"}'] == 0
    assert node.process.poll() is None
