"""A hostile DHT peer for tests: a bare hivemind P2P + DHTNode with throw-away keys, writing raw records.

It runs no gossiptrain record validator, so its own DHT node stores whatever it is told and serves it
to every get that reaches it; what it sends honest nodes to store is exactly what a hand-written
attacker could send. Its writes come in three flavours:

- ``raw``: hivemind's plain encoding, unsigned (plain values, or dictionary entries under any subkey);
- ``forged``: the signed-entry format of SPEC.md §15 under someone else's subkey, signed with its own key;
- ``own``: correctly signed under its own peer id (a Sybil member), with whatever content it likes.

These are the attacks measured on a validator-less swarm (issue 13): forged departures of every peer,
a forged run manifest, a plain value over the ready key, plain values with 10-year expirations over
the next commitment keys, and presences with rounds of 2**64 - 1 and 2**63; and, measured with owner-signed
records in place, receipts for honest peers' old rounds that no exchange produced (every honest committee
then met `no_state` and flagged the honest peer within 36 s).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from protocol.records import (
    MAX_RECEIPTS,
    Presence,
    commit_key,
    entry_signing_bytes,
    pack_entry,
    presence_key,
    receipts_key,
    votes_key,
)
from protocol.verification import (
    Attestation,
    Commitment,
    Receipt,
    Vote,
    audit_seed,
    committee_ranking,
    envelope,
    is_sampled,
    nonce_commitment,
    open_envelope,
    signing_bytes,
)

from node.bench.fuzz import STARTUP_TIMEOUT, dht_peer
from node.net.identity import Identity
from node.net.signed_records import dht_key_id

# dht_peer: node/bench/fuzz.py
__all__ = ["STARTUP_TIMEOUT", "Adversary", "ForgingSigner", "adversary", "dht_peer", "ground_identity"]

TEN_YEARS = 10 * 365 * 86400.0


class ForgingSigner(RecordValidatorBase):
    """Signs every entry it is handed (any subkey) with the adversary's own key; accepts everything."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.names: dict[bytes, str] = {}

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        key = self.names.get(record.key)
        subkey = msgpack.unpackb(record.subkey, raw=False) if record.subkey not in (b"", b"\xc0") else None
        if key is None or not isinstance(subkey, str):
            return record.value
        signature = self.identity.sign(entry_signing_bytes(key, subkey, record.expiration_time, record.value))
        return pack_entry(key, record.value, signature)


