"""One round of a node: H inner steps, then a NoLoCo outer step with one random partner (or alone).

    train (trainer thread) -> commit (verification) -> pair and swap (gossip) -> accept? -> outer step
    -> checkpoint every N rounds -> held-out loss -> publish the new round

`Progress` is what the node has done so far; the presence record, node.json, history.jsonl
and summary.json all read it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from node.config import NodeConfig
from node.gossip.exchange import Gossip
from node.gossip.pairing import clock_catch_up
from node.metrics import NodeMetrics
from node.net.membership import Membership
from node.train.trainer import RoundStats, Trainer
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
    last_exchange: dict[str, Any] | None = None  # time and partner of the last applied partner update


@dataclass
class RoundResult:
    stats: RoundStats
    partner: str | None = None
    distance: float | None = None
    waited: float = 0.0
    history: dict[str, Any] = field(default_factory=dict)


class Rounds:
    def __init__(self, cfg: NodeConfig, trainer: Trainer, gossip: Gossip, verification: Verification | None,
                 membership: Membership, metrics: NodeMetrics, compute: Compute, progress: Progress,
                 fault: Fault | None, fault_seed: int) -> None:
        self.cfg, self.trainer, self.gossip, self.verification = cfg, trainer, gossip, verification
        self.membership, self.metrics, self.compute, self.progress = membership, metrics, compute, progress
        self.fault = fault
        self._fault_generator = torch.Generator().manual_seed(fault_seed) if fault is not None else None

    async def train(self) -> RoundStats:
        stats = await self.compute(self.trainer.run_round)
        m = self.metrics
        if stats.steps:
            m.inner_steps.inc(stats.steps)
            m.tokens.inc(stats.tokens)
            m.tokens_per_second.set(stats.tokens / max(stats.seconds, 1e-9))
            m.train_loss.set(stats.mean_loss)
            m.round_seconds.observe(stats.seconds)
            m.train_compute_seconds.inc(stats.seconds)
        return stats

    async def outer_step(self, stats: RoundStats) -> RoundResult:
        """Pair (unless `--sync local`), apply the outer step and move the round clock on."""
        progress, m = self.progress, self.metrics
        partner, tensors, waited = None, None, 0.0
        next_round = progress.round + 1
        if self.cfg.sync == "noloco":
            live_rounds = [peer.round for peer in self.membership.live.values()]
            if (caught_up := clock_catch_up(live_rounds, progress.round, self.cfg.max_staleness)) is not None:
                logger.info("no peer within %d rounds of round %d: catching the clock up to %d",
                            self.cfg.max_staleness, progress.round, caught_up)
                progress.round, next_round = caught_up, caught_up + 1
            committed_update = None  # test-only fault injection may commit to another update than it sends
            if self.fault is not None:
                committed_update = await self.compute(cheat, self.trainer, self.fault, self._fault_generator,
                                                      progress.round)
            if self.verification is not None:
                # None: this round is not paired
                outgoing = await self.verification.commit(progress.round, committed_update)
            else:
                outgoing = await self.compute(self.trainer.outgoing_tensors)
            if outgoing is not None:
                outcome = await self.gossip.sync_round(progress.round, outgoing, self.cfg.sync_timeout)
                partner, tensors, waited = outcome.partner, outcome.tensors, outcome.seconds
                if partner is not None and self.verification is not None and not await self.verification.accept_update(
                        partner, outcome.partner_round, tensors):
                    partner, tensors = None, None  # refused: a local outer step
                elif outcome.partner_round is not None:
                    # Lamport-style: a pair leaves with the later of its two rounds, so a slower node is
                    # pulled along instead of drifting out of every partner's staleness window
                    next_round = max(progress.round, outcome.partner_round) + 1
        m.sync_wait_seconds.observe(waited)
        distance = await self.compute(self.trainer.apply_outer_step, tensors)
        if distance is not None:
            m.partner_distance.set(distance)
        if partner is not None:
            progress.last_exchange = {"time": time.time(), "partner": partner}
        m.outer_rounds.labels(mode="paired" if partner else "local").inc()
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
