"""What the fuzzer (node/bench/fuzz.py) relies on, without a node: refused DHT records counted by a fixed set of
reasons, every incoming stream counted once by how it ended, and reproducible, never-failing case generators."""

from __future__ import annotations

import asyncio
import dataclasses
import types

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import StateRequest
from protocol.records import RECORD_REFUSALS, Presence, entry_signing_bytes, pack_entry

from node.bench.fuzz import RECORD_TARGETS, STREAM_TARGETS, Target, record_case, refused_by, stream_case
from node.metrics import NodeMetrics
from node.net.identity import Identity
from node.net.signed_records import SignedRecordValidator, dht_key_id
from node.net.stream_service import StreamService, StreamSettings

NOW = 1_000_000.0
KEY = "run.peers"
ALICE, BOB = Identity.generate(), Identity.generate()
NODE = Target(BOB.peer_id, "/ip4/127.0.0.1/tcp/1", "run", "ab" * 32, 1000)


def entry(identity: Identity, subkey: str, value: bytes, key: str = KEY, expiration: float = NOW + 5) -> bytes:
    return pack_entry(key, value, identity.sign(entry_signing_bytes(key, subkey, expiration, value)))


def bad_records() -> dict[str, DHTRecord]:
    """One record per refusal reason."""
    value = MSGPackSerializer.dumps(Presence("ab" * 32, 1, None, ()).to_wire())
    me = MSGPackSerializer.dumps(ALICE.peer_id)
    good = DHTRecord(dht_key_id(KEY), me, entry(ALICE, ALICE.peer_id, value), NOW + 5)
    return {
        "plain_value": dataclasses.replace(good, subkey=DHTProtocol.IS_REGULAR_VALUE),
        "subkey": dataclasses.replace(good, subkey=b"\xc1"),
        "expiration": dataclasses.replace(good, expiration_time=float("nan")),
        "envelope": dataclasses.replace(good, value=b"\x93garbage"),
        "key": DHTRecord(dht_key_id("run.nothing"), me, entry(ALICE, ALICE.peer_id, value, "run.nothing"), NOW + 5),
        "key_mismatch": dataclasses.replace(good, key=dht_key_id("run.ready")),
        "lifetime": DHTRecord(dht_key_id(KEY), me, entry(ALICE, ALICE.peer_id, value, expiration=NOW + 1e6), NOW + 1e6),
        "oversized": DHTRecord(dht_key_id(KEY), me, entry(ALICE, ALICE.peer_id, b"\xc0" * 25_000), NOW + 5),
        "signature": DHTRecord(dht_key_id(KEY), MSGPackSerializer.dumps(BOB.peer_id),
                               entry(ALICE, BOB.peer_id, value), NOW + 5),
        "schema": DHTRecord(dht_key_id(KEY), me, entry(ALICE, ALICE.peer_id, MSGPackSerializer.dumps([1, 2])), NOW + 5),
    }


def test_every_refusal_reason_is_counted_under_its_own_label():
    counted: list[str] = []
    validator = SignedRecordValidator(clock=lambda: NOW, on_refused=counted.append)
    records = bad_records()
    assert set(records) == set(RECORD_REFUSALS)
    for reason, record in records.items():
        assert not validator.validate(record), reason
        assert counted[-1] == reason, (reason, counted)
    assert validator.refusals == {reason: 1 for reason in RECORD_REFUSALS}


def test_a_failing_refusal_counter_never_turns_a_refusal_into_an_error():
    def broken(reason: str) -> None:
        raise RuntimeError("metrics gone")

    validator = SignedRecordValidator(clock=lambda: NOW, on_refused=broken)
    assert not validator.validate(bad_records()["signature"])


def test_the_records_refused_metric_has_every_reason_from_the_start():
    metrics = NodeMetrics()
    for reason in RECORD_REFUSALS:
        assert metrics.records_refused.labels(reason=reason)._value.get() == 0


