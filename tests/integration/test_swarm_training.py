"""A 3-node swarm of real processes trains one model with random-pair gossip."""

from __future__ import annotations

import itertools
import math

import pytest

from node.tools.swarm import LocalSwarm
from node.train.checkpoint import load_latest
from tests.integration.conftest import TINY, poll, rounds_done

pytestmark = pytest.mark.integration

ROUNDS = 12
RUN_ARGS = TINY + ["--inner-steps", "20", "--rounds", str(ROUNDS), "--sync-timeout", "6", "--seed", "7"]
REQUIRED_METRICS = [
    "gossiptrain_info", "gossiptrain_inner_steps_total", "gossiptrain_outer_rounds_total",
    "gossiptrain_tokens_total", "gossiptrain_train_loss", "gossiptrain_peers_live", "gossiptrain_exchanges_total",
    "gossiptrain_exchange_seconds", "gossiptrain_sync_wait_seconds", "gossiptrain_bytes_sent_total",
    "gossiptrain_bytes_received_total", "gossiptrain_partner_distance", "gossiptrain_protocol_errors_total",
]


def run_to_completion(swarm: LocalSwarm, mid_run_snapshot: bool) -> dict:
    swarm.start()
    snapshot = {}
    if mid_run_snapshot:
        # metrics of a live node, once it has done a few paired rounds
        def all_live_after_3_rounds():
            scrapes = [swarm.metrics(i) for i in range(swarm.num_nodes)]
            return all(m and rounds_done(m) >= 3 for m in scrapes) and scrapes

        snapshot = poll(all_live_after_3_rounds, timeout=180, what="every node to compute 3 rounds")
    codes = swarm.wait_finished(timeout=300)
    assert codes == [0] * swarm.num_nodes, [n.log_tail() for n in swarm.nodes]
    slow = [load_latest(n.work_dir / "checkpoints")[0].tensors["phi"] for n in swarm.nodes]
    distances = [float((a - b).norm()) for a, b in itertools.combinations(slow, 2)]
    return {"summaries": swarm.summaries(), "metrics": snapshot, "distance": sum(distances) / len(distances)}


@pytest.fixture(scope="module")
def gossip_run(tmp_path_factory):
    swarm = LocalSwarm(3, tmp_path_factory.mktemp("gossip"), RUN_ARGS)
    try:
        yield run_to_completion(swarm, mid_run_snapshot=True)
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    swarm = LocalSwarm(3, tmp_path_factory.mktemp("local"), RUN_ARGS + ["--sync", "local"])
    try:
        yield run_to_completion(swarm, mid_run_snapshot=False)
    finally:
        swarm.stop()


def test_every_node_completes_its_rounds_and_exchanges(gossip_run):
    for summary in gossip_run["summaries"]:
        assert summary["rounds_done"] == ROUNDS
        assert summary["round"] >= ROUNDS  # the swarm clock: pairs leave with the later round
        assert summary["exchanges"]["ok"] >= 1, summary
        assert summary["peers_seen"] == 2, summary


def test_every_node_heldout_loss_drops_clearly(gossip_run):
    for summary in gossip_run["summaries"]:
        assert summary["initial_eval_loss"] == pytest.approx(math.log(256), abs=0.1)  # untrained: uniform bytes
        assert summary["eval_loss"] < summary["initial_eval_loss"] - 1.5, summary


def test_gossip_keeps_replicas_closer_than_local_training(gossip_run, local_run):
    assert all(s["exchanges"]["ok"] == 0 for s in local_run["summaries"])
    assert gossip_run["distance"] < 0.5 * local_run["distance"], (gossip_run["distance"], local_run["distance"])


@pytest.mark.parametrize("index", range(3))
def test_live_node_serves_metrics_with_sensible_values(gossip_run, index):
    samples = gossip_run["metrics"][index]
    names = {key.split("{")[0] for key in samples}
    for name in REQUIRED_METRICS:
        assert any(n == name or n.startswith(name + "_") for n in names), f"{name} missing from /metrics"
    assert samples["gossiptrain_inner_steps_total"] >= 3 * 10
    assert samples["gossiptrain_tokens_total"] == samples["gossiptrain_inner_steps_total"] * 8 * 64
    assert 0 < samples["gossiptrain_train_loss"] < math.log(256) + 0.5
    assert samples["gossiptrain_peers_live"] == 2
    assert rounds_done(samples) >= 3
    assert samples["gossiptrain_round"] >= rounds_done(samples)
    if samples['gossiptrain_exchanges_total{result="ok"}'] >= 1:
        numel_bytes = samples['gossiptrain_bytes_sent_total{kind="exchange"}']
        assert numel_bytes > 4 * 50_000  # at least one model's worth of fp32 went out
        assert samples["gossiptrain_partner_distance"] > 0
        assert samples["gossiptrain_exchange_seconds_count"] >= 1
    assert samples["gossiptrain_sync_wait_seconds_count"] >= 3
    assert samples['gossiptrain_protocol_errors_total{kind="malformed"}'] == 0
    info = [k for k in samples if k.startswith("gossiptrain_info{")]
    assert info and 'run_id="gossiptrain-default"' in info[0]
