"""`gossiptrain bench exchange`: what the pair exchange costs compared with the bytes it moves.

One run measures the full-duplex swap of a model-sized flat fp32 tensor (``numel``
parameters, numel*4 bytes each way) between two peers, three ways:

 1. ``raw TCP``: asyncio TCP on 127.0.0.1, both directions written concurrently in
    2 MiB chunks, each side ``readexactly``'s the partner's bytes. The ceiling for
    Python asyncio moving bytes on this machine.
 2. ``p2pd stream``: the same raw bytes (no framing) over a binary stream between
    two real hivemind P2P instances, each with its own p2pd (libp2p: TLS/noise,
    yamux, two extra unix-socket hops through the daemons). What the transport
    itself costs.
 3. ``gossiptrain``: ``node.exchange.swap_tensors`` over ``FrameStream`` on the same
    kind of p2pd stream, the responder registered as a binary stream handler,
    exactly as the gossip round does it (msgpack frames, blake2b checksum,
    finiteness check, acks). What our protocol costs on top of the transport.

Each exchange is timed from opening the stream until both sides hold the partner's
complete tensor (for gossiptrain: until both have the partner's ack). Received data
is compared with what the partner sent, so a broken transfer fails the benchmark
rather than being reported as fast. Both peers live in this one process and event
loop (uvloop), identically for all three modes, so the ratios between modes are fair
even though the absolute figures are pessimistic for two separate machines.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, TypeVar

import numpy as np
import uvloop

T = TypeVar("T")
StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Work = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]]  # one side of an exchange
Opener = Callable[[], Awaitable[StreamPair]]  # the initiator opening its stream

CHUNK_BYTES = 2 * 2**20  # write size of the raw modes and chunk size of the tensor transfer
MAX_FRAME_BYTES = 8 * 2**20 + 64 * 2**10
IO_TIMEOUT = 60.0  # per read / drain, as FrameStream applies it
EXCHANGE_TIMEOUT = 120.0  # one whole exchange, stream opening included
SETUP_TIMEOUT = 60.0  # starting a P2P instance, opening a server
TENSOR_NAME = "theta"
RAW_PROTOCOL = "gossiptrain/bench-raw/1"
SWAP_PROTOCOL = "gossiptrain/bench-exchange/1"


class TransferMismatch(RuntimeError):
    """A side received something other than what its partner sent."""


@dataclass
class _Pending(Generic[T]):
    """One expected incoming exchange: the responder's result, and when it may close its stream."""

    result: asyncio.Future[T]
    release: asyncio.Event = field(default_factory=asyncio.Event)


