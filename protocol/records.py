"""What a node publishes about itself (SPEC.md §14): one schema per record kind; pure data, no torch, no network.

Kinds:

- ``Presence`` (DHT ``{run}.peers``, subkey: the publisher's peer id): addresses, round,
  manifest, held-out loss and a ``Report`` of what ``gossiptrain status`` shows; or, when
  the node leaves cleanly, a departure (``left``).
- ``Ready`` (DHT ``{run}.ready``, subkey: the publisher's peer id): "my round r is done, pair
  with me", or ``done`` once the node is no longer waiting.
- ``NodeStatus`` (``node.json`` in the work dir): where the node is and how it is doing,
  read by the launcher, the health check and peers files (a shared volume: also hostile).

Every DHT record is a signed dictionary entry (SPEC.md §15): its subkey is its signer's peer
id, and the signed envelope names the key it belongs to, so a validator that only sees the
hashed key still knows the record's kind (``parse_key``), its longest lifetime and size
(``KIND_RULES``) and its schema (``check_entry``). The swarm's run manifest is what its live
members' signed presence records agree on (``agreed_manifest``).

Each kind is a frozen dataclass with ``KIND``, ``to_wire()`` (exactly what is stored) and
``from_wire(body, strict=False)``. Parsing treats every field as hostile: a record that is
not a map, is too large, or whose deciding fields are malformed raises ``InvalidRecord``
(the caller skips and counts it). An optional field that is missing, ``None`` or malformed
takes its default (``None``, empty) -- one set of defaults for every reader -- unless
``strict``, where a present malformed field also raises (what a DHT-level validator wants).
Malformed entries of a list or map field are dropped (leniently) one by one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from protocol.errors import InvalidField
from protocol.fields import MAX_STR_CHARS, MAX_U63
from protocol.verification import MAX_RECORD_BYTES, Commitment, Receipt, Vote, open_envelope

__all__ = [
    "InvalidRecord",
    "MAX_RECORD_FIELDS",
    "MAX_PEER_ID_CHARS",
    "MAX_ADDRESSES",
    "MAX_FLAGGED",
    "MAX_EXCHANGE_RESULTS",
    "MAX_STATUS_BYTES",
    "NODE_STATES",
    "WITHDRAWN_ROUND",
    "check_peer_id",
    "LastExchange",
    "Report",
    "Presence",
    "Ready",
    "NodeStatus",
    "RECORD_KINDS",
    "validate",
    "MAX_ROUND",
    "ENTRY_DOMAIN",
    "EXPIRATION_SLACK",
    "MAX_KEY_CHARS",
    "MAX_ENTRY_BYTES",
    "MAX_RECEIPTS",
    "KindRules",
    "KIND_RULES",
    "RECORD_REFUSALS",
    "RecordKey",
    "presence_key",
    "ready_key",
    "commit_key",
    "receipts_key",
    "votes_key",
    "parse_key",
    "decode_value",
    "check_entry",
    "entry_signing_bytes",
    "pack_entry",
    "unpack_entry",
    "agreed_manifest",
]

MAX_RECORD_FIELDS = 64  # top-level keys of one record (ours have at most 16; unknown keys are ignored)
MAX_PEER_ID_CHARS = 128  # a base58 libp2p peer id is about 52
MAX_ADDRESSES = 32  # multiaddrs in one record
MAX_FLAGGED = 32  # flagged peer ids carried in a presence record
MAX_EXCHANGE_RESULTS = 32  # distinct exchange results counted in a presence record
MAX_LABEL_CHARS = 64  # an exchange result, a version, a node state
MAX_PATH_CHARS = 4096  # node.json: the work dir, the start detail
MAX_STATUS_BYTES = 64 * 1024  # node.json, read as a whole
NODE_STATES = ("joining", "running", "stopped")
WITHDRAWN_ROUND = -1  # the round of a `done` ready record written when a node leaves
_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")

T = TypeVar("T")


class InvalidRecord(InvalidField):
    """A presence or ready record (or a node.json) is malformed or too large: skipped and counted, never used."""

    kind = "record"


# ----------------------------------------------------------------------------- field checkers
# Each returns the (normalised) value or raises InvalidRecord naming the field. bool is never a number.

def _text(name: str, value: Any, limit: int = MAX_STR_CHARS) -> str:
    """A printable string (no control characters: status prints it to a terminal) of at most `limit` characters."""
    if not isinstance(value, str):
        raise InvalidRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    if len(value) > limit or not value.isprintable():
        raise InvalidRecord(f"field '{name}' must be printable and at most {limit} characters")
    return value


def check_peer_id(value: Any, name: str = "peer_id") -> str:
    """A peer id: 1..128 base58 characters (a DHT subkey, a partner, a flagged peer)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PEER_ID_CHARS or not _BASE58.issuperset(value):
        raise InvalidRecord(f"field '{name}' must be a peer id (1..{MAX_PEER_ID_CHARS} base58 characters)")
    return value


