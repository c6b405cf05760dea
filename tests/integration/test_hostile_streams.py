"""Hostile streams against a real node (issue 13): a trickling partner, a flood of streams with huge first
frames, an identity grabbing every upload slot, an outsider asking for audits. The node cuts, refuses and
counts each of them early, and keeps training at its usual pace.

A 2-node swarm of real processes (real p2pd, 127.0.0.1); the attackers are hivemind P2P instances in this
process, each with its own identity, speaking the wire protocol byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from hivemind.p2p import P2P, PeerID

from protocol import (
    AuditRequest,
    ExchangeAccept,
    ExchangeReject,
    ExchangeRequest,
    StateOffer,
    StateRequest,
    TensorSpec,
    encode_frame,
    encode_message,
    tensor_messages,
)

from node.config import NodeConfig
from node.gossip.exchange import EXCHANGE_PROTOCOL
from node.join.statesync import STATE_PROTOCOL
from node.net.streams import FrameStream, PeerGone
from node.tools.procs import p2pd_children
from node.tools.swarm import LocalSwarm
from node.verify.service import AUDIT_PROTOCOL
from tests.integration.conftest import TINY, poll, rounds_done

WIRE_DTYPE = NodeConfig.wire_dtype  # the nodes run the default wire dtype

pytestmark = pytest.mark.integration

IO_TIMEOUT = 2.0
CHUNK_BYTES = 2 * 2**20  # the run's (the default)
# verify on (start states are retained for audits) but no round drawn: no replays skew the paired-round counts;
# every round boundary tries to pair (no staleness window closes on these fast rounds)
ARGS = TINY + ["--inner-steps", "20", "--sync-timeout", "3", "--io-timeout", str(IO_TIMEOUT), "--max-uploads", "2",
               "--verify-rate", "0", "--max-staleness", "1000"]
BASELINE, ATTACK = 40.0, 45.0  # seconds over which paired rounds are counted without (half before, half after)
# and with an attack
RUN = "gossiptrain-default"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    swarm = LocalSwarm(2, tmp_path_factory.mktemp("hostile"), ARGS)
    swarm.start()
    try:
        poll(lambda: all(rounds_done(swarm.metrics(i)) >= 3 for i in range(2)), timeout=180,
             what="3 rounds on both nodes")
        yield swarm
    finally:
        swarm.stop()


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def paired(samples: dict[str, float]) -> float:
    return samples.get('gossiptrain_outer_rounds_total{mode="paired"}', 0.0)


class Attacker:
    """One identity (its own p2pd) that dials the node's stream handlers and misbehaves."""

    def __init__(self, p2p: P2P, swarm: LocalSwarm) -> None:
        self.p2p, self.swarm = p2p, swarm
        node = swarm.nodes[0]
        self.target = PeerID.from_base58(node.status["peer_id"])
        self.manifest, self.numel = node.status["manifest"], node.status["parameters"]
        self.peer_id = p2p.peer_id.to_base58()
        self._round, self._round_read = 0, -1e9

    async def open(self, protocol: str) -> FrameStream:
        _info, reader, writer = await asyncio.wait_for(self.p2p.call_binary_stream_handler(self.target, protocol), 10)
        return FrameStream(reader, writer, max_frame_bytes=2**24, io_timeout=15)

    async def node_round(self) -> int:
        """The node's round, read at most every 0.25 s: a tiny-model node may do several rounds a second, and a
        round read longer ago can be more than max_staleness (8) behind, when the node refuses as stale."""
        if time.monotonic() - self._round_read > 0.25:
            samples = await asyncio.to_thread(self.swarm.metrics, 0)
            self._round, self._round_read = int(samples.get("gossiptrain_round", 0)), time.monotonic()
        return self._round

    async def pair_and_trickle(self, one_byte_chunks: bool) -> float | None:
        """Ask the node to pair; once accepted, send our tensor as 1-byte chunks (refused from the header) or
        as valid chunks written a few bytes at a time. Returns the seconds from the accept until the node
        closed the stream, or None if it refused to pair."""
        stream = await self.open(EXCHANGE_PROTOCOL)
        try:
            await stream.send(ExchangeRequest(run_id=RUN, manifest_hash=self.manifest, round=await self.node_round(),
                                              sender=self.peer_id, tensors=("theta",), numel=self.numel,
                                              dtype=WIRE_DTYPE))
            reply = await stream.recv((ExchangeAccept, ExchangeReject))
            if isinstance(reply, ExchangeReject):
                return None
            accepted = time.monotonic()
            spec = TensorSpec("theta", WIRE_DTYPE, (self.numel,))
            messages = tensor_messages(spec, bytes(spec.nbytes), 1 if one_byte_chunks else CHUNK_BYTES)
            frames = b"".join(encode_frame(encode_message(next(messages)), 2**24) for _ in range(2))
            trickler = asyncio.ensure_future(self._trickle(stream.writer, frames))
            try:  # the node streams its own tensor meanwhile: read it until the node closes the stream
                while await asyncio.wait_for(stream.reader.read(2**16), 30):
                    pass
            except (ConnectionError, OSError):
                pass
            finally:
                trickler.cancel()
                await asyncio.gather(trickler, return_exceptions=True)
            return time.monotonic() - accepted
        finally:
            stream.close()

    @staticmethod
    async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for start in range(0, len(data), 64):  # 64 bytes every 0.1 s: never silent for an I/O timeout
                writer.write(data[start:start + 64])
                await writer.drain()
                await asyncio.sleep(0.1)

    async def attack(self, seconds: float, one_byte_chunks: bool) -> list[float]:
        """Keep asking the node to pair and trickling for `seconds`; the cut times of the accepted attempts."""
        cuts, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                cut = await self.pair_and_trickle(one_byte_chunks)
            except Exception:  # noqa: BLE001 - refused mid-way, stream reset: try again
                cut = None
            if cut is not None:
                cuts.append(cut)
            else:
                await asyncio.sleep(0.1)  # refused (not at a boundary, busy, stale): ask again soon
        return cuts