class _Responder(Generic[T]):
    """The accepting peer: runs ``work`` on an incoming stream and hands its result to the timer.

    The stream stays open until the timer has stopped, so neither side's close can cut
    bytes still in flight (p2pd's bridge does not survive an early close, DESIGN §5).
    """

    def __init__(self, work: Work[T]) -> None:
        self.work = work
        self.pending: _Pending[T] | None = None

    def expect(self) -> _Pending[T]:
        """Arm the responder for the next incoming stream."""
        self.pending = _Pending(asyncio.get_running_loop().create_future())
        return self.pending

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server callback."""
        await self._serve(reader, writer)

    async def handle_p2p(self, _info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """hivemind binary stream handler."""
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending, self.pending = self.pending, None
        try:
            if pending is None:
                return  # unexpected stream: refuse it by closing
            try:
                result = await asyncio.wait_for(self.work(reader, writer), EXCHANGE_TIMEOUT)
            except Exception as error:  # noqa: BLE001 - reported to the timer, which raises it
                if not pending.result.done():
                    pending.result.set_exception(error)
                return
            if not pending.result.done():
                pending.result.set_result(result)
            try:
                await asyncio.wait_for(pending.release.wait(), EXCHANGE_TIMEOUT)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        finally:
            writer.close()


async def _timed_exchange(responder: _Responder[T], open_stream: Opener, work: Work[T]) -> tuple[float, T, T]:
    """Open a stream to the responder and run ``work`` on both ends; (seconds, initiator's, responder's result)."""
    pending = responder.expect()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(EXCHANGE_TIMEOUT):
            started = time.perf_counter()
            reader, writer = await open_stream()
            mine = await work(reader, writer)
            theirs = await pending.result
            elapsed = time.perf_counter() - started
    except Exception as error:
        # the initiator usually fails second (its stream was closed): report the responder's cause
        if pending.result.done() and not pending.result.cancelled() and pending.result.exception() is not None:
            raise pending.result.exception() from error
        raise
    finally:
        pending.release.set()
        responder.pending = None
        if writer is not None:
            writer.close()
        if not pending.result.done():
            pending.result.cancel()
    return elapsed, mine, theirs


# ---------------------------------------------------------------------- what each side does
def _raw_work(payload: np.ndarray) -> Work[bytes]:
    """Side of a raw exchange: write ``payload`` in chunks while reading as many bytes from the partner."""
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
        return received

    return work


def _swap_work(payload: np.ndarray) -> Work[np.ndarray]:
    """Side of a gossiptrain exchange: exactly the training path, swap_tensors over a FrameStream."""
    from node.exchange import flat_spec, swap_tensors
    from node.transport import FrameStream

    specs = [flat_spec(TENSOR_NAME, payload.size)]

    async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> np.ndarray:
        stream = FrameStream(reader, writer, max_frame_bytes=MAX_FRAME_BYTES, io_timeout=IO_TIMEOUT)
        received = await swap_tensors(stream, {TENSOR_NAME: payload}, specs, chunk_bytes=CHUNK_BYTES)
        return received[TENSOR_NAME]

    return work


def _check(received: bytes | np.ndarray, sent: np.ndarray, who: str) -> None:
    """Bit-for-bit comparison of what arrived with what the partner sent (int32 views: no NaN semantics)."""
    got = received.view(np.uint8) if isinstance(received, np.ndarray) else np.frombuffer(received, dtype=np.uint8)
    if got.size != sent.nbytes or not np.array_equal(got.view(np.int32), sent.view(np.int32)):
        raise TransferMismatch(f"{who} received {got.size} bytes that differ from its partner's {sent.nbytes}")


# ---------------------------------------------------------------------- the three modes
@dataclass(frozen=True)
class ModeResult:
    """Timings of one mode (seconds per exchange, warm-up excluded)."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


async def _repeat(
    name: str,
    repeats: int,
    responder: _Responder[T],
    open_stream: Opener,
    work: Work[T],
    a: np.ndarray,
    b: np.ndarray,
) -> ModeResult:
    """One warm-up and ``repeats`` timed exchanges; the initiator sends ``a``, the responder ``b``."""
    seconds = []
    for attempt in range(repeats + 1):
        elapsed, mine, theirs = await _timed_exchange(responder, open_stream, work)
        _check(mine, b, f"{name}: initiator")
        _check(theirs, a, f"{name}: responder")
        del mine, theirs
        if attempt:
            seconds.append(elapsed)
    return ModeResult(name, seconds)


async def _bench_raw_tcp(a: np.ndarray, b: np.ndarray, repeats: int) -> ModeResult:
    """Mode 1: plain asyncio TCP over loopback."""
    responder: _Responder[bytes] = _Responder(_raw_work(b))
    server = await asyncio.wait_for(asyncio.start_server(responder.handle_tcp, "127.0.0.1", 0), SETUP_TIMEOUT)
    try:
        port = server.sockets[0].getsockname()[1]

        async def open_stream() -> StreamPair:
            return await asyncio.open_connection("127.0.0.1", port)

        return await _repeat("raw TCP", repeats, responder, open_stream, _raw_work(a), a, b)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), SETUP_TIMEOUT)


