"""A node stopped (SIGTERM, mid-round) and restarted continues exactly where it was.

Real processes, one node training alone (--sync local, so nothing but its own state
decides the result): the stopped-and-resumed run ends bit-identical to an
uninterrupted run of the same length. A damaged newest checkpoint is detected,
reported, and the previous good one is used.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from node.tools.procs import session_members
from node.tools.swarm import LocalSwarm
from node.train.checkpoint import list_checkpoints, load_latest
from tests.integration.conftest import TINY, poll

pytestmark = pytest.mark.integration

ROUNDS = 6
INNER_STEPS = 60  # long rounds, so a SIGTERM lands mid-round


def args(tmp_path, extra=()):
    return TINY + ["--sync", "local", "--seed", "5", "--inner-steps", str(INNER_STEPS), "--rounds", str(ROUNDS),
                   "--checkpoint-every", "2", "--identity", str(tmp_path / "identity.key"), *extra]


def final_state(node) -> dict[str, torch.Tensor]:
    checkpoint, skipped = load_latest(node.work_dir / "checkpoints")
    assert checkpoint is not None and not skipped
    return checkpoint


def run_alone(swarm: LocalSwarm, extra: list[str] | None = None) -> int:
    node = swarm.start_node(0, [], extra)
    swarm.wait_until_up(node)
    return node.process.wait(timeout=240)


def inner_steps(swarm: LocalSwarm) -> int:
    return int(swarm.metrics(0).get("gossiptrain_inner_steps_total", 0))


def test_sigterm_mid_round_then_restart_matches_an_uninterrupted_run(tmp_path):
    # the same identity (hence the same data order) for both runs; they never run at the same time
    reference = LocalSwarm(1, tmp_path / "reference", args(tmp_path))
    interrupted = LocalSwarm(1, tmp_path / "interrupted", args(tmp_path))
    try:
        assert run_alone(reference) == 0
        want = final_state(reference.nodes[0])

        node = interrupted.start_node(0, [])
        interrupted.wait_until_up(node)
        # the counter moves at round ends: once 2 rounds are done (a periodic checkpoint written),
        # the SIGTERM lands inside round 3 or 4, between two round boundaries
        poll(lambda: 2 * INNER_STEPS <= inner_steps(interrupted), timeout=180, interval=0.05,
             what="the node to finish two rounds")
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=60) == 0, node.log_tail()
        stopped = final_state(node)
        assert stopped.meta["rounds_done"] < ROUNDS
        print(f"stopped at round {stopped.meta['round']}, inner step {stopped.meta['step_in_round']} of the next")

        assert run_alone(interrupted) == 0
        status = interrupted.nodes[0].poll_status()
        assert status["start"] == "resumed", status
        got = final_state(interrupted.nodes[0])
    finally:
        reference.stop()
        interrupted.stop()

    assert got.meta["round"] == want.meta["round"] == ROUNDS
    assert got.meta["global_step"] == want.meta["global_step"] == ROUNDS * INNER_STEPS
    assert got.meta["sampler"] == want.meta["sampler"]
    model_state = sorted(name for name in want.tensors if name != "rng.torch")  # torch's RNG is process-global
    assert sorted(got.tensors.keys() - {"rng.torch"}) == model_state
    for name in model_state:
        assert torch.equal(got.tensors[name], want.tensors[name]), name


def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path):
    swarm = LocalSwarm(1, tmp_path / "node", args(tmp_path, ["--rounds", "4"]))
    try:
        assert run_alone(swarm) == 0
        newest, previous = list_checkpoints(swarm.nodes[0].work_dir / "checkpoints")[:2]
        with open(newest, "r+b") as file:  # a torn write: the file ends mid-tensor
            file.truncate(newest.stat().st_size // 2)

        node = swarm.start_node(0, [], ["--rounds", "0"])  # until stopped
        swarm.wait_until_up(node)
        assert node.poll_status()["start"] == "resumed"
        assert previous.name in node.poll_status()["start_detail"]
        samples = poll(lambda: swarm.metrics(0), timeout=30, what="metrics")
        assert samples["gossiptrain_checkpoints_damaged_total"] == 1
        assert f"checkpoint {newest.name} is damaged" in node.log_path.read_text()
        swarm.stop()
        assert node.process.returncode == 0
    finally:
        swarm.stop()


def test_second_signal_forces_exit_without_orphaning_p2pd(tmp_path):
    swarm = LocalSwarm(1, tmp_path / "node", args(tmp_path, ["--rounds", "0", "--inner-steps", "2000"]))
    try:
        node = swarm.start_node(0, [])
        swarm.wait_until_up(node)
        p2pd = [pid for pid in session_members(node.process.pid) if pid != node.process.pid]
        assert p2pd  # the node's own p2pd
        # a hung p2pd makes the leave itself hang (its DHT calls wait out their timeouts) ...
        for pid in p2pd:
            os.kill(pid, signal.SIGSTOP)
        node.process.send_signal(signal.SIGTERM)
        poll(lambda: "stop requested" in node.log_path.read_text(), timeout=10, what="the leave to begin")
        assert node.process.poll() is None
        # ... and a second signal ends it at once, taking p2pd down with the node
        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=10) == 1, node.log_tail()
        assert "second signal" in node.log_path.read_text()
        poll(lambda: not session_members(node.process.pid), timeout=10, what="p2pd to be gone too")
    finally:
        swarm.stop()