def _maddr(name: str, value: Any) -> str:
    value = _text(name, value)
    if not value.startswith("/"):
        raise InvalidRecord(f"field '{name}' must be a multiaddr (starts with '/')")
    return value


def _int(name: str, value: Any, low: int = 0, high: int = MAX_U63) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRecord(f"field '{name}' must be an integer in {low}..{high}")
    return value


def _number(name: str, value: Any) -> float:
    """Any number, NaN and infinities included (a diverged loss is news, not garbage)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRecord(f"field '{name}' must be a number, got {type(value).__name__}")
    return float(value)


def _finite(name: str, value: Any, low: float = -math.inf) -> float:
    number = _number(name, value)
    if not math.isfinite(number) or number < low:
        raise InvalidRecord(f"field '{name}' must be a finite number >= {low}")
    return number


def _fraction(name: str, value: Any) -> float:
    number = _finite(name, value, 0.0)
    if number > 1.0:
        raise InvalidRecord(f"field '{name}' must be a fraction in 0..1")
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRecord(f"field '{name}' must be a boolean, got {type(value).__name__}")
    return value


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if _text(name, value, MAX_LABEL_CHARS) not in choices:
            raise InvalidRecord(f"field '{name}' must be one of {choices}")
        return value
    return check


def _list(name: str, value: Any, limit: int, item: Callable[[str, Any], T], strict: bool) -> tuple[T, ...]:
    """At most `limit` entries; a malformed entry raises if strict, else is dropped."""
    if not isinstance(value, (list, tuple)) or len(value) > limit:
        raise InvalidRecord(f"field '{name}' must be a list of at most {limit} entries")
    result = []
    for index, entry in enumerate(value):
        try:
            result.append(item(f"{name}[{index}]", entry))
        except InvalidRecord:
            if strict:
                raise
    return tuple(result)


def _counts(name: str, value: Any, strict: bool) -> dict[str, int]:
    """{label: count}, at most MAX_EXCHANGE_RESULTS entries; a malformed entry raises if strict, else is dropped."""
    if not isinstance(value, dict) or len(value) > MAX_EXCHANGE_RESULTS:
        raise InvalidRecord(f"field '{name}' must be a map of at most {MAX_EXCHANGE_RESULTS} entries")
    result = {}
    for label, count in value.items():
        try:
            result[_text(f"{name} key", label, MAX_LABEL_CHARS)] = _int(f"{name}[{label!r:.40}]", count)
        except InvalidRecord:
            if strict:
                raise
    return result


def _map(body: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRecord(f"{what} must be a map, got {type(body).__name__}")
    if len(body) > MAX_RECORD_FIELDS:
        raise InvalidRecord(f"{what} has {len(body)} fields, the limit is {MAX_RECORD_FIELDS}")
    return body


def _optional(body: Mapping[str, Any], name: str, check: Callable[[str, Any], T], strict: bool,
              default: Any = None) -> Any:
    """The checked field; `default` when it is missing or None, or (unless strict) malformed."""
    value = body.get(name)
    if value is None:
        return default
    try:
        return check(name, value)
    except InvalidRecord:
        if strict:
            raise
        return default


# ----------------------------------------------------------------------------- presence
@dataclass(frozen=True)
class LastExchange:
    """The last partner update this node applied: when (its wall clock) and from whom."""

    time: float | None
    partner: str | None

    def to_wire(self) -> dict[str, Any]:
        return {"time": self.time, "partner": self.partner}

    @classmethod
    def from_wire(cls, body: Any, strict: bool = False) -> LastExchange:
        body = _map(body, "last_exchange")
        return cls(time=_optional(body, "time", _finite, strict),
                   partner=_optional(body, "partner", lambda n, v: check_peer_id(v, n), strict))


@dataclass(frozen=True)
class Report:
    """What `gossiptrain status` and `doctor` read from a presence record besides round and eval loss.

    Flat on the wire (its fields are top-level keys of the presence record)."""

    time: float | None = None  # the publisher's wall clock when it published: doctor estimates clock skew from it
    version: str | None = None
    started: float | None = None  # wall clock when the node started
    rounds_done: int | None = None
    train_loss: float | None = None
    tokens_per_second: float | None = None
    utilisation: float | None = None  # share of wall time spent in inner steps, 0..1
    last_exchange: LastExchange | None = None
    exchanges: Mapping[str, int] = field(default_factory=dict)  # exchange result -> count
    flagged: tuple[str, ...] = ()  # peers this node has flagged (at most MAX_FLAGGED)

    def to_wire(self) -> dict[str, Any]:
        return {
            "time": self.time, "version": self.version, "started": self.started, "rounds_done": self.rounds_done,
            "train_loss": self.train_loss, "tokens_per_second": self.tokens_per_second,
            "utilisation": self.utilisation,
            "last_exchange": self.last_exchange.to_wire() if self.last_exchange is not None else None,
            "exchanges": dict(self.exchanges), "flagged": list(self.flagged[:MAX_FLAGGED]),
        }

    @classmethod
    def from_wire(cls, body: Any, strict: bool = False) -> Report:
        body = _map(body, "presence record")
        return cls(
            time=_optional(body, "time", _finite, strict),
            version=_optional(body, "version", lambda n, v: _text(n, v, MAX_LABEL_CHARS), strict),
            started=_optional(body, "started", _finite, strict),
            rounds_done=_optional(body, "rounds_done", _int, strict),
            train_loss=_optional(body, "train_loss", _number, strict),
            tokens_per_second=_optional(body, "tokens_per_second", lambda n, v: _finite(n, v, 0.0), strict),
            utilisation=_optional(body, "utilisation", _fraction, strict),
            last_exchange=_optional(body, "last_exchange", lambda n, v: LastExchange.from_wire(v, strict), strict),
            exchanges=_optional(body, "exchanges", lambda n, v: _counts(n, v, strict), strict, {}),
            flagged=_optional(body, "flagged", lambda n, v: _list(n, v, MAX_FLAGGED, _peer_item, strict), strict, ()),
        )


def _peer_item(name: str, value: Any) -> str:
    return check_peer_id(value, name)


@dataclass(frozen=True)
class Presence:
    """A member's presence under `{run}.peers` (subkey: its peer id), refreshed every heartbeat.

    A departure (`left`) carries the manifest only: peers drop the node at their next view refresh."""

    KIND: ClassVar[str] = "presence"
    manifest: str | None
    round: int | None = None  # None: unknown (missing or malformed)
    eval_loss: float | None = None
    maddrs: tuple[str, ...] = ()
    report: Report = field(default_factory=Report)
    left: bool = False

    @classmethod
    def departure(cls, manifest: str) -> Presence:
        return cls(manifest=manifest, left=True)

    def to_wire(self) -> dict[str, Any]:
        if self.left:
            return {"manifest": self.manifest, "left": True}
        return {**self.report.to_wire(), "round": self.round, "manifest": self.manifest, "eval_loss": self.eval_loss,
                "maddrs": list(self.maddrs)}

    @classmethod
    def from_wire(cls, body: Any, strict: bool = False) -> Presence:
        body = _map(body, "presence record")
        left = body.get("left")
        if left is not None and not isinstance(left, bool):  # deciding: live or gone cannot be guessed
            raise InvalidRecord("field 'left' must be a boolean")
        manifest = _optional(body, "manifest", _text, strict)
        if left:
            return cls.departure(manifest)
        return cls(
            manifest=manifest,
            round=_optional(body, "round", _int, strict),
            eval_loss=_optional(body, "eval_loss", _number, strict),
            maddrs=_optional(body, "maddrs", lambda n, v: _list(n, v, MAX_ADDRESSES, _maddr, strict), strict, ()),
            report=Report.from_wire(body, strict),
        )


# ----------------------------------------------------------------------------- ready
@dataclass(frozen=True)
class Ready:
    """`{run}.ready` (subkey: peer id): the round a node finished and waits to pair at, or `done` when it no
    longer waits (WITHDRAWN_ROUND when it left). Every field decides pairing, so any malformed one rejects it."""

    KIND: ClassVar[str] = "ready"
    round: int
    manifest: str
    done: bool = False

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"round": self.round, "manifest": self.manifest}
        if self.done:
            body["done"] = True
        return body

    @classmethod
    def from_wire(cls, body: Any, strict: bool = False) -> Ready:
        body = _map(body, "ready record")
        done = _bool("done", body["done"]) if body.get("done") is not None else False
        round_ = _int("round", body.get("round"), WITHDRAWN_ROUND if done else 0)
        return cls(round=round_, manifest=_text("manifest", body.get("manifest")), done=done)


# ----------------------------------------------------------------------------- node.json
@dataclass(frozen=True)
class NodeStatus:
    """A node's `node.json`: rewritten (atomically) whenever its state changes; read by other processes."""

    KIND: ClassVar[str] = "node_status"
    status: str | None  # one of NODE_STATES; None: missing or malformed
    peer_id: str | None = None
    maddrs: tuple[str, ...] = ()
    pid: int | None = None  # > 0: 0 and negative pids address process groups
    metrics_port: int | None = None  # None: metrics disabled
    hostname: str | None = None
    pid_namespace: int | None = None
    work_dir: str | None = None
    run_id: str | None = None
    manifest: str | None = None
    parameters: int | None = None
    start: str | None = None  # resumed / synced / fresh (node.join.plan.StartMode)
    start_detail: str | None = None
    round: int | None = None
    initial_eval_loss: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status, "peer_id": self.peer_id, "maddrs": list(self.maddrs), "pid": self.pid,
            "metrics_port": self.metrics_port, "hostname": self.hostname, "pid_namespace": self.pid_namespace,
            "work_dir": self.work_dir, "run_id": self.run_id, "manifest": self.manifest,
            "parameters": self.parameters, "start": self.start, "start_detail": self.start_detail,
            "round": self.round, "initial_eval_loss": self.initial_eval_loss,
        }

    @classmethod
    def from_wire(cls, body: Any, strict: bool = False) -> NodeStatus:
        body = _map(body, "node status")

        def text(limit: int) -> Callable[[str, Any], str]:
            return lambda n, v: _text(n, v, limit)

        return cls(
            status=_optional(body, "status", _one_of(NODE_STATES), strict),
            peer_id=_optional(body, "peer_id", lambda n, v: check_peer_id(v, n), strict),
            maddrs=_optional(body, "maddrs", lambda n, v: _list(n, v, MAX_ADDRESSES, _maddr, strict), strict, ()),
            pid=_optional(body, "pid", lambda n, v: _int(n, v, 1), strict),
            metrics_port=_optional(body, "metrics_port", lambda n, v: _int(n, v, 1, 65535), strict),
            hostname=_optional(body, "hostname", text(MAX_STR_CHARS), strict),
            pid_namespace=_optional(body, "pid_namespace", _int, strict),
            work_dir=_optional(body, "work_dir", text(MAX_PATH_CHARS), strict),
            run_id=_optional(body, "run_id", text(MAX_STR_CHARS), strict),
            manifest=_optional(body, "manifest", text(MAX_STR_CHARS), strict),
            parameters=_optional(body, "parameters", _int, strict),
            start=_optional(body, "start", text(MAX_LABEL_CHARS), strict),
            start_detail=_optional(body, "start_detail", text(MAX_PATH_CHARS), strict),
            round=_optional(body, "round", _int, strict),
            initial_eval_loss=_optional(body, "initial_eval_loss", _number, strict),
        )

    @classmethod
    def loads(cls, text: str | bytes, strict: bool = False) -> NodeStatus:
        """Parse a node.json's text; InvalidRecord if it is too large, not JSON (e.g. a partial copy) or no status."""
        if len(text) > MAX_STATUS_BYTES:
            raise InvalidRecord(f"node status is {len(text)} bytes, the limit is {MAX_STATUS_BYTES}")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise InvalidRecord(f"node status is not JSON: {error}") from None
        return cls.from_wire(body, strict)


