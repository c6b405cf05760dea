"""How a node gets its weights: its own recent checkpoint, a live donor's state, or the seeded init.

`plan.py` decides (a pure rule); this module carries the decision out: it reads the node's
newest checkpoint, looks at the live view, restores or downloads, and reports what it did.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P

from protocol.records import MAX_ROUND

from node.config import NodeConfig
from node.gossip.pairing import catch_up_step, supported_round
from node.join.plan import StartMode, donor_order, plan_start, state_problem
from node.join.statesync import StateSyncError, StateSyncSettings, download_state
from node.metrics import NodeMetrics
from node.net.membership import Membership
from node.train.checkpoint import Checkpoint, load_latest
from node.train.trainer import Trainer

logger = logging.getLogger(__name__)

Compute = Callable[..., Awaitable[Any]]  # runs a blocking call on the trainer thread


def checkpoint_round_problem(meta: dict, live_rounds: list[int], margin: int) -> str | None:
    """Why a checkpoint's round must not be resumed (None: it may be): not a round below 2**63, or more than
    `margin` rounds beyond what the live swarm supports (its median round). Resuming such a round would
    publish it, overflow the next one, and crash again on every restart."""
    for name in ("round", "rounds_done"):
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_ROUND:
            return f"its {name} {str(value)[:40]} is not a count below 2**63 - 1"
    supported = supported_round(live_rounds)
    if supported is not None and meta["round"] > supported + margin:
        return f"its round {meta['round']} is far beyond the swarm's (median live round {supported})"
    return None


class JoinError(RuntimeError):
    """The node could not reach the swarm (bootstrap failed, p2pd did not start, no donor delivered)."""


@dataclass(frozen=True)
class JoinOutcome:
    mode: StartMode | None  # None: a stop came while downloading (nothing new to checkpoint)
    round: int
    rounds_done: int
    detail: str  # where the weights came from, for logs, node.json and the summary


class Joiner:
    def __init__(self, cfg: NodeConfig, p2p: P2P, membership: Membership, metrics: NodeMetrics,
                 trainer: Trainer, compute: Compute, state_settings: StateSyncSettings,
                 manifest_hash: str, checkpoint_dir: Path, stop_event: asyncio.Event, rng: random.Random) -> None:
        self.cfg, self.p2p, self.membership, self.metrics = cfg, p2p, membership, metrics
        self.trainer, self.compute, self.state_settings = trainer, compute, state_settings
        self.manifest_hash, self.checkpoint_dir = manifest_hash, checkpoint_dir
        self.stop_event, self.rng = stop_event, rng

    async def join(self) -> JoinOutcome:
        checkpoint = await self._load_own_checkpoint()
        await self._read_view()
        live_rounds = [peer.round for peer in self.membership.live.values()]
        if checkpoint is not None:
            margin = self.cfg.resume_max_lag + catch_up_step(self.cfg.max_staleness)
            problem = checkpoint_round_problem(checkpoint.meta, live_rounds, margin)
            if problem is not None:
                self.metrics.checkpoints_damaged.inc()
                logger.warning("checkpoint %s refused: %s; not resuming from it", checkpoint.path.name, problem)
                checkpoint = None
        plan = plan_start(checkpoint.meta["round"] if checkpoint else None, live_rounds, self.cfg.resume_max_lag)
        round_, rounds_done, detail = 0, 0, ""
        if checkpoint is not None:
            # also before a re-sync: our optimizer state and data position are still ours to continue
            await self.compute(self.trainer.restore, checkpoint.meta, checkpoint.tensors)
            round_, rounds_done = checkpoint.meta["round"], checkpoint.meta["rounds_done"]
            detail = f"checkpoint {checkpoint.path.name} at round {round_}"
        if plan is StartMode.SYNC:
            try:
                synced = await self._sync_from_donors()
            except StateSyncError as error:
                if checkpoint is None:
                    raise JoinError(f"{error}; retry later or add other --initial-peer addresses") from error
                logger.warning("%s; continuing from our own stale checkpoint", error)
                plan = StartMode.RESUME
            else:
                if synced is None:
                    return JoinOutcome(None, round_, rounds_done, detail)
                round_, detail = synced
        self.metrics.start_mode.labels(mode=plan.value).set(1)
        logger.info("start: %s (%s; swarm front at round %d, %d live peers)", plan.value,
                    detail or "seeded initial weights", max(live_rounds, default=0), len(live_rounds))
        return JoinOutcome(plan, round_, rounds_done, detail)

    async def _load_own_checkpoint(self) -> Checkpoint | None:
        checkpoint, skipped = await self.compute(load_latest, self.checkpoint_dir)
        for path, reason in skipped:
            self.metrics.checkpoints_damaged.inc()
            logger.warning("checkpoint %s is damaged (%s): skipped", path.name, reason)
        if checkpoint is None:
            return None
        meta = checkpoint.meta
        if meta.get("manifest") != self.manifest_hash or meta.get("numel") != self.trainer.numel:
            logger.warning("checkpoint %s belongs to another run manifest: not resuming from it", checkpoint.path.name)
            return None
        return checkpoint

    async def _read_view(self) -> None:
        """The live view decides resume vs re-sync; right after bootstrap give presence records a moment."""
        deadline = time.monotonic() + self.cfg.presence_ttl
        while True:
            await self.membership.refresh_view()
            if self.membership.live or not self.cfg.initial_peers or time.monotonic() >= deadline:
                return
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.cfg.heartbeat / 2)
                return
            except TimeoutError:
                pass

    async def _vet(self, received: dict[str, Any]) -> str | None:
        """Why a donor's state must not be adopted (None: adopt it): its φ's held-out loss against the losses the
        live peers report (a poisoning donor's random φ is whole units worse; node/join/plan.py state_problem)."""
        loss = await self.compute(self.trainer.heldout_loss_of, received["phi"])
        reported = [peer.eval_loss for peer in self.membership.live.values() if peer.eval_loss is not None]
        return state_problem(loss, reported)

    async def _sync_from_donors(self) -> tuple[int, str] | None:
        """Download and adopt the swarm's state: (round, detail), or None if a stop came first. Raises StateSyncError."""
        async def donors() -> list[str]:
            await self.membership.refresh_view()
            return donor_order({p: r.round for p, r in self.membership.live.items()}, self.cfg.max_staleness, self.rng)

        download = asyncio.ensure_future(download_state(
            self.p2p, self.state_settings, self.metrics, donors, self.cfg.state_sync_timeout, self._vet))
        stopped = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({download, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (download, stopped):
                if not task.done():
                    task.cancel()
            await asyncio.gather(download, stopped, return_exceptions=True)
        if not download.done() or download.cancelled():
            return None
        synced = download.result()  # raises StateSyncError
        await self.compute(self.trainer.adopt, synced.slow, synced.momentum, synced.global_step)
        self.metrics.state_sync_seconds.set(synced.seconds)
        self.metrics.state_sync_bytes.inc(synced.nbytes)
        return synced.round, (f"donor {synced.donor[-8:]} at round {synced.round}, {synced.nbytes / 2**20:.1f} MiB "
                              f"in {synced.seconds:.2f}s after {len(synced.attempts)} failed attempts")
