"""`overlap on`: the eager outer step plus late corrections ends exactly where sequential NoLoCo ends.

The math is checked against a plain reference: one node's sequence of rounds with random updates Δ_t and random
partners, stepped sequentially (paired outer step at the boundary) and eagerly (local step at once, the pair's
correction c landing m boundaries later). After every correction has landed, φ and δ agree. Then the round
engine itself (node/round.py) with a scripted gossip: what lands when, what a round in flight counts as, the
round clock.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from node.config import ConfigError, NodeConfig
from node.gossip.exchange import SyncOutcome
from node.metrics import NodeMetrics
from node.round import Progress, Rounds, clock_after_exchange, overlap_search_seconds
from node.tasks import BackgroundTasks
from node.train.outer_step import (
    OuterHyper,
    apply_correction,
    eager_outer_step,
    local_outer_step,
    outer_step_full,
    outer_step_theta,
    pair_correction_full,
    pair_correction_theta,
)
from node.train.trainer import PartnerUpdate, Trainer

HYPERS = {"gamma=beta": OuterHyper(0.5, 0.7, 0.7), "gamma!=beta": OuterHyper(0.5, 0.7, 0.9)}


def gaussian(generator: torch.Generator, n: int = 256) -> torch.Tensor:
    return torch.randn(n, generator=generator, dtype=torch.float64)


def correction(hyper: OuterHyper, slow, delta_update, partner_slow, partner_delta) -> torch.Tensor:
    if hyper.theta_only:
        return pair_correction_theta(slow + delta_update, partner_slow + partner_delta, hyper)
    return pair_correction_full(slow, delta_update, partner_slow, partner_delta, hyper)


@pytest.mark.parametrize("hyper", HYPERS.values(), ids=HYPERS.keys())
def test_paired_step_is_the_local_step_plus_the_correction(hyper):
    g = torch.Generator().manual_seed(1)
    slow, fast, momentum, partner_slow, partner_fast = (gaussian(g) for _ in range(5))
    local_slow, local_momentum = local_outer_step(slow, fast - slow, momentum, hyper)
    if hyper.theta_only:
        paired = outer_step_theta(slow, fast, momentum, partner_fast, hyper)
    else:
        paired = outer_step_full(slow, fast, momentum, partner_slow, partner_fast - partner_slow, hyper)
    c = correction(hyper, slow, fast - slow, partner_slow, partner_fast - partner_slow)
    torch.testing.assert_close(paired[0], local_slow + c)
    torch.testing.assert_close(paired[1], local_momentum + c)
    # landed one boundary later (m = 1, before the next outer step) it is the same state
    torch.testing.assert_close(apply_correction(local_slow, local_momentum, c, 1, hyper.alpha), paired)


def simulate(hyper: OuterHyper, lags: dict[int, int], rounds: int, seed: int):
    """One node over `rounds` rounds with random Δ_t; round t pairs with a random partner (its φ_j, Δ_j given)
    iff t in `lags`, and in the eager engine that exchange lands lags[t] boundaries later (before that boundary's
    outer step, or after the last one). Each engine works from its own state only: the eager one computes c
    from what it sent (its round's start φ_s, Δ_t) and the shift the correction landing at that boundary
    made. Returns ((φ, δ) sequential, (φ, δ) eager)."""
    g = torch.Generator().manual_seed(seed)
    slow, momentum = gaussian(g), gaussian(g)
    seq, eager = (slow, momentum), (slow, momentum)
    pending: dict[int, list[tuple]] = {}  # boundary -> exchanges landing before its step: (sent, partner, shift, m)

    def land(state, sent, partner, shift, lag):
        (e_slow_start, delta_update), (partner_slow, partner_delta) = sent, partner
        c = correction(hyper, e_slow_start + shift, delta_update, partner_slow, partner_delta)
        return apply_correction(*state, c, lag, hyper.alpha)

    for t in range(rounds):
        delta_update = gaussian(g) * 0.1
        partner = (gaussian(g), gaussian(g) * 0.1) if t in lags else None
        # sequential NoLoCo: the paired outer step (or the local one), from its own state
        s_slow, s_momentum = seq
        if partner is None:
            seq = local_outer_step(s_slow, delta_update, s_momentum, hyper)
        elif hyper.theta_only:
            seq = outer_step_theta(s_slow, s_slow + delta_update, s_momentum, partner[0] + partner[1], hyper)
        else:
            seq = outer_step_full(s_slow, s_slow + delta_update, s_momentum, partner[0], partner[1], hyper)
        # eager: land what is due, take the local step, send (φ_s, Δ_t)
        e_start = eager[0]
        corrected = e_start
        for sent, their, shift, lag in pending.pop(t, []):
            corrected, e_momentum = land((corrected, eager[1]), sent, their, shift, lag)
            eager = (corrected, e_momentum)
        shift = corrected - e_start
        if partner is not None:
            pending.setdefault(t + lags[t], []).append(((e_start, delta_update), partner, shift, lags[t]))
        eager = local_outer_step(eager[0], delta_update, eager[1], hyper)
    for landing in pending.values():  # after the last boundary
        for sent, their, shift, lag in landing:
            eager = land(eager, sent, their, shift, lag)
    return seq, eager


@pytest.mark.parametrize("hyper", HYPERS.values(), ids=HYPERS.keys())
@pytest.mark.parametrize("lag", [1, 2, 3])
def test_eager_steps_with_late_corrections_match_sequential_noloco(hyper, lag):
    rounds = 12
    # at most one exchange in flight: a round that starts while one runs is not paired; the next one pairs
    # again at the boundary where the previous exchange lands (so a shift is in play every time)
    lags = {t: lag for t in range(0, rounds, lag)}
    for seed in range(3):
        (seq_slow, seq_momentum), (eager_slow, eager_momentum) = simulate(hyper, lags, rounds, seed)
        torch.testing.assert_close(eager_slow, seq_slow, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eager_momentum, seq_momentum, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("hyper", HYPERS.values(), ids=HYPERS.keys())
def test_mixed_lags_and_unpaired_rounds_match_too(hyper):
    lags = {0: 1, 1: 3, 5: 2, 7: 1, 8: 1, 9: 2}  # also the last exchange lands after the last boundary
    (seq_slow, seq_momentum), (eager_slow, eager_momentum) = simulate(hyper, lags, 11, seed=7)
    torch.testing.assert_close(eager_slow, seq_slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eager_momentum, seq_momentum, rtol=1e-10, atol=1e-10)


def pair_spread(measure_from_start: bool | None, rounds: int = 200) -> float:
    """Two eager nodes exchanging every round (each lands at the next boundary; None: never exchanging);
    ‖φ_a − φ_b‖ at the end."""
    hyper = OuterHyper(0.5, 0.7, 0.7)
    g = torch.Generator().manual_seed(3)
    states = [(torch.zeros(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)) for _ in range(2)]
    landing: list = [None, None]
    for _ in range(rounds):
        common = gaussian(g, 64) * 0.1
        deltas = [common + gaussian(g, 64) * 0.1 for _ in range(2)]
        starts = [state[0] for state in states]
        corrected = []
        for i, (slow, momentum) in enumerate(states):
            if landing[i] is not None:
                slow, momentum = apply_correction(slow, momentum, landing[i], 1, hyper.alpha)
            corrected.append(slow)
            states[i] = (slow, momentum)
        sent = [starts[i] + deltas[i] for i in range(2)]
        base = [sent[i] if measure_from_start else corrected[i] + deltas[i] for i in range(2)]
        landing = [None if measure_from_start is None else pair_correction_theta(base[i], sent[1 - i], hyper)
                   for i in range(2)]
        states = [local_outer_step(slow, deltas[i], momentum, hyper) for i, (slow, momentum) in enumerate(states)]
    return float((states[0][0] - states[1][0]).norm())


def test_a_pair_that_exchanges_every_round_stays_together():
    """Measured from the round's start φ_s (ignoring the correction that landed at the same boundary) the pull
    overshoots and the pair's difference grows without bound; measured from φ_s + shift it stays small."""
    alone = pair_spread(measure_from_start=None)
    assert pair_spread(measure_from_start=False) < 0.1 * alone
    assert pair_spread(measure_from_start=True) > 1e3 * alone


def test_a_correction_lands_at_least_one_boundary_later():
    zero = torch.zeros(3)
    with pytest.raises(ValueError, match="at least one boundary"):
        apply_correction(zero, zero, zero, 0, 0.5)


def test_clock_after_a_late_exchange_is_the_sequential_clock():
    # sequential: a pair at rounds (own 10, partner 14) leaves boundary t with 15, t+1 with 16, t+2 with 17;
    # eager: 11 after t, 12 after t+1, and at t+2 the exchange lands (m = 2)
    own, partner = 10, 14
    assert clock_after_exchange(own + 2, partner, lag=2) + 1 == max(own, partner) + 3
    assert clock_after_exchange(30, 14, lag=2) == 30  # a partner behind does not move the clock back


def test_overlap_setting_is_validated_and_in_the_manifest():
    assert NodeConfig().overlap == "off"  # the default, by measurement (README "Overlapped rounds")
    assert NodeConfig(overlap="on").manifest("d", 1) != NodeConfig().manifest("d", 1)
    with pytest.raises(ConfigError, match="overlap"):
        NodeConfig(overlap="maybe").validate()


# --------------------------------------------------------------------------- the round engine, scripted gossip
class ScriptedGossip:
    """sync_round returns the outcome the test hands it (a future per call), whenever the test likes."""

    def __init__(self) -> None:
        self.background = BackgroundTasks()
        self.calls: list[tuple[int, dict, asyncio.Future]] = []
        self.timeouts: list[float] = []  # each call's search deadline

    async def sync_round(self, round_: int, outgoing: dict, timeout: float, prefer_new_for: float = 0.0) -> SyncOutcome:
        future = asyncio.get_running_loop().create_future()
        self.calls.append((round_, outgoing, future))
        self.timeouts.append(timeout)
        return await future


class AcceptingVerification:
    """Commits by returning the outgoing tensors (made at the boundary, stored in the background), accepts every
    update but a flagged peer's; `flagged` peers are excluded."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.flagged, self.distrusted = trainer, set(), set()

    async def prepare(self, round_: int, committed_update=None) -> dict:
        return {"outgoing": self.trainer.outgoing_tensors()}

    async def publish(self, prepared: dict) -> dict:
        return prepared["outgoing"]

    async def accept_update(self, partner: str, partner_round: int, tensors: dict, attestation: bytes = b"",
                            nonce: bytes = b"") -> bool:
        return partner not in self.flagged

    def excluded(self) -> set[str]:
        return set(self.flagged)


async def engine(tiny_config, corpus, verification: bool = False, **changes):
    # (float32 wire: the engine's exact equalities; with bfloat16 a correction uses the θ it sent, rounded)
    cfg = tiny_config(verify="off", wire_dtype="float32", **{"overlap": "on", **changes})
    trainer = Trainer(cfg, corpus, shard=0, sampler_seed=1)
    gossip = ScriptedGossip()

    async def compute(function, *args):
        return function(*args)

    rounds = Rounds(cfg, trainer, gossip, AcceptingVerification(trainer) if verification else None,
                    SimpleNamespace(live={}), NodeMetrics(), compute, Progress(), None, 0)
    return rounds, trainer, gossip


async def boundary(rounds: Rounds):
    stats = await rounds.train()
    return await rounds.outer_step(stats)


def outer_rounds(rounds: Rounds) -> dict[str, float]:
    return {s.labels["mode"]: s.value for m in rounds.metrics.outer_rounds.collect() for s in m.samples
            if s.name.endswith("_total")}


async def settle_tasks() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_engine_lands_a_late_exchange_with_its_lag_and_skips_pairing_while_one_runs(tiny_config, corpus):
    rounds, trainer, gossip = await engine(tiny_config, corpus)
    hyper = trainer.hyper
    partner = np.random.default_rng(0).standard_normal(trainer.numel).astype(np.float32)

    # boundary 0: local step at once, the exchange starts in the background
    phi0, delta0 = trainer.slow_weights.clone(), trainer.outer_momentum.clone()
    stats = await rounds.train()
    theta0 = trainer.fast_weights()
    result = await rounds.outer_step(stats)
    await settle_tasks()
    assert len(gossip.calls) == 1 and gossip.calls[0][0] == 0
    assert torch.equal(torch.from_numpy(gossip.calls[0][1]["theta"]), theta0)  # sends θ_t as it was
    want = local_outer_step(phi0, theta0 - phi0, delta0, hyper)
    torch.testing.assert_close(trainer.slow_weights, want[0])
    assert result.partner is None and rounds.progress.round == 1

    # boundary 1: exchange 0 still running -> local step only, no second exchange
    phi1 = trainer.slow_weights.clone()
    stats = await rounds.train()
    theta1 = trainer.fast_weights()
    await rounds.outer_step(stats)
    await settle_tasks()
    assert len(gossip.calls) == 1 and outer_rounds(rounds)["in_flight"] == 1
    want = local_outer_step(phi1, theta1 - phi1, want[1], hyper)

    # exchange 0 completes (partner at round 5); boundary 2 lands it with m = 2, then starts exchange 2
    gossip.calls[0][2].set_result(SyncOutcome("peer-a", {"theta": partner}, 0.5, partner_round=5))
    await settle_tasks()
    phi2 = trainer.slow_weights.clone()
    stats = await rounds.train()
    theta2 = trainer.fast_weights()
    result = await rounds.outer_step(stats)
    await settle_tasks()
    c = pair_correction_theta(theta0, torch.from_numpy(partner), hyper)
    want = eager_outer_step(phi2, theta2, want[1], [(c, 2)], hyper)
    torch.testing.assert_close(trainer.slow_weights, want[0])
    torch.testing.assert_close(trainer.outer_momentum, want[1])
    assert result.partner == "peer-a"
    assert result.distance == pytest.approx(float(np.linalg.norm(theta0.numpy() - partner)), rel=1e-5)
    assert rounds.progress.round == clock_after_exchange(2, 5, 2) + 1 == 8
    assert len(gossip.calls) == 2 and gossip.calls[1][0] == 7  # exchange 2 announces the clock before the step
    assert outer_rounds(rounds) == {"paired": 1, "local": 1, "in_flight": 1}

    # the last round: settle waits for exchange 2 and lands it right after the boundary (m = 1)
    gossip.calls[1][2].set_result(SyncOutcome("peer-b", {"theta": partner}, 0.1, partner_round=7))
    # exchange 2 started where exchange 0 landed: its pull is measured from φ_s + that correction's shift
    shift = want[2] - phi2
    torch.testing.assert_close(shift, c * (1 + hyper.alpha))
    sent2 = torch.from_numpy(gossip.calls[1][1]["theta"])
    c = pair_correction_theta(sent2 + shift, torch.from_numpy(partner), hyper)
    want = apply_correction(want[0], want[1], c, 1, hyper.alpha)
    await rounds.settle(result)
    torch.testing.assert_close(trainer.slow_weights, want[0])
    torch.testing.assert_close(trainer.fast_weights(), want[0])  # θ ← φ
    assert result.partner == "peer-b" and rounds.progress.round == 8
    assert rounds.exchange is None


async def test_engine_takes_a_refused_or_partnerless_exchange_as_a_local_step(tiny_config, corpus):
    rounds, trainer, gossip = await engine(tiny_config, corpus)
    await boundary(rounds)
    await settle_tasks()
    gossip.calls[0][2].set_result(SyncOutcome(None, None, 10.0))
    await settle_tasks()
    phi, delta = trainer.slow_weights.clone(), trainer.outer_momentum.clone()
    stats = await rounds.train()
    theta = trainer.fast_weights()
    result = await rounds.outer_step(stats)
    assert result.partner is None and outer_rounds(rounds)["local"] == 2
    await settle_tasks()
    torch.testing.assert_close(trainer.slow_weights, local_outer_step(phi, theta - phi, delta, trainer.hyper)[0])
    assert rounds.progress.round == 2 and len(gossip.calls) == 2


async def cheater_exchange_landed(tiny_config, corpus):
    """An engine whose first boundary's background exchange with "cheater" has completed (not yet applied)."""
    rounds, trainer, gossip = await engine(tiny_config, corpus, verification=True)
    await boundary(rounds)
    await settle_tasks()
    partner = np.zeros(trainer.numel, dtype=np.float32)
    gossip.calls[0][2].set_result(SyncOutcome("cheater", {"theta": partner}, 0.1, partner_round=0))
    await settle_tasks()
    return rounds, trainer


async def assert_next_boundary_is_a_local_step(rounds, trainer) -> None:
    phi, delta = trainer.slow_weights.clone(), trainer.outer_momentum.clone()
    stats = await rounds.train()
    theta = trainer.fast_weights()
    result = await rounds.outer_step(stats)
    assert result.partner is None and outer_rounds(rounds)["local"] == 2
    torch.testing.assert_close(trainer.slow_weights, local_outer_step(phi, theta - phi, delta, trainer.hyper)[0])


async def test_an_update_accepted_before_its_sender_was_flagged_does_not_land(tiny_config, corpus):
    rounds, trainer = await cheater_exchange_landed(tiny_config, corpus)
    rounds.verification.flagged.add("cheater")  # a verifier majority flags it while the next round trains
    await assert_next_boundary_is_a_local_step(rounds, trainer)
    refused = {s.labels["reason"]: s.value for m in rounds.metrics.updates_refused.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert refused["flagged"] == 1


async def test_an_update_whose_sender_is_flagged_during_the_boundary_does_not_land(tiny_config, corpus):
    """The flag arrives after the boundary looked at the landed exchange (while it commits, or while the outer
    step waits for the trainer thread behind an audit replay): checked again on the trainer thread."""
    rounds, trainer = await cheater_exchange_landed(tiny_config, corpus)
    prepare = rounds.verification.prepare

    async def flagged_meanwhile(*args):
        rounds.verification.flagged.add("cheater")
        return await prepare(*args)

    rounds.verification.prepare = flagged_meanwhile
    await assert_next_boundary_is_a_local_step(rounds, trainer)


async def test_the_boundary_does_not_wait_for_the_commitment_store(tiny_config, corpus):
    rounds, trainer, gossip = await engine(tiny_config, corpus, verification=True)
    stored = asyncio.get_running_loop().create_future()
    publish = rounds.verification.publish

    async def slow_store(prepared):  # a frozen DHT neighbour
        return await publish(prepared) if await stored else None

    rounds.verification.publish = slow_store
    await asyncio.wait_for(boundary(rounds), 30)  # the boundary is done while the store hangs
    await settle_tasks()
    assert gossip.calls == [] and not rounds.exchange.task.done()
    stored.set_result(True)
    await settle_tasks()
    assert len(gossip.calls) == 1  # pairing starts once the commitment is stored

    # a store that fails: that round is not paired, and the next boundary is a plain local step
    gossip.calls[0][2].set_result(SyncOutcome(None, None, 0.1))
    await settle_tasks()
    stored = asyncio.get_running_loop().create_future()
    stored.set_result(False)
    await boundary(rounds)
    await settle_tasks()
    await boundary(rounds)
    assert len(gossip.calls) == 1 and outer_rounds(rounds)["local"] == 3


def test_the_background_search_runs_until_shortly_before_the_next_boundary():
    assert overlap_search_seconds(sync_timeout=10.0, round_seconds=30.0) == pytest.approx(24.0)
    assert overlap_search_seconds(sync_timeout=10.0, round_seconds=2.0) == 10.0  # never below sync_timeout


async def test_a_long_round_keeps_the_node_open_to_pairing_for_most_of_the_next(tiny_config, corpus):
    rounds, trainer, gossip = await engine(tiny_config, corpus, sync_timeout=0.001)
    stats = await rounds.train()
    await rounds.outer_step(stats)
    await settle_tasks()
    assert gossip.timeouts == [pytest.approx(0.8 * stats.seconds)] and stats.seconds > 0.001
    gossip.calls[0][2].set_result(SyncOutcome(None, None, 0.0))
    await settle_tasks()


async def test_overlap_off_and_sync_local_keep_the_sequential_engine(tiny_config, corpus):
    rounds, trainer, gossip = await engine(tiny_config, corpus, sync="local")
    await boundary(rounds)
    assert not rounds.overlapped and gossip.calls == [] and rounds.exchange is None
    rounds, trainer, gossip = await engine(tiny_config, corpus, overlap="off")
    stepping = asyncio.ensure_future(boundary(rounds))
    await settle_tasks()
    assert not stepping.done() and len(gossip.calls) == 1  # the boundary waits for the pair
    gossip.calls[0][2].set_result(SyncOutcome(None, None, 1.0))
    result = await stepping
    assert result.partner is None and rounds.exchange is None


def test_trainer_late_correction_equals_the_paired_outer_step(corpus, tiny_config):
    cfg = tiny_config(inner_steps=3, wire_dtype="float32")  # exact: the θ sent is the θ the paired step uses
    paired, eager = (Trainer(cfg, corpus, shard=0, sampler_seed=3) for _ in range(2))
    partner = np.random.default_rng(1).standard_normal(paired.numel).astype(np.float32)
    paired.run_round()
    paired.apply_outer_step({"theta": partner})
    eager.run_round()
    sent = eager.outgoing_tensors()
    eager.apply_eager_outer_step([])
    eager.apply_late_corrections([PartnerUpdate(sent, {"theta": partner}, 1)])
    torch.testing.assert_close(eager.slow_weights, paired.slow_weights)
    torch.testing.assert_close(eager.outer_momentum, paired.outer_momentum)
    torch.testing.assert_close(eager.fast_weights(), paired.fast_weights())