# ----------------------------------------------------------------------------- registry
RECORD_KINDS: dict[str, type] = {cls.KIND: cls for cls in (Presence, Ready, NodeStatus)}


def validate(kind: str, body: Any) -> None:
    """Strict check of one record of `kind` (what a DHT-level validator accepts); InvalidRecord if malformed."""
    RECORD_KINDS[kind].from_wire(body, strict=True)


# ----------------------------------------------------------------------------- signed DHT entries (SPEC.md §15)
MAX_ROUND = MAX_U63  # rounds are u63 everywhere: on the wire, in records, in checkpoints
ENTRY_DOMAIN = b"gossiptrain/dht/1\n"  # prefix of the bytes an entry's signer signs
EXPIRATION_SLACK = 30.0  # seconds an expiration may exceed now + its kind's TTL (clock skew between peers)
MAX_KEY_CHARS = 512
MAX_ENTRY_BYTES = 32 * 1024  # a whole signed entry as stored (envelope: key, value, signature)
MAX_SIGNATURE_BYTES = 64  # Ed25519
MAX_RECEIPTS = 16  # receipts one receiver keeps published (its most recent ones)
MAX_VALUE_ITEMS = 1024  # entries of any list or map inside a value (a sketch has 128 numbers)
# Why a DHT-level record validator refuses a record, in the order it checks (node/net/signed_records.py): the
# reason labels of gossiptrain_records_refused_total, a fixed set (never text taken from the record itself).
RECORD_REFUSALS = ("plain_value", "subkey", "expiration", "envelope", "key", "key_mismatch", "lifetime", "oversized",
                   "signature", "schema")