async def _bench_p2p(a: np.ndarray, b: np.ndarray, repeats: int) -> tuple[ModeResult, ModeResult]:
    """Modes 2 and 3: two real P2P instances (one p2pd each), a raw stream and the gossiptrain exchange."""
    from hivemind.p2p import P2P

    responder_p2p = initiator_p2p = None
    try:
        responder_p2p = await asyncio.wait_for(
            P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT), SETUP_TIMEOUT + 5
        )
        maddrs = await asyncio.wait_for(responder_p2p.get_visible_maddrs(), SETUP_TIMEOUT)
        initiator_p2p = await asyncio.wait_for(
            P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT),
            SETUP_TIMEOUT + 5,
        )
        raw: _Responder[bytes] = _Responder(_raw_work(b))
        swap: _Responder[np.ndarray] = _Responder(_swap_work(b))
        await asyncio.wait_for(responder_p2p.add_binary_stream_handler(RAW_PROTOCOL, raw.handle_p2p), SETUP_TIMEOUT)
        await asyncio.wait_for(responder_p2p.add_binary_stream_handler(SWAP_PROTOCOL, swap.handle_p2p), SETUP_TIMEOUT)
        target = responder_p2p.peer_id

        def opener(protocol: str) -> Opener:
            async def open_stream() -> StreamPair:
                _info, reader, writer = await asyncio.wait_for(
                    initiator_p2p.call_binary_stream_handler(target, protocol), IO_TIMEOUT
                )
                return reader, writer

            return open_stream

        stream = await _repeat("p2pd stream", repeats, raw, opener(RAW_PROTOCOL), _raw_work(a), a, b)
        exchange = await _repeat("gossiptrain", repeats, swap, opener(SWAP_PROTOCOL), _swap_work(a), a, b)
        return stream, exchange
    finally:
        for p2p in (initiator_p2p, responder_p2p):
            if p2p is not None:
                try:
                    await asyncio.wait_for(p2p.shutdown(), 10)
                except Exception as error:  # noqa: BLE001 - best effort; the daemon was terminated
                    print(f"warning: p2pd shutdown: {error!r}", file=sys.stderr)


# ---------------------------------------------------------------------- report
def _header(numel: int, repeats: int) -> str:
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    torch_note = "imported by hivemind, unused here" if "torch" in sys.modules else "not imported"
    return (
        f"pair exchange, full duplex: numel={numel:,} fp32 = {numel * 4 / 1e6:.1f} MB per direction, "
        f"chunks {CHUNK_BYTES // 2**20} MiB, median of {repeats} after 1 warm-up\n"
        f"both peers in this one process and uvloop event loop (+ one p2pd per peer for the p2pd modes); "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch_note}; "
        f"CPUs {cpus} ({usable} usable)"
    )


def _table(numel: int, results: list[ModeResult]) -> str:
    megabytes = numel * 4 / 1e6
    raw, stream = results[0].median, results[1].median
    rows = [("mode", "MB/s/dir", "seconds", "vs raw TCP", "vs p2pd", "runs (s)")]
    for result in results:
        median = result.median
        rows.append((
            result.name,
            f"{megabytes / median:,.0f}",
            f"{median:.3f}",
            f"{raw / median:.2f}x",
            f"{stream / median:.2f}x",
            " ".join(f"{s:.3f}" for s in result.seconds),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:-1])]
        lines.append("  ".join(cells + [row[-1]]))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines) + "\n(ratios: throughput of this mode / throughput of the reference, 1.00x = as fast)"


async def _main(numel: int, repeats: int) -> int:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(numel, dtype=np.float32)  # the initiator's tensor
    b = rng.standard_normal(numel, dtype=np.float32)  # the responder's
    results = [await _bench_raw_tcp(a, b, repeats), *await _bench_p2p(a, b, repeats)]
    print(_header(numel, repeats))
    print(_table(numel, results))
    return 0


def run_benchmark(numel: int, repeats: int) -> int:
    """Measure raw TCP, a plain p2pd stream and gossiptrain's exchange; print the table; 0 on success."""
    if numel <= 0 or repeats <= 0:
        print("numel and repeats must be positive", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_main(numel, repeats))
    except Exception as error:  # noqa: BLE001 - a failed benchmark is a message and exit status 1
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
