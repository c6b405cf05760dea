"""Prometheus metrics of one node (prefix gossiptrain_), on their own registry and HTTP port."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server

from protocol import ProtocolError
from protocol.records import RECORD_REFUSALS

EXCHANGE_RESULTS = ("ok", "rejected", "timeout", "too_slow", "peer_gone", "protocol_error", "aborted", "no_partner")
FAILED_RESULTS = ("timeout", "too_slow", "peer_gone", "protocol_error", "aborted")  # an accepted exchange that broke


def counts_by_label(counter: Counter, label: str) -> dict[str, int]:
    """A labelled counter's current values, e.g. {"ok": 12, "timeout": 1} (for summaries)."""
    return {
        sample.labels[label]: int(sample.value)
        for metric in counter.collect() for sample in metric.samples if sample.name.endswith("_total")
    }


def protocol_error_kinds() -> list[str]:
    """Every refusal kind a peer's input can get (looked up when a NodeMetrics is made, so all are visible at 0)."""
    return sorted({"record", *(cls.kind for cls in (ProtocolError, *ProtocolError.__subclasses__()))})


class MetricSpec(NamedTuple):
    """One metric of NodeMetrics: the attribute it is kept in and how it is registered."""

    attr: str
    kind: type  # Counter, Gauge, Histogram or Info
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # Histogram only
    zeros: Iterable[str] | Callable[[], Iterable[str]] = ()  # values of the (single) label exported at 0 from start


# In registration (= exposition) order. Dashboards (tests/unit/test_dashboards.py) and ops/prometheus rules use
# these names: change one only together with them.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("info", Info, "gossiptrain", "Node identity and build"),
    MetricSpec("inner_steps", Counter, "gossiptrain_inner_steps", "Inner optimizer steps taken"),
    MetricSpec("outer_rounds", Counter, "gossiptrain_outer_rounds", "Outer rounds completed", ("mode",),
               zeros=("paired", "local", "in_flight")),
    MetricSpec("tokens", Counter, "gossiptrain_tokens", "Training tokens processed"),
    MetricSpec("tokens_per_second", Gauge, "gossiptrain_tokens_per_second",
               "Training throughput of the last round's inner steps"),
    MetricSpec("train_loss", Gauge, "gossiptrain_train_loss", "Mean training loss of the last round"),
    MetricSpec("eval_loss", Gauge, "gossiptrain_eval_loss", "Held-out loss of the slow weights"),
    MetricSpec("round", Gauge, "gossiptrain_round", "Current outer round"),
    MetricSpec("peers_live", Gauge, "gossiptrain_peers_live", "Other live peers in the DHT presence view"),
    MetricSpec("dht_routing_peers", Gauge, "gossiptrain_dht_routing_peers",
               "Peers in the DHT routing table (node/net/healing.py puts lost ones back)"),
    MetricSpec("dht_rebootstraps", Counter, "gossiptrain_dht_rebootstraps",
               "DHT re-bootstraps after lost peers answered again (partition healing)"),
    MetricSpec("exchanges", Counter, "gossiptrain_exchanges", "Pair exchanges by result", ("result",),
               zeros=EXCHANGE_RESULTS),
    MetricSpec("exchange_seconds", Histogram, "gossiptrain_exchange_seconds", "Duration of successful pair exchanges",
               buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)),
    MetricSpec("exchange_bytes_per_second", Gauge, "gossiptrain_exchange_bytes_per_second",
               "Rate at which the partner's tensors arrived in the last accepted pair exchange, completed or not"),
    MetricSpec("exchange_completion_ratio", Gauge, "gossiptrain_exchange_completion_ratio",
               "Share of the last 10 accepted pair exchanges that completed (1 until the first one)"),
    MetricSpec("streams_refused", Counter, "gossiptrain_streams_refused",
               "Incoming streams closed unread: the peer's or the node's cap of open streams was reached", ("reason",),
               zeros=("peer_limit", "total_limit")),
    MetricSpec("incoming_streams", Counter, "gossiptrain_incoming_streams",
               "Incoming protocol streams by protocol (kind) and how they ended: served (the request was answered), "
               "protocol_error, timeout, peer_gone, remote_error (it sent an error instead of a request), "
               "failed (any other error), busy (refused by a stream cap)",
               ("kind", "result")),
    MetricSpec("records_refused", Counter, "gossiptrain_records_refused",
               "DHT records refused by this node's record validator (stores offered to it and records read), by reason",
               ("reason",), zeros=RECORD_REFUSALS),
    MetricSpec("sync_wait_seconds", Histogram, "gossiptrain_sync_wait_seconds",
               "Time from round end to outer step (partner search + exchange)",
               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)),
    MetricSpec("round_seconds", Histogram, "gossiptrain_round_seconds",
               "Compute time of the inner steps of one round", buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)),
    MetricSpec("bytes_sent", Counter, "gossiptrain_bytes_sent", "Protocol bytes sent", ("kind",),
               zeros=("exchange", "state", "audit")),
    MetricSpec("bytes_received", Counter, "gossiptrain_bytes_received", "Protocol bytes received", ("kind",),
               zeros=("exchange", "state", "audit")),
    MetricSpec("partner_distance", Gauge, "gossiptrain_partner_distance",
               "L2 distance between own and partner fast weights at the last exchange"),
    MetricSpec("state_sync_seconds", Gauge, "gossiptrain_state_sync_seconds",
               "Duration of this node's state download when it joined"),
    MetricSpec("state_sync_bytes", Counter, "gossiptrain_state_sync_bytes",
               "Tensor bytes of state downloaded from donors on join"),
    MetricSpec("states_refused", Counter, "gossiptrain_states_refused",
               "Donor states downloaded on join but not adopted: held-out loss far above what the live peers report"),
    MetricSpec("state_uploads", Counter, "gossiptrain_state_uploads", "State requests served to joiners, by result",
               ("result",), zeros=("ok", "refused", "failed")),
    MetricSpec("audit_uploads", Counter, "gossiptrain_audit_uploads",
               "Audit requests (start state of a drawn round) served to verifiers, by result; not_committee: "
               "refused to a peer outside that audit's committee", ("result",),
               zeros=("ok", "refused", "not_committee", "failed")),
    MetricSpec("start_mode", Gauge, "gossiptrain_start_mode", "How this process got its weights (1 for the mode used)",
               ("mode",)),
    MetricSpec("checkpoint_seconds", Histogram, "gossiptrain_checkpoint_seconds",
               "Time to write one checkpoint (fsync included)",
               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
    MetricSpec("checkpoint_last_success", Gauge, "gossiptrain_checkpoint_last_success_timestamp",
               "Unix time of the last checkpoint written"),
    MetricSpec("checkpoints", Counter, "gossiptrain_checkpoints", "Checkpoint writes by result", ("result",),
               zeros=("ok", "failed")),
    MetricSpec("checkpoints_damaged", Counter, "gossiptrain_checkpoints_damaged",
               "Checkpoints found truncated or corrupt at start-up (skipped)"),
    MetricSpec("peer_joins", Counter, "gossiptrain_peer_joins", "Peers that appeared in the live view"),
    MetricSpec("peer_leaves", Counter, "gossiptrain_peer_leaves",
               "Peers that left the live view (clean leave or presence expired)"),
    MetricSpec("protocol_errors", Counter, "gossiptrain_protocol_errors", "Malformed or refused input from peers",
               ("kind",), zeros=protocol_error_kinds),
    # verification (node/verify/service.py)
    MetricSpec("verifications", Counter, "gossiptrain_verifications",
               "Audits this node replayed and voted on, by its vote", ("verdict",), zeros=("accept", "reject")),
    MetricSpec("audit_verdicts", Counter, "gossiptrain_audit_verdicts",
               "Committee verdicts observed (2 of 3 votes), by verdict", ("verdict",),
               zeros=("accept", "reject", "undecided")),
    MetricSpec("peers_flagged", Gauge, "gossiptrain_peers_flagged",
               "Peers flagged by a verifier majority (excluded from pairing)"),
    MetricSpec("commitments", Counter, "gossiptrain_commitments", "Update commitments published, by result",
               ("result",), zeros=("ok", "failed", "skipped")),
    MetricSpec("updates_refused", Counter, "gossiptrain_updates_refused",
               "Partner updates received but not applied, by reason", ("reason",),
               zeros=("flagged", "no_commitment", "digest_mismatch", "no_attestation")),
    MetricSpec("replay_seconds", Histogram, "gossiptrain_verify_replay_seconds",
               "Compute time of one verification replay", buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)),
    MetricSpec("verify_compute_seconds", Counter, "gossiptrain_verify_compute_seconds",
               "Trainer-thread seconds spent on verification (signatures, digests, replays)"),
    MetricSpec("train_compute_seconds", Counter, "gossiptrain_train_compute_seconds",
               "Trainer-thread seconds spent on inner steps"),
    MetricSpec("utilisation", Gauge, "gossiptrain_utilisation",
               "Share of wall time spent on inner steps since this process's first round (train compute / wall)"),
)