@dataclass(frozen=True)
class KindRules:
    """What a validator allows for one kind of DHT record."""

    kind: str
    ttl: float  # the longest lifetime (expiration - now, by the validator's clock), before EXPIRATION_SLACK
    max_value_bytes: int  # the msgpack value (before the signature envelope)


# The TTLs bound what a node may configure (presence_ttl, sync_timeout, verify_record_ttl): a record is never
# locked in place for longer than this, and a node clamps its own expirations to it.
KIND_RULES: dict[str, KindRules] = {rules.kind: rules for rules in (
    KindRules("presence", 300.0, 24 * 1024),
    KindRules("ready", 300.0, 2 * 1024),
    KindRules("commitment", 7200.0, MAX_RECORD_BYTES + 16),
    KindRules("receipts", 7200.0, 24 * 1024),
    KindRules("vote", 7200.0, 4 * 1024),
)}


@dataclass(frozen=True)
class RecordKey:
    """A DHT key parsed: which run, which kind of record, and the round / audited peer it names."""

    text: str
    run_id: str
    kind: str  # a key of KIND_RULES
    round: int | None = None  # commitment, vote
    peer: str | None = None  # vote: the audited peer


def presence_key(run_id: str) -> str:
    return f"{run_id}.peers"


def ready_key(run_id: str) -> str:
    return f"{run_id}.ready"


