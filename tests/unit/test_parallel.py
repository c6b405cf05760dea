"""Data-parallel inner steps inside one node (`--devices cpu:2`): two gloo processes train as one node, their
replicas stay bit-identical, a verifier replays their round in one process, and the workers never outlive the node
or hang it."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from node.config import ConfigError, NodeConfig, parse_devices
from node.train.data import ShardSampler
from node.train.model import make_model
from node.train.parallel import DataParallel, ParallelError, rank_devices
from node.train.trainer import Trainer, inner_step, lr_at
from node.verify.replay import Replayer, ReplayError, describe_start, start_from_wire

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0  # collectives in these tests: a failure must show long before this


def _data_parallel(cfg: NodeConfig, timeout: float = TIMEOUT) -> DataParallel:
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return DataParallel(cfg, model, optimizer, rank_devices(cfg.devices), timeout=timeout)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def _rank0_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, ...]:
    parameters = list(model.parameters())
    return (_flat(parameters), _flat(optimizer.state[p]["exp_avg"] for p in parameters),
            _flat(optimizer.state[p]["exp_avg_sq"] for p in parameters))


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_devices_spec_is_validated():
    assert parse_devices("", lambda: 0) == []
    assert parse_devices("cpu:3", lambda: 0) == ["cpu"] * 3
    assert parse_devices("cuda:1,cuda:0", lambda: 2) == ["cuda:1", "cuda:0"]
    assert parse_devices("auto", lambda: 2) == ["cuda:0", "cuda:1"]
    NodeConfig(devices="cpu:2").validate()
    for spec, message in [("cpu:0", "1 <= N"), ("cpu", "cpu:N"), ("gpu:1", "must be"), ("cuda:0,cpu:1", "must be")]:
        with pytest.raises(ConfigError, match=message):
            NodeConfig(devices=spec).validate()
    for spec, gpus, message in [("cuda:2", 2, "cuda:2 not present"), ("cuda:0,cuda:0", 2, "once"),
                                ("auto", 0, "no CUDA GPU")]:
        with pytest.raises(ConfigError, match=message):
            parse_devices(spec, lambda gpus=gpus: gpus)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            NodeConfig(devices="cuda:0").validate()


def test_all_reduced_gradient_is_the_gradient_of_the_concatenated_batch(corpus, tiny_config):
    cfg = tiny_config(devices="cpu:2", grad_clip=1e9)  # no clipping: the gradients stay as all-reduced
    parallel = _data_parallel(cfg)
    reference = copy.deepcopy(parallel.replica.model)
    try:
        parallel.sync_state()
        loss = parallel.inner_step(ShardSampler(corpus, 0, cfg.num_shards, cfg.context, cfg.batch_size, 3), 1e-3)
        sampler = ShardSampler(corpus, 0, cfg.num_shards, cfg.context, cfg.batch_size, 3)
        batches = [sampler.next_batch() for _ in range(2)]  # rank 0's batch, then rank 1's
        want_loss = reference.loss(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        want_loss.backward()
        for got, want in zip(parallel.replica.model.parameters(), reference.parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-8)
        assert float(loss) == pytest.approx(float(want_loss.detach()), rel=1e-6)
        # rank 1 stepped with the very same mean gradient: its weights and AdamW moments are rank 0's, bit for bit
        for got, want in zip(parallel.worker_state(1), _rank0_state(parallel.replica.model, parallel.replica.optimizer)):
            assert torch.equal(got, want)
    finally:
        parallel.close()
    assert all(w.process.exitcode == 0 for w in parallel.workers)


def test_replicas_stay_identical_and_match_one_process_on_the_concatenated_batches(corpus, tiny_config):
    cfg = tiny_config(devices="cpu:2", inner_steps=4, wire_dtype="float32")
    trainer = Trainer(cfg, corpus, shard=0, sampler_seed=1)
    try:
        phi0 = trainer.slow_weights.clone()
        stats = trainer.run_round()
        assert stats.steps == 4 and stats.tokens == 4 * 2 * cfg.batch_size * cfg.context  # N x batch per step
        # one process, one model, the same 2 batches per step concatenated into one batch of 2 x batch_size
        model = make_model(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sampler = ShardSampler(corpus, 0, cfg.num_shards, cfg.context, cfg.batch_size, 1)
        for step in range(4):
            batches = [sampler.next_batch() for _ in range(2)]
            inner_step(model, optimizer, torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]),
                       lr_at(step, cfg), cfg.grad_clip)
        assert _rel_l2(trainer.fast_weights() - phi0, _flat(model.parameters()) - phi0) < 1e-4
        trainer.apply_outer_step(None)  # φ moves on rank 0 alone: the next round starts by broadcasting it
        meta, tensors = trainer.checkpoint_state()
        checkpoint = copy.deepcopy(meta), {name: tensor.clone() for name, tensor in tensors.items()}
        trainer.run_round()
        m, v, _ = trainer.flat_moments()
        assert [torch.equal(a, b) for a, b in zip(trainer.parallel.worker_state(1), (trainer.fast_weights(), m, v))] \
            == [True, True, True]
        second_round = trainer.fast_weights()
        # a verifier replays the round in one process from what the node commits: "ranks": 2 in its data
        tensors, data = describe_start(trainer.round_start)
        assert json.loads(data)["ranks"] == 2
        start = start_from_wire(tensors, data, trainer.round_start.global_step, trainer.numel)
        honest = trainer.fast_weights() - trainer.slow_weights
        replayed = Replayer(cfg, corpus).replay(start, cfg.inner_steps)
        assert _rel_l2(replayed, honest) < 1e-6  # measured 0.0: halving is exact, the split matches each rank's
        with pytest.raises(ReplayError, match="ranks"):
            start_from_wire(tensors, data.replace('"ranks":2', '"ranks":1000'), 0, trainer.numel)
        # a checkpoint loaded on rank 0 reaches the worker too: the round re-runs to the very same weights
        trainer.restore(*checkpoint)
        trainer.run_round()
        assert torch.equal(trainer.fast_weights(), second_round)
    finally:
        trainer.close()


def test_a_worker_killed_between_steps_is_a_clear_error_in_the_node(corpus, tiny_config):
    trainer = Trainer(tiny_config(devices="cpu:2"), corpus, shard=0, sampler_seed=1)
    try:
        trainer.run_round()
        trainer.apply_outer_step(None)
        os.kill(trainer.parallel.workers[0].process.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ParallelError, match=r"worker rank 1 \(cpu, pid \d+\) was killed by SIGKILL"):
            trainer.run_round()
        assert time.monotonic() - started < 5
        with pytest.raises(ParallelError, match="SIGKILL"):  # and it stays broken, without waiting again
            trainer.run_round()
    finally:
        trainer.close()


class PoisonedSampler:
    """Hands rank 1 token ids outside the vocabulary: its forward pass fails in the middle of the step."""

    def __init__(self, sampler: ShardSampler) -> None:
        self.sampler, self.draws = sampler, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.sampler.next_batch()
        self.draws += 1
        return (inputs + 10_000, targets) if self.draws % 2 == 0 else (inputs, targets)


def test_a_hanging_worker_is_a_clear_error_after_the_collective_timeout(corpus, tiny_config):
    cfg = tiny_config(devices="cpu:2")
    sampler = ShardSampler(corpus, 0, cfg.num_shards, cfg.context, cfg.batch_size, 3)
    parallel = _data_parallel(cfg, timeout=3.0)
    try:
        parallel.sync_state()
        parallel.inner_step(sampler, 1e-3)
        os.kill(parallel.workers[0].process.pid, signal.SIGSTOP)  # alive, but it will never answer
        started = time.monotonic()
        with pytest.raises(ParallelError, match="rank 1 .* alive but did not answer"):
            parallel.inner_step(sampler, 1e-3)
        assert time.monotonic() - started < 3.0 + 5  # the collective timeout, then a bounded diagnosis
    finally:
        parallel.close()  # kills the stopped worker
    assert parallel.workers[0].process.exitcode == -signal.SIGKILL


def test_a_worker_failing_mid_step_is_a_clear_error_with_its_reason(corpus, tiny_config):
    cfg = tiny_config(devices="cpu:2")
    sampler = ShardSampler(corpus, 0, cfg.num_shards, cfg.context, cfg.batch_size, 3)
    parallel = _data_parallel(cfg)
    try:
        parallel.sync_state()
        started = time.monotonic()
        with pytest.raises(ParallelError, match="rank 1 .* exited with code 1: IndexError"):
            parallel.inner_step(PoisonedSampler(sampler), 1e-3)
        assert time.monotonic() - started < 5
    finally:
        parallel.close()


PARENT = """
import sys, time
import torch
from node.config import NodeConfig
from node.train.model import make_model
from node.train.parallel import DataParallel, rank_devices
cfg = NodeConfig(d_model=32, n_layers=1, n_heads=2, context=32, batch_size=4, threads=1, devices="cpu:2")
model = make_model(cfg)
parallel = DataParallel(cfg, model, torch.optim.AdamW(model.parameters()), rank_devices(cfg.devices))
print(*(w.process.pid for w in parallel.workers), flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped (this container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_exit_when_the_node_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]  # the parent's start is bounded (START_TIMEOUT)
        assert len(pids) == 1 and not any(_gone(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in pids if not _gone(pid)]
    for pid in alive:  # never leave one behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive
