"""`gossiptrain bench exchange`: what the pair exchange costs compared with the bytes it moves.

One run measures the full-duplex swap of a model-sized flat fp32 tensor (``numel``
parameters, numel*4 bytes each way) between two peers, three ways:

 1. ``raw TCP``: asyncio TCP on 127.0.0.1, both directions written concurrently in
    2 MiB chunks, each side ``readexactly``'s the partner's bytes, then the responder
    sends a 1-byte ack. The ceiling for Python asyncio moving bytes on this machine.
 2. ``p2pd stream``: the same raw bytes and ack (no framing) over a binary stream
    between two real hivemind P2P instances, each with its own p2pd (libp2p: TLS/noise,
    yamux, two extra unix-socket hops through the daemons). What the transport
    itself costs.
 3. ``gossiptrain``: ``node.net.tensor_stream.swap_tensors`` over ``FrameStream`` on the same
    kind of p2pd stream, the responder registered as a binary stream handler,
    exactly as the gossip round does it (msgpack frames, blake2b checksum,
    finiteness check, acks). What our protocol costs on top of the transport.

The two peers are two real nodes on this machine: the initiator is this process, the
responder a separate OS process (``python -m node.bench.exchange --serve``) with its
own event loop, GIL and, for the p2pd modes, its own p2pd. It prints one ready line
(its TCP port, peer id and addresses) and serves until its stdin closes. Both sides
use uvloop and generate their tensors from fixed seeds, so each side checks what it
received without the expected data being shipped.

Each exchange is timed by the initiator from opening the stream until it holds the
responder's complete tensor and knows the responder holds its own (the responder's
1-byte ack in the raw modes, swap_tensors' acks for gossiptrain). Afterwards, outside
the timed region, both sides compare what arrived with what the partner sent, and the
responder reports its verdict in one more byte; a broken transfer fails the benchmark
rather than being reported as fast.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, TypeVar

import numpy as np

from node.bench.child import (
    LOG_TAIL_LINES,
    ChildProcess,
    announce_and_serve,
    machine_line,
    run_parent,
    serve_entry,
    shutdown_p2pd,
)
from node.table import format_table

T = TypeVar("T")
StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Work = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]]  # one side of an exchange
Opener = Callable[[], Awaitable[StreamPair]]  # the initiator opening its stream

CHUNK_BYTES = 2 * 2**20  # write size of the raw modes and chunk size of the tensor transfer
MAX_FRAME_BYTES = 8 * 2**20 + 64 * 2**10
IO_TIMEOUT = 60.0  # per read / drain, as FrameStream applies it
EXCHANGE_TIMEOUT = 120.0  # one whole exchange, stream opening included
SETUP_TIMEOUT = 60.0  # starting a P2P instance, opening a server
LINGER_TIMEOUT = 10.0  # the responder waiting for the initiator to close after the verdict
STOP_TIMEOUT = 20.0  # the responder process shutting down after its stdin closed
TENSOR_NAME = "theta"
RAW_PROTOCOL = "gossiptrain/bench-raw/1"
SWAP_PROTOCOL = "gossiptrain/bench-exchange/1"
INITIATOR_SEED, RESPONDER_SEED = 1, 2
ACK = b"\x06"  # raw modes: the responder has all of the initiator's bytes
VERDICT_OK, VERDICT_MISMATCH = b"\x01", b"\x00"  # after the timed region: the responder's check
READY_PREFIX = "gossiptrain-bench-responder ready "


class TransferMismatch(RuntimeError):
    """A side received something other than what its partner sent."""


class ExchangeFailed(RuntimeError):
    """One exchange of one mode broke (stream reset, timeout, ...): which one, and why."""


def _tensor(seed: int, numel: int) -> np.ndarray:
    """A side's tensor, reproducible by its partner from the seed alone."""
    return np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)