def commit_key(run_id: str, round_: int) -> str:
    return f"{run_id}.commit.{round_}"


def receipts_key(run_id: str) -> str:
    return f"{run_id}.audits"


def votes_key(run_id: str, peer: str, round_: int) -> str:
    return f"{run_id}.votes.{peer}.{round_}"


_ROUND_RE = r"(?P<round>0|[1-9][0-9]{0,18})"
# Most specific suffix first: a key is the first pattern it matches (a run id containing ".votes." or
# ".commit." could make a key ambiguous; such run ids are not supported).
_KEY_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vote", re.compile(r"(?P<run>.+)\.votes\.(?P<peer>[1-9A-HJ-NP-Za-km-z]{1,128})\." + _ROUND_RE, re.DOTALL)),
    ("commitment", re.compile(r"(?P<run>.+)\.commit\." + _ROUND_RE, re.DOTALL)),
    ("presence", re.compile(r"(?P<run>.+)\.peers", re.DOTALL)),
    ("ready", re.compile(r"(?P<run>.+)\.ready", re.DOTALL)),
    ("receipts", re.compile(r"(?P<run>.+)\.audits", re.DOTALL)),
)


def parse_key(text: Any) -> RecordKey:
    """The kind (and round, audited peer) of a DHT key; InvalidRecord for a key no record kind lives under."""
    if not isinstance(text, str) or not 0 < len(text) <= MAX_KEY_CHARS:
        raise InvalidRecord(f"a DHT key must be a string of 1..{MAX_KEY_CHARS} characters")
    for kind, pattern in _KEY_PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        run_id = _text("run_id", match["run"])
        groups = match.groupdict()
        round_ = int(groups["round"]) if groups.get("round") is not None else None
        if round_ is not None and round_ > MAX_ROUND:
            raise InvalidRecord(f"round {round_} in key is not below 2**63")
        return RecordKey(text, run_id, kind, round_, groups.get("peer"))
    raise InvalidRecord(f"no record kind lives under key {text[:80]!r}")