@contextlib.asynccontextmanager
async def attackers(swarm: LocalSwarm, count: int):
    p2ps = []
    try:
        for _ in range(count):
            p2ps.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[swarm.nodes[0].maddr],
                                         startup_timeout=30))
        yield [Attacker(p2p, swarm) for p2p in p2ps]
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


async def count_paired(swarm: LocalSwarm, seconds: float) -> tuple[float, float]:
    """(paired rounds, all rounds) of node 0 over the next `seconds`."""
    before = await asyncio.to_thread(swarm.metrics, 0)
    await asyncio.sleep(seconds)
    after = await asyncio.to_thread(swarm.metrics, 0)
    return paired(after) - paired(before), rounds_done(after) - rounds_done(before)


async def test_a_trickling_partner_is_cut_within_an_io_timeout_and_costs_no_paired_rounds(swarm):
    """A trickler can cost a node two things: round boundaries that end unpaired (it held the node until the
    search gave up: what took paired rounds from ~40 to ~2 per 30 s before), and the time it holds the node
    before it is cut. Both stay within 10%: the share of paired rounds, and the time held over the attack.
    (Paired rounds per wall second swing by +-50% between identical windows on a shared 2-core machine, with
    the CPU that other processes leave; they are printed, not asserted.)"""
    # attack-free windows before and after the attack, so that drifting conditions hit both alike;
    # the attack is shorter than the 60 s a node refuses a peer after its first offence: one cut per identity
    async with attackers(swarm, 2) as (slow, one_byte):
        await asyncio.sleep(2)  # the attackers' p2pd are up and connected
        first = await count_paired(swarm, BASELINE / 2)
        attacks = asyncio.gather(slow.attack(ATTACK, one_byte_chunks=False), one_byte.attack(ATTACK, True))
        attacked, attacked_rounds = await count_paired(swarm, ATTACK)
        slow_cuts, one_byte_cuts = await attacks
        second = await count_paired(swarm, BASELINE / 2)
    baseline, baseline_rounds = first[0] + second[0], first[1] + second[1]
    samples = swarm.metrics(0)
    print(f"paired rounds per 30 s: {baseline / BASELINE * 30:.1f} without attack, {attacked / ATTACK * 30:.1f} under "
          f"attack; paired share {baseline / baseline_rounds:.2f} without, {attacked / attacked_rounds:.2f} under attack; "
          f"slow-write cuts {[round(c, 2) for c in slow_cuts]}s, 1-byte-chunk cuts {[round(c, 2) for c in one_byte_cuts]}s")
    assert slow_cuts and one_byte_cuts, "the node never accepted an attacker"
    assert max(slow_cuts) < IO_TIMEOUT + 1.5  # too slow after one I/O timeout of allowance
    assert max(one_byte_cuts) < 1.5  # 1-byte chunks are not the run's: refused from the header
    assert samples['gossiptrain_exchanges_total{result="too_slow"}'] >= len(slow_cuts)
    assert samples['gossiptrain_protocol_errors_total{kind="field"}'] >= len(one_byte_cuts)
    # each identity is cut once, then refused for a while (not once per round)
    assert len(slow_cuts) == 1 and len(one_byte_cuts) == 1
    assert sum(slow_cuts) + sum(one_byte_cuts) <= 0.1 * ATTACK
    assert attacked / attacked_rounds >= 0.9 * baseline / baseline_rounds, (baseline, baseline_rounds, attacked,
                                                                            attacked_rounds)


