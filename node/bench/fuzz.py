"""`gossiptrain bench fuzz`: random and mutated input against one live node; it must refuse, count and carry on.

One real node process (`python -m node run`, its own p2pd, 127.0.0.1; node/tools/swarm.py) and, in this
process, a stranger with its own Ed25519 identity and p2pd. The stranger

- opens one stream per case on each protocol the node serves (exchange, state, audit: node/net/stream_service.py)
  and writes a random or mutated frame on it: mutations of a valid request built with protocol/messages.py (a
  field of the wrong type, dropped or extra fields, a wrong version or type, another message type, bit flips,
  truncation, a header promising more than follows, huge or oversized lengths, deep nesting), random msgpack,
  random bytes. It then reads whatever the node answers until the node closes the stream, for at most the node's
  I/O timeout + SLACK after its last byte: a stream still open then is a hang;
- sends one DHT store (hivemind's rpc_store, straight to the node) per case for each record kind
  (protocol/records.py KIND_RULES): signed entries with a wrong schema, bad signatures, forged or garbage
  subkeys, plain values, expirations that are huge or not finite, keys that name no kind or another key,
  garbage and oversized envelopes, whole dictionaries holding a bad entry, and undecodable requests.

Every case is drawn from `random.Random(f"{seed}/{target}/{index}")`: a run is reproducible from its seed, and
one case (its mutation is printed with --verbose) from seed, target and index. Between targets the node's metrics
are scraped: every stream it saw must be counted once under incoming_streams_total{kind,result} (a refusal as
protocol_error, timeout, peer_gone, remote_error or busy) and every record it refused under records_refused_total.
At the end the node must be alive, serve /metrics and answer a valid request, and its RSS must not have grown by
more than RSS_GROWTH_LIMIT_MIB.

hypothesis' runner draws examples inside one synchronous test and shrinks them; here thousands of cases go to a
live node concurrently, so the cases come from a seeded generator with hypothesis-style mutations instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import re
import sys
import tempfile
import time
import typing
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from protocol import (
    HEADER_BYTES,
    MAX_CONTROL_FRAME_BYTES,
    PROTOCOL_VERSION,
    AuditRequest,
    ErrorMessage,
    ExchangeRequest,
    ProtocolError,
    StateRequest,
    decode_message,
    encode_message,
    parse_frame_header,
)
from protocol import fields as wire
from protocol.messages import MESSAGE_CLASSES
from protocol.records import (
    KIND_RULES,
    RECORD_REFUSALS,
    Presence,
    Ready,
    commit_key,
    entry_signing_bytes,
    pack_entry,
    presence_key,
    ready_key,
    receipts_key,
    votes_key,
)

from node.config import NodeConfig
from node.table import format_table

if typing.TYPE_CHECKING:
    from hivemind.dht.node import DHTNode
    from hivemind.dht.validation import RecordValidatorBase
    from hivemind.p2p import P2P

    from node.net.identity import Identity
    from node.net.signed_records import SignedRecordValidator
    from node.tools.swarm import LocalSwarm

DEFAULT_COUNT = 10_000
DEFAULT_SEED = 13
IO_TIMEOUT = 2.0  # the node's --io-timeout for the run: the longest it may wait on a silent stranger
SLACK = 3.0  # beyond the I/O timeout, before a stream the node has not closed is a hang
CONCURRENCY = 8  # streams (and DHT requests) in flight at once
MAX_STREAMS_PER_PEER = 16  # the node's caps for the run: the stranger's streams are refused only when they pile up
MAX_STREAMS = 32
RECORDS_PER_REQUEST = 25  # DHT cases batched into one rpc_store (the undecodable ones go alone)
RSS_GROWTH_LIMIT_MIB = 300.0
STARTUP_TIMEOUT = 30.0  # p2pd and the DHT node of the stranger
NODE_START_TIMEOUT = 120.0
COUNT_TIMEOUT = 30.0  # for the node's counters to catch up with the cases of one target
READ_BYTES = 64 * 1024
# the fuzzed node: a small model (start-up and rounds fast on 2 cores), verification on (it serves audits)
NODE_ARGS = ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--context", "64", "--batch-size", "8",
             "--eval-batches", "4", "--warmup-steps", "10", "--inner-steps", "50", "--verify", "on"]
STREAM_TARGETS = ("exchange", "state", "audit")
RECORD_TARGETS = tuple(KIND_RULES)


class FuzzError(RuntimeError):
    """The fuzz run could not be carried out (the node did not start, the stranger could not reach it)."""


# ============================================================================ a stranger on the swarm
@contextlib.asynccontextmanager
async def dht_peer(initial_peers: list[str] | None, key_dir: Path, validator: RecordValidatorBase | None = None,
                   identity: Identity | None = None, join: bool = True
                   ) -> AsyncIterator[tuple[Identity, P2P, DHTNode]]:
    """An in-process p2pd + DHTNode with its own identity (bounded start-up), shut down on exit. With `join`
    False the p2pd connects to `initial_peers` but the DHT node stays out of their routing tables."""
    from hivemind.dht.node import DHTNode

    from node.net.identity import Identity
    from node.net.p2pd import start_p2p

    identity = identity or Identity.generate()
    key_path = key_dir / f"peer-{identity.peer_id[-8:]}.key"
    identity.save(key_path)
    p2p = await start_p2p(STARTUP_TIMEOUT, initial_peers=initial_peers, identity_path=str(key_path),
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"], check_if_identity_free=False)
    dht = None
    try:
        dht = await asyncio.wait_for(DHTNode.create(p2p=p2p, initial_peers=initial_peers if join else None,
                                                    cache_locally=False, record_validator=validator),
                                     STARTUP_TIMEOUT)
        yield identity, p2p, dht
    finally:
        if dht is not None:
            await asyncio.wait_for(dht.shutdown(), STARTUP_TIMEOUT)
        await asyncio.wait_for(p2p.shutdown(), STARTUP_TIMEOUT)


@dataclass(frozen=True)
class Target:
    """What the stranger knows of the node it fuzzes (from its node.json)."""

    peer_id: str
    maddr: str
    run_id: str
    manifest: str
    numel: int


# ============================================================================ random values
def random_text(rng: random.Random, longest: int = 40) -> str:
    alphabet = rng.choice(("abcdef0123456789", "ABCxyz._-/ ", "\u00e9\u4e2d\U0001f600\x00\n", "123456789ABCDEFGHJKLMN"))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def random_int(rng: random.Random) -> int:
    return rng.choice((0, 1, -1, 2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63),
                       rng.randint(-(2**63), 2**64 - 1), rng.randint(0, 1000)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any msgpack value: scalars of every type, and (shallow) arrays and maps of them."""
    pick = rng.randrange(10 if depth < 3 else 7)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return random_int(rng)
    if pick == 3:
        return rng.choice((0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, 1e308, rng.uniform(-1e9, 1e9)))
    if pick == 4:
        return random_text(rng)
    if pick == 5:
        return rng.randbytes(rng.randint(0, 64))
    if pick == 6:
        return msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 16)))
    if pick in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {random_text(rng, 8): random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# a valid value of each wire field type (protocol/fields.py), drawn at random
_FIELD_VALUES: dict[Callable, Callable[[random.Random], Any]] = {
    wire.check_str: lambda rng: random_text(rng),
    wire.check_uint: lambda rng: rng.choice((0, 1, rng.randint(0, 2**64 - 1))),
    wire.check_u63: lambda rng: rng.choice((0, 1, rng.randint(0, 2**63 - 1))),
    wire.check_bool: lambda rng: rng.random() < 0.5,
    wire.check_bytes: lambda rng: rng.randbytes(rng.randint(0, 256)),
    wire.check_names: lambda rng: [random_text(rng, 12) for _ in range(rng.randint(0, 4))],
    wire.check_shape: lambda rng: [rng.randint(0, 2**20) for _ in range(rng.randint(0, 4))],
}


def random_message(rng: random.Random, cls: type | None = None) -> dict[str, Any]:
    """The wire map of a message of `cls` (any type if None) with random values of the right field types."""
    cls = cls or rng.choice(list(MESSAGE_CLASSES.values()))
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": int(cls.TYPE)}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        body[name] = _FIELD_VALUES.get(hint.__metadata__[0], random_value)(rng)
    return body


# ============================================================================ stream cases
@dataclass(frozen=True)
class StreamCase:
    index: int
    mutation: str
    payload: bytes
    close: bool = False  # close our side right after writing (the node meets the end of the stream)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def valid_request(target: str, node: Target, sender: str, rng: random.Random) -> Any:
    round_ = rng.choice((0, 1, rng.randint(0, 50), 2**63 - 1))
    if target == "exchange":
        return ExchangeRequest(run_id=node.run_id, manifest_hash=node.manifest, round=round_, sender=sender,
                               tensors=("theta",), numel=node.numel, dtype=NodeConfig.wire_dtype)  # the node's
    if target == "state":
        return StateRequest(run_id=node.run_id, manifest_hash=node.manifest, sender=sender)
    return AuditRequest(run_id=node.run_id, manifest_hash=node.manifest, sender=sender, round=round_)


def _bitflip(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    return bytes(data)


def _field_mutation(base: dict[str, Any], rng: random.Random, how: str) -> dict[str, Any]:
    body = dict(base)
    names = [name for name in body if name not in ("v", "t")]
    if how == "field_type" and names:
        body[rng.choice(names)] = random_value(rng)
    elif how == "field_drop":
        del body[rng.choice(list(body))]
    elif how == "field_extra":
        for _ in range(rng.choice((1, 3, 70))):  # 70: over the decoder's 64 map entries
            body[random_text(rng, 10) or "x"] = random_value(rng)
    elif how == "version":
        body["v"] = rng.choice((0, 2, -1, 2**64 - 1, "1", 1.0, True, None, [1]))
    elif how == "type":
        body["t"] = rng.choice((12, 255, -1, 2**63, "1", 1.5, False, None, {}))
    elif how == "field_huge":
        body[rng.choice(names or ["x"])] = rng.choice(("x" * (70 * 1024), list(range(2000)), 2**64 - 1,
                                                       b"\x00" * (70 * 1024)))
    return body


STREAM_MUTATIONS: tuple[tuple[str, int], ...] = (  # (mutation, weight)
    ("valid", 2), ("field_type", 10), ("field_drop", 6), ("field_extra", 5), ("field_huge", 3), ("version", 4),
    ("type", 4), ("other_message", 6), ("forged_sender", 3), ("bitflip", 10), ("truncate_close", 6), ("stall", 2),
    ("huge_length", 5), ("short_length", 4), ("empty_body", 2), ("random_msgpack", 8), ("random_bytes", 8),
    ("deep_nesting", 3), ("trailing_frames", 4), ("no_bytes", 2), ("error_message", 3),
)


def stream_case(seed: int, target: str, index: int, node: Target, sender: str) -> StreamCase:
    """Case `index` of `target`: reproducible from (seed, target, index)."""
    rng = random.Random(f"{seed}/{target}/{index}")
    mutation = rng.choices([m for m, _ in STREAM_MUTATIONS], [w for _, w in STREAM_MUTATIONS])[0]
    request = valid_request(target, node, sender, rng)
    body = encode_message(request)
    base = msgpack.unpackb(body, raw=False)
    close = False
    if mutation == "valid":
        payload = frame(body)
    elif mutation in ("field_type", "field_drop", "field_extra", "field_huge", "version", "type"):
        payload = frame(pack(_field_mutation(base, rng, mutation)))
    elif mutation == "other_message":
        payload = frame(pack(random_message(rng, rng.choice([c for c in MESSAGE_CLASSES.values()
                                                             if c is not type(request)]))))
    elif mutation == "forged_sender":
        payload = frame(pack({**base, "sender": rng.choice((random_text(rng), "12D3KooW" + "A" * 44))}))
    elif mutation == "bitflip":
        payload = frame(_bitflip(body, rng))
    elif mutation == "truncate_close":
        whole = frame(body)
        payload, close = whole[:rng.randrange(1, len(whole))], True
    elif mutation == "stall":  # a header promising more than follows, then silence: only the node's clock ends it
        whole = frame(body)
        payload = whole[:rng.randrange(1, len(whole))]
    elif mutation == "huge_length":
        length = rng.choice((2**32 - 1, 2**31, MAX_CONTROL_FRAME_BYTES + 1, 8 * 2**20 + 1, 2**24))
        payload = length.to_bytes(4, "big") + rng.randbytes(rng.randint(0, 4096))
    elif mutation == "short_length":  # the header says fewer bytes than the body has: the rest reads as a frame
        cut = rng.randrange(0, len(body))
        payload = cut.to_bytes(4, "big") + body
    elif mutation == "empty_body":
        payload = frame(b"")
    elif mutation == "random_msgpack":
        payload = frame(pack(random_value(rng)))
    elif mutation == "random_bytes":
        payload = rng.randbytes(rng.randint(1, 2048))
        close = rng.random() < 0.5
    elif mutation == "deep_nesting":
        depth = rng.choice((100, 1000, 60_000))
        payload = frame(rng.choice((b"\x91", b"\x81\x00")) * depth + b"\xc0")
    elif mutation == "trailing_frames":
        payload = frame(body) + frame(pack(random_value(rng))) + rng.randbytes(rng.randint(0, 64))
    elif mutation == "no_bytes":
        payload, close = b"", True
    else:  # error_message: an ErrorMessage where the request belongs
        payload = frame(encode_message(ErrorMessage(kind=random_text(rng, 12), message=random_text(rng))))
    return StreamCase(index, mutation, payload, close)


# ============================================================================ record cases
@dataclass(frozen=True)
class RecordCase:
    index: int
    mutation: str
    key: bytes  # the DHT id it is stored under
    subkey: bytes  # hivemind's subkey tag: msgpack of the subkey, msgpack None (plain value) or b"" (dictionary)
    value: bytes
    expiration: float
    alone: bool = False  # in a request of its own (hivemind may refuse the whole request)
    valid: bool = False  # a well-formed record of the stranger's own: the node may store it


def record_key_text(kind: str, run_id: str, rng: random.Random, me: str) -> str:
    round_ = rng.randint(0, 1000)
    return {"presence": presence_key(run_id), "ready": ready_key(run_id), "commitment": commit_key(run_id, round_),
            "receipts": receipts_key(run_id), "vote": votes_key(run_id, me, round_)}[kind]


def record_base_value(kind: str, manifest: str, rng: random.Random) -> tuple[Any, bool]:
    """(value, schema-valid?): a departure or a withdrawn ready (harmless if stored), else a random map."""
    if kind == "presence":
        return Presence.departure(manifest).to_wire(), True
    if kind == "ready":
        return Ready(-1, manifest, True).to_wire(), True
    fields = ("peer", "round", "run_id", "digest", "votes", "receipts", "verdict", "signature", "sketch")
    return {rng.choice(fields): random_value(rng) for _ in range(rng.randint(0, 5))}, False


RECORD_MUTATIONS: tuple[tuple[str, int], ...] = (
    ("valid", 2), ("schema", 10), ("field_type", 8), ("bad_signature", 8), ("forged_subkey", 6),
    ("garbage_subkey", 6), ("plain_value", 5), ("expiration", 4), ("lifetime", 5), ("key_mismatch", 6),
    ("bad_key", 6), ("envelope", 10), ("oversized", 4), ("dictionary", 4), ("undecodable", 2),
)


def record_case(seed: int, kind: str, index: int, run_id: str, manifest: str, identity: Identity,
                others: list[str], now: float) -> RecordCase:
    """Case `index` of record kind `kind`: reproducible from (seed, kind, index) and the stranger's key."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils import MSGPackSerializer

    rng = random.Random(f"{seed}/{kind}/{index}")
    mutation = rng.choices([m for m, _ in RECORD_MUTATIONS], [w for _, w in RECORD_MUTATIONS])[0]
    me = identity.peer_id
    key = record_key_text(kind, run_id, rng, me)
    rules = KIND_RULES[kind]
    expiration = now + rng.uniform(10, rules.ttl)
    value, valid = record_base_value(kind, manifest, rng)
    subkey = me
    alone = False

    if mutation == "schema":
        value, valid = rng.choice((random_value(rng), {**random_message(rng), "round": random_value(rng)})), False
    elif mutation == "field_type":
        if isinstance(value, dict) and value:
            value = {**value, rng.choice(list(value)): random_value(rng)}
        valid = False  # (it may still pass a lenient field: the node's answer tells)
    elif mutation == "oversized":
        value = {"pad": "x" * rng.choice((rules.max_value_bytes, 2 * rules.max_value_bytes, 40 * 1024))}
        valid = False
    value_bytes = pack(value)
    signed_key, signed_subkey, signed_expiration = key, subkey, expiration
    if mutation == "key_mismatch":
        key = rng.choice((record_key_text(rng.choice(RECORD_TARGETS), run_id, rng, me) + "x", key + ".1",
                          random_text(rng)))
    elif mutation == "bad_key":
        signed_key = key = rng.choice(("", "x" * 600, f"{run_id}.nothing", f"{run_id}.commit.-1", f"{run_id}.peers.x",
                                       random_text(rng), f"{run_id}.votes.{me}", "other-run.ready\x00"))
    elif mutation == "forged_subkey":
        subkey = rng.choice(others)  # someone else's entry, signed with the stranger's key
    elif mutation == "lifetime":
        signed_expiration = expiration = now + rules.ttl + rng.choice((120.0, 3600.0, 10 * 365 * 86400.0, 1e300))
    elif mutation == "expiration":
        signed_expiration, expiration = now + 60, rng.choice((math.inf, -math.inf, math.nan))
    signature = identity.sign(entry_signing_bytes(signed_key, signed_subkey, signed_expiration
                                                  if math.isfinite(signed_expiration) else now, value_bytes))
    if mutation == "bad_signature":
        signature = rng.choice((_bitflip(signature, rng), b"", rng.randbytes(64), signature[:32], signature * 2))
    entry = pack_entry(signed_key, value_bytes, signature) if signed_key else pack({"k": "", "v": value_bytes,
                                                                                    "s": signature})
    tag = pack(subkey)
    if mutation == "garbage_subkey":
        tag = rng.choice((rng.randbytes(rng.randint(1, 40)), pack(random_value(rng)), pack(random_text(rng)),
                          pack(me + "x"), b"\xc1", pack(me.encode())))
        if tag in (pack(None), b""):
            tag = b"\xc1"
    elif mutation == "plain_value":
        tag = pack(None)
    elif mutation == "envelope":
        entry = rng.choice((rng.randbytes(rng.randint(0, 300)), pack(random_value(rng)), entry[:rng.randrange(len(entry))],
                            pack({"k": key, "v": random_value(rng), "s": signature}), pack([key, value_bytes, signature]),
                            b"\x00" * (33 * 1024), _bitflip(entry, rng)))
    elif mutation == "dictionary":  # a whole dictionary value, one of its entries bad
        dictionary = DictionaryDHTValue()
        dictionary.store(rng.choice((me, others[0], 7)), _bitflip(entry, rng), expiration)
        tag, entry = b"", MSGPackSerializer.dumps(dictionary)
    elif mutation == "undecodable":  # hivemind cannot read it: the whole request is refused, no validator runs
        tag, entry, alone = b"", rng.randbytes(rng.randint(0, 64)), True
    return RecordCase(index, mutation, DHTID.generate(source=key).to_bytes(), tag, entry, expiration, alone,
                      valid and mutation == "valid")


def refused_by(validator: SignedRecordValidator, case: RecordCase) -> bool:
    """Would `validator` refuse the record (any entry of a whole dictionary)?"""
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    if case.subkey != b"":
        return not validator.validate(DHTRecord(case.key, case.subkey, case.value, case.expiration))
    dictionary = MSGPackSerializer.loads(case.value)
    with dictionary.freeze():
        return not all(validator.validate(DHTRecord(case.key, MSGPackSerializer.dumps(subkey), value, expiration))
                       for subkey, (value, expiration) in dictionary.items())


# ============================================================================ running the cases
@dataclass
class Row:
    """One target's results."""

    target: str
    sent: int = 0
    rejected: int = 0  # a typed refusal: an ErrorMessage naming its kind, or a DHT store refused
    answered: int = 0  # a regular reply (a reject of a valid request, an offer, an accept) or a record stored
    closed: int = 0  # closed without a reply (by the node, or by us: `cut`)
    cut: int = 0  # streams we closed ourselves right after writing (a cut-off frame, no bytes, random bytes)
    hangs: int = 0  # not closed within the I/O timeout + SLACK
    crashes: int = 0  # the node process died
    failed: int = 0  # the stranger could not send the case (no stream, no DHT answer)
    accepted_bad: int = 0  # records the node stored although its own rules refuse them
    counted: int = -1  # the node's own count of the refusals (-1: not read)
    expected: int = 0  # what the node must have counted at least (records: exactly)
    seen: int = -1  # streams: how many the node counted in all (one per stream that reached its handler)
    unseen: int = 0  # streams opened that the node's handler never got (only streams we cut at once may be)
    seconds: float = 0.0
    slowest: float = 0.0  # seconds until the node closed the slowest stream
    errors_logged: int = 0  # tracebacks in the node's log during this target
    kinds: Counter = field(default_factory=Counter)  # ErrorMessage kinds, DHT refusal reasons (the node's)
    mutations: Counter = field(default_factory=Counter)

    def table_row(self) -> dict[str, Any]:
        return {"handler/kind": self.target, "sent": self.sent, "rejected": self.rejected, "closed": self.closed,
                "answered": self.answered, "hangs": self.hangs, "crashes": self.crashes, "failed": self.failed,
                "counted": self.counted, "expected": self.expected,
                "unseen": self.unseen, "max close s": round(self.slowest, 2),
                "tracebacks": self.errors_logged, "seconds": round(self.seconds, 1)}


async def _read_until_closed(reader: asyncio.StreamReader, deadline: float) -> tuple[bytes, bool]:
    """(the first bytes the node sent, whether it closed the stream before `deadline`)."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return bytes(received), False
        try:
            async with asyncio.timeout(remaining):
                data = await reader.read(READ_BYTES)
        except TimeoutError:
            return bytes(received), False
        except (ConnectionError, OSError):
            return bytes(received), True
        if not data:
            return bytes(received), True
        if len(received) < MAX_CONTROL_FRAME_BYTES:  # the first reply is all we judge
            received += data[:MAX_CONTROL_FRAME_BYTES - len(received)]


def first_reply(data: bytes) -> Any:
    """The first message the node sent: None if none came whole, "garbage" if it is not a valid message."""
    if len(data) < HEADER_BYTES:
        return None
    try:
        length = parse_frame_header(data[:HEADER_BYTES], MAX_CONTROL_FRAME_BYTES)
        if len(data) < HEADER_BYTES + length:
            return None
        return decode_message(data[HEADER_BYTES:HEADER_BYTES + length])
    except ProtocolError:
        return "garbage"


class Fuzzer:
    def __init__(self, swarm: LocalSwarm, node: Target, p2p: P2P, dht: DHTNode, identity: Identity, seed: int,
                 io_timeout: float, concurrency: int, verbose: bool = False) -> None:
        self.swarm, self.node, self.p2p, self.dht, self.identity = swarm, node, p2p, dht, identity
        self.seed, self.io_timeout, self.concurrency, self.verbose = seed, io_timeout, concurrency, verbose
        from hivemind.p2p import PeerID

        self.target_id = PeerID.from_base58(node.peer_id)

    # ------------------------------------------------------------------ streams
    async def stream_target(self, target: str, count: int) -> Row:
        from node.gossip.exchange import EXCHANGE_PROTOCOL
        from node.join.statesync import STATE_PROTOCOL
        from node.verify.service import AUDIT_PROTOCOL

        protocol = {"exchange": EXCHANGE_PROTOCOL, "state": STATE_PROTOCOL, "audit": AUDIT_PROTOCOL}[target]
        row, before = Row(target), await self.scrape()
        started, logged = time.monotonic(), self.tracebacks()
        queue = iter(range(count))

        async def worker() -> None:
            for index in queue:
                if row.crashes:
                    return
                case = stream_case(self.seed, target, index, self.node, self.identity.peer_id)
                await self.send_stream(protocol, case, row)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        row.seconds = time.monotonic() - started
        # the node counts a stream when its handler ends, maybe just after we saw it closed
        opened = row.sent - row.failed
        after = await self.scrape_until(lambda s: _delta(before, s, _incoming(target)) >= opened,
                                        lambda s: _delta(before, s, _incoming(target)))
        row.seen = int(_delta(before, after, _incoming(target)))
        row.counted = int(_delta(before, after, _incoming(target, refused=True)))
        # what the node must have counted as refusals (at least: an answered stream may end as one too, e.g. an
        # accepted exchange whose tensors never come): each typed refusal, each hang, and each stream we cut off
        # that reached its handler (p2pd may drop a stream closed at once before the handler is called: the only
        # streams allowed to go unseen). A stream the node answered and closed while our bytes were still arriving
        # may be reset before the answer reaches us: "closed" without a reply, it need not be a refusal.
        row.unseen = opened - row.seen
        row.expected = row.rejected + row.hangs + max(0, row.cut - max(0, row.unseen))
        row.errors_logged = self.tracebacks() - logged
        return row

    async def send_stream(self, protocol: str, case: StreamCase, row: Row) -> None:
        loop = asyncio.get_running_loop()
        row.sent += 1
        row.mutations[case.mutation] += 1
        try:
            _info, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.target_id, protocol), self.io_timeout + SLACK)
        except Exception as error:  # noqa: BLE001 - the node is unreachable: dead or stuck?
            row.failed += 1
            if not self.node_alive():
                row.crashes = 1
            elif self.verbose:
                print(f"  {protocol} case {case.index}: no stream: {error!r}", file=sys.stderr)
            return
        try:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):  # the node may cut us off mid-write
                writer.write(case.payload)
                async with asyncio.timeout(self.io_timeout + SLACK):
                    await writer.drain()
            sent_at = loop.time()
            if case.close:
                writer.close()
                row.closed += 1  # no reply possible: the node's count says it refused it
                row.cut += 1
                return
            data, closed = await _read_until_closed(reader, sent_at + self.io_timeout + SLACK)
            row.slowest = max(row.slowest, loop.time() - sent_at)
            reply = first_reply(data)
            if not closed:
                row.hangs += 1
                print(f"  HANG: {protocol} case {case.index} ({case.mutation}) not closed after "
                      f"{self.io_timeout + SLACK:.0f}s", file=sys.stderr)
            elif isinstance(reply, ErrorMessage):
                row.rejected += 1
                row.kinds[reply.kind] += 1
            elif reply is None or reply == "garbage":
                row.closed += 1
            else:
                row.answered += 1
                row.kinds[f"reply:{getattr(reply, 'reason', type(reply).__name__)}"] += 1
            if self.verbose:
                print(f"  {protocol} {case.index} {case.mutation}: {type(reply).__name__}", file=sys.stderr)
        finally:
            writer.close()

    # ------------------------------------------------------------------ records
    async def record_target(self, kind: str, count: int) -> Row:
        from hivemind.utils import get_dht_time

        from node.net.identity import Identity
        from node.net.signed_records import SignedRecordValidator

        row, before = Row(kind), await self.scrape()
        started, logged = time.monotonic(), self.tracebacks()
        others = [Identity.generate().peer_id for _ in range(4)]
        cases = [record_case(self.seed, kind, index, self.node.run_id, self.node.manifest, self.identity, others,
                             get_dht_time()) for index in range(count)]
        batches: list[list[RecordCase]] = [[case] for case in cases if case.alone]
        rest = [case for case in cases if not case.alone]
        batches += [rest[start:start + RECORDS_PER_REQUEST] for start in range(0, len(rest), RECORDS_PER_REQUEST)]
        queue = iter(batches)
        reference = SignedRecordValidator()  # what the node's validator must refuse (the same rules, a checker only)

        async def worker() -> None:
            for batch in queue:
                if row.crashes:
                    return
                await self.send_records(batch, row, reference)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        row.seconds = time.monotonic() - started
        # every refusal by the validator is counted before the node answers the store
        after = await self.scrape()
        row.counted = int(_delta(before, after, "gossiptrain_records_refused_total{"))
        for reason in RECORD_REFUSALS:  # the node's reasons
            key = f'gossiptrain_records_refused_total{{reason="{reason}"}}'
            if after.get(key, 0) - before.get(key, 0):
                row.kinds[reason] = int(after.get(key, 0) - before.get(key, 0))
        row.errors_logged = self.tracebacks() - logged
        return row

    async def send_records(self, batch: list[RecordCase], row: Row, reference: SignedRecordValidator) -> None:
        """Store one batch on the node; tally what it refused against what `reference` refuses."""
        from hivemind.proto import dht_pb2

        row.sent += len(batch)
        row.mutations.update(case.mutation for case in batch)
        request = dht_pb2.StoreRequest(keys=[c.key for c in batch], subkeys=[c.subkey for c in batch],
                                       values=[c.value for c in batch], expiration_time=[c.expiration for c in batch],
                                       in_cache=[False] * len(batch))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.io_timeout + SLACK):
                response = await self.dht.protocol.get_stub(self.target_id).rpc_store(request)
        except TimeoutError:
            row.hangs += len(batch)
            print(f"  HANG: store of {[c.index for c in batch]} not answered in {self.io_timeout + SLACK:.0f}s",
                  file=sys.stderr)
            return
        except Exception as error:  # noqa: BLE001 - hivemind's error reply to an unreadable request
            row.slowest = max(row.slowest, loop.time() - started)
            if not self.node_alive():
                row.crashes, row.failed = 1, row.failed + len(batch)
            elif not all(case.alone for case in batch):
                row.failed += len(batch)  # a readable batch refused whole: a bug to look at
                print(f"  store of {[c.index for c in batch]} failed: {error!r}", file=sys.stderr)
            else:  # refused by hivemind before any validator ran: nothing for the node to count
                row.rejected += len(batch)
                row.kinds["rpc_refused"] += len(batch)
            return
        row.slowest = max(row.slowest, loop.time() - started)
        if len(response.store_ok) != len(batch):
            row.failed += len(batch)
            return
        for case, ok in zip(batch, response.store_ok):
            refuse = refused_by(reference, case)
            row.expected += refuse
            if ok:
                row.answered += 1
                if refuse:  # the node stored what its own rules refuse
                    row.accepted_bad += 1
                    print(f"  STORED a bad record: {case.mutation} case {case.index}", file=sys.stderr)
            elif refuse:
                row.rejected += 1
            else:  # valid by the rules, not stored: hivemind's storage holds a newer entry of ours
                row.answered += 1

    # ------------------------------------------------------------------ the node
    def node_alive(self) -> bool:
        return self.swarm.nodes[0].process.poll() is None

    def tracebacks(self) -> int:
        try:
            return self.swarm.nodes[0].log_path.read_text(errors="replace").count("Traceback")
        except FileNotFoundError:
            return 0

    async def scrape(self) -> dict[str, float]:
        return await asyncio.to_thread(self.swarm.metrics, 0)

    async def scrape_until(self, done: Callable[[dict[str, float]], bool],
                           value: Callable[[dict[str, float]], float]) -> dict[str, float]:
        """Scrape until `done`, or until `value` stopped changing for an I/O timeout + SLACK (every handler has
        ended by then), or COUNT_TIMEOUT."""
        deadline = time.monotonic() + COUNT_TIMEOUT
        last, since = None, time.monotonic()
        while True:
            samples = await self.scrape()
            now = time.monotonic()
            if value(samples) != last:
                last, since = value(samples), now
            if (done(samples) or now > deadline or now - since > self.io_timeout + SLACK
                    or not self.node_alive()):
                return samples
            await asyncio.sleep(0.2)

    async def still_serving(self) -> str | None:
        """None if the node answers a valid state request with a well-formed reply; else what went wrong."""
        from node.join.statesync import STATE_PROTOCOL

        request = frame(encode_message(valid_request("state", self.node, self.identity.peer_id, random.Random(0))))
        try:
            _info, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(self.target_id, STATE_PROTOCOL), self.io_timeout + SLACK)
        except Exception as error:  # noqa: BLE001 - reported
            return f"no stream: {error!r}"
        try:
            writer.write(request)
            data, _closed = await _read_until_closed(reader, asyncio.get_running_loop().time() + 30)
        finally:
            writer.close()
        reply = first_reply(data)
        if reply is None or reply == "garbage" or isinstance(reply, ErrorMessage):
            return f"a valid state request got {reply!r}"
        return None


def _incoming(kind: str, refused: bool = False) -> Callable[[str], bool]:
    """Selects the incoming_streams samples of `kind` (all results, or every result but served)."""
    prefix = "gossiptrain_incoming_streams_total{"

    def select(name: str) -> bool:
        return (name.startswith(prefix) and f'kind="{kind}"' in name
                and not (refused and 'result="served"' in name))

    return select


def _delta(before: dict[str, float], after: dict[str, float], select: str | Callable[[str], bool]) -> float:
    chosen = select if callable(select) else (lambda name: name.startswith(select))
    return sum(v for k, v in after.items() if chosen(k)) - sum(v for k, v in before.items() if chosen(k))


def vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


# ============================================================================ the run
@dataclass
class Report:
    rows: list[Row]
    alive: bool
    metrics_served: bool
    serving_problem: str | None
    rss_before_mib: float
    rss_after_mib: float
    seconds: float
    exit_code: int | None = None

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_after_mib - self.rss_before_mib

    def problems(self) -> list[str]:
        found = []
        for row in self.rows:
            if row.crashes:
                found.append(f"{row.target}: the node crashed")
            if row.hangs:
                found.append(f"{row.target}: {row.hangs} hangs")
            if row.accepted_bad:
                found.append(f"{row.target}: the node stored {row.accepted_bad} records its rules refuse")
            if row.failed:
                found.append(f"{row.target}: {row.failed} cases could not be sent")
            if row.target in STREAM_TARGETS:
                if not 0 <= row.unseen <= row.cut:
                    found.append(f"{row.target}: the node counted {row.seen} streams, {row.sent - row.failed} opened "
                                 f"({row.cut} of them closed by us at once)")
                if row.counted < row.expected:
                    found.append(f"{row.target}: the node counted {row.counted} refusals, at least {row.expected} "
                                 "expected")
            elif row.counted == 0 and row.expected:
                found.append(f"{row.target}: the node counted none of the {row.expected} records it refused "
                             "(gossiptrain_records_refused_total is not wired: the node's DHT record validator needs "
                             "its on_refused set to the metric, node/daemon.py)")
            elif row.counted != row.expected:
                found.append(f"{row.target}: the node counted {row.counted} refused records, expected {row.expected}")
        if not self.alive:
            found.append(f"the node exited ({self.exit_code})")
        if not self.metrics_served:
            found.append("the node stopped serving /metrics")
        if self.serving_problem:
            found.append(f"the node stopped serving requests: {self.serving_problem}")
        if not self.rss_growth_mib < RSS_GROWTH_LIMIT_MIB:
            found.append(f"the node's RSS grew by {self.rss_growth_mib:.0f} MiB")
        return found

    def format(self) -> str:
        lines = [format_table([row.table_row() for row in self.rows]), ""]
        for row in self.rows:
            lines.append(f"{row.target}: node said {dict(row.kinds.most_common())}")
        lines.append(f"node alive: {self.alive}; /metrics: {self.metrics_served}; valid request answered: "
                     f"{self.serving_problem is None}; RSS {self.rss_before_mib:.0f} -> {self.rss_after_mib:.0f} MiB; "
                     f"{self.seconds:.0f}s in all")
        problems = self.problems()
        lines.append("PASS: 0 crashes, 0 hangs, every refusal counted" if not problems
                     else "FAIL: " + "; ".join(problems))
        return "\n".join(lines)


def node_target(swarm: LocalSwarm) -> Target:
    status = swarm.nodes[0].poll_status()
    try:
        return Target(status["peer_id"], status["maddrs"][0], status["run_id"], status["manifest"],
                      int(status["parameters"]))
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise FuzzError(f"the node's node.json lacks {error}: {status}") from None


async def fuzz_node(swarm: LocalSwarm, work_dir: Path, count: int, seed: int = DEFAULT_SEED,
                    io_timeout: float = IO_TIMEOUT, concurrency: int = CONCURRENCY,
                    targets: tuple[str, ...] = STREAM_TARGETS + RECORD_TARGETS, verbose: bool = False,
                    progress: Callable[[Row], None] | None = None) -> Report:
    """Fuzz node 0 of a running `swarm` (started with fuzz_args) and report."""
    started = time.monotonic()
    node = node_target(swarm)
    pid = swarm.nodes[0].process.pid
    rss_before = vm_rss_mib(pid)
    rows: list[Row] = []
    async with dht_peer([node.maddr], work_dir, join=False) as (identity, p2p, dht):
        fuzzer = Fuzzer(swarm, node, p2p, dht, identity, seed, io_timeout, concurrency, verbose)
        for target in targets:
            if target in STREAM_TARGETS:
                row = await fuzzer.stream_target(target, count)
            else:
                row = await fuzzer.record_target(target, count)
            rows.append(row)
            if progress is not None:
                progress(row)
            if not fuzzer.node_alive():
                break
        alive = fuzzer.node_alive()
        serving = await fuzzer.still_serving() if alive else "the node is dead"
        metrics_served = bool(await fuzzer.scrape()) if alive else False
    rss_after = vm_rss_mib(pid) if alive else math.nan
    return Report(rows, alive, metrics_served, serving, rss_before, rss_after, time.monotonic() - started,
                  swarm.nodes[0].process.poll())


def fuzz_args(io_timeout: float = IO_TIMEOUT) -> list[str]:
    """The fuzzed node's arguments beyond LocalSwarm's own."""
    return NODE_ARGS + ["--io-timeout", str(io_timeout), "--max-streams-per-peer", str(MAX_STREAMS_PER_PEER),
                        "--max-streams", str(MAX_STREAMS)]


def run_benchmark(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, targets: tuple[str, ...] | None = None,
                  concurrency: int = CONCURRENCY, verbose: bool = False) -> int:
    from node.tools.swarm import LocalSwarm, SwarmError

    targets = targets or STREAM_TARGETS + RECORD_TARGETS
    print(f"fuzzing one node: {count} cases per target ({', '.join(targets)}), seed {seed}, io timeout "
          f"{IO_TIMEOUT}s + {SLACK}s slack, {concurrency} at once", flush=True)
    with tempfile.TemporaryDirectory(prefix="gossiptrain-fuzz-") as tmp:
        swarm = LocalSwarm(1, Path(tmp), fuzz_args())
        try:
            try:
                swarm.start()
            except SwarmError as error:
                print(f"bench fuzz: the node did not start: {error}", file=sys.stderr)
                return 1
            report = asyncio.run(fuzz_node(
                swarm, Path(tmp), count, seed, IO_TIMEOUT, concurrency, targets, verbose,
                progress=lambda row: print(f"  {row.target}: {row.sent} sent in {row.seconds:.0f}s, "
                                           f"{row.hangs} hangs, counted {row.counted}/{row.expected}", flush=True)))
        finally:
            swarm.stop()
        print(report.format())
        if report.problems():
            print(f"node log tail:\n{swarm.nodes[0].log_tail(40)}", file=sys.stderr)
    return 1 if report.problems() else 0


_TARGET_NAMES = re.compile(r"^[a-z]+$")


def parse_targets(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [n for n in names if n not in STREAM_TARGETS + RECORD_TARGETS or not _TARGET_NAMES.match(n)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown targets {unknown}: choose from "
                                         f"{', '.join(STREAM_TARGETS + RECORD_TARGETS)}")
    return names