def _no_ext(code: int, data: bytes) -> Any:
    raise InvalidRecord(f"msgpack extension type {code} in a record")


def decode_value(raw: Any, limit: int) -> Any:
    """A record value's msgpack bytes, decoded as hostile input: size, container sizes, no extension types."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > limit:
        raise InvalidRecord(f"a record value must be at most {limit} bytes")
    try:
        return msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, ext_hook=_no_ext, max_str_len=limit,
                               max_bin_len=limit, max_array_len=MAX_VALUE_ITEMS, max_map_len=MAX_VALUE_ITEMS)
    except InvalidRecord:
        raise
    except Exception as error:  # noqa: BLE001 - msgpack raises assorted errors on garbage
        raise InvalidRecord(f"undecodable record value: {type(error).__name__}") from None


def _verification(value: Any, kind: type) -> Any:
    try:
        record, _signature = open_envelope(value, kind)  # the inner signature is the node's to check
    except InvalidField as error:
        raise InvalidRecord(str(error)) from None
    return record


def check_entry(key: RecordKey, signer: str, value: Any) -> None:
    """Strict check of a decoded value stored under `key` by `signer` (the subkey); InvalidRecord if it may not be.

    Beyond each kind's schema, a verification record must be the signer's own and name the run (and round,
    audited peer) of its key."""
    if key.kind == "presence":
        Presence.from_wire(value, strict=True)
    elif key.kind == "ready":
        Ready.from_wire(value, strict=True)
    elif key.kind == "commitment":
        commitment = _verification(value, Commitment)
        if (commitment.peer, commitment.round, commitment.run_id) != (signer, key.round, key.run_id):
            raise InvalidRecord("a commitment must be its signer's, for the run and round of its key")
    elif key.kind == "vote":
        vote = _verification(value, Vote)
        if (vote.verifier, vote.peer, vote.round, vote.run_id) != (signer, key.peer, key.round, key.run_id):
            raise InvalidRecord("a vote must be its signer's, on the peer and round of its key")
    elif key.kind == "receipts":
        if not isinstance(value, list) or len(value) > MAX_RECEIPTS:
            raise InvalidRecord(f"receipts must be a list of at most {MAX_RECEIPTS} signed receipts")
        for blob in value:
            receipt = _verification(blob, Receipt)
            if receipt.receiver != signer or receipt.run_id != key.run_id:
                raise InvalidRecord("a receipt must be its signer's, for the run of its key")
    else:  # pragma: no cover - parse_key yields only the kinds above
        raise InvalidRecord(f"unknown record kind {key.kind!r}")


def entry_signing_bytes(key: str, subkey: str, expiration: float, value: bytes) -> bytes:
    """What an entry's signer signs: the key (as text), the subkey (its peer id), the expiration, the value bytes."""
    return ENTRY_DOMAIN + msgpack.packb([key, subkey, float(expiration), bytes(value)], use_bin_type=True)