class Adversary:
    def __init__(self, p2p: P2P, dht: DHTNode, identity: Identity) -> None:
        self.p2p, self.dht, self.identity = p2p, dht, identity
        self.peer_id = identity.peer_id
        self.signer = ForgingSigner(identity)
        self.sybil_votes_cast = 0
        self._voted_on: set[tuple[str, int]] = set()  # audits already attacked
        self.stores = 0  # store calls made
        self.accepted = 0  # (key, subkey) stores some DHT node (possibly only its own) reported as done

    async def store(self, key: str, value: Any, expiration: float, subkey: str | None = None,
                    mode: str = "raw", as_identity: Identity | None = None) -> bool:
        """One write: `raw` (unsigned), `forged` (under any subkey, signed with its own key) or `own` (its subkey;
        `as_identity`: another identity of the attacker's, a Sybil, under that one's subkey and signature)."""
        self.signer.identity = as_identity or self.identity
        if mode == "own":
            subkey = self.signer.identity.peer_id
        self.signer.names[dht_key_id(key)] = key
        self.dht.protocol.record_validator = None if mode == "raw" else self.signer
        try:
            ok = bool(await asyncio.wait_for(self.dht.store(key, value, expiration, subkey=subkey), 10))
        except Exception:  # noqa: BLE001 - honest nodes may refuse or drop it: that is the point
            ok = False
        finally:
            self.dht.protocol.record_validator = None
        self.stores += 1
        self.accepted += ok
        return ok

    async def store_many(self, keys: list[str], value: Any, expiration: float) -> None:
        """Plain (unsigned, no subkey) values under many keys at once."""
        self.dht.protocol.record_validator = None
        try:
            await asyncio.wait_for(self.dht.store_many(keys, [value] * len(keys), expiration), 30)
        except Exception:  # noqa: BLE001 - see store
            pass
        self.stores += len(keys)

    # ------------------------------------------------------------------ the measured attacks
    async def forge_departures(self, run_id: str, victims: list[str], manifest: str) -> None:
        """`{"left": true}` under every victim's presence subkey, with a later expiration than theirs."""
        left = Presence.departure(manifest).to_wire()
        expiration = get_dht_time() + 3600
        for victim in victims:
            for mode in ("raw", "forged"):
                await self.store(f"{run_id}.peers", left, expiration, subkey=victim, mode=mode)

    async def forge_manifest(self, run_id: str, victims: list[str], fake: str) -> None:
        """A plain `{run}.manifest` value (10 years) and presences with a fake manifest under the victims' subkeys."""
        await self.store(f"{run_id}.manifest", fake, get_dht_time() + TEN_YEARS)
        body = Presence(fake, 1, None, ("/ip4/127.0.0.1/tcp/9",)).to_wire()
        for victim in victims:
            for mode in ("raw", "forged"):
                await self.store(f"{run_id}.peers", body, get_dht_time() + 3600, subkey=victim, mode=mode)

    async def plain_ready(self, run_id: str) -> None:
        await self.store(f"{run_id}.ready", "not a dictionary", get_dht_time() + TEN_YEARS)

    async def block_commitments(self, run_id: str, first_round: int, count: int = 300) -> None:
        """Plain values with 10-year expirations over the next `count` commitment keys."""
        keys = [f"{run_id}.commit.{r}" for r in range(first_round, first_round + count)]
        await self.store_many(keys, "blocked", get_dht_time() + TEN_YEARS)

    async def absurd_rounds(self, run_id: str, manifest: str, victims: list[str]) -> None:
        """Presences with rounds 2**64 - 1 and 2**63 (its own, signed; and forged under the victims' subkeys),
        then its own with 2**63 - 1 (schema-valid: a live Sybil far ahead of everyone)."""
        for round_ in (2**64 - 1, 2**63):
            body = {**Presence(manifest, 0, None, ("/ip4/127.0.0.1/tcp/9",)).to_wire(), "round": round_}
            await self.store(f"{run_id}.peers", body, get_dht_time() + 60, mode="own")
            for victim in victims:
                await self.store(f"{run_id}.peers", body, get_dht_time() + 60, subkey=victim, mode="forged")
        body = Presence(manifest, 2**63 - 1, None, ("/ip4/127.0.0.1/tcp/9",)).to_wire()
        await self.store(f"{run_id}.peers", body, get_dht_time() + 60, mode="own")


    async def sybil_votes(self, run_id: str, rate: float, limit: int = 4) -> int:
        """Reject votes on honest peers' genuine audits by fresh keys ground to rank first and second for each
        audit's (public) seed: the committee capture measured before voters needed to be live before the audited
        exchange. Returns the votes stored this call."""
        try:
            audits = await asyncio.wait_for(self.dht.get(receipts_key(run_id), latest=True), 10)
            peers = await asyncio.wait_for(self.dht.get(presence_key(run_id), latest=True), 10)
        except Exception:  # noqa: BLE001 - nothing to attack this time
            return 0
        live = [p for p in (peers.value if peers is not None and isinstance(peers.value, dict) else {}) if p != self.peer_id]
        cast = 0
        for receiver, entry in (audits.value if audits is not None and isinstance(audits.value, dict) else {}).items():
            if receiver == self.peer_id or cast >= limit:
                continue
            try:
                blobs = _signed_value(entry.value)
            except Exception:  # noqa: BLE001 - not a receipts entry
                continue
            for blob in blobs if isinstance(blobs, list) else []:
                try:
                    receipt, _ = open_envelope(blob, Receipt)
                    found = await asyncio.wait_for(self.dht.get(commit_key(run_id, receipt.round), latest=True), 10)
                    commitment, _ = open_envelope(_signed_value(found.value[receipt.sender].value), Commitment)
                except Exception:  # noqa: BLE001 - unreadable: skip it
                    continue
                seed = audit_seed(run_id, receipt.sender, receipt.round, commitment.digest(), receipt.lottery_nonce())
                if not is_sampled(seed, rate) or (receipt.sender, receipt.round) in self._voted_on:
                    continue
                self._voted_on.add((receipt.sender, receipt.round))
                rivals = [p for p in live if p != receipt.sender]
                for place in range(2):
                    key = ground_identity(seed, receipt.sender, rivals, place + 1)
                    rivals.append(key.peer_id)
                    vote = Vote(run_id, receipt.sender, receipt.round, key.peer_id, "reject", "sybil", 1.0, 9.0, 9.0)
                    if await self.store(votes_key(run_id, receipt.sender, receipt.round),
                                        envelope(vote, key.sign(signing_bytes(vote))), get_dht_time() + 600,
                                        mode="own", as_identity=key):
                        cast += 1
                if cast >= limit:
                    break
        self.sybil_votes_cast += cast
        return cast

    async def forge_receipts(self, run_id: str, victims: list[str], rounds: list[int], rate: float) -> int:
        """Receipts as if this adversary had received each victim's θ of each of `rounds`: the digest copied from
        the victim's public commitment, the nonce ground until the audit lottery draws it, signed by the adversary
        as receiver (its own subkey of {run}.audits, so the DHT takes it: one store, at most MAX_RECEIPTS), the
        sender's attestation signed by the adversary too (it has no other). Returns how many it stored."""
        blobs = []
        for round_ in rounds:
            blobs += await self._forged_receipts(run_id, victims, round_, rate)
        blobs = blobs[:MAX_RECEIPTS]
        if blobs:
            await self.store(receipts_key(run_id), blobs, get_dht_time() + 600, mode="own")
        return len(blobs)

    async def _forged_receipts(self, run_id: str, victims: list[str], round_: int, rate: float) -> list[bytes]:
        try:
            found = await asyncio.wait_for(self.dht.get(commit_key(run_id, round_), latest=True), 10)
        except Exception:  # noqa: BLE001 - nothing to forge from this time
            return []
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        blobs = []
        for victim in victims:
            try:
                commitment, _ = open_envelope(_signed_value(entries[victim].value), Commitment)
            except Exception:  # noqa: BLE001 - no (readable) commitment of this victim for that round
                continue
            for grind in range(10_000):
                nonce = f"{grind:032x}"
                attested = Attestation(run_id, victim, self.peer_id, round_, commitment.theta_digest, get_dht_time(),
                                       nonce_commitment(bytes.fromhex(nonce)))
                receipt = Receipt(run_id, victim, self.peer_id, round_, commitment.theta_digest, nonce,
                                  attested.time, self.identity.sign(signing_bytes(attested)))
                if is_sampled(audit_seed(run_id, victim, round_, commitment.digest(), receipt.lottery_nonce()), rate):
                    break
            blobs.append(envelope(receipt, self.identity.sign(signing_bytes(receipt))))
        return blobs


def ground_identity(seed: bytes, audited: str, rivals: list[str], top: int) -> Identity:
    """A fresh identity ranking within the first `top` of an audit's committee order (a few tries): what an
    attacker who knows an audit's seed does."""
    for _ in range(10_000):
        key = Identity.generate()
        if committee_ranking(seed, [*rivals, key.peer_id], audited).index(key.peer_id) < top:
            return key
    raise RuntimeError("no identity ranked")


def _signed_value(stored: Any) -> Any:
    """The value inside a signed DHT entry, as a DHT node without a record validator returns it."""
    entry = msgpack.unpackb(stored, raw=False) if isinstance(stored, bytes) else stored
    return msgpack.unpackb(entry["v"], raw=False)


@contextlib.asynccontextmanager
async def adversary(initial_peers: list[str], key_dir: Path) -> AsyncIterator[Adversary]:
    """An Adversary joined to the swarm through `initial_peers` (no record validator), shut down on exit."""
    async with dht_peer(initial_peers, key_dir) as (identity, p2p, dht):
        yield Adversary(p2p, dht, identity)
