"""A verifier's replay reproduces a peer's round exactly from what the peer committed and serves."""

import numpy as np
import pytest
import torch

from protocol.verification import data_assignment

from node.train.trainer import Trainer
from node.verify.faults import FAULT_ACK, FAULT_ACK_ENV, FAULT_ENV, Fault, FaultConfigError, fault_from_env, parse_fault
from node.verify.replay import Replayer, ReplayError, describe_start, sent_digest, start_digest, start_from_wire


@pytest.fixture(scope="module")
def trained_round(corpus, tiny_config):
    def make(rounds: int = 2, **changes) -> Trainer:
        """A trainer a few rounds in (Adam moments and sampler far from their initial state), one more round run."""
        trainer = Trainer(tiny_config(**changes), corpus, shard=1, sampler_seed=5)
        for _ in range(rounds):
            trainer.run_round()
            trainer.apply_outer_step(None)
        trainer.run_round()
        return trainer

    return make


def test_replay_from_the_served_state_is_bit_exact(corpus, trained_round):
    trainer = trained_round()
    start = trainer.round_start
    assert start.adam_step == 8 and start.global_step == 8
    honest = trainer.fast_weights() - trainer.slow_weights
    tensors, data = describe_start(start)  # what the peer commits to and serves to verifiers
    rebuilt = start_from_wire({k: v.copy() for k, v in tensors.items()}, data, start.global_step, trainer.numel)
    replayer = Replayer(trainer.cfg, corpus)
    replayed = replayer.replay(rebuilt, trainer.cfg.inner_steps)
    assert torch.equal(replayed, honest)
    # the replay did not touch the trainer, and a second replay gives the same answer
    assert torch.equal(replayer.replay(rebuilt, trainer.cfg.inner_steps), honest)


def test_micro_batch_split_is_close_but_not_identical(corpus, trained_round):
    trainer = trained_round()
    honest = trainer.fast_weights() - trainer.slow_weights
    replayed = Replayer(trainer.cfg, corpus).replay(trainer.round_start, trainer.cfg.inner_steps, micro_batches=2)
    assert float((replayed - honest).norm() / honest.norm()) < 1e-2


def test_cheating_on_work_changes_the_replay(corpus, trained_round):
    trainer = trained_round()
    honest = trainer.fast_weights() - trainer.slow_weights
    replayer = Replayer(trainer.cfg, corpus)
    skipped = replayer.replay(trainer.round_start, trainer.cfg.inner_steps, skip=frozenset({3}))
    assert float((skipped - honest).norm() / honest.norm()) > 0.05


def test_digests_bind_every_tensor_and_the_meta(trained_round):
    trainer = trained_round(rounds=1)
    tensors, data = describe_start(trainer.round_start)
    digest = start_digest(tensors, data, 4)
    assert start_digest(tensors, data, 5) != digest
    assert start_digest(tensors, data_assignment(0, {}, 4), 4) != digest
    for name in tensors:
        changed = {k: v.copy() for k, v in tensors.items()}
        changed[name][0] += 1e-7
        assert start_digest(changed, data, 4) != digest, name
    sent = {"theta": np.ones(3, dtype=np.float32)}
    assert sent_digest(sent) != sent_digest({"theta": np.full(3, 1.0000001, dtype=np.float32)})
    assert sent_digest(sent) != sent_digest({"phi": np.ones(3, dtype=np.float32)})


@pytest.mark.parametrize("data", ["not json", '{"shard": 1}', '{"shard": 1, "sampler": 5, "adam_step": 1}',
                                  '{"shard": "x", "sampler": {}, "adam_step": 1}'])
def test_malformed_data_assignment_is_a_replay_error(data):
    tensors = {name: np.zeros(4, dtype=np.float32) for name in ("phi", "adam_m", "adam_v")}
    with pytest.raises(ReplayError):
        start_from_wire(tensors, data, 0, 4)


def test_wrong_sizes_and_shards_are_replay_errors(corpus, trained_round):
    trainer = trained_round(rounds=0)
    tensors, data = describe_start(trainer.round_start)
    with pytest.raises(ReplayError):
        start_from_wire({k: v[:-1] for k, v in tensors.items()}, data, 0, trainer.numel)
    bad_shard = start_from_wire(tensors, data_assignment(999, trainer.round_start.sampler, 0), 0, trainer.numel)
    with pytest.raises(ReplayError):
        Replayer(trainer.cfg, corpus).replay(bad_shard, 2)


def test_fault_injection_needs_the_acknowledgement():
    assert fault_from_env({}) is None
    with pytest.raises(FaultConfigError, match="refusing"):
        fault_from_env({FAULT_ENV: "sign_flip"})
    assert fault_from_env({FAULT_ENV: "scale:2", FAULT_ACK_ENV: FAULT_ACK}) == Fault("scale", 2.0)
    for text in ("teleport", "scale:x"):
        with pytest.raises(FaultConfigError):
            parse_fault(text)


def test_fault_attacks():
    delta = torch.randn(1000)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(Fault("sign_flip").apply(delta, generator), -delta)
    assert torch.equal(Fault("scale", 2).apply(delta, generator), 2 * delta)
    assert not Fault("zero").apply(delta, generator).any()
    noisy = Fault("noise", 0.5).apply(delta, generator)
    assert float((noisy - delta).norm() / delta.norm()) == pytest.approx(0.5, rel=0.15)
    assert float(Fault("random", 1).apply(delta, generator).norm() / delta.norm()) == pytest.approx(1.0, rel=0.15)


def test_the_committed_micro_batch_split_is_replayed(corpus, trained_round):
    trainer = trained_round(micro_batches=2)
    honest = trainer.fast_weights() - trainer.slow_weights
    tensors, data = describe_start(trainer.round_start)
    assert '"micro_batches":2' in data
    rebuilt = start_from_wire(tensors, data, trainer.round_start.global_step, trainer.numel)
    assert torch.equal(Replayer(trainer.cfg, corpus).replay(rebuilt, trainer.cfg.inner_steps), honest)
