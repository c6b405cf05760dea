"""The DHT client every part of a node (and `gossiptrain status`) reads and writes hivemind's DHT through.

Every get and store is bounded by a timeout: a frozen neighbour must not hold a heartbeat,
a round or a status query. A read that did not complete is `DHTUnavailable` (the answer is
unknown, which is not the same as empty); a store that did not complete is False (logged),
to be retried by the caller's next heartbeat or round.

Every record is a signed dictionary entry under this node's own subkey (node/net/signed_records.py):
`store` names the key to the node's record validator, so it can sign the entry, and keeps the
expiration within the record kind's longest lifetime, which every validator enforces.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from protocol.records import KIND_RULES, InvalidRecord, parse_key

from node.net.signed_records import signing_validator

logger = logging.getLogger(__name__)

DHT_TIMEOUT = 5.0  # one DHT get/store of a node


class DHTUnavailable(RuntimeError):
    """A DHT read did not complete in time (or failed): the answer is unknown, not empty."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"DHT get {key} {reason}")
        self.key, self.reason = key, reason  # reason: "timed out after 5s", "failed: ..."


@dataclass(frozen=True)
class Entry:
    """One subkey of a dictionary value, as hivemind returned it: nothing in it is checked yet."""

    subkey: Any
    value: Any
    expiration: float


def entries(found: Any) -> list[Entry]:
    """The subkey entries of a fetched dictionary value ([] if nothing is stored or it is not a dictionary)."""
    if not isinstance(found, dict):
        return []
    result = []
    for subkey, item in found.items():
        expiration = getattr(item, "expiration_time", None)
        if isinstance(expiration, (int, float)) and not isinstance(expiration, bool):
            result.append(Entry(subkey, getattr(item, "value", None), float(expiration)))
    return result


class DHTClient:
    """Bounded get/store on a hivemind DHT node (a member's or a status client's)."""

    def __init__(self, dht: DHTNode, timeout: float = DHT_TIMEOUT) -> None:
        self.dht = dht
        self.timeout = timeout

    async def fetch(self, key: str) -> Any:
        """The latest value under `key` (None: nothing stored); DHTUnavailable when the DHT did not answer."""
        try:
            found = await asyncio.wait_for(self.dht.get(key, latest=True), self.timeout)
        except TimeoutError:
            raise DHTUnavailable(key, f"timed out after {self.timeout:.0f}s") from None
        except Exception as error:  # noqa: BLE001 - hivemind raises assorted errors on broken peers
            raise DHTUnavailable(key, f"failed: {error}") from error
        return None if found is None else found.value

    async def fetch_entries(self, key: str) -> list[Entry]:
        """The subkey entries under a dictionary key ([] if none); DHTUnavailable when the DHT did not answer."""
        return entries(await self.fetch(key))

    async def store(self, key: str, value: Any, expiration: float, subkey: Any = None) -> bool:
        """Store under `key` (a subkey of it if given); False (logged) if it failed or timed out.

        Only an entry under this node's own peer id as subkey can be signed, hence stored."""
        validator = signing_validator(self.dht)
        if validator is not None:
            validator.note_key(key)
            try:
                expiration = min(expiration, get_dht_time() + KIND_RULES[parse_key(key).kind].ttl)
            except InvalidRecord:
                pass  # no record kind lives there: every validator refuses it
        try:
            stored = bool(await asyncio.wait_for(self.dht.store(key, value, expiration, subkey=subkey), self.timeout))
        except Exception as error:  # noqa: BLE001 - a failed store is retried on the next heartbeat/round
            logger.warning("DHT store %s failed: %s", key, str(error) or type(error).__name__)
            return False
        if not stored and subkey is not None:
            # hivemind reports the answer of whichever replica replied last: one hostile (or stale) DHT node
            # refusing is enough for False although the honest replicas hold the record. Read it back.
            stored = await self._readable(key, subkey, value, expiration)
        return stored

    async def _readable(self, key: str, subkey: Any, value: Any, expiration: float) -> bool:
        """Does a (validated) read of `key` return exactly this entry?"""
        try:
            found = await self.fetch_entries(key)
        except DHTUnavailable:
            return False
        return any(e.subkey == subkey and e.expiration == expiration and e.value == value for e in found)
