"""One round of a node: H inner steps, then a NoLoCo outer step with one random partner (or alone).

    overlap off:  train (trainer thread) -> commit (verification) -> pair and swap (gossip) -> accept? -> outer step
    overlap on:   train -> commit -> local outer step with the corrections that landed -> next round at once,
                  while pair and swap -> accept? runs in the background (its correction lands at a later boundary)
    then: checkpoint every N rounds -> held-out loss -> publish the new round

`Progress` is what the node has done so far; the presence record, node.json, history.jsonl
and summary.json all read it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from node.config import NodeConfig
from node.gossip.exchange import Gossip
from node.gossip.pairing import clock_catch_up, prefer_new_seconds
from node.metrics import NodeMetrics
from node.net.membership import Membership
from node.train.trainer import PartnerUpdate, RoundStats, Trainer
from node.verify.faults import Fault, cheat
from node.verify.service import Verification

logger = logging.getLogger(__name__)

Compute = Callable[..., Awaitable[Any]]  # runs a blocking call on the trainer thread


@dataclass
class Progress:
    round: int = 0  # the swarm clock this node is at (moves with partners, see `Rounds.run`)
    rounds_done: int = 0  # rounds this node has finished (its own count, resumed from checkpoints)
    eval_loss: float | None = None
    initial_eval_loss: float | None = None
    train_loss: float | None = None
    tokens_per_second: float | None = None
    utilisation: float | None = None  # inner-step seconds / wall seconds since this process's first round
    last_exchange: dict[str, Any] | None = None  # time and partner of the last applied partner update


@dataclass
class RoundResult:
    stats: RoundStats
    partner: str | None = None
    distance: float | None = None
    waited: float = 0.0
    history: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExchangeResult:
    """An exchange that ran in the background (`overlap on`): partner None if none was found or its update
    was refused."""

    partner: str | None
    partner_round: int | None
    sent: dict[str, Any]
    received: dict[str, Any] | None
    seconds: float


@dataclass
class Exchange:
    """The one exchange in flight, started at the boundary after `step` outer steps of this process; `shift`:
    what the correction that landed at that boundary added to φ (see PartnerUpdate)."""

    task: asyncio.Task
    step: int
    shift: torch.Tensor | None = None


def clock_after_exchange(round_: int, partner_round: int, lag: int) -> int:
    """The round clock when an exchange lands `lag` outer steps after it started (before this boundary's +1).

    The sequential engine leaves a pair with max(own, partner) + 1 and counts on from there; `lag` boundaries
    later that is max(own + lag, partner + lag): what this gives, since own + lag is the clock now."""
    return max(round_, partner_round + lag)


def overlap_search_seconds(sync_timeout: float, round_seconds: float) -> float:
    """`overlap on`: how long the background partner search of a boundary may run. Training goes on meanwhile,
    so it runs until shortly before the next boundary (the last round's length is the estimate), and at least
    `sync_timeout`. A node is then open to pairing most of the time, not only in the `sync_timeout` after its
    own boundary: with rounds longer than that, nodes whose boundaries fall together re-paired with each other
    every round and a node out of phase with them never found one ready (measured on a 20 Mbit/s WAN)."""
    return max(sync_timeout, 0.8 * round_seconds)


class Rounds:
    def __init__(self, cfg: NodeConfig, trainer: Trainer, gossip: Gossip, verification: Verification | None,
                 membership: Membership, metrics: NodeMetrics, compute: Compute, progress: Progress,
                 fault: Fault | None, fault_seed: int) -> None:
        self.cfg, self.trainer, self.gossip, self.verification = cfg, trainer, gossip, verification
        self.membership, self.metrics, self.compute, self.progress = membership, metrics, compute, progress
        self.fault = fault
        self._fault_generator = torch.Generator().manual_seed(fault_seed) if fault is not None else None
        self.exchange: Exchange | None = None  # overlap on: the exchange running in the background
        self._steps = 0  # outer steps taken by this process (lags of background exchanges count these)
        self._first_round_started: float | None = None
        self._compute_seconds = 0.0

    @property
    def overlapped(self) -> bool:
        return self.cfg.sync == "noloco" and self.cfg.overlap == "on"

    async def train(self) -> RoundStats:
        if self._first_round_started is None:
            self._first_round_started = time.monotonic()
        stats = await self.compute(self.trainer.run_round)
        m = self.metrics
        if stats.steps:
            m.inner_steps.inc(stats.steps)
            m.tokens.inc(stats.tokens)
            m.tokens_per_second.set(stats.tokens / max(stats.seconds, 1e-9))
            m.train_loss.set(stats.mean_loss)
            m.round_seconds.observe(stats.seconds)
            m.train_compute_seconds.inc(stats.seconds)
            self._compute_seconds += stats.seconds
            # what the trainer did not wait for: boundaries (network, outer step), evaluation, checkpoints, audits
            self.progress.utilisation = min(1.0, self._compute_seconds / max(
                time.monotonic() - self._first_round_started, 1e-9))
            m.utilisation.set(self.progress.utilisation)
        return stats

    async def outer_step(self, stats: RoundStats) -> RoundResult:
        """Pair (unless `--sync local`), apply the outer step and move the round clock on."""
        if self.overlapped:
            return await self._eager_outer_step(stats)
        progress, m = self.progress, self.metrics
        partner, tensors, waited = None, None, 0.0
        next_round = progress.round + 1
        if self.cfg.sync == "noloco":
            next_round = self._catch_up_clock() + 1
            outgoing = await self._commit()
            if outgoing is not None:
                outcome = await self.gossip.sync_round(progress.round, outgoing, self.cfg.sync_timeout,
                                                       prefer_new_seconds(self.cfg.sync_timeout, stats.seconds))
                partner, tensors, waited = outcome.partner, outcome.tensors, outcome.seconds
                if partner is not None and self.verification is not None and not await self.verification.accept_update(
                        partner, outcome.partner_round, tensors, outcome.attestation, outcome.nonce):
                    partner, tensors = None, None  # refused: a local outer step
                elif outcome.partner_round is not None:
                    # Lamport-style: a pair leaves with the later of its two rounds, so a slower node is
                    # pulled along instead of drifting out of every partner's staleness window
                    next_round = max(progress.round, outcome.partner_round) + 1
        m.sync_wait_seconds.observe(waited)
        distance, dropped = await self.compute(self._apply_paired, tensors, partner)
        if dropped:  # flagged after it was accepted, while the step waited for the trainer (e.g. behind a replay)
            self._flagged_since(partner)
            partner = None
        self._steps += 1
        return self._finish(stats, "paired" if partner else "local", partner, distance, waited, next_round)

    def _excluded_now(self, partner: str | None) -> bool:
        """Whether `partner` is flagged or distrusted by now (membership reads only: atomic on any thread)."""
        verification = self.verification
        return partner is not None and verification is not None and (
            partner in verification.flagged or partner in verification.distrusted)

    def _apply_paired(self, tensors: dict[str, Any] | None, partner: str | None) -> tuple[float | None, bool]:
        """On the trainer thread: the outer step, alone if the partner has been flagged by now (the last moment
        to check). Returns (distance, whether the partner's tensors were dropped)."""
        dropped = self._excluded_now(partner)
        return self.trainer.apply_outer_step(None if dropped else tensors), dropped

    async def _eager_outer_step(self, stats: RoundStats) -> RoundResult:
        """`overlap on`: land the exchange that completed since the last boundary (its correction, its round
        clock), start this round's exchange in the background unless one is still running, take the local
        outer step, and return: the next round's inner steps start while the exchange runs."""
        progress = self.progress
        boundary = time.monotonic()
        landed, in_flight = self._landed()
        partner, updates = None, []
        if landed is not None:
            result, update = landed
            partner, updates = result.partner, [update]
            # the clock moves when the exchange is applied, as if the pair had left with max(own, partner) + 1
            progress.round = clock_after_exchange(progress.round, result.partner_round, update.lag)
        self._catch_up_clock()
        # the commitment is made here, from the round's state, but stored in the DHT in the background
        prepared = None if in_flight else await self._prepare_commit()
        if prepared is not None:
            search = overlap_search_seconds(self.cfg.sync_timeout, stats.seconds)
            self.exchange = Exchange(self.gossip.background.spawn(
                self._exchange(progress.round, prepared, search, prefer_new_seconds(search, stats.seconds))), self._steps)
        waited = time.monotonic() - boundary  # no network in it: the commitment made on the trainer thread
        self.metrics.sync_wait_seconds.observe(waited)
        distance, shift, dropped = await self.compute(self._apply_eager, updates, partner)
        if dropped:  # flagged while this boundary committed or waited for the trainer (e.g. behind a replay)
            self._flagged_since(partner)
            partner = None
        if prepared is not None:
            self.exchange.shift = shift
        self._steps += 1
        mode = "paired" if partner else "in_flight" if in_flight else "local"
        return self._finish(stats, mode, partner, distance, waited, progress.round + 1)

    async def settle(self, result: RoundResult) -> None:
        """The node's last round (`--rounds` reached, `overlap on`): wait for the exchange in flight and land its
        correction now, so the final state holds it. (A leave does not wait: a lost correction is a local step.)"""
        if self.exchange is None:
            return
        await asyncio.wait({self.exchange.task})
        landed, _ = self._landed()
        if landed is None:
            return
        exchange, update = landed
        distance = await self.compute(self.trainer.apply_late_corrections, [update])
        self.progress.round = clock_after_exchange(self.progress.round, exchange.partner_round, update.lag)
        self.metrics.round.set(self.progress.round)
        self._record_partner(exchange.partner, distance)
        result.partner, result.distance = exchange.partner, distance
        result.history.update(partner=exchange.partner, partner_distance=distance)

    def _landed(self) -> tuple[tuple[ExchangeResult, PartnerUpdate] | None, bool]:
        """(the exchange that completed since the last boundary with its update, if it brought one;
        whether one is still running). Re-raises what the exchange raised."""
        exchange = self.exchange
        if exchange is None:
            return None, False
        if not exchange.task.done():
            return None, True
        self.exchange = None
        result: ExchangeResult = exchange.task.result()
        if result.partner is None or result.received is None:
            return None, False
        if self._flagged_since(result.partner):
            return None, False
        lag = self._steps - exchange.step
        logger.debug("exchange with %s (%.2fs) lands %d outer step(s) after it started", result.partner[-8:],
                     result.seconds, lag)
        return (result, PartnerUpdate(result.sent, result.received, lag, exchange.shift)), False

    def _apply_eager(self, updates: list[PartnerUpdate], partner: str | None) -> tuple[Any, Any, bool]:
        """On the trainer thread: the eager outer step, without the partner's correction if that partner has
        been flagged by now (the last moment to check). Returns (distance, shift, whether it was dropped)."""
        dropped = self._excluded_now(partner)
        distance, shift = self.trainer.apply_eager_outer_step([] if dropped else updates)
        return distance, shift, dropped

    def _flagged_since(self, partner: str) -> bool:
        """Whether an update accepted in the background came from a peer flagged since: it is not applied."""
        if self.verification is None or partner not in self.verification.excluded():
            return False
        self.metrics.updates_refused.labels(reason="flagged").inc()
        logger.warning("dropped the late update of %s, flagged since the exchange", partner[-8:])
        return True

    async def _exchange(self, round_: int, prepared: Any, search_seconds: float,
                        prefer_new_for: float = 0.0) -> ExchangeResult:
        """Store the commitment, pair and swap in the background (`overlap on`), and check the partner's update
        like the sequential engine does; nothing here touches the trainer."""
        outgoing = prepared if self.verification is None else await self.verification.publish(prepared)
        if outgoing is None:  # the commitment was not stored: this round is not paired
            return ExchangeResult(None, None, {}, None, 0.0)
        outcome = await self.gossip.sync_round(round_, outgoing, search_seconds, prefer_new_for)
        partner, tensors = outcome.partner, outcome.tensors
        if partner is not None and self.verification is not None and not await self.verification.accept_update(
                partner, outcome.partner_round, tensors, outcome.attestation, outcome.nonce):
            partner, tensors = None, None
        return ExchangeResult(partner, outcome.partner_round if partner else None, outgoing, tensors,
                              outcome.seconds)

    def _catch_up_clock(self) -> int:
        """Jump the round clock to the swarm's when no live peer is within max_staleness; returns the clock."""
        progress = self.progress
        live_rounds = [peer.round for peer in self.membership.live.values()]
        if (caught_up := clock_catch_up(live_rounds, progress.round, self.cfg.max_staleness)) is not None:
            logger.info("no peer within %d rounds of round %d: catching the clock up to %d",
                        self.cfg.max_staleness, progress.round, caught_up)
            progress.round = caught_up
        return progress.round

    async def _commit(self) -> dict[str, Any] | None:
        """This round's commitment (verification on), stored; returns the tensors to send, None: not paired."""
        committed_update = await self._cheat()
        if self.verification is not None:
            return await self.verification.commit(self.progress.round, committed_update)
        return await self.compute(self.trainer.outgoing_tensors)

    async def _prepare_commit(self) -> Any | None:
        """`overlap on`: this round's commitment made but not stored yet (verification.publish stores it), or,
        verification off, the tensors to send. None: not paired."""
        committed_update = await self._cheat()
        if self.verification is not None:
            return await self.verification.prepare(self.progress.round, committed_update)
        return await self.compute(self.trainer.outgoing_tensors)

    async def _cheat(self) -> Any | None:
        """Test-only fault injection: may commit to another update than it sends (None: the one sent)."""
        if self.fault is None:
            return None
        return await self.compute(cheat, self.trainer, self.fault, self._fault_generator, self.progress.round)

    def _record_partner(self, partner: str | None, distance: float | None) -> None:
        if distance is not None:
            self.metrics.partner_distance.set(distance)
        if partner is not None:
            self.progress.last_exchange = {"time": time.time(), "partner": partner}

    def _finish(self, stats: RoundStats, mode: str, partner: str | None, distance: float | None, waited: float,
                next_round: int) -> RoundResult:
        progress, m = self.progress, self.metrics
        self._record_partner(partner, distance)
        m.outer_rounds.labels(mode=mode).inc()
        progress.round = next_round
        progress.rounds_done += 1
        m.round.set(progress.round)
        return RoundResult(stats, partner, distance, waited,
                           {"partner": partner, "partner_distance": distance, "wait_seconds": round(waited, 4)})

    async def evaluate(self, result: RoundResult) -> None:
        progress = self.progress
        progress.eval_loss = await self.compute(self.trainer.evaluate)
        self.metrics.eval_loss.set(progress.eval_loss)
        stats = result.stats
        tokens_per_second = stats.tokens / max(stats.seconds, 1e-9)
        if stats.steps:
            progress.train_loss, progress.tokens_per_second = stats.mean_loss, tokens_per_second
        logger.info(
            "round %d  loss %.3f  eval %.3f  %5.0f tok/s  partner %s  wait %.2fs", progress.round, stats.mean_loss,
            progress.eval_loss, tokens_per_second, result.partner[-8:] if result.partner else "-", result.waited,
        )