# ----------------------------------------------------------------------------- incoming streams counted
SETTINGS = StreamSettings(run_id="run", manifest_hash="m" * 64, numel=10, io_timeout=0.5, max_frame_bytes=2**20,
                          chunk_bytes=2**16, max_streams_per_peer=1, max_streams=1)
PEER = "the-peer"


async def raw_call(service: StreamService, payload: bytes, close: bool) -> None:
    """Write `payload` to the service as PEER (then close if asked) and read until it closes the stream."""
    info = types.SimpleNamespace(peer_id=types.SimpleNamespace(to_base58=lambda: PEER))
    server = await asyncio.start_server(lambda r, w: service.handle(info, r, w), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(payload)
        await writer.drain()
        if close:
            writer.close()
            return
        async with asyncio.timeout(5):
            while await reader.read(2**16):
                pass
        writer.close()
    finally:
        server.close()


def counting_service(metrics: NodeMetrics, serve=None, failed=None) -> StreamService:
    async def reply(incoming, request):
        from protocol import ExchangeReject

        await incoming.stream.send(ExchangeReject(reason="busy", round=0))

    return StreamService(None, "test/1", StateRequest, SETTINGS, metrics, "state", serve=serve or reply,
                         failed=failed or (lambda incoming, error: None))


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def incoming(metrics: NodeMetrics, result: str) -> float:
    return metrics.incoming_streams.labels(kind="state", result=result)._value.get()


async def eventually(predicate) -> None:
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not counted within 3 s")


@pytest.mark.parametrize("payload, close, result", [
    (b"\x00\x00\x00\x03abc", False, "protocol_error"),  # a malformed body: told and counted
    (b"\x00\x00\x00\x09abc", True, "protocol_error"),  # a frame cut off by the end of the stream
    (b"", True, "peer_gone"),  # opened and closed without a byte
    (b"\x00\x00\x00\x09abc", False, "timeout"),  # a frame promising more than comes: only the clock ends it
])
async def test_every_incoming_stream_is_counted_once_by_how_it_ended(payload, close, result):
    metrics = NodeMetrics()
    await raw_call(counting_service(metrics), payload, close)
    await eventually(lambda: incoming(metrics, result) == 1)
    total = sum(incoming(metrics, r) for r in ("served", "protocol_error", "timeout", "peer_gone", "remote_error",
                                               "failed", "busy"))
    assert total == 1


async def test_a_served_stream_and_a_failing_callback_are_counted_and_the_service_carries_on():
    from protocol import encode_message

    metrics = NodeMetrics()
    request = frame(encode_message(StateRequest(run_id="run", manifest_hash="m" * 64, sender=PEER)))
    service = counting_service(metrics)
    await raw_call(service, request, False)
    await eventually(lambda: incoming(metrics, "served") == 1)

    def broken(incoming, error):
        raise RuntimeError("bug in a callback")

    service = counting_service(metrics, failed=broken)
    await raw_call(service, b"\x00\x00\x00\x03abc", False)  # the broken callback must not escape the handler
    await eventually(lambda: incoming(metrics, "protocol_error") == 1)
    assert service.limiter.open_total == 0  # its slot released


# ----------------------------------------------------------------------------- the generators
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), index=st.integers(0, 10**6), target=st.sampled_from(STREAM_TARGETS))
def test_stream_cases_are_reproducible_and_always_build(seed, index, target):
    case = stream_case(seed, target, index, NODE, ALICE.peer_id)
    assert case == stream_case(seed, target, index, NODE, ALICE.peer_id)
    assert isinstance(case.payload, bytes) and len(case.payload) < 2**20


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), index=st.integers(0, 10**6), kind=st.sampled_from(RECORD_TARGETS))
def test_record_cases_are_reproducible_and_judged_without_error(seed, index, kind):
    others = [BOB.peer_id]
    case = record_case(seed, kind, index, "run", "ab" * 32, ALICE, others, NOW)
    assert case == record_case(seed, kind, index, "run", "ab" * 32, ALICE, others, NOW)
    if not case.alone:
        refused_by(SignedRecordValidator(clock=lambda: NOW), case)  # a bool, never an exception
