"""One node's life: start -> join -> run rounds -> leave.

The event loop (uvloop) owns the network: p2pd, the DHT, gossip and metrics. The
trainer runs on its own thread behind a single-worker executor; the loop only awaits it.
This class composes the parts: the join is `node/join/procedure.py`, a round is
`node/round.py`, the work-dir files are `node/workdir.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import random
import resource
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hivemind.dht.node import DHTNode

from protocol import PROTOCOL_VERSION, manifest_hash
from protocol.records import MAX_FLAGGED, LastExchange, NodeStatus, Report
from protocol.verification import Tolerances

from node import __version__
from node.config import ConfigError, NodeConfig
from node.gossip.exchange import Gossip, GossipSettings
from node.join.peers_file import PeersFileError, wait_for_peers_file
from node.join.plan import StartMode
from node.join.procedure import Joiner, JoinError
from node.join.statesync import DonorState, StateServer
from node.metrics import NodeMetrics, counts_by_label
from node.net.healing import DHTHealer, ViewPeer
from node.net.identity import Identity, IdentityError
from node.net.membership import DHTUnavailable, Membership
from node.net.p2pd import start_p2p
from node.net.signed_records import SignedRecordValidator, signing_validator
from node.net.stream_service import StreamSettings
from node.round import Progress, Rounds
from node.tasks import BackgroundTasks
from node.train.checkpoint import save_checkpoint
from node.train.data import DataError, load_run_corpus
from node.train.parallel import ParallelError
from node.train.trainer import DeviceUnavailable, SlowState, Trainer
from node.verify.faults import FaultConfigError, fault_from_env
from node.verify.replay import Replayer
from node.verify.service import Verification, VerifySettings
from node.workdir import WorkDirBusy, WorkDirFiles, claim_work_dir, pid_namespace

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 60.0
PEERS_FILE_TIMEOUT = 300.0  # how long a node started with --initial-peers-file waits for a running peer


class StartupError(RuntimeError):
    """A setting cannot work on this machine (device, metrics port, data): fix the config."""


class Node:
    """Use `await Node.create(cfg)`, then `await node.run()`; `node.request_stop()` ends it cleanly."""

    def __init__(self) -> None:
        raise TypeError("use `await Node.create(config)`")

    @classmethod
    async def create(cls, cfg: NodeConfig) -> Node:
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
            if (trainer := getattr(self, "trainer", None)) is not None:
                trainer.close()  # no orphaned data-parallel workers
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
            os.close(self._work_dir_lock)
            raise
        return self

    async def _start(self, cfg: NodeConfig) -> None:
        self.files = WorkDirFiles(self.work_dir)
        self.files.clear_status()
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
        self.progress = Progress()
        self.peers_seen: set[str] = set()
        self.exit_code = 0
        self.started_at = time.time()
        self.p2p = self.dht = None
        self.background = BackgroundTasks()
        self.start_mode: StartMode | None = None  # set once the node has its weights (see _join)
        self.start_detail = ""
        self._donor: tuple[int, SlowState] | None = None  # (round, its boundary) served to joiners
        self._checkpointed: tuple[int, int] | None = None  # (rounds done, global step) of the newest checkpoint

        try:
            corpus = await self._compute(load_run_corpus, cfg)
        except DataError as error:
            raise StartupError(str(error)) from error
        try:
            manifest = cfg.manifest(corpus.fingerprint, PROTOCOL_VERSION, corpus.vocab_size, corpus.tokenizer)
        except ConfigError as error:  # an init-weights file that vanished since the config was checked
            raise StartupError(str(error)) from error
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
                DHTNode.create(p2p=self.p2p, initial_peers=cfg.initial_peers or None, cache_locally=False,
                               record_validator=SignedRecordValidator(self.identity)),  # owner-signed records only
                STARTUP_TIMEOUT,
            )
        except TimeoutError as error:
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
        # ConfigError: a model or init weights refused; ParallelError: a data-parallel worker did not start
        except (DeviceUnavailable, DataError, ConfigError, ParallelError) as error:
            raise StartupError(str(error)) from error

        self.metrics = NodeMetrics()
        if (validator := signing_validator(self.dht)) is not None:  # every refused DHT record is counted
            validator.on_refused = lambda reason: self.metrics.records_refused.labels(reason=reason).inc()
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

        stream = StreamSettings.from_config(cfg, self.manifest_hash, self.trainer.numel)
        self.gossip = Gossip(
            self.p2p, self.membership, self.metrics,
            GossipSettings(stream, tensor_names=self.trainer.tensor_names(), max_staleness=cfg.max_staleness,
                           reference=self.trainer.wire_reference),
            random.Random(digest),
            self.background,
        )
        await self.gossip.start()
        self.state_settings = stream  # state sync needs nothing more
        self.state_server = StateServer(self.p2p, self.state_settings, self.metrics, self._donor_state, cfg.max_uploads)
        await self.state_server.start()
        self.verification: Verification | None = None
        if cfg.verify == "on":
            replayer = await self._compute(Replayer, cfg, corpus, self.trainer.device)
            self.verification = Verification(
                self.p2p, self.membership, self.metrics, self.identity,
                VerifySettings(
                    stream, inner_steps=cfg.inner_steps, rate=cfg.verify_rate,
                    tolerances=Tolerances(cfg.verify_max_hamming, cfg.verify_max_rel_l2, cfg.verify_max_norm_ratio),
                    vote_timeout=cfg.vote_timeout, audit_window=cfg.audit_window, record_ttl=cfg.verify_record_ttl,
                    lsh_seed=int.from_bytes(bytes.fromhex(self.manifest_hash[:16]), "big"),
                    trusted=frozenset(cfg.trusted_peers),
                ),
                self.trainer, replayer, self._compute, self.background,
            )
            await self.verification.start()
            self.gossip.excluded = self.verification.excluded
            self.gossip.attest = self.verification.attest
        if self.fault is not None:
            logger.warning("TEST FAULT INJECTION ENABLED (%s): this node %s", self.fault,
                           "serves joiners a poisoned state" if self.fault.poisons_state else "sends corrupted updates")
        self.membership.on_view_change = self._on_view_change
        self.membership.presence_extra = self._presence_extra
        update_fault = self.fault if self.fault is not None and not self.fault.poisons_state else None
        self.rounds = Rounds(cfg, self.trainer, self.gossip, self.verification, self.membership, self.metrics,
                             self._compute, self.progress, update_fault, digest)
        self.joiner = Joiner(cfg, self.p2p, self.membership, self.metrics, self.trainer, self._compute,
                             self.state_settings, self.manifest_hash, self.files.checkpoint_dir, self.stop_event,
                             random.Random(digest))

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
        progress = self.progress
        try:
            await self._join()
            if not self.stop_event.is_set():
                self.background.spawn(self._heartbeat_loop())
                self.background.spawn(self._healer().run())  # partition healing: lost DHT peers back
                if self.verification is not None:
                    self.background.spawn(self.verification.run())
                self._write_status("running")
                await self._wait_for_peers()
            if not self.stop_event.is_set():
                progress.initial_eval_loss = progress.eval_loss = await self._compute(self.trainer.evaluate)
                self.metrics.eval_loss.set(progress.eval_loss)
                self._write_status("running")
                self._record_history(None)
                logger.info("held-out loss at start: %.3f", progress.eval_loss)
            while not self.stop_event.is_set() and (self.cfg.rounds == 0 or progress.rounds_done < self.cfg.rounds):
                try:
                    await self._run_round()
                except ParallelError as error:  # a worker died or hung: this node cannot train on; it leaves cleanly
                    logger.error("%s: leaving", error)
                    self.exit_code = 1
                    break
        finally:
            summary = await self._leave()
        return summary

    async def _join(self) -> None:
        outcome = await self.joiner.join()
        self.progress.round, self.progress.rounds_done = outcome.round, outcome.rounds_done
        self.start_detail = outcome.detail
        if outcome.mode is None:
            return  # stopped while downloading: nothing new to checkpoint
        self.start_mode = outcome.mode
        self._donor = (self.progress.round, self.trainer.published)
        self.metrics.round.set(self.progress.round)

    async def _run_round(self) -> None:
        stats = await self.rounds.train()
        if self.stop_event.is_set():
            # leaving before the outer step: the final checkpoint keeps θ and the step count, and a
            # restart finishes this very round (the remaining inner steps, then the pairing)
            return
        result = await self.rounds.outer_step(stats)
        if self.cfg.rounds and self.progress.rounds_done >= self.cfg.rounds:
            await self.rounds.settle(result)  # overlap on: the last exchange lands in the final state
        self._donor = (self.progress.round, self.trainer.published)
        if self.cfg.checkpoint_every and self.progress.rounds_done % self.cfg.checkpoint_every == 0:
            await self._checkpoint()
        await self.rounds.evaluate(result)
        # peers see our new round now, not at the next heartbeat: pairing depends on it
        self.background.spawn(self.membership.publish_presence(self.progress.round, self.progress.eval_loss,
                                                               self.maddrs))
        self._record_history(result.history)

    def _donor_state(self) -> DonorState | None:
        """What this node serves a joiner: its last round boundary (None until it has its weights)."""
        if self._donor is None:
            return None
        round_, boundary = self._donor
        slow = boundary.slow
        if self.fault is not None and self.fault.poisons_state:  # test-only: node/verify/faults.py
            slow = self.fault.poison(slow, seed=round_)
        return DonorState(round_, boundary.global_step, slow, boundary.momentum)

    def _on_view_change(self, joined: set[str], left: set[str]) -> None:
        self.peers_seen.update(joined)  # every peer ever in the view, not only those a heartbeat happened to see
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
            except TimeoutError:
                pass
        logger.info("%d peers live: starting to train", len(self.membership.live))

    def _presence_extra(self) -> Report:
        """What `gossiptrain status` and `doctor` read from our presence record, besides round and eval loss."""
        flagged = sorted(self.verification.flagged)[:MAX_FLAGGED] if self.verification is not None else []
        last = self.progress.last_exchange
        return Report(
            time=time.time(),  # our wall clock when published: `gossiptrain doctor` estimates clock skew from it
            version=__version__, started=self.started_at, rounds_done=self.progress.rounds_done,
            train_loss=self.progress.train_loss, tokens_per_second=self.progress.tokens_per_second,
            utilisation=self.progress.utilisation,
            last_exchange=LastExchange(last["time"], last["partner"]) if last is not None else None,
            exchanges=counts_by_label(self.metrics.exchanges, "result"), flagged=tuple(flagged),
        )

    def _record_history(self, round_info: dict[str, Any] | None) -> None:
        """One line of history.jsonl (read by `gossiptrain report`)."""
        m, progress = self.metrics, self.progress
        self.files.append_history({
            "time": round(time.time(), 3), "peer_id": self.peer_id, "round": progress.round,
            "rounds_done": progress.rounds_done, "train_loss": progress.train_loss, "eval_loss": progress.eval_loss,
            "tokens_per_second": progress.tokens_per_second, "utilisation": progress.utilisation,
            "partner": None, "partner_distance": None, "wait_seconds": None,
            **(round_info or {}),
            "exchanges": counts_by_label(m.exchanges, "result"),
            "bytes_sent": int(sum(counts_by_label(m.bytes_sent, "kind").values())),
            "bytes_received": int(sum(counts_by_label(m.bytes_received, "kind").values())),
        })

    def _healer(self) -> DHTHealer:
        """Puts the peers the DHT routing table lost (an outage) back: the initial ones and those seen live."""
        membership = self.membership
        return DHTHealer(self.dht, self.p2p, self.peer_id, self.cfg.initial_peers,
                         lambda: [ViewPeer(r.peer_id, r.maddrs) for r in membership.live.values()],
                         lambda: membership.departed, self.metrics, on_heal=membership.republish)

    async def _heartbeat_loop(self) -> None:
        while True:
            if (code := self._p2pd_exit_code()) is not None:
                logger.error("p2pd exited with code %s: this node is cut off from the swarm; leaving", code)
                self.exit_code = 1
                self.request_stop()
                return
            try:
                # bounded well inside the presence TTL, so one slow DHT call cannot make us vanish
                await asyncio.wait_for(self.membership.heartbeat(self.progress.round, self.progress.eval_loss,
                                                                 self.maddrs), self.cfg.presence_ttl / 2)
                self.metrics.peers_live.set(len(self.membership.live))
                self.peers_seen.update(self.membership.live)
            except Exception as error:  # noqa: BLE001 - a failed heartbeat is retried next period
                logger.warning("heartbeat failed: %s", error or type(error).__name__)
            await asyncio.sleep(self.cfg.heartbeat)

    async def _checkpoint(self) -> None:
        """Write a checkpoint on the trainer thread (the state must not move while it is written)."""
        position = (self.progress.rounds_done, self.trainer.global_step)
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
        meta.update(format=1, manifest=self.manifest_hash, round=self.progress.round,
                    rounds_done=self.progress.rounds_done, peer_id=self.peer_id, written_at=time.time())
        return save_checkpoint(self.files.checkpoint_dir, meta, tensors, keep=self.cfg.checkpoint_keep)

    async def _leave(self) -> dict[str, Any]:
        if not self.stop_event.is_set():
            self.request_stop()  # arms the leave deadline; stops gossip and uploads
        await self.background.cancel_all()
        if self.start_mode is not None:
            # peers drop us at their next refresh (not after the TTL) while the final checkpoint is written
            await asyncio.gather(self.membership.withdraw(), self._checkpoint())
        summary = self.summary()
        self.files.write_summary(summary)
        self._write_status("stopped")
        await self._close_network()
        await self._compute(self.trainer.close)  # data-parallel workers, if any, exit now
        self.executor.shutdown(wait=True)
        os.close(self._work_dir_lock)  # the work dir is free for the next node (the kernel would do it at exit)
        logger.info("node %s left at round %d after %d rounds", self.peer_id, self.progress.round,
                    self.progress.rounds_done)
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
        progress = self.progress
        return {
            "peer_id": self.peer_id, "round": progress.round, "rounds_done": progress.rounds_done,
            "start": self.start_mode.value if self.start_mode else None, "start_detail": self.start_detail,
            "initial_eval_loss": progress.initial_eval_loss,
            "eval_loss": progress.eval_loss, "exchanges": exchanges, "peers_seen": len(self.peers_seen),
            "flagged": sorted(self.verification.flagged) if self.verification is not None else [],
            "votes": votes,
            "distrusted": sorted(self.verification.distrusted) if self.verification is not None else [],
            "seconds": time.time() - self.started_at,
            # this process's peak resident memory (Linux reports KiB): what a node of this model needs
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def _write_status(self, status: str) -> None:
        self.files.write_status(NodeStatus(
            status=status, peer_id=self.peer_id, maddrs=tuple(self.maddrs), pid=os.getpid(),
            metrics_port=self.metrics_port, hostname=socket.gethostname(), pid_namespace=pid_namespace(),
            work_dir=str(self.work_dir),
            run_id=self.cfg.run_id, manifest=self.manifest_hash, parameters=self.trainer.numel,
            start=self.start_mode.value if self.start_mode else None,
            start_detail=self.start_detail, round=self.progress.round,
            initial_eval_loss=self.progress.initial_eval_loss,
        ))
