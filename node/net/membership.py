"""Swarm membership over hivemind's Kademlia DHT: presence, the live-peer view, the run manifest, readiness.

Keys live under the run id:
  {run}.peers  [peer id]   presence: round, manifest hash, addresses, held-out loss, and what `gossiptrain
                           status` shows (wall-clock time, train loss, tokens/s, last exchange, exchange
                           counts, flagged peers); expires after presence_ttl
  {run}.ready  [peer id]   "my round r is done, pair with me"; expires after the sync deadline

Every entry is signed by the peer its subkey names and checked by every DHT node's record
validator (node/net/signed_records.py): nobody can write, replace or withdraw another peer's
records. There is no swarm-wide manifest key: the swarm's manifest is what its live members'
signed presence records agree on (protocol/records.py `agreed_manifest`).

The presence and ready records are built and parsed by their schemas (protocol/records.py): a
malformed record is skipped and counted, never used. DHT calls go through node/net/dht.py (bounded).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from protocol.records import (
    WITHDRAWN_ROUND,
    InvalidRecord,
    Presence,
    Ready,
    Report,
    agreed_manifest,
    check_peer_id,
    presence_key,
    ready_key,
)

from node.net.dht import DHTClient, DHTUnavailable, Entry

logger = logging.getLogger(__name__)

UNKNOWN_ROUND = -1  # a live peer whose presence record has no (valid) round
MAX_REMEMBERED_PEERS = 4096  # live_since entries kept
# peers that enter our view within this long of our first look were there before we came (the view fills over a
# few heartbeats): we cannot tell since when, so they count as live since before anything we will audit
VIEW_STARTUP_GRACE = 10.0


class ManifestMismatch(RuntimeError):
    """This node's run manifest differs from the swarm's: they must not average models."""


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    round: int  # UNKNOWN_ROUND if its record has none
    eval_loss: float | None
    expiration: float
    maddrs: tuple[str, ...] = ()  # the addresses its presence announces (partition healing dials them)


class Membership:
    def __init__(self, dht: DHTNode, run_id: str, peer_id: str, manifest_hash: str, presence_ttl: float) -> None:
        self.dht = dht
        self.client = DHTClient(dht)  # bounded get/store, also used by verification
        self.peer_id = peer_id
        self.manifest_hash = manifest_hash
        self.presence_ttl = presence_ttl
        self.keys = {"peers": presence_key(run_id), "ready": ready_key(run_id)}
        self.live: dict[str, PeerRecord] = {}
        self.departed: set[str] = set()  # peers whose latest presence says they left cleanly (last refresh)
        # wall-clock time each peer last entered our live view (kept after it leaves; reset when it comes back):
        # verification seats a peer on committees only if it was live before the audited exchange happened
        self.live_since: dict[str, float] = {}
        self._first_look: float | None = None  # wall clock of our first view refresh
        self.malformed_records = 0  # presence/ready records skipped as malformed (counted, debug-logged)
        self._ready_expiration = 0.0
        self._presence_expiration = 0.0
        self._last_presence: tuple[int, float | None, list[str]] | None = None  # publish_presence's last arguments
        self.on_view_change: Callable[[set[str], set[str]], None] = lambda joined, left: None
        self.presence_extra: Callable[[], Report] = Report  # what `gossiptrain status` shows, besides round and loss

    async def _store(self, key: str, value: Any, expiration: float, subkey: str | None = None) -> bool:
        return await self.client.store(self.keys[key], value, expiration, subkey)

    def _parse(self, entry: Entry, kind: type, now: float) -> Any:
        """The record of another live peer's entry; None if it is ours, expired or malformed (counted)."""
        if entry.subkey == self.peer_id or entry.expiration < now:
            return None
        try:
            check_peer_id(entry.subkey, "subkey")
            return kind.from_wire(entry.value)
        except InvalidRecord as error:
            self.malformed_records += 1
            logger.debug("skipping a malformed %s record under %.60r: %s", kind.KIND, entry.subkey, error)
            return None

    async def check_manifest(self) -> bool:
        """Raise ManifestMismatch if the swarm runs something else; True if live members were found.

        The swarm's manifest is the one most live members' signed presences carry (a lone first
        node starts its own swarm). DHTUnavailable propagates: joining blind could let a
        mismatched node into the swarm.
        """
        now = get_dht_time()
        manifests = []
        for entry in await self.client.fetch_entries(self.keys["peers"]):
            presence: Presence | None = self._parse(entry, Presence, now)
            if presence is not None and not presence.left:
                manifests.append(presence.manifest)
        swarm_manifest = agreed_manifest(manifests, self.manifest_hash)
        if swarm_manifest is not None and swarm_manifest != self.manifest_hash:
            raise ManifestMismatch(
                f"run manifest mismatch: swarm has {swarm_manifest[:12]}, this node has "
                f"{self.manifest_hash[:12]} (model, data, hyper-parameters and protocol version must all match)"
            )
        return swarm_manifest is not None

    async def heartbeat(self, round_: int, eval_loss: float | None, addresses: list[str]) -> None:
        """Refresh presence (it carries our manifest), then reload the live view."""
        await self.publish_presence(round_, eval_loss, addresses)
        await self.refresh_view()

    async def publish_presence(self, round_: int, eval_loss: float | None, addresses: list[str]) -> None:
        self._last_presence = (round_, eval_loss, list(addresses))
        presence = Presence(manifest=self.manifest_hash, round=round_, eval_loss=eval_loss, maddrs=tuple(addresses),
                            report=self.presence_extra())
        # a DHT subkey is only replaced by a later expiration: keep ours increasing
        self._presence_expiration = max(get_dht_time() + self.presence_ttl, self._presence_expiration + 0.01)
        await self._store("peers", presence.to_wire(), self._presence_expiration, subkey=self.peer_id)

    async def republish(self) -> None:
        """Publish the last presence again (fresh expiration) and reload the view: partition healing calls this
        when lost DHT peers answer again, so the swarm sees us, and we it, before the next heartbeat."""
        if self._last_presence is None:
            return
        await self.publish_presence(*self._last_presence)
        await self.refresh_view()

    async def withdraw(self) -> None:
        """Leave: replace our presence and ready records with 'left'/'done' ones, so peers drop us at
        their next view refresh instead of when the TTL runs out (and stop asking us to pair)."""
        self._presence_expiration += 1.0
        self._last_presence = None  # nothing to re-publish once we left
        left = Presence.departure(self.manifest_hash)
        await asyncio.gather(
            self._store("peers", left.to_wire(), self._presence_expiration, subkey=self.peer_id),
            self.withdraw_ready(WITHDRAWN_ROUND),
        )

    async def refresh_view(self) -> dict[str, PeerRecord]:
        """Reload the live view; if the DHT does not answer, keep the last view minus expired peers."""
        now = get_dht_time()
        try:
            entries = await self.client.fetch_entries(self.keys["peers"])
        except DHTUnavailable as error:
            logger.warning("%s; keeping the last live view", error)
            expired = {peer for peer, record in self.live.items() if record.expiration <= now}
            self.live = {peer: record for peer, record in self.live.items() if peer not in expired}
            if expired:
                self.on_view_change(set(), expired)
            return self.live
        live, departed = {}, set()
        for entry in entries:
            presence: Presence | None = self._parse(entry, Presence, now)
            if presence is None or presence.manifest != self.manifest_hash:
                continue
            if presence.left:
                departed.add(entry.subkey)
                continue
            round_ = presence.round if presence.round is not None else UNKNOWN_ROUND
            live[entry.subkey] = PeerRecord(entry.subkey, round_, presence.eval_loss, entry.expiration, presence.maddrs)
        joined, left = live.keys() - self.live.keys(), self.live.keys() - live.keys()
        self.live, self.departed = live, departed
        if self._first_look is None:
            self._first_look = now
        arriving = now - self._first_look > VIEW_STARTUP_GRACE  # else: already there when we came
        for peer in joined:
            self.live_since[peer] = now if arriving else 0.0
        if len(self.live_since) > MAX_REMEMBERED_PEERS:  # bounded whatever the DHT says: forget departed peers first
            for peer in [p for p in self.live_since if p not in live][: len(self.live_since) - MAX_REMEMBERED_PEERS]:
                del self.live_since[peer]
        if joined or left:
            self.on_view_change(set(joined), set(left))
        return live

    async def announce_ready(self, round_: int, ttl: float) -> None:
        # must expire after the last record we stored there, or the DHT keeps the old one
        self._ready_expiration = max(get_dht_time() + ttl, self._ready_expiration + 0.01)
        await self._store("ready", Ready(round_, self.manifest_hash).to_wire(), self._ready_expiration,
                          subkey=self.peer_id)

    async def withdraw_ready(self, round_: int) -> None:
        """Mark our ready record done, so peers stop asking us until the next round boundary.

        A DHT subkey is only replaced by a record that expires later, hence the small offset.
        """
        self._ready_expiration = expiration = self._ready_expiration + 0.5
        value = Ready(round_, self.manifest_hash, done=True).to_wire()
        await self._store("ready", value, expiration, subkey=self.peer_id)

    async def ready_peers(self) -> dict[str, int]:
        """Peers currently waiting for a partner, with the round they finished ({} if the DHT is slow)."""
        try:
            entries = await self.client.fetch_entries(self.keys["ready"])
        except DHTUnavailable as error:
            logger.info("%s", error)
            return {}
        ready = {}
        now = get_dht_time()
        for entry in entries:
            record: Ready | None = self._parse(entry, Ready, now)
            if record is not None and not record.done and record.manifest == self.manifest_hash:
                ready[entry.subkey] = record.round
        return ready
