"""One node's life: start -> join -> run rounds -> leave.

The event loop (uvloop) owns the network: p2pd, the DHT, gossip and metrics. The
trainer runs on its own thread behind a single-worker executor; the loop only awaits it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from hivemind.dht.node import DHTNode

from protocol import PROTOCOL_VERSION, manifest_hash
from protocol.verification import Tolerances

from node import __version__
from node.train.checkpoint import Checkpoint, load_latest, save_checkpoint
from node.config import NodeConfig
from node.train.data import DataError, load_corpus
from node.verify.faults import FaultConfigError, fault_from_env
from node.gossip.exchange import Gossip, GossipSettings
from node.net.identity import Identity, IdentityError
from node.join.plan import StartMode, donor_order, plan_start
from node.net.membership import DHTUnavailable, Membership
from node.metrics import NodeMetrics, counts_by_label
from node.net.p2pd import start_p2p
from node.gossip.pairing import clock_catch_up
from node.join.peers_file import PeersFileError, wait_for_peers_file
from node.verify.replay import Replayer
from node.join.statesync import DonorState, StateServer, StateSyncError, StateSyncSettings, download_state
from node.tasks import BackgroundTasks
from node.train.trainer import DeviceUnavailable, Trainer
from node.verify.service import Verification, VerifySettings
from node.workdir import WorkDirBusy, claim_work_dir, pid_namespace

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
PEERS_FILE_TIMEOUT = 300.0  # how long a node started with --initial-peers-file waits for a running peer
MAX_FLAGGED_PUBLISHED = 32  # flagged peer ids carried in the presence record (for `gossiptrain status`)


class JoinError(RuntimeError):
    """The node could not reach the swarm (bootstrap failed, p2pd did not start)."""


class StartupError(RuntimeError):
    """A setting cannot work on this machine (device, metrics port, data): fix the config."""


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic small-file write: readers (the swarm launcher, tests) never see half a file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


class Node:
    """Use `await Node.create(cfg)`, then `await node.run()`; `node.request_stop()` ends it cleanly."""

    def __init__(self) -> None:
        raise TypeError("use `await Node.create(config)`")

    @classmethod
    async def create(cls, cfg: NodeConfig) -> "Node":
        self = object.__new__(cls)
        self.cfg = cfg
        try:  # ours alone while we run: a second node on this dir would corrupt both nodes' checkpoints
            self.work_dir, self._work_dir_lock = claim_work_dir(cfg.work_dir)
        except WorkDirBusy as error:
            raise StartupError(str(error)) from error
        except OSError as error:  # read-only volume, wrong owner
            raise StartupError(f"cannot use work dir {cfg.work_dir}: {error}") from error
        self.executor = None
        try:
            await self._start(cfg)
        except BaseException:  # failed or cancelled: the network is closed already; free the rest
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
            os.close(self._work_dir_lock)
            raise
        return self

    async def _start(self, cfg: NodeConfig) -> None:
        # a node.json left by an earlier run (kill -9, a reused volume) must not tell others where we are
        (self.work_dir / "node.json").unlink(missing_ok=True)
        if cfg.initial_peers_file:
            try:
                from_file = await wait_for_peers_file(cfg.initial_peers_file, PEERS_FILE_TIMEOUT)
            except PeersFileError as error:
                raise JoinError(str(error)) from error
            logger.info("initial peers from %s: %s", cfg.initial_peers_file, " ".join(from_file))
            self.cfg = cfg = dataclasses.replace(cfg, initial_peers=[*cfg.initial_peers, *from_file])
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer")
        self.stop_event = asyncio.Event()
        self.round = 0
        self.eval_loss: float | None = None
        self.peers_seen: set[str] = set()
        self.rounds_done = 0
        self.exit_code = 0
        self.initial_eval_loss: float | None = None
        self.train_loss: float | None = None
        self.tokens_per_second: float | None = None
        self.last_exchange: dict[str, Any] | None = None  # time and partner of the last applied partner update
        self.history_path = self.work_dir / "history.jsonl"
        self.started_at = time.time()
        self.p2p = self.dht = None
        self.background = BackgroundTasks()
        self.checkpoint_dir = self.work_dir / "checkpoints"
        self.start_mode: StartMode | None = None  # set once the node has its weights (see _join)
        self.start_detail = ""
        self._donor: tuple[int, tuple] | None = None  # (round, trainer.published) served to joiners
        self._checkpointed: tuple[int, int] | None = None  # (rounds done, global step) of the newest checkpoint

        try:
            corpus = await self._compute(load_corpus, cfg.data or None)
        except DataError as error:
            raise StartupError(str(error)) from error
        manifest = cfg.manifest(corpus.fingerprint, PROTOCOL_VERSION)
        self.manifest_hash = manifest_hash(manifest)
        try:
            self.fault = fault_from_env(os.environ)
            # the libp2p identity is also the key that signs this node's verification records
            if cfg.identity:
                self.identity = Identity.load_or_create(cfg.identity)
                identity_path = Path(cfg.identity)
            else:  # a fresh identity per start, as before; kept in the work dir for p2pd to read
                self.identity = Identity.generate()
                identity_path = self.work_dir / "p2p-identity.key"
                self.identity.save(identity_path)
        except (IdentityError, FaultConfigError) as error:
            raise StartupError(str(error)) from error
        try:
            self.p2p = await start_p2p(
                STARTUP_TIMEOUT,
                initial_peers=cfg.initial_peers or None,
                host_maddrs=[f"/ip4/{cfg.host}/tcp/{cfg.port}"],
                announce_maddrs=cfg.announce or None,
                identity_path=str(identity_path),
                check_if_identity_free=False,  # hivemind's check only reads RSA keys
            )
            self.dht = await asyncio.wait_for(
                DHTNode.create(p2p=self.p2p, initial_peers=cfg.initial_peers or None, cache_locally=False),
                STARTUP_TIMEOUT,
            )
        except (asyncio.TimeoutError, TimeoutError) as error:
            await self._close_network()
            raise JoinError(f"p2p/DHT start-up took over {STARTUP_TIMEOUT:.0f}s") from error
        except Exception as error:
            await self._close_network()
            raise JoinError(
                f"could not join through {cfg.initial_peers or 'no initial peers'}: {error} "
                "(check the multiaddrs, that the peers are up, and that clocks agree within ~3 s)"
            ) from error
        except BaseException:  # cancelled by a stop signal while starting: no orphaned p2pd
            await self._close_network()
            raise
        try:
            await self._start_services(corpus)
        except BaseException:
            await self._close_network()  # no orphaned p2pd, whatever failed
            raise

    async def _start_services(self, corpus: Any) -> None:
        cfg = self.cfg
        self.peer_id = self.p2p.peer_id.to_base58()
        if self.peer_id != self.identity.peer_id:
            raise StartupError(f"p2pd runs as {self.peer_id}, not as identity {self.identity.peer_id}")
        self.maddrs = [str(m) for m in await self.p2p.get_visible_maddrs()]
        self.membership = Membership(self.dht, cfg.run_id, self.peer_id, self.manifest_hash, cfg.presence_ttl)
        try:
            joined_existing = await self.membership.check_manifest()
        except DHTUnavailable as error:
            raise JoinError(f"could not read the swarm's run manifest: {error}") from error

        digest = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{self.peer_id}".encode()).digest()[:8], "big")
        shard = cfg.shard if cfg.shard >= 0 else digest % cfg.num_shards
        try:
            self.trainer = await self._compute(Trainer, cfg, corpus, shard, digest)
        except (DeviceUnavailable, DataError) as error:
            raise StartupError(str(error)) from error

        self.metrics = NodeMetrics()
        self.metrics.info.info({"version": __version__, "peer_id": self.peer_id, "run_id": cfg.run_id,
                                "manifest": self.manifest_hash[:16], "sync": cfg.sync,
                                "device": str(self.trainer.device)})
        try:
            self.metrics_port = self.metrics.serve(cfg.metrics_host, cfg.metrics_port) if cfg.metrics_port >= 0 else None
        except OSError as error:
            raise StartupError(
                f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: {error} "
                "(pick another --metrics-port, 0 for a free one, -1 to disable)"
            ) from error

        self.gossip = Gossip(
            self.p2p, self.membership, self.metrics,
            GossipSettings(
                run_id=cfg.run_id, manifest_hash=self.manifest_hash, numel=self.trainer.numel,
                tensor_names=self.trainer.tensor_names(), max_staleness=cfg.max_staleness,
                io_timeout=cfg.io_timeout, max_frame_bytes=cfg.max_frame_bytes, chunk_bytes=cfg.chunk_bytes,
            ),
            random.Random(digest),
            self.background,
        )
        await self.gossip.start()
        self.state_settings = StateSyncSettings(
            run_id=cfg.run_id, manifest_hash=self.manifest_hash, numel=self.trainer.numel,
            io_timeout=cfg.io_timeout, max_frame_bytes=cfg.max_frame_bytes, chunk_bytes=cfg.chunk_bytes,
        )
        self.state_server = StateServer(self.p2p, self.state_settings, self.metrics, self._donor_state, cfg.max_uploads)
        await self.state_server.start()
        self.verification: Verification | None = None
        if cfg.verify == "on":
            replayer = await self._compute(Replayer, cfg, corpus, self.trainer.device)
            self.verification = Verification(
                self.p2p, self.membership, self.metrics, self.identity,
                VerifySettings(
                    run_id=cfg.run_id, manifest_hash=self.manifest_hash, numel=self.trainer.numel,
                    inner_steps=cfg.inner_steps, rate=cfg.verify_rate,
                    tolerances=Tolerances(cfg.verify_max_hamming, cfg.verify_max_rel_l2, cfg.verify_max_norm_ratio),
                    vote_timeout=cfg.vote_timeout, audit_window=cfg.audit_window, record_ttl=cfg.verify_record_ttl,
                    io_timeout=cfg.io_timeout, max_frame_bytes=cfg.max_frame_bytes, chunk_bytes=cfg.chunk_bytes,
                    lsh_seed=int.from_bytes(bytes.fromhex(self.manifest_hash[:16]), "big"),
                ),
                self.trainer, replayer, self._compute, self.background,
            )
            await self.verification.start()
            self.gossip.excluded = self.verification.excluded
        if self.fault is not None:
            self._fault_generator = torch.Generator().manual_seed(digest)
            logger.warning("TEST FAULT INJECTION ENABLED (%s): this node sends corrupted updates", self.fault)
        self.membership.on_view_change = self._on_view_change
        self.membership.presence_extra = self._presence_extra
        self.rng = random.Random(digest)

        logger.info(
            "node %s up: %s swarm %r, shard %d/%d, %d parameters on %s, metrics on %s",
            self.peer_id, "joining" if joined_existing else "starting", cfg.run_id, shard, cfg.num_shards,
            self.trainer.numel, self.trainer.device, self.metrics_port,
        )
        for maddr in self.maddrs:
            logger.info("others join with: --initial-peer %s", maddr)
        self._write_status("joining")

    async def _compute(self, function: Callable, *args: Any) -> Any:
        """Run blocking work on the trainer thread; the event loop stays free."""
        return await self.loop.run_in_executor(self.executor, function, *args)

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            logger.info("stop requested: finishing the current phase, then leaving (a second signal forces exit)")
            self.stop_event.set()
            self.trainer.interrupt.set()
            self.gossip.stop()
            self.state_server.stopping = True
            if self.verification is not None:
                self.verification.stopping = True
            # a leave is bounded: whatever hangs, the process is gone after leave_timeout
            self.loop.call_later(self.cfg.leave_timeout, self._force_exit,
                                 f"leave did not finish within {self.cfg.leave_timeout:.0f}s")

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop_event.is_set():
            self._force_exit("second signal")
        self.request_stop()

    def _force_exit(self, why: str) -> None:
        logger.warning("%s: exiting now without a final checkpoint (the last periodic one stays valid)", why)
        child = getattr(self.p2p, "_child", None)
        if child is not None and child.returncode is None:
            child.kill()  # no orphaned p2pd
        os._exit(1)

    async def run(self) -> dict[str, Any]:
        try:
            await self._join()
            if not self.stop_event.is_set():
                self.background.spawn(self._heartbeat_loop())
                if self.verification is not None:
                    self.background.spawn(self.verification.run())
                self._write_status("running")
                await self._wait_for_peers()
            if not self.stop_event.is_set():
                self.initial_eval_loss = self.eval_loss = await self._compute(self.trainer.evaluate)
                self.metrics.eval_loss.set(self.eval_loss)
                self._write_status("running")
                self._record_history(None)
                logger.info("held-out loss at start: %.3f", self.eval_loss)
            while not self.stop_event.is_set() and (self.cfg.rounds == 0 or self.rounds_done < self.cfg.rounds):
                await self._run_round()
        finally:
            summary = await self._leave()
        return summary

    # ------------------------------------------------------------------ join: resume, sync or fresh
    async def _join(self) -> None:
        """Get this node's weights: its own recent checkpoint, a live donor's state, or the seeded init."""
        checkpoint = await self._load_own_checkpoint()
        await self._read_view_for_join()
        live_rounds = [peer.round for peer in self.membership.live.values()]
        plan = plan_start(checkpoint.meta["round"] if checkpoint else None, live_rounds, self.cfg.resume_max_lag)
        if checkpoint is not None:
            # also before a re-sync: our optimizer state and data position are still ours to continue
            await self._compute(self.trainer.restore, checkpoint.meta, checkpoint.tensors)
            self.round, self.rounds_done = checkpoint.meta["round"], checkpoint.meta["rounds_done"]
            self.start_detail = f"checkpoint {checkpoint.path.name} at round {self.round}"
        if plan is StartMode.SYNC:
            try:
                if not await self._sync_from_donors():
                    return  # stopped while downloading: nothing new to checkpoint
            except StateSyncError as error:
                if checkpoint is None:
                    raise JoinError(f"{error}; retry later or add other --initial-peer addresses") from error
                logger.warning("%s; continuing from our own stale checkpoint", error)
                plan = StartMode.RESUME
        self.start_mode = plan
        self._donor = (self.round, self.trainer.published)
        self.metrics.start_mode.labels(mode=plan.value).set(1)
        self.metrics.round.set(self.round)
        swarm_round = max(live_rounds, default=0)
        logger.info("start: %s (%s; swarm front at round %d, %d live peers)", plan.value,
                    self.start_detail or "seeded initial weights", swarm_round, len(live_rounds))

    async def _load_own_checkpoint(self) -> Checkpoint | None:
        checkpoint, skipped = await self._compute(load_latest, self.checkpoint_dir)
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

    async def _read_view_for_join(self) -> None:
        """The live view decides resume vs re-sync; right after bootstrap give presence records a moment."""
        deadline = time.monotonic() + self.cfg.presence_ttl
        while True:
            await self.membership.refresh_view()
            if self.membership.live or not self.cfg.initial_peers or time.monotonic() >= deadline:
                return
            try:
                await asyncio.wait_for(self.stop_event.wait(), self.cfg.heartbeat / 2)
                return
            except (asyncio.TimeoutError, TimeoutError):
                pass

    async def _sync_from_donors(self) -> bool:
        """Download and adopt the swarm's state; False if a stop came first. Raises StateSyncError."""
        async def donors() -> list[str]:
            await self.membership.refresh_view()
            return donor_order({p: r.round for p, r in self.membership.live.items()}, self.cfg.max_staleness, self.rng)

        download = asyncio.ensure_future(download_state(
            self.p2p, self.state_settings, self.metrics, donors, self.cfg.state_sync_timeout))
        stopped = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({download, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (download, stopped):
                if not task.done():
                    task.cancel()
            await asyncio.gather(download, stopped, return_exceptions=True)
        if not download.done() or download.cancelled():
            return False
        synced = download.result()  # raises StateSyncError
        await self._compute(self.trainer.adopt, synced.slow, synced.momentum, synced.global_step)
        self.round = synced.round
        self.metrics.state_sync_seconds.set(synced.seconds)
        self.metrics.state_sync_bytes.inc(synced.nbytes)
        self.start_detail = (f"donor {synced.donor[-8:]} at round {synced.round}, {synced.nbytes / 2**20:.1f} MiB in "
                             f"{synced.seconds:.2f}s after {len(synced.attempts)} failed attempts")
        return True

    def _donor_state(self) -> DonorState | None:
        """What this node serves a joiner: its last round boundary (None until it has its weights)."""
        if self._donor is None:
            return None
        round_, published = self._donor
        slow, momentum, step = self.trainer.slow_state(published)
        return DonorState(round_, step, slow, momentum)

    def _on_view_change(self, joined: set[str], left: set[str]) -> None:
        self.metrics.peer_joins.inc(len(joined))
        self.metrics.peer_leaves.inc(len(left))
        if joined or left:
            logger.info("live view: %s joined, %s left", [p[-8:] for p in joined] or "-", [p[-8:] for p in left] or "-")

    async def _wait_for_peers(self) -> None:
        """Hold the first round until min_peers others are live (bounded: then train anyway)."""
        if self.cfg.min_peers <= 0:
            return
        deadline = time.monotonic() + self.cfg.min_peers_timeout
        while len(self.membership.live) < self.cfg.min_peers and not self.stop_event.is_set():
            if time.monotonic() >= deadline:
                logger.warning("only %d of %d peers after %.0fs; training anyway",
                               len(self.membership.live), self.cfg.min_peers, self.cfg.min_peers_timeout)
                return
            await self.membership.refresh_view()
            try:
                await asyncio.wait_for(self.stop_event.wait(), 0.5)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        logger.info("%d peers live: starting to train", len(self.membership.live))

    async def _run_round(self) -> None:
        stats = await self._compute(self.trainer.run_round)
        m = self.metrics
        tokens_per_second = stats.tokens / max(stats.seconds, 1e-9)
        if stats.steps:
            m.inner_steps.inc(stats.steps)
            m.tokens.inc(stats.tokens)
            m.tokens_per_second.set(tokens_per_second)
            m.train_loss.set(stats.mean_loss)
            m.round_seconds.observe(stats.seconds)
            m.train_compute_seconds.inc(stats.seconds)
        if self.stop_event.is_set():
            # leaving before the outer step: the final checkpoint keeps θ and the step count, and a
            # restart finishes this very round (the remaining inner steps, then the pairing)
            return

        partner, tensors, waited = None, None, 0.0
        next_round = self.round + 1
        if self.cfg.sync == "noloco":
            live_rounds = [peer.round for peer in self.membership.live.values()]
            if (caught_up := clock_catch_up(live_rounds, self.round, self.cfg.max_staleness)) is not None:
                logger.info("no peer within %d rounds of round %d: catching the clock up to %d",
                            self.cfg.max_staleness, self.round, caught_up)
                self.round, next_round = caught_up, caught_up + 1
            if self.fault is not None:
                await self._compute(self._cheat)
            if self.verification is not None:
                outgoing = await self.verification.commit(self.round)  # None: this round is not paired
            else:
                outgoing = await self._compute(self.trainer.outgoing_tensors)
            if outgoing is not None:
                outcome = await self.gossip.sync_round(self.round, outgoing, self.cfg.sync_timeout)
                partner, tensors, waited = outcome.partner, outcome.tensors, outcome.seconds
                if partner is not None and self.verification is not None and not await self.verification.accept_update(
                        partner, outcome.partner_round, tensors):
                    partner, tensors = None, None  # refused: a local outer step
                elif outcome.partner_round is not None:
                    # Lamport-style: a pair leaves with the later of its two rounds, so a slower node is
                    # pulled along instead of drifting out of every partner's staleness window
                    next_round = max(self.round, outcome.partner_round) + 1
        m.sync_wait_seconds.observe(waited)
        distance = await self._compute(self.trainer.apply_outer_step, tensors)
        if distance is not None:
            m.partner_distance.set(distance)
        if partner is not None:
            self.last_exchange = {"time": time.time(), "partner": partner}
        m.outer_rounds.labels(mode="paired" if partner else "local").inc()
        self.round = next_round
        self.rounds_done += 1
        self._donor = (self.round, self.trainer.published)
        m.round.set(self.round)
        if self.cfg.checkpoint_every and self.rounds_done % self.cfg.checkpoint_every == 0:
            await self._checkpoint()
        self.eval_loss = await self._compute(self.trainer.evaluate)
        m.eval_loss.set(self.eval_loss)
        # peers see our new round now, not at the next heartbeat: pairing depends on it
        self.background.spawn(self.membership.publish_presence(self.round, self.eval_loss, self.maddrs))
        if stats.steps:
            self.train_loss, self.tokens_per_second = stats.mean_loss, tokens_per_second
        self._record_history({"partner": partner, "partner_distance": distance, "wait_seconds": round(waited, 4)})
        logger.info(
            "round %d  loss %.3f  eval %.3f  %5.0f tok/s  partner %s  wait %.2fs",
            self.round, stats.mean_loss, self.eval_loss, tokens_per_second, partner[-8:] if partner else "-", waited,
        )

    def _presence_extra(self) -> dict[str, Any]:
        """What `gossiptrain status` and `doctor` read from our presence record, besides round and eval loss."""
        flagged = sorted(self.verification.flagged)[:MAX_FLAGGED_PUBLISHED] if self.verification is not None else []
        return {
            "time": time.time(),  # our wall clock when published: `gossiptrain doctor` estimates clock skew from it
            "version": __version__, "started": self.started_at, "rounds_done": self.rounds_done,
            "train_loss": self.train_loss, "tokens_per_second": self.tokens_per_second,
            "last_exchange": self.last_exchange, "exchanges": counts_by_label(self.metrics.exchanges, "result"),
            "flagged": flagged,
        }

    def _record_history(self, round_info: dict[str, Any] | None) -> None:
        """Append one line to history.jsonl (read by `gossiptrain report`); a failed write never stops training."""
        m = self.metrics
        record = {
            "time": round(time.time(), 3), "peer_id": self.peer_id, "round": self.round, "rounds_done": self.rounds_done,
            "train_loss": self.train_loss, "eval_loss": self.eval_loss, "tokens_per_second": self.tokens_per_second,
            "partner": None, "partner_distance": None, "wait_seconds": None,
            **(round_info or {}),
            "exchanges": counts_by_label(m.exchanges, "result"),
            "bytes_sent": int(sum(counts_by_label(m.bytes_sent, "kind").values())),
            "bytes_received": int(sum(counts_by_label(m.bytes_received, "kind").values())),
        }
        try:
            with open(self.history_path, "a") as file:
                file.write(json.dumps(record, default=str) + "\n")
        except OSError as error:
            logger.warning("could not append to %s: %s", self.history_path, error)

    def _cheat(self) -> None:
        """Test-only fault injection (node/verify/faults.py): θ ← φ + attack(θ − φ), on the trainer thread."""
        phi = self.trainer.slow_weights
        delta = self.trainer.fast_weights() - phi
        self.trainer.load_fast_weights(phi + self.fault.apply(delta, self._fault_generator))
        if self.fault.hide and self.verification is not None:
            self.verification.committed_update = delta
        logger.warning("TEST FAULT INJECTION: round %d sends a %s update", self.round, self.fault)

    async def _heartbeat_loop(self) -> None:
        while True:
            if (code := self._p2pd_exit_code()) is not None:
                logger.error("p2pd exited with code %s: this node is cut off from the swarm; leaving", code)
                self.exit_code = 1
                self.request_stop()
                return
            try:
                # bounded well inside the presence TTL, so one slow DHT call cannot make us vanish
                await asyncio.wait_for(
                    self.membership.heartbeat(self.round, self.eval_loss, self.maddrs), self.cfg.presence_ttl / 2)
                self.metrics.peers_live.set(len(self.membership.live))
                self.peers_seen.update(self.membership.live)
            except Exception as error:  # noqa: BLE001 - a failed heartbeat is retried next period
                logger.warning("heartbeat failed: %s", error or type(error).__name__)
            await asyncio.sleep(self.cfg.heartbeat)

    async def _checkpoint(self) -> None:
        """Write a checkpoint on the trainer thread (the state must not move while it is written)."""
        position = (self.rounds_done, self.trainer.global_step)
        if position == self._checkpointed:
            return  # the newest checkpoint already holds exactly this state
        started = time.monotonic()
        try:
            path = await self._compute(self._write_checkpoint)
        except Exception as error:  # noqa: BLE001 - disk full, permissions: training goes on, loudly
            self.metrics.checkpoints.labels(result="failed").inc()
            logger.error("checkpoint failed: %s", error)
            return
        seconds = time.monotonic() - started
        self.metrics.checkpoint_seconds.observe(seconds)
        self.metrics.checkpoint_last_success.set(time.time())
        self.metrics.checkpoints.labels(result="ok").inc()
        self._checkpointed = position
        logger.debug("checkpoint %s written in %.2fs", path.name, seconds)

    def _write_checkpoint(self) -> Path:
        meta, tensors = self.trainer.checkpoint_state()
        meta.update(format=1, manifest=self.manifest_hash, round=self.round, rounds_done=self.rounds_done,
                    peer_id=self.peer_id, written_at=time.time())
        return save_checkpoint(self.checkpoint_dir, meta, tensors, keep=self.cfg.checkpoint_keep)

    async def _leave(self) -> dict[str, Any]:
        if not self.stop_event.is_set():
            self.request_stop()  # arms the leave deadline; stops gossip and uploads
        await self.background.cancel_all()
        if self.start_mode is not None:
            # peers drop us at their next refresh (not after the TTL) while the final checkpoint is written
            await asyncio.gather(self.membership.withdraw(), self._checkpoint())
        summary = self.summary()
        _write_json(self.work_dir / "summary.json", summary)
        self._write_status("stopped")
        await self._close_network()
        self.executor.shutdown(wait=True)
        os.close(self._work_dir_lock)  # the work dir is free for the next node (the kernel would do it at exit)
        logger.info("node %s left at round %d after %d rounds", self.peer_id, self.round, self.rounds_done)
        return summary

    def _p2pd_exit_code(self) -> int | None:
        """p2pd's exit code if it died under us (e.g. a terminal's Ctrl-C reaches its process group)."""
        child = getattr(self.p2p, "_child", None)
        return None if child is None else child.returncode

    async def _close_network(self) -> None:
        try:
            if self.dht is not None and self._p2pd_exit_code() is None:  # with p2pd gone, DHT shutdown hangs
                await asyncio.wait_for(self.dht.shutdown(), 5)
        except Exception as error:  # noqa: BLE001 - p2pd must go down regardless
            logger.warning("DHT shutdown failed: %s", error or type(error).__name__)
        finally:
            if self.p2p is not None:
                await asyncio.wait_for(self.p2p.shutdown(), 10)

    def summary(self) -> dict[str, Any]:
        exchanges = counts_by_label(self.metrics.exchanges, "result")
        votes = counts_by_label(self.metrics.verifications, "verdict")
        return {
            "peer_id": self.peer_id, "round": self.round, "rounds_done": self.rounds_done,
            "start": self.start_mode.value if self.start_mode else None, "start_detail": self.start_detail,
            "initial_eval_loss": self.initial_eval_loss,
            "eval_loss": self.eval_loss, "exchanges": exchanges, "peers_seen": len(self.peers_seen),
            "flagged": sorted(self.verification.flagged) if self.verification is not None else [],
            "votes": votes,
            "distrusted": sorted(self.verification.distrusted) if self.verification is not None else [],
            "seconds": time.time() - self.started_at,
        }

    def _write_status(self, status: str) -> None:
        _write_json(self.work_dir / "node.json", {
            "status": status, "peer_id": self.peer_id, "maddrs": self.maddrs, "pid": os.getpid(),
            "metrics_port": self.metrics_port, "hostname": socket.gethostname(), "pid_namespace": pid_namespace(),
            "work_dir": str(self.work_dir),
            "run_id": self.cfg.run_id, "manifest": self.manifest_hash, "parameters": self.trainer.numel, "start": self.start_mode.value if self.start_mode else None,
            "start_detail": self.start_detail, "round": self.round, "initial_eval_loss": self.initial_eval_loss,
        })