# ---------------------------------------------------------------------- what each side does
def _raw_work(payload: np.ndarray, initiator: bool) -> Work[bytes]:
    """Side of a raw exchange: write ``payload`` in chunks while reading as many bytes from the partner.

    Then the responder writes a 1-byte ack (after all of its payload, same stream), which
    the initiator reads: when it arrives, both sides hold the partner's bytes.
    """
    view = memoryview(payload).cast("B")

    async def send(writer: asyncio.StreamWriter) -> None:
        for start in range(0, len(view), CHUNK_BYTES):
            writer.write(view[start : start + CHUNK_BYTES])
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)

    async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        sender = asyncio.ensure_future(send(writer))  # same structure as swap_tensors
        try:
            received = await reader.readexactly(len(view))
            await sender
        finally:
            if not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
        if initiator:
            ack = await asyncio.wait_for(reader.readexactly(1), IO_TIMEOUT)
            if ack != ACK:
                raise TransferMismatch(f"expected the responder's ack, got {ack!r}")
        else:
            writer.write(ACK)
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
        return received

    return work


def _swap_work(payload: np.ndarray) -> Work[np.ndarray]:
    """Side of a gossiptrain exchange: exactly the training path, swap_tensors over a FrameStream."""
    from node.net.streams import FrameStream
    from node.net.tensor_stream import flat_spec, swap_tensors

    specs = [flat_spec(TENSOR_NAME, payload.size)]

    async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> np.ndarray:
        stream = FrameStream(reader, writer, max_frame_bytes=MAX_FRAME_BYTES, io_timeout=IO_TIMEOUT)
        received = await swap_tensors(stream, {TENSOR_NAME: payload}, specs, chunk_bytes=CHUNK_BYTES)
        return received[TENSOR_NAME]

    return work


def _matches(received: bytes | np.ndarray, sent: np.ndarray) -> bool:
    """Bit-for-bit comparison of what arrived with what the partner sent (int32 views: no NaN semantics)."""
    got = received.view(np.uint8) if isinstance(received, np.ndarray) else np.frombuffer(received, dtype=np.uint8)
    return got.size == sent.nbytes and np.array_equal(got.view(np.int32), sent.view(np.int32))


# ---------------------------------------------------------------------- the responder process
class _ResponderServer:
    """The accepting peer: runs a mode's work on each incoming stream, checks, reports the verdict."""

    def __init__(self, payload: np.ndarray, expected: np.ndarray) -> None:
        self.expected = expected
        self.raw = _raw_work(payload, initiator=False)
        self.swap = _swap_work(payload)
        self.failures = 0

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server callback."""
        await self._serve("raw TCP", self.raw, reader, writer)

    async def handle_p2p_raw(self, _info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve("p2pd stream", self.raw, reader, writer)

    async def handle_p2p_swap(self, _info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve("gossiptrain", self.swap, reader, writer)

    async def _serve(self, mode: str, work: Work, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                received = await asyncio.wait_for(work(reader, writer), EXCHANGE_TIMEOUT)
                ok = _matches(received, self.expected)  # the initiator's clock has stopped by now
                del received
                writer.write(VERDICT_OK if ok else VERDICT_MISMATCH)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            except Exception as error:  # noqa: BLE001 - reported on stderr and in the exit status
                self._fail(f"{mode}: exchange failed: {type(error).__name__}: {error}")
                return
            if not ok:
                self._fail(f"{mode}: received {self.expected.nbytes} bytes that differ from the initiator's")
            # the initiator closes first, once it has the verdict: p2pd's bridge does not
            # survive an early close with bytes still in flight (DESIGN §5)
            try:
                await asyncio.wait_for(reader.read(1), LINGER_TIMEOUT)
            except Exception:  # noqa: BLE001 - the exchange is over either way
                pass
        finally:
            writer.close()

    def _fail(self, message: str) -> None:
        self.failures += 1
        print(f"responder: {message}", file=sys.stderr, flush=True)


async def _serve_main(numel: int, lifetime: float, ready_out: IO[str]) -> int:
    """The responder process: serve every mode until stdin closes; 0 if every exchange checked out."""
    from hivemind.p2p import P2P

    responder = _ResponderServer(_tensor(RESPONDER_SEED, numel), _tensor(INITIATOR_SEED, numel))
    server = p2p = None
    try:
        server = await asyncio.wait_for(asyncio.start_server(responder.handle_tcp, "127.0.0.1", 0), SETUP_TIMEOUT)
        p2p = await asyncio.wait_for(
            P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT), SETUP_TIMEOUT + 5
        )
        await asyncio.wait_for(p2p.add_binary_stream_handler(RAW_PROTOCOL, responder.handle_p2p_raw), SETUP_TIMEOUT)
        await asyncio.wait_for(p2p.add_binary_stream_handler(SWAP_PROTOCOL, responder.handle_p2p_swap), SETUP_TIMEOUT)
        maddrs = await asyncio.wait_for(p2p.get_visible_maddrs(), SETUP_TIMEOUT)
        ready = {
            "pid": os.getpid(),
            "tcp_port": server.sockets[0].getsockname()[1],
            "peer_id": p2p.peer_id.to_base58(),
            "maddrs": [str(maddr) for maddr in maddrs],
        }
        if not await announce_and_serve("responder", ready_out, READY_PREFIX, ready, lifetime):
            return 1
    finally:
        if server is not None:
            server.close()
        await shutdown_p2pd(p2p, "responder")
    return 1 if responder.failures else 0


# ---------------------------------------------------------------------- the initiator's side of it
@dataclass(frozen=True)
class ModeResult:
    """Timings of one mode (seconds per exchange, warm-up excluded)."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


