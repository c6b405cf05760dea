"""State sync over real p2pd streams: donor fallback (dead, stalled, refusing), spreading joiners.

Donors and joiners here are real hivemind P2P instances (each with its own p2pd) in
this process, so a donor can be made to die or stall at an exact point mid-transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import pytest
from hivemind.p2p import P2P

from protocol import StateOffer, StateRequest, TensorSpec, tensor_messages

from node.join.statesync import (
    STATE_PROTOCOL,
    DonorState,
    StateServer,
    StateSyncError,
    StateSyncSettings,
    download_state,
)
from node.metrics import NodeMetrics
from node.net.streams import FrameStream

pytestmark = pytest.mark.integration

IO_TIMEOUT = 1.5
SETTINGS = StateSyncSettings(run_id="sync-test", manifest_hash="m" * 64, numel=1_000_000, io_timeout=IO_TIMEOUT,
                             max_frame_bytes=2**22, chunk_bytes=2**20)


def make_state(settings: StateSyncSettings, seed: int, round_: int = 7) -> DonorState:
    rng = np.random.default_rng(seed)
    return DonorState(round_, 1234, rng.standard_normal(settings.numel, dtype=np.float32),
                      rng.standard_normal(settings.numel, dtype=np.float32))


async def new_p2p(initial_peers=None) -> P2P:
    return await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers, startup_timeout=30)


async def serve_state(p2p: P2P, state: DonorState, settings: StateSyncSettings = SETTINGS,
                      max_uploads: int = 1) -> tuple[StateServer, NodeMetrics]:
    metrics = NodeMetrics()
    server = StateServer(p2p, settings, metrics, lambda: state, max_uploads)
    await server.start()
    return server, metrics


async def serve_broken(p2p: P2P, behaviour: str, state: DonorState) -> None:
    """A donor that sends a valid offer and the first chunk of φ, then stalls or vanishes."""

    async def handler(_info, reader, writer):
        stream = FrameStream(reader, writer, max_frame_bytes=2**22, io_timeout=30)
        await stream.recv(StateRequest)
        await stream.send(StateOffer(round=state.round, global_step=1, manifest_hash=SETTINGS.manifest_hash,
                                     tensors=("phi", "momentum"), numel=SETTINGS.numel, dtype="float32"))
        spec = TensorSpec("phi", "float32", (SETTINGS.numel,))
        messages = tensor_messages(spec, memoryview(state.slow).cast("B"), SETTINGS.chunk_bytes)
        await stream.send(next(messages))  # header
        await stream.send(next(messages))  # first chunk
        if behaviour == "stall":
            with contextlib.suppress(asyncio.CancelledError):  # cancelled at shutdown
                await asyncio.sleep(3600)  # a frozen process: the stream stays open, nothing more comes
        stream.close()  # a crash mid-transfer

    await p2p.add_binary_stream_handler(STATE_PROTOCOL, handler)


def uploads_ok(metrics: NodeMetrics) -> float:
    return metrics.state_uploads.labels(result="ok")._value.get()


async def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll until predicate() is true (the donor counts an upload once it has read the joiner's ack)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


def ids(*peers: P2P) -> list[str]:
    return [p.peer_id.to_base58() for p in peers]


async def shutdown(*peers: P2P) -> None:
    await asyncio.gather(*(p.shutdown() for p in peers), return_exceptions=True)


async def test_joiner_falls_back_past_stalled_dead_and_refusing_donors():
    good_state = make_state(SETTINGS, seed=1)
    stalled, dead, refusing, good = await asyncio.gather(*(new_p2p() for _ in range(4)))
    try:
        await serve_broken(stalled, "stall", make_state(SETTINGS, 2))
        await serve_broken(dead, "die", make_state(SETTINGS, 3))
        other_run = StateSyncSettings(**{**SETTINGS.__dict__, "manifest_hash": "x" * 64})
        await serve_state(refusing, make_state(SETTINGS, 4), settings=other_run)
        _server, good_metrics = await serve_state(good, good_state)
        maddrs = [str(m) for p in (stalled, dead, refusing, good) for m in await p.get_visible_maddrs()]
        joiner = await new_p2p(initial_peers=maddrs)
        try:
            order = ids(stalled, dead, refusing, good)

            async def donors():
                return order

            started = time.monotonic()
            synced = await download_state(joiner, SETTINGS, NodeMetrics(), donors, timeout=60)
            elapsed = time.monotonic() - started
            assert await wait_for(lambda: uploads_ok(good_metrics) == 1)
        finally:
            await shutdown(joiner)
    finally:
        await shutdown(stalled, dead, refusing, good)

    assert synced.donor == ids(good)[0] and synced.round == good_state.round and synced.global_step == 1234
    assert np.array_equal(synced.slow, good_state.slow) and np.array_equal(synced.momentum, good_state.momentum)
    outcomes = dict(synced.attempts)
    assert "PeerTimeout" in outcomes[ids(stalled)[0]], synced.attempts  # the stall cost one I/O timeout
    assert "truncated" in outcomes[ids(dead)[0]] or "PeerGone" in outcomes[ids(dead)[0]], synced.attempts
    assert outcomes[ids(refusing)[0]] == "refused: manifest"
    assert elapsed < IO_TIMEOUT + 10, elapsed  # bounded: one stall timeout plus the transfers
    assert synced.nbytes == 2 * SETTINGS.numel * 4


async def test_simultaneous_joiners_are_spread_over_donors():
    """Two joiners asking the same donor first: it serves one and refuses the other as busy."""
    big = StateSyncSettings(**{**SETTINGS.__dict__, "numel": 12_000_000})  # ~96 MB: the transfers overlap
    states = [make_state(big, seed=10), make_state(big, seed=11)]
    first, second = await asyncio.gather(new_p2p(), new_p2p())
    try:
        served = [await serve_state(p, s, settings=big) for p, s in zip((first, second), states, strict=True)]
        maddrs = [str(m) for p in (first, second) for m in await p.get_visible_maddrs()]
        joiners = await asyncio.gather(new_p2p(maddrs), new_p2p(maddrs))
        try:
            async def donors():
                return ids(first, second)  # both joiners prefer the same donor

            results = await asyncio.gather(
                *(download_state(j, big, NodeMetrics(), donors, timeout=120) for j in joiners))
            assert await wait_for(lambda: [uploads_ok(m) for _s, m in served] == [1, 1])
        finally:
            await shutdown(*joiners)
    finally:
        await shutdown(first, second)

    assert sorted(r.donor for r in results) == sorted(ids(first, second)), [r.attempts for r in results]
    for result in results:
        state = states[ids(first, second).index(result.donor)]
        assert np.array_equal(result.slow, state.slow) and np.array_equal(result.momentum, state.momentum)
    assert any("refused: busy" in outcome for r in results for _d, outcome in r.attempts)


async def test_a_state_that_fails_the_joiners_vetting_is_not_adopted_and_its_donor_not_asked_again():
    """The joiner vets each delivered state before adopting it (node/join/procedure.py: its held-out loss); here the
    vetting is a norm bound, standing in for the loss, so the test is about what download_state does with a no."""
    honest = make_state(SETTINGS, seed=5)
    poisoned = DonorState(honest.round, 1234, 10 * honest.slow, honest.momentum)
    bad, good = await asyncio.gather(new_p2p(), new_p2p())
    try:
        _s, bad_metrics = await serve_state(bad, poisoned)
        await serve_state(good, honest)
        maddrs = [str(m) for p in (bad, good) for m in await p.get_visible_maddrs()]
        joiner = await new_p2p(initial_peers=maddrs)
        metrics, vetted = NodeMetrics(), []
        limit = 2 * float(np.linalg.norm(honest.slow))
        try:
            async def donors():
                return ids(bad, good)

            async def vet(received):
                vetted.append(float(np.linalg.norm(received["phi"])))
                return None if vetted[-1] <= limit else f"norm {vetted[-1]:.0f} above {limit:.0f}"

            synced = await download_state(joiner, SETTINGS, metrics, donors, timeout=30, vet=vet)
        finally:
            await shutdown(joiner)
    finally:
        await shutdown(bad, good)

    assert synced.donor == ids(good)[0] and np.array_equal(synced.slow, honest.slow)
    assert len(vetted) == 2 and dict(synced.attempts)[ids(bad)[0]].startswith("state refused: norm")
    assert metrics.states_refused._value.get() == 1 and uploads_ok(bad_metrics) <= 1  # asked once, not again


async def test_no_donor_at_all_is_a_clear_error_within_the_deadline():
    joiner = await new_p2p()
    try:
        async def donors():
            return []

        started = time.monotonic()
        with pytest.raises(StateSyncError, match="no donor delivered"):
            await download_state(joiner, SETTINGS, NodeMetrics(), donors, timeout=3)
        assert time.monotonic() - started < 6
    finally:
        await shutdown(joiner)