async def test_a_flood_of_streams_with_huge_first_frames_is_refused_early(swarm):
    node = swarm.nodes[0]
    pid = node.process.pid
    rss_before = max(vm_rss_mib(pid) for _ in range(3))
    p2pd_before = sum(vm_rss_mib(p) for p in p2pd_children(pid))
    rounds_before = rounds_done(swarm.metrics(0))
    before = swarm.metrics(0)
    async with attackers(swarm, 1) as (flooder,):
        opened = await asyncio.gather(*(flooder.open(EXCHANGE_PROTOCOL) for _ in range(48)), return_exceptions=True)
        streams = [s for s in opened if isinstance(s, FrameStream)]
        body = (8 * 2**20).to_bytes(4, "big") + bytes(8 * 2**20)  # a first frame of 8 MiB (the frame limit)
        for stream in streams:
            stream.writer.write(body)
        peak, deadline = rss_before, time.monotonic() + 8
        while time.monotonic() < deadline:
            peak = max(peak, vm_rss_mib(pid))
            await asyncio.sleep(0.1)
        p2pd_peak = sum(vm_rss_mib(p) for p in p2pd_children(pid))
        for stream in streams:
            stream.close()
    after = swarm.metrics(0)
    refused = (after['gossiptrain_streams_refused_total{reason="peer_limit"}']
               - before['gossiptrain_streams_refused_total{reason="peer_limit"}'])
    oversized = (after['gossiptrain_protocol_errors_total{kind="oversized"}']
                 - before['gossiptrain_protocol_errors_total{kind="oversized"}'])
    print(f"48 streams x 8 MiB first frames: {len(streams)} opened, {refused:.0f} refused over the peer's cap, "
          f"{oversized:.0f} refused from the header; node RSS {rss_before:.0f} -> peak {peak:.0f} MiB, "
          f"its p2pd {p2pd_before:.0f} -> {p2pd_peak:.0f} MiB")
    assert len(streams) == 48
    assert refused >= 1 and oversized >= 1 and refused + oversized >= 40
    assert peak - rss_before < 64, (rss_before, peak)
    poll(lambda: rounds_done(swarm.metrics(0)) >= rounds_before + 3, timeout=90,
         what="the node to keep training after the flood")
    assert node.process.poll() is None


async def test_one_requester_cannot_hold_every_upload_slot(swarm):
    before = swarm.metrics(0)['gossiptrain_state_uploads_total{result="refused"}']
    async with attackers(swarm, 2) as (hoarder, joiner):
        def request(attacker):
            return StateRequest(run_id=RUN, manifest_hash=attacker.manifest, sender=attacker.peer_id)

        first, second = await hoarder.open(STATE_PROTOCOL), await hoarder.open(STATE_PROTOCOL)
        await first.send(request(hoarder))
        assert isinstance(await first.recv((StateOffer, ExchangeReject)), StateOffer)  # then never read further
        await second.send(request(hoarder))
        reply = await second.recv((StateOffer, ExchangeReject))
        assert isinstance(reply, ExchangeReject) and reply.reason == "busy"  # its one slot is taken
        other = await joiner.open(STATE_PROTOCOL)
        await other.send(request(joiner))
        assert isinstance(await other.recv((StateOffer, ExchangeReject)), StateOffer)  # max_uploads 2: one left
        for stream in (first, second, other):
            stream.close()
    assert swarm.metrics(0)['gossiptrain_state_uploads_total{result="refused"}'] >= before + 1


async def test_a_peer_outside_an_audits_committee_gets_no_start_state(swarm):
    async with attackers(swarm, 1) as (outsider,):
        now, replies = await outsider.node_round(), []
        for round_ in range(max(0, now - 8), now + 1):  # some of these rounds are retained for audits
            request = AuditRequest(run_id=RUN, manifest_hash=outsider.manifest, sender=outsider.peer_id, round=round_)
            for _attempt in range(10):  # p2pd may still be resetting streams after the flood of the test before
                stream = await outsider.open(AUDIT_PROTOCOL)
                try:
                    await stream.send(request)
                    replies.append(await stream.recv())
                    break
                except PeerGone:
                    await asyncio.sleep(0.5)
                finally:
                    stream.close()
    reasons = [getattr(reply, "reason", type(reply).__name__) for reply in replies]
    assert all(isinstance(reply, ExchangeReject) for reply in replies), reasons
    assert "bad_request" in reasons, reasons  # a retained round, but we are on no committee of it
    assert swarm.metrics(0)['gossiptrain_audit_uploads_total{result="not_committee"}'] >= reasons.count("bad_request")