def pack_entry(key: str, value: bytes, signature: bytes) -> bytes:
    """The signed entry as stored in the DHT: {"k": key, "v": value bytes, "s": signature}."""
    return msgpack.packb({"k": key, "v": bytes(value), "s": bytes(signature)}, use_bin_type=True)


def unpack_entry(blob: Any) -> tuple[str, bytes, bytes]:
    """(key, value bytes, signature) of a stored entry; InvalidRecord if it is not one. Nothing is verified here."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) > MAX_ENTRY_BYTES:
        raise InvalidRecord(f"a signed entry must be at most {MAX_ENTRY_BYTES} bytes")
    try:
        body = msgpack.unpackb(bytes(blob), raw=False, strict_map_key=True, ext_hook=_no_ext, max_array_len=0,
                               max_map_len=3, max_str_len=MAX_ENTRY_BYTES, max_bin_len=MAX_ENTRY_BYTES)
    except InvalidRecord:
        raise
    except Exception as error:  # noqa: BLE001 - msgpack raises assorted errors on garbage
        raise InvalidRecord(f"undecodable signed entry: {type(error).__name__}") from None
    if not isinstance(body, dict) or set(body) != {"k", "v", "s"}:
        raise InvalidRecord("a signed entry is a map of exactly k, v, s")
    key, value, signature = body["k"], body["v"], body["s"]
    if not isinstance(key, str) or not isinstance(value, bytes) or not isinstance(signature, bytes):
        raise InvalidRecord("a signed entry's key must be a string, its value and signature binary")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise InvalidRecord("oversized signature")
    return key, value, signature


def agreed_manifest(manifests: Iterable[Any], ours: str | None = None) -> str | None:
    """The run manifest the most live members' presences carry (None: no live member says).

    A tie that includes `ours` is ours (a joiner is not refused by a split it cannot judge); any
    other tie goes to the smallest hash, so every reader names the same one."""
    counts = Counter(m for m in manifests if isinstance(m, str))
    if not counts:
        return None
    top = max(counts.values())
    if ours is not None and counts.get(ours) == top:
        return ours
    return min(m for m, count in counts.items() if count == top)
