"""Swarm membership over hivemind's Kademlia DHT: presence, the live-peer view, the run manifest, readiness.

Keys live under the run id:
  {run}.manifest           the manifest hash every member must share (refreshed by every member)
  {run}.peers  [peer id]   presence: round, manifest hash, addresses, held-out loss, and what `gossiptrain
                           status` shows (wall-clock time, train loss, tokens/s, last exchange, exchange
                           counts, flagged peers); expires after presence_ttl
  {run}.ready  [peer id]   "my round r is done, pair with me"; expires after the sync deadline
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

DHT_TIMEOUT = 5.0  # one DHT get/store; a frozen neighbour must not hold us longer


class ManifestMismatch(RuntimeError):
    """This node's run manifest differs from the swarm's: they must not average models."""


class DHTUnavailable(RuntimeError):
    """A DHT read did not complete in time (or failed): the answer is unknown, not empty."""


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    round: int
    eval_loss: float | None
    expiration: float


class Membership:
    def __init__(self, dht: DHTNode, run_id: str, peer_id: str, manifest_hash: str, presence_ttl: float) -> None:
        self.dht = dht
        self.peer_id = peer_id
        self.manifest_hash = manifest_hash
        self.presence_ttl = presence_ttl
        self.keys = {name: f"{run_id}.{name}" for name in ("manifest", "peers", "ready")}
        self.live: dict[str, PeerRecord] = {}
        self._ready_expiration = 0.0
        self._presence_expiration = 0.0
        self.on_view_change: Callable[[set[str], set[str]], None] = lambda joined, left: None
        self.presence_extra: Callable[[], dict[str, Any]] = dict  # more fields for the presence record

    async def _get(self, key: str) -> Any:
        """The value under one of our keys (None: nothing stored); DHTUnavailable when the DHT did not answer."""
        return await self.fetch(self.keys[key])

    async def _store(self, key: str, value: Any, expiration: float, subkey: str | None = None) -> bool:
        return await self.put(self.keys[key], value, expiration, subkey)

    async def fetch(self, key: str) -> Any:
        """The value under a full DHT key (None: nothing stored); DHTUnavailable when the DHT did not answer."""
        try:
            found = await asyncio.wait_for(self.dht.get(key, latest=True), DHT_TIMEOUT)
        except (asyncio.TimeoutError, TimeoutError):
            raise DHTUnavailable(f"DHT get {key} timed out after {DHT_TIMEOUT:.0f}s") from None
        except Exception as error:  # noqa: BLE001 - hivemind raises assorted errors on broken peers
            raise DHTUnavailable(f"DHT get {key} failed: {error}") from error
        return None if found is None else found.value

    async def put(self, key: str, value: Any, expiration: float, subkey: str | None = None) -> bool:
        """Store under a full DHT key; False (logged) if it failed or timed out."""
        try:
            return bool(await asyncio.wait_for(self.dht.store(key, value, expiration, subkey=subkey), DHT_TIMEOUT))
        except Exception as error:  # noqa: BLE001 - a failed store is retried on the next heartbeat/round
            logger.warning("DHT store %s failed: %s", key, error or type(error).__name__)
            return False

    async def check_manifest(self) -> bool:
        """Raise ManifestMismatch if the swarm runs something else; True if a swarm manifest was found.

        DHTUnavailable propagates: joining blind could let a mismatched node rewrite the manifest.
        """
        swarm_manifest = await self._get("manifest")
        if swarm_manifest is not None and swarm_manifest != self.manifest_hash:
            raise ManifestMismatch(
                f"run manifest mismatch: swarm has {str(swarm_manifest)[:12]}, this node has "
                f"{self.manifest_hash[:12]} (model, data, hyper-parameters and protocol version must all match)"
            )
        return swarm_manifest is not None

    async def heartbeat(self, round_: int, eval_loss: float | None, addresses: list[str]) -> None:
        """Refresh presence and the manifest, then reload the live view."""
        await self.publish_presence(round_, eval_loss, addresses)
        await self._store("manifest", self.manifest_hash, get_dht_time() + 10 * self.presence_ttl)
        await self.refresh_view()

    async def publish_presence(self, round_: int, eval_loss: float | None, addresses: list[str]) -> None:
        presence = {**self.presence_extra(), "round": round_, "manifest": self.manifest_hash, "eval_loss": eval_loss,
                    "maddrs": addresses}
        # a DHT subkey is only replaced by a later expiration: keep ours increasing
        self._presence_expiration = max(get_dht_time() + self.presence_ttl, self._presence_expiration + 0.01)
        await self._store("peers", presence, self._presence_expiration, subkey=self.peer_id)

    async def withdraw(self) -> None:
        """Leave: replace our presence and ready records with 'left'/'done' ones, so peers drop us at
        their next view refresh instead of when the TTL runs out (and stop asking us to pair)."""
        self._presence_expiration += 1.0
        left = {"manifest": self.manifest_hash, "left": True}
        await asyncio.gather(
            self._store("peers", left, self._presence_expiration, subkey=self.peer_id),
            self.withdraw_ready(-1),
        )

    async def refresh_view(self) -> dict[str, PeerRecord]:
        """Reload the live view; if the DHT does not answer, keep the last view minus expired peers."""
        now = get_dht_time()
        try:
            entries = await self._get("peers")
        except DHTUnavailable as error:
            logger.warning("%s; keeping the last live view", error)
            expired = {peer for peer, record in self.live.items() if record.expiration <= now}
            self.live = {peer: record for peer, record in self.live.items() if peer not in expired}
            if expired:
                self.on_view_change(set(), expired)
            return self.live
        live = {}
        for peer_id, entry in (entries or {}).items() if isinstance(entries, dict) else ():
            value = getattr(entry, "value", None)
            if not isinstance(peer_id, str) or peer_id == self.peer_id or not isinstance(value, dict):
                continue
            if entry.expiration_time < now or value.get("manifest") != self.manifest_hash or value.get("left"):
                continue
            round_ = value.get("round")
            loss = value.get("eval_loss")
            live[peer_id] = PeerRecord(
                peer_id, round_ if isinstance(round_, int) else -1,
                float(loss) if isinstance(loss, (int, float)) else None, entry.expiration_time,
            )
        joined, left = live.keys() - self.live.keys(), self.live.keys() - live.keys()
        self.live = live
        if joined or left:
            self.on_view_change(set(joined), set(left))
        return live

    async def announce_ready(self, round_: int, ttl: float) -> None:
        # must expire after the last record we stored there, or the DHT keeps the old one
        self._ready_expiration = max(get_dht_time() + ttl, self._ready_expiration + 0.01)
        await self._store("ready", {"round": round_, "manifest": self.manifest_hash}, self._ready_expiration,
                          subkey=self.peer_id)

    async def withdraw_ready(self, round_: int) -> None:
        """Mark our ready record done, so peers stop asking us until the next round boundary.

        A DHT subkey is only replaced by a record that expires later, hence the small offset.
        """
        self._ready_expiration = expiration = self._ready_expiration + 0.5
        value = {"round": round_, "manifest": self.manifest_hash, "done": True}
        await self._store("ready", value, expiration, subkey=self.peer_id)

    async def ready_peers(self) -> dict[str, int]:
        """Peers currently waiting for a partner, with the round they finished ({} if the DHT is slow)."""
        try:
            entries = await self._get("ready")
        except DHTUnavailable as error:
            logger.info("%s", error)
            return {}
        ready = {}
        now = get_dht_time()
        for peer_id, entry in (entries or {}).items() if isinstance(entries, dict) else ():
            value = getattr(entry, "value", None)
            if peer_id == self.peer_id or not isinstance(value, dict) or entry.expiration_time < now:
                continue
            if value.get("done") or value.get("manifest") != self.manifest_hash:
                continue
            if isinstance(value.get("round"), int):
                ready[peer_id] = value["round"]
        return ready
