"""`--overlap on`: 3 real nodes train on while their exchanges run in the background.

Each node takes the local outer step at once and lands its partner's correction at a later boundary. The swarm
still pairs (exchanges complete, corrections land), the held-out loss drops, and the replicas end far closer
together than nodes that never communicate (`--sync local`).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from node.tools.swarm import LocalSwarm
from node.train.checkpoint import load_latest
from tests.integration.conftest import TINY, poll

pytestmark = pytest.mark.integration

ROUNDS = 16  # replicas are compared at the end: enough rounds for averaging to dominate the drift
RUN_ARGS = TINY + ["--inner-steps", "20", "--rounds", str(ROUNDS), "--sync-timeout", "6", "--seed", "3",
                   "--checkpoint-every", "0"]


def paired_rounds(samples: dict[str, float]) -> int:
    """Boundaries at which a partner's correction landed."""
    return int(samples.get('gossiptrain_outer_rounds_total{mode="paired"}', 0))


def history(node) -> list[dict]:
    return [json.loads(line) for line in (node.work_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def run(swarm: LocalSwarm, watch: bool) -> dict:
    swarm.start()
    scrapes: list[dict[str, float]] = [{} for _ in range(swarm.num_nodes)]
    if watch:
        def every_node_landed_a_correction():
            for i in range(swarm.num_nodes):  # keep each node's last scrape: one done with its rounds is gone
                scrapes[i] = swarm.metrics(i) or scrapes[i]
            return all(paired_rounds(s) >= 1 for s in scrapes)

        poll(every_node_landed_a_correction, timeout=150, what="every node to land a partner's correction")
    codes = swarm.wait_finished(timeout=150)
    assert codes == [0] * swarm.num_nodes, [n.log_tail() for n in swarm.nodes]
    slow = [load_latest(n.work_dir / "checkpoints")[0].tensors["phi"] for n in swarm.nodes]
    distances = [float((a - b).norm()) for a, b in itertools.combinations(slow, 2)]
    return {"summaries": swarm.summaries(), "histories": [history(n) for n in swarm.nodes], "scrapes": scrapes,
            "logs": [n.log_path.read_text() for n in swarm.nodes], "distance": sum(distances) / len(distances)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for name, extra in (("overlap", ["--overlap", "on"]), ("local", ["--sync", "local"])):
        swarm = LocalSwarm(3, tmp_path_factory.mktemp(name), RUN_ARGS + extra)
        try:
            results[name] = run(swarm, watch=name == "overlap")
        finally:
            swarm.stop()
    return results


def test_nodes_pair_in_the_background_and_land_corrections(runs):
    overlap = runs["overlap"]
    for summary, log in zip(overlap["summaries"], overlap["logs"]):
        assert summary["rounds_done"] == ROUNDS and summary["round"] >= ROUNDS
        assert summary["exchanges"]["ok"] >= 2, summary
        assert "Traceback" not in log, log[-3000:]
    for samples in overlap["scrapes"]:
        assert paired_rounds(samples) >= 1
        assert 0 < samples["gossiptrain_utilisation"] <= 1  # inner-step seconds / wall seconds
    for rounds in overlap["histories"]:
        landed = [r for r in rounds if r.get("partner")]
        assert len(landed) >= 2, rounds  # corrections applied (each names the partner it came from)
        assert all(r["partner_distance"] > 0 for r in landed)


def test_loss_drops_clearly(runs):
    for summary in runs["overlap"]["summaries"]:
        assert summary["initial_eval_loss"] == pytest.approx(math.log(256), abs=0.1)
        assert summary["eval_loss"] < summary["initial_eval_loss"] - 1.5, summary


def test_replicas_end_much_closer_than_without_communication(runs):
    assert all(s["exchanges"]["ok"] == 0 for s in runs["local"]["summaries"])
    assert runs["overlap"]["distance"] < 0.5 * runs["local"]["distance"], (
        runs["overlap"]["distance"], runs["local"]["distance"])