class NodeMetrics:
    """The node's metrics on their own registry, one attribute per METRICS entry (plus process_* from a
    ProcessCollector: memory, CPU, start time, for the drill-down panels and alerts)."""

    registry: CollectorRegistry
    info: Info
    inner_steps: Counter
    outer_rounds: Counter
    tokens: Counter
    tokens_per_second: Gauge
    train_loss: Gauge
    eval_loss: Gauge
    round: Gauge
    peers_live: Gauge
    dht_routing_peers: Gauge
    dht_rebootstraps: Counter
    exchanges: Counter
    exchange_seconds: Histogram
    exchange_bytes_per_second: Gauge
    exchange_completion_ratio: Gauge
    streams_refused: Counter
    incoming_streams: Counter
    records_refused: Counter
    sync_wait_seconds: Histogram
    round_seconds: Histogram
    bytes_sent: Counter
    bytes_received: Counter
    partner_distance: Gauge
    state_sync_seconds: Gauge
    state_sync_bytes: Counter
    states_refused: Counter
    state_uploads: Counter
    audit_uploads: Counter
    start_mode: Gauge
    checkpoint_seconds: Histogram
    checkpoint_last_success: Gauge
    checkpoints: Counter
    checkpoints_damaged: Counter
    peer_joins: Counter
    peer_leaves: Counter
    protocol_errors: Counter
    verifications: Counter
    audit_verdicts: Counter
    peers_flagged: Gauge
    commitments: Counter
    updates_refused: Counter
    replay_seconds: Histogram
    verify_compute_seconds: Counter
    train_compute_seconds: Counter
    utilisation: Gauge

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        for spec in METRICS:
            setattr(self, spec.attr, _register(spec, self.registry))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a background thread; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


def _register(spec: MetricSpec, registry: CollectorRegistry):
    """Create one metric on `registry`, with its zero-valued label children (so every value shows from the start)."""
    extra = {} if spec.buckets is None else {"buckets": spec.buckets}
    metric = spec.kind(spec.name, spec.help, spec.labels, registry=registry, **extra)
    for value in spec.zeros() if callable(spec.zeros) else spec.zeros:
        metric.labels(**{spec.labels[0]: value})
    return metric


assert {spec.attr for spec in METRICS} == set(NodeMetrics.__annotations__) - {"registry"}, \
    "every METRICS entry needs its NodeMetrics annotation, and the other way round"
