"""Owner-signed DHT records: the hivemind record validator every gossiptrain DHT node runs (SPEC.md §15).

Every record the swarm stores is a dictionary entry whose subkey is its signer's peer id. The
signer (an Ed25519 libp2p identity, node/net/identity.py: the peer id embeds the public key)
signs the key, the subkey, the expiration and the value bytes; the stored bytes are the envelope
``{"k": key text, "v": value bytes, "s": signature}`` (protocol/records.py ``pack_entry``).

hivemind hands a validator the *hashed* key (DHTID bytes), so the envelope names its key in
clear text: the validator checks that the text hashes to the key it is stored under, and learns
from it the record's kind (``parse_key``), hence its schema, size limit and longest lifetime.
Refused: plain (non-dictionary) values, subkeys that are not Ed25519 peer ids, a signature that
is not the subkey owner's, a key that does not hash to the record's key or names no kind, a value
over its kind's size or failing its schema, an expiration beyond now + the kind's TTL + slack
(by this validator's clock). hivemind calls ``validate`` when a peer asks to store a record and
on every record a peer returns to a get, so every read re-checks; a record that passed once is
remembered (by a digest of its exact bytes) so the re-check of an unchanged record skips the
signature and schema work.

A node signs only what it stores under its own subkey, and only under keys it announced with
``note_key`` (hivemind's ``sign_value`` sees the hashed key too): `DHTClient.store` does that.
A read-only client (status, doctor) runs the validator without an identity: it checks, never signs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from protocol.records import (
    EXPIRATION_SLACK,
    KIND_RULES,
    RECORD_REFUSALS,
    InvalidRecord,
    RecordKey,
    check_entry,
    check_peer_id,
    decode_value,
    entry_signing_bytes,
    pack_entry,
    parse_key,
    unpack_entry,
)

from node.net import identity as ident

logger = logging.getLogger(__name__)

PLAIN_VALUE_TAGS = (msgpack.packb(None), b"")  # hivemind's subkey tags of a regular value / a whole dictionary
_UNSIGNED = msgpack.packb(None)  # what strip_value gives for bytes that are not a signed entry
MAX_REMEMBERED = 8192  # records known valid, and key names this node signs under


class RecordRefused(InvalidRecord):
    """A record the validator refuses, with `reason`: one of RECORD_REFUSALS (a metric label, never record text)."""

    def __init__(self, reason: str, error: InvalidRecord | str) -> None:
        super().__init__(str(error))
        self.reason = reason


def dht_key_id(key: str) -> bytes:
    """The DHT id hivemind stores `key` under (what a validator is given as DHTRecord.key)."""
    return DHTID.generate(source=key).to_bytes()


def _refusing(reason: str, check: Callable, *args):
    """check(*args); an InvalidRecord it raises becomes a RecordRefused with `reason`."""
    try:
        return check(*args)
    except RecordRefused:
        raise
    except InvalidRecord as error:
        raise RecordRefused(reason, error) from None


def _subkey(raw: bytes) -> str:
    try:
        subkey = msgpack.unpackb(raw, raw=False)
    except Exception as error:  # noqa: BLE001 - msgpack raises assorted errors on garbage
        raise InvalidRecord(f"undecodable subkey: {type(error).__name__}") from None
    return check_peer_id(subkey, "subkey")


class SignedRecordValidator(RecordValidatorBase):
    """Accepts only owner-signed, schema-valid, bounded-lifetime dictionary entries; signs this node's own."""

    REASONS: ClassVar[tuple[str, ...]] = RECORD_REFUSALS

    def __init__(self, identity: ident.Identity | None = None, clock: Callable[[], float] = get_dht_time,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.identity = identity
        # called with the reason (one of RECORD_REFUSALS) of every refusal: the node's metric
        # (gossiptrain_records_refused_total{reason}); settable after construction (the metrics come later)
        self.on_refused = on_refused
        self.peer_id = identity.peer_id if identity is not None else None
        self.clock = clock
        self._names: dict[bytes, str] = {}  # DHT id -> key text, for keys this node signs under
        self._valid: set[bytes] = set()  # digests of records that passed every check
        self._keys: dict[str, object] = {}  # peer id -> its Ed25519 public key (None: not one)
        self.refused: Counter[str] = Counter()  # why records were refused (tests, debugging): first words of the error
        self.refusals: Counter[str] = Counter()  # the same, by reason (RECORD_REFUSALS)
        self._own: set[bytes] = set()  # digests of the values this node's own stores produced
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ signing (this node's own records)
    def note_key(self, key: str) -> None:
        """This node is about to store under `key`: remember its text, so `sign_value` can name it."""
        if len(self._names) >= MAX_REMEMBERED:
            self._names.clear()
        self._names[dht_key_id(key)] = key

    def sign_value(self, record: DHTRecord) -> bytes:
        value = self._sign(record)
        if len(self._own) >= MAX_REMEMBERED:
            self._own.clear()
        self._own.add(hashlib.blake2b(value, digest_size=16).digest())
        return value

    def _sign(self, record: DHTRecord) -> bytes:
        key = self._names.get(record.key)
        if self.identity is None or key is None or record.subkey in PLAIN_VALUE_TAGS:
            return record.value  # not ours to sign: stays unsigned, and every validator refuses it
        try:
            subkey = _subkey(record.subkey)
        except InvalidRecord:
            return record.value
        if subkey != self.peer_id:
            return record.value
        signature = self.identity.sign(entry_signing_bytes(key, subkey, record.expiration_time, record.value))
        return pack_entry(key, record.value, signature)

    def strip_value(self, record: DHTRecord) -> bytes:
        try:
            return unpack_entry(record.value)[1]
        except InvalidRecord:
            return _UNSIGNED  # never reached for a validated record; None is what a reader then sees

    # ------------------------------------------------------------------ checking (every record, every read)
    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except RecordRefused as error:
            self.refusals[error.reason] += 1
            if self.on_refused is not None:
                try:
                    self.on_refused(error.reason)
                except Exception:  # noqa: BLE001 - counting must never turn a refusal into a hivemind RPC error
                    logger.exception("counting a refused DHT record failed")
            reason = str(error)
            self.refused[reason.split(":")[0][:60]] += 1
            own = hashlib.blake2b(record.value, digest_size=16).digest() in self._own
            if own and reason not in self._warned:  # a record this node stored itself refused: a bug, say it once
                self._warned.add(reason)
                logger.warning("own DHT record refused by the record validator: %s", reason)
            else:
                logger.debug("DHT record refused: %s", reason)
            return False
        return True

    def check(self, record: DHTRecord) -> RecordKey:
        """The record's parsed key if it may be stored and used; RecordRefused (an InvalidRecord) naming why not."""
        if record.subkey in PLAIN_VALUE_TAGS:
            raise RecordRefused("plain_value", "plain value: only signed dictionary entries are stored")
        signer = _refusing("subkey", _subkey, record.subkey)
        expiration = record.expiration_time
        if isinstance(expiration, bool) or not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
            raise RecordRefused("expiration", "expiration: not a finite number")
        key_text, value, signature = _refusing("envelope", unpack_entry, record.value)
        key = _refusing("key", parse_key, key_text)
        if dht_key_id(key_text) != record.key:
            raise RecordRefused("key_mismatch", f"key mismatch: the entry names {key_text[:80]!r}, stored under "
                                                "another key")
        rules = KIND_RULES[key.kind]
        if expiration > self.clock() + rules.ttl + EXPIRATION_SLACK:
            raise RecordRefused("lifetime", f"expiration: {expiration - self.clock():.0f}s ahead, a {key.kind} lives "
                                            f"at most {rules.ttl:.0f}s")
        if len(value) > rules.max_value_bytes:
            raise RecordRefused("oversized", f"oversized: a {key.kind} value is at most {rules.max_value_bytes} bytes")
        digest = hashlib.blake2b(b"".join((struct.pack(">d", float(expiration)), record.key, record.subkey,
                                           record.value)), digest_size=20).digest()
        if digest in self._valid:
            return key
        if not self._verify(signer, entry_signing_bytes(key_text, signer, expiration, value), signature):
            raise RecordRefused("signature", f"signature: not signed by the subkey's owner {signer[-8:]}")
        _refusing("schema", lambda: check_entry(key, signer, decode_value(value, rules.max_value_bytes)))
        if len(self._valid) >= MAX_REMEMBERED:
            self._valid.clear()
        self._valid.add(digest)
        return key

    def _verify(self, signer: str, message: bytes, signature: bytes) -> bool:
        public = self._keys.get(signer, ...)
        if public is ...:
            public = ident.public_key_of(signer)
            if len(self._keys) >= MAX_REMEMBERED:
                self._keys.clear()
            self._keys[signer] = public
        if public is None:
            return False
        try:
            public.verify(signature, message)
        except Exception:  # noqa: BLE001 - InvalidSignature, or a malformed signature
            return False
        return True

    @property
    def priority(self) -> int:
        return 10  # (the only validator; before any that would deserialize the value)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, SignedRecordValidator)  # one is enough


def signing_validator(dht: DHTNode | object) -> SignedRecordValidator | None:
    """The validator of a DHT node, if it is ours (test doubles and bare nodes have none)."""
    validator = getattr(getattr(dht, "protocol", None), "record_validator", None)
    return validator if isinstance(validator, SignedRecordValidator) else None