async def _timed_exchange(name: str, open_stream: Opener, work: Work[T], expected: np.ndarray) -> float:
    """Open a stream to the responder and run ``work``; seconds until both sides hold the partner's tensor."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            started = time.perf_counter()
            reader, writer = await open_stream()
            received = await work(reader, writer)
            elapsed = time.perf_counter() - started
        if not _matches(received, expected):
            raise TransferMismatch(f"{name}: the initiator received bytes that differ from the responder's")
        del received
        try:
            verdict = await asyncio.wait_for(reader.readexactly(1), IO_TIMEOUT)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{name}: the responder closed the stream without its verdict") from None
        if verdict != VERDICT_OK:
            raise TransferMismatch(f"{name}: the responder received bytes that differ from the initiator's")
    finally:
        if writer is not None:
            writer.close()
    return elapsed


async def _repeat(name: str, repeats: int, open_stream: Opener, work: Work[T], expected: np.ndarray) -> ModeResult:
    """One warm-up and ``repeats`` timed exchanges."""
    seconds = []
    for attempt in range(repeats + 1):
        try:
            elapsed = await _timed_exchange(name, open_stream, work, expected)
        except TransferMismatch:
            raise
        except Exception as error:
            what = "the warm-up" if attempt == 0 else f"timed exchange {attempt} of {repeats}"
            raise ExchangeFailed(f"{name}, {what}: {type(error).__name__}: {error}") from error
        if attempt:
            seconds.append(elapsed)
    return ModeResult(name, seconds)


async def _bench_raw_tcp(port: int, a: np.ndarray, b: np.ndarray, repeats: int) -> ModeResult:
    """Mode 1: plain asyncio TCP over loopback to the responder process."""

    async def open_stream() -> StreamPair:
        return await asyncio.open_connection("127.0.0.1", port)

    return await _repeat("raw TCP", repeats, open_stream, _raw_work(a, initiator=True), b)


async def _bench_p2p(ready: dict, a: np.ndarray, b: np.ndarray, repeats: int) -> tuple[ModeResult, ModeResult]:
    """Modes 2 and 3: our own P2P (own p2pd) to the responder's, a raw stream and the gossiptrain exchange."""
    from hivemind.p2p import P2P, PeerID

    p2p = None
    try:
        p2p = await asyncio.wait_for(
            P2P.create(
                initial_peers=ready["maddrs"], host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT
            ),
            SETUP_TIMEOUT + 5,
        )
        target = PeerID.from_base58(ready["peer_id"])

        def opener(protocol: str) -> Opener:
            async def open_stream() -> StreamPair:
                opening = p2p.call_binary_stream_handler(target, protocol)
                _info, reader, writer = await asyncio.wait_for(opening, IO_TIMEOUT)
                return reader, writer

            return open_stream

        stream = await _repeat("p2pd stream", repeats, opener(RAW_PROTOCOL), _raw_work(a, initiator=True), b)
        exchange = await _repeat("gossiptrain", repeats, opener(SWAP_PROTOCOL), _swap_work(a), b)
        return stream, exchange
    finally:
        await shutdown_p2pd(p2p)


