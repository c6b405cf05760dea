"""Prometheus metrics of one node (prefix gossiptrain_), on their own registry and HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, start_http_server

from protocol import ProtocolError

EXCHANGE_RESULTS = ("ok", "rejected", "timeout", "peer_gone", "protocol_error", "aborted", "no_partner")
FAILED_RESULTS = ("timeout", "peer_gone", "protocol_error", "aborted")  # an accepted exchange that broke


def counts_by_label(counter: Counter, label: str) -> dict[str, int]:
    """A labelled counter's current values, e.g. {"ok": 12, "timeout": 1} (for summaries)."""
    return {
        sample.labels[label]: int(sample.value)
        for metric in counter.collect() for sample in metric.samples if sample.name.endswith("_total")
    }


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_* (memory, CPU, start time): the drill-down panels and alerts
        self.info = Info("gossiptrain", "Node identity and build", registry=r)
        self.inner_steps = Counter("gossiptrain_inner_steps", "Inner optimizer steps taken", registry=r)
        self.outer_rounds = Counter("gossiptrain_outer_rounds", "Outer rounds completed", ["mode"], registry=r)
        self.tokens = Counter("gossiptrain_tokens", "Training tokens processed", registry=r)
        self.tokens_per_second = Gauge(
            "gossiptrain_tokens_per_second", "Training throughput of the last round's inner steps", registry=r)
        self.train_loss = Gauge("gossiptrain_train_loss", "Mean training loss of the last round", registry=r)
        self.eval_loss = Gauge("gossiptrain_eval_loss", "Held-out loss of the slow weights", registry=r)
        self.round = Gauge("gossiptrain_round", "Current outer round", registry=r)
        self.peers_live = Gauge("gossiptrain_peers_live", "Other live peers in the DHT presence view", registry=r)
        self.exchanges = Counter("gossiptrain_exchanges", "Pair exchanges by result", ["result"], registry=r)
        self.exchange_seconds = Histogram(
            "gossiptrain_exchange_seconds", "Duration of successful pair exchanges", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.sync_wait_seconds = Histogram(
            "gossiptrain_sync_wait_seconds", "Time from round end to outer step (partner search + exchange)",
            registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60),
        )
        self.round_seconds = Histogram(
            "gossiptrain_round_seconds", "Compute time of the inner steps of one round", registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.bytes_sent = Counter("gossiptrain_bytes_sent", "Protocol bytes sent", ["kind"], registry=r)
        self.bytes_received = Counter("gossiptrain_bytes_received", "Protocol bytes received", ["kind"], registry=r)
        self.partner_distance = Gauge(
            "gossiptrain_partner_distance", "L2 distance between own and partner fast weights at the last exchange",
            registry=r,
        )
        self.state_sync_seconds = Gauge(
            "gossiptrain_state_sync_seconds", "Duration of this node's state download when it joined", registry=r)
        self.state_sync_bytes = Counter(
            "gossiptrain_state_sync_bytes", "Tensor bytes of state downloaded from donors on join", registry=r)
        self.state_uploads = Counter(
            "gossiptrain_state_uploads", "State requests served to joiners, by result", ["result"], registry=r)
        self.start_mode = Gauge(
            "gossiptrain_start_mode", "How this process got its weights (1 for the mode used)", ["mode"], registry=r)
        self.checkpoint_seconds = Histogram(
            "gossiptrain_checkpoint_seconds", "Time to write one checkpoint (fsync included)", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.checkpoint_last_success = Gauge(
            "gossiptrain_checkpoint_last_success_timestamp", "Unix time of the last checkpoint written", registry=r)
        self.checkpoints = Counter("gossiptrain_checkpoints", "Checkpoint writes by result", ["result"], registry=r)
        self.checkpoints_damaged = Counter(
            "gossiptrain_checkpoints_damaged", "Checkpoints found truncated or corrupt at start-up (skipped)",
            registry=r)
        self.peer_joins = Counter("gossiptrain_peer_joins", "Peers that appeared in the live view", registry=r)
        self.peer_leaves = Counter(
            "gossiptrain_peer_leaves", "Peers that left the live view (clean leave or presence expired)", registry=r)
        self.protocol_errors = Counter(
            "gossiptrain_protocol_errors", "Malformed or refused input from peers", ["kind"], registry=r
        )
        # verification (node/verify/service.py)
        self.verifications = Counter(
            "gossiptrain_verifications", "Audits this node replayed and voted on, by its vote", ["verdict"], registry=r)
        self.audit_verdicts = Counter(
            "gossiptrain_audit_verdicts", "Committee verdicts observed (2 of 3 votes), by verdict", ["verdict"],
            registry=r)
        self.peers_flagged = Gauge(
            "gossiptrain_peers_flagged", "Peers flagged by a verifier majority (excluded from pairing)", registry=r)
        self.commitments = Counter(
            "gossiptrain_commitments", "Update commitments published, by result", ["result"], registry=r)
        self.updates_refused = Counter(
            "gossiptrain_updates_refused", "Partner updates received but not applied, by reason", ["reason"],
            registry=r)
        self.replay_seconds = Histogram(
            "gossiptrain_verify_replay_seconds", "Compute time of one verification replay", registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.verify_compute_seconds = Counter(
            "gossiptrain_verify_compute_seconds", "Trainer-thread seconds spent on verification "
            "(signatures, digests, replays)", registry=r)
        self.train_compute_seconds = Counter(
            "gossiptrain_train_compute_seconds", "Trainer-thread seconds spent on inner steps", registry=r)
        for verdict in ("accept", "reject"):
            self.verifications.labels(verdict=verdict)
        for verdict in ("accept", "reject", "undecided"):
            self.audit_verdicts.labels(verdict=verdict)
        for result in ("ok", "failed", "skipped"):
            self.commitments.labels(result=result)
        for reason in ("flagged", "no_commitment", "digest_mismatch"):
            self.updates_refused.labels(reason=reason)
        for kind in sorted({"record", *(cls.kind for cls in (ProtocolError, *ProtocolError.__subclasses__()))}):
            self.protocol_errors.labels(kind=kind)  # every refusal kind is visible at 0 from the start
        for result in EXCHANGE_RESULTS:
            self.exchanges.labels(result=result)
        for mode in ("paired", "local"):
            self.outer_rounds.labels(mode=mode)
        for kind in ("exchange", "state", "audit"):
            self.bytes_sent.labels(kind=kind)
            self.bytes_received.labels(kind=kind)
        for result in ("ok", "refused", "failed"):
            self.state_uploads.labels(result=result)
        for result in ("ok", "failed"):
            self.checkpoints.labels(result=result)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics endpoint in a background thread; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
