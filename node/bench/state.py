"""`gossiptrain bench state-sync`: how long a joiner takes to download the swarm state, and what it holds meanwhile.

For each state size (``numel`` parameters), a joiner downloads φ and δ (2 × numel fp32,
8·numel tensor bytes) from a live donor, ``repeats`` times, along the exact code path a
joining node uses: the donor serves through ``node.join.statesync.StateServer``, the joiner
calls ``node.join.statesync.download_state``, with the settings a node gets by default
(``NodeConfig``: chunk size, frame limit, per-read I/O timeout, one upload at a time).

The two peers are two real nodes on this machine: the joiner is this process, the
donor a separate OS process (``python -m node.bench.state --serve --numel N``) with its
own event loop, GIL and p2pd, serving a synthetic random DonorState. It prints one ready
line (peer id, addresses, round, step, and a blake2b checksum of its φ and δ) and serves
until its stdin closes. The joiner has its own P2P (own p2pd) bootstrapped from the
donor's multiaddrs.

Each download is timed by the joiner from calling ``download_state`` until it returns
(opening the stream, request, offer, both checksummed tensor transfers, the ack). There
is no warm-up: a joiner downloads once, on a fresh stream, and so does every repeat.
Afterwards, outside the timed region, the joiner checks the arrays it holds against the
donor's checksum (and round and step); a broken transfer, or a download that needed a
retry, fails the benchmark rather than being reported.

Peak memory: the joiner's VmHWM (peak resident set) from /proc/self/status. Before each
download, after a gc, the peak is reset to the current RSS by writing "5" to
/proc/self/clear_refs (Linux >= 4.0), so every download is measured on its own: growth =
VmHWM after − VmRSS before, reported as a ratio to the state's tensor bytes (1.00x: the
state is held once; 2.00x would mean it is held twice). The previous download's result
is released before the next, so each download allocates fresh buffers. Where the peak
cannot be reset, only the first download is measured and the figure is an upper bound
(the peak of everything before it counts too). Only this process is counted: the joiner's
p2pd is a separate process whose buffers are not included.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import IO

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

LARGE_NUMEL = 100_000_000  # the second default size: a ~100M-parameter state, 800 MB of φ and δ
RUN_ID = "gossiptrain-bench-state"
MANIFEST_HASH = "b" * 64  # both sides use the same one; the donor checks it like any node does
STATE_ROUND, STATE_STEP = 42, 2100  # what the donor claims; the joiner checks it received them
DONOR_SEED = 7
SETUP_TIMEOUT = 60.0  # starting a P2P instance, registering a handler
STOP_TIMEOUT = 20.0  # the donor process shutting down after its stdin closed
MIN_RATE = 5e6  # bytes/s: the download deadline is the node's state_sync_timeout, longer for huge states
GENERATE_RATE = 20e6  # bytes/s: a lower bound on the donor generating and hashing its state (ready deadline)
READY_PREFIX = "gossiptrain-bench-donor ready "
STATUS_FILE = "/proc/self/status"
CLEAR_REFS_FILE = "/proc/self/clear_refs"


class TransferMismatch(RuntimeError):
    """The joiner holds something other than what the donor serves."""


class DownloadFailed(RuntimeError):
    """One download broke (donor gone, timeout, retry needed, ...): which one, and why."""


def _settings(numel: int):
    """What a node with the default configuration uses (built as node/daemon.py builds it from NodeConfig)."""
    from node.config import NodeConfig
    from node.net.stream_service import StreamSettings

    return StreamSettings.from_config(NodeConfig(run_id=RUN_ID), MANIFEST_HASH, numel)


def _download_timeout(numel: int) -> float:
    from node.config import NodeConfig

    return max(NodeConfig().state_sync_timeout, 8 * numel / MIN_RATE)


def _checksum(slow: np.ndarray, momentum: np.ndarray) -> str:
    """blake2b of φ's bytes then δ's bytes, computed in place (no copy)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (slow, momentum):
        digest.update(memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B"))
    return digest.hexdigest()


def default_sizes() -> list[int]:
    """The default model's parameter count (NodeConfig defaults, built by node.train.model) and 100M."""
    from node.config import NodeConfig
    from node.train.model import count_parameters, make_model

    return [count_parameters(make_model(NodeConfig())), LARGE_NUMEL]


# ---------------------------------------------------------------------- peak memory of this process
def _status_bytes(key: str) -> int | None:
    """A Vm* line of /proc/self/status in bytes; None where there is no such file."""
    try:
        with open(STATUS_FILE) as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open(CLEAR_REFS_FILE, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class PeakMeter:
    """Peak RSS growth of this process over one download: VmHWM after − VmRSS before."""

    def __init__(self) -> None:
        self.resettable = True  # until a reset fails
        self.measured = 0  # downloads measured so far
        self.before: int | None = None

    def start(self) -> None:
        gc.collect()  # the previous download's buffers are gone before the baseline is read
        self.resettable = self.resettable and _reset_peak()
        self.before = _status_bytes("VmRSS") if (self.resettable or self.measured == 0) else None

    def stop(self) -> int | None:
        """Bytes of growth, or None if this download is not measured."""
        peak = _status_bytes("VmHWM")
        if self.before is None or peak is None:
            return None
        self.measured += 1
        return max(0, peak - self.before)

    @property
    def method(self) -> str:
        if _status_bytes("VmHWM") is None:
            return "peak RSS: not available on this system (no /proc/self/status)"
        if self.resettable:
            return ("peak RSS growth: VmHWM after − VmRSS before each download, the peak reset before each by "
                    "writing 5 to /proc/self/clear_refs after a gc; largest of the downloads")
        return ("peak RSS growth: /proc/self/clear_refs not writable, so the peak cannot be reset: first download "
                "only, VmHWM after − VmRSS before, an upper bound")


# ---------------------------------------------------------------------- the donor process
async def _serve_main(numel: int, lifetime: float, ready_out: IO[str]) -> int:
    """The donor process: serve a random state until stdin closes; 0 if every upload went through."""
    from hivemind.p2p import P2P

    from node.join.statesync import DonorState, StateServer
    from node.metrics import NodeMetrics

    rng = np.random.default_rng(DONOR_SEED)
    state = DonorState(
        round=STATE_ROUND, global_step=STATE_STEP,
        slow=rng.standard_normal(numel, dtype=np.float32), momentum=rng.standard_normal(numel, dtype=np.float32),
    )  # fmt: skip
    checksum = _checksum(state.slow, state.momentum)
    metrics = NodeMetrics()
    p2p = None
    try:
        p2p = await asyncio.wait_for(
            P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT), SETUP_TIMEOUT + 5
        )
        server = StateServer(p2p, _settings(numel), metrics, lambda: state, max_uploads=1)
        await asyncio.wait_for(server.start(), SETUP_TIMEOUT)
        maddrs = await asyncio.wait_for(p2p.get_visible_maddrs(), SETUP_TIMEOUT)
        ready = {
            "pid": os.getpid(),
            "peer_id": p2p.peer_id.to_base58(),
            "maddrs": [str(maddr) for maddr in maddrs],
            "round": state.round,
            "global_step": state.global_step,
            "checksum": checksum,
        }
        if not await announce_and_serve("donor", ready_out, READY_PREFIX, ready, lifetime):
            return 1
    finally:
        await shutdown_p2pd(p2p, "donor")
    bad = {
        result: metrics.registry.get_sample_value("gossiptrain_state_uploads_total", {"result": result}) or 0
        for result in ("refused", "failed")
    }
    if any(bad.values()):
        print(f"donor: uploads refused {bad['refused']:.0f}, failed {bad['failed']:.0f}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------- the joiner's side of it
@dataclass
class SizeResult:
    """One state size: seconds per download and peak RSS growth (bytes) of the measured ones."""

    numel: int
    seconds: list[float] = field(default_factory=list)
    growth: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return 2 * 4 * self.numel  # φ and δ, fp32

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


async def _download_once(
    p2p, donor: ChildProcess, ready: dict, numel: int, meter: PeakMeter
) -> tuple[float, int | None]:
    """One download_state from the donor; (seconds, peak RSS growth), verified against the donor's checksum."""
    from node.join.statesync import download_state
    from node.metrics import NodeMetrics

    async def donors() -> list[str]:
        return [ready["peer_id"]]

    settings, metrics, timeout = _settings(numel), NodeMetrics(), _download_timeout(numel)  # a node has these already
    meter.start()
    started = time.perf_counter()
    download = asyncio.ensure_future(download_state(p2p, settings, metrics, donors, timeout))
    exited = asyncio.ensure_future(donor.exited())  # download_state would retry a dead donor until its deadline
    try:
        await asyncio.wait({download, exited}, return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.perf_counter() - started
        growth = meter.stop()
    finally:
        for task in (download, exited):
            if not task.done():
                task.cancel()
        await asyncio.gather(download, exited, return_exceptions=True)
    if not download.done() or download.cancelled():
        raise RuntimeError(f"the donor process exited with status {exited.result()} during the download")
    synced = download.result()  # raises StateSyncError
    if synced.attempts:
        raise RuntimeError(f"the download needed a retry: {synced.attempts}")
    if (synced.round, synced.global_step) != (ready["round"], ready["global_step"]):
        raise TransferMismatch(f"received round {synced.round} step {synced.global_step}, "
                               f"the donor serves round {ready['round']} step {ready['global_step']}")
    if _checksum(synced.slow, synced.momentum) != ready["checksum"]:
        raise TransferMismatch("the joiner received arrays that differ from the donor's (checksum mismatch)")
    return elapsed, growth


async def _bench_size(numel: int, repeats: int, meter: PeakMeter) -> SizeResult:
    """Start a donor of ``numel`` parameters, join it with our own P2P, download ``repeats`` times."""
    from hivemind.p2p import P2P

    # the donor gives up by itself if we vanish without closing its stdin (we never hang it)
    lifetime = 3 * SETUP_TIMEOUT + repeats * (_download_timeout(numel) + 30) + 60
    donor = ChildProcess("donor", "bench.state", READY_PREFIX)
    result = SizeResult(numel)
    error: BaseException | None = None
    p2p = None
    try:
        try:
            ready = await donor.start(numel, lifetime, 2 * SETUP_TIMEOUT + 10 + 8 * numel / GENERATE_RATE)
            p2p = await asyncio.wait_for(
                P2P.create(
                    initial_peers=ready["maddrs"], host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=SETUP_TIMEOUT
                ),
                SETUP_TIMEOUT + 5,
            )
            for attempt in range(1, repeats + 1):
                try:
                    seconds, growth = await _download_once(p2p, donor, ready, numel, meter)
                except TransferMismatch:
                    raise
                except Exception as caught:
                    what = f"download {attempt} of {repeats}: {type(caught).__name__}: {caught}"
                    raise DownloadFailed(what) from caught
                result.seconds.append(seconds)
                if growth is not None:
                    result.growth.append(growth)
                print(f"state-sync {numel:,}: download {attempt}/{repeats} {seconds:.3f}s", file=sys.stderr, flush=True)
        except Exception as caught:  # noqa: BLE001 - reported below, with the donor's side of it
            error = caught
        finally:
            await shutdown_p2pd(p2p)
            code = await donor.stop(STOP_TIMEOUT)
        if error is None and code != 0:
            error = RuntimeError(f"the donor process exited with status {code}")
        if error is not None:
            status = "" if code in (0, 1) or "exited with status" in str(error) else f" (donor exit status {code})"
            tail = donor.log_tail()
            note = f"\ndonor's stderr (last {LOG_TAIL_LINES} lines):\n{tail}" if tail else ""
            raise DownloadFailed(f"{numel:,} parameters: {type(error).__name__}: {error}{status}{note}") from error
    finally:
        donor.close()
    return result


# ---------------------------------------------------------------------- report
def _header(repeats: int, meter: PeakMeter) -> str:
    from node.config import NodeConfig

    cfg = NodeConfig()
    return (
        f"state sync: a joiner downloads φ and δ (2 × numel fp32) from one donor with node.join.statesync.download_state, "
        f"{repeats} downloads per size, each on a fresh stream, no warm-up (a joiner downloads once)\n"
        f"donor: a separate process (python -m node.bench.state --serve) with its own p2pd, serving a random "
        f"DonorState through StateServer; joiner: this process, its own p2pd bootstrapped from the donor's "
        f"multiaddrs; node defaults: chunks {cfg.chunk_bytes // 2**20} MiB, frames up to "
        f"{cfg.max_frame_bytes / 2**20:.0f} MiB, I/O timeout {cfg.io_timeout:.0f}s; timed from calling "
        f"download_state until it returns; arrays checked against the donor's blake2b outside the timed region\n"
        f"{meter.method}; ratio = growth / state bytes (1.00x: the state is held once); the joiner's p2pd, "
        f"a separate process, is not counted\n" + machine_line()
    )


def _table(results: list[SizeResult]) -> str:
    rows = []
    for result in results:
        megabytes = result.nbytes / 1e6
        peak = max(result.growth) if result.growth else None
        rows.append({
            "numel": f"{result.numel:,}",
            "MB": f"{megabytes:,.1f}",
            "seconds median": f"{result.median:.3f}",
            "seconds min": f"{min(result.seconds):.3f}",
            "MB/s": f"{megabytes / result.median:,.0f}",
            "peak RSS growth": "-" if peak is None else f"{peak / result.nbytes:.2f}x",
            "growth MB": "-" if peak is None else f"{peak / 1e6:,.1f}",
            "runs (s)": " ".join(f"{s:.3f}" for s in result.seconds),
        })  # fmt: skip
    return format_table(rows) + (
        "\n(MB: tensor bytes of φ and δ, 1 MB = 10^6 bytes; MB/s at the median; peak RSS growth: the largest "
        "of the downloads, fixed costs such as frame buffers dominate small states)"
    )


async def _main(sizes: list[int], repeats: int) -> int:
    meter = PeakMeter()
    results = []
    for numel in sizes:
        try:
            results.append(await _bench_size(numel, repeats, meter))
        except Exception as error:  # noqa: BLE001 - a failed benchmark is a message and exit status 1
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    print(_header(repeats, meter))
    print(_table(results))
    return 0


def run_benchmark(sizes: list[int], repeats: int) -> int:
    """Time download_state for each state size; print the table; 0 on success. No sizes: default_sizes()."""
    sizes = list(sizes) or default_sizes()
    if min(sizes) <= 0 or repeats <= 0:
        print("numel and repeats must be positive", file=sys.stderr)
        return 2
    return run_parent(_main(sizes, repeats))


if __name__ == "__main__":
    sys.exit(serve_entry(sys.argv[1:], "bench.state", "bench state-sync donor", "donor", _serve_main))