# ---------------------------------------------------------------------- report
def _header(numel: int, repeats: int) -> str:
    return (
        f"pair exchange, full duplex: numel={numel:,} fp32 = {numel * 4 / 1e6:.1f} MB per direction, "
        f"chunks {CHUNK_BYTES // 2**20} MiB, median of {repeats} after 1 warm-up\n"
        f"two peers as separate processes on this machine over loopback (initiator: this process; "
        f"responder: python -m node.bench.exchange --serve), each with its own uvloop event loop and, "
        f"for the p2pd modes, its own p2pd; timed by the initiator until both hold the partner's tensor, "
        f"verified outside the timed region\n" + machine_line()
    )


def _table(numel: int, results: list[ModeResult]) -> str:
    megabytes = numel * 4 / 1e6
    raw, stream = results[0].median, results[1].median
    rows = [
        {
            "mode": result.name,
            "MB/s/dir": f"{megabytes / result.median:,.0f}",
            "seconds": f"{result.median:.3f}",
            "vs raw TCP": f"{raw / result.median:.2f}x",
            "vs p2pd": f"{stream / result.median:.2f}x",
            "runs (s)": " ".join(f"{s:.3f}" for s in result.seconds),
        }
        for result in results
    ]
    return format_table(rows) + "\n(ratios: throughput of this mode / throughput of the reference, 1.00x = as fast)"


def _fail(message: str, responder: ChildProcess) -> int:
    print(f"benchmark failed: {message}", file=sys.stderr)
    tail = responder.log_tail()
    if tail:
        print(f"responder's stderr (last {LOG_TAIL_LINES} lines):\n{tail}", file=sys.stderr)
    return 1


async def _main(numel: int, repeats: int) -> int:
    a = _tensor(INITIATOR_SEED, numel)  # ours
    b = _tensor(RESPONDER_SEED, numel)  # what the responder process sends us
    # the responder gives up by itself if we vanish without closing its stdin (we never hang it)
    lifetime = 2 * SETUP_TIMEOUT + 3 * (repeats + 1) * (EXCHANGE_TIMEOUT + IO_TIMEOUT) + 60
    responder = ChildProcess("responder", "bench.exchange", READY_PREFIX)
    results: list[ModeResult] = []
    error: BaseException | None = None
    try:
        try:
            ready = await responder.start(numel, lifetime, 2 * SETUP_TIMEOUT + 10)
            results.append(await _bench_raw_tcp(ready["tcp_port"], a, b, repeats))
            results.extend(await _bench_p2p(ready, a, b, repeats))
        except Exception as caught:  # noqa: BLE001 - reported below, with the responder's side of it
            error = caught
        finally:
            code = await responder.stop(STOP_TIMEOUT)
        if error is not None:
            status = "" if code in (0, 1) else f" (the responder process exited with status {code})"
            return _fail(f"{type(error).__name__}: {error}{status}", responder)
        if code != 0:
            return _fail(f"the responder process exited with status {code}", responder)
    finally:
        responder.close()
    print(_header(numel, repeats))
    print(_table(numel, results))
    return 0


def run_benchmark(numel: int, repeats: int) -> int:
    """Measure raw TCP, a plain p2pd stream and gossiptrain's exchange; print the table; 0 on success."""
    if numel <= 0 or repeats <= 0:
        print("numel and repeats must be positive", file=sys.stderr)
        return 2
    return run_parent(_main(numel, repeats))


if __name__ == "__main__":
    sys.exit(serve_entry(sys.argv[1:], "bench.exchange", "bench exchange responder", "responder", _serve_main))
