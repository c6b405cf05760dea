"""The trainer wires θ, φ and δ into the outer step exactly as the equations say."""

import numpy as np
import pytest
import torch

from node.config import NodeConfig
from node.train.outer_step import OuterHyper, outer_step_full, outer_step_theta
from node.train.trainer import Trainer, lr_at


@pytest.fixture(scope="module")
def config(tiny_config):
    """The tiny model with rounds of 3 inner steps (the step counts below assume 3), on the float32 wire."""
    return lambda **changes: tiny_config(**{"inner_steps": 3, "wire_dtype": "float32", **changes})  # θ sent = θ


def test_round_then_paired_theta_outer_step(corpus, config):
    trainer = Trainer(config(), corpus, shard=0, sampler_seed=1)
    phi0 = trainer.slow_weights.clone()
    stats = trainer.run_round()
    assert stats.steps == 3 and stats.tokens == 3 * 4 * 32 and np.isfinite(stats.mean_loss)
    sent = trainer.outgoing_tensors()
    assert list(sent) == ["theta"] and sent["theta"].dtype == np.float32
    theta = torch.from_numpy(sent["theta"].copy())
    assert not torch.equal(theta, phi0)  # the inner steps moved θ away from φ
    partner = np.random.default_rng(0).standard_normal(trainer.numel).astype(np.float32)
    distance = trainer.apply_outer_step({"theta": partner})
    want_phi, want_delta = outer_step_theta(phi0, theta, torch.zeros_like(phi0), torch.from_numpy(partner), OuterHyper())
    torch.testing.assert_close(trainer.slow_weights, want_phi)
    torch.testing.assert_close(trainer.outer_momentum, want_delta)
    assert distance == pytest.approx(float((theta - torch.from_numpy(partner)).norm()), rel=1e-5)
    # θ ← φ after the outer step
    torch.testing.assert_close(torch.from_numpy(trainer.outgoing_tensors()["theta"].copy()), want_phi)


def test_gamma_not_beta_sends_phi_and_delta_and_uses_full_form(corpus, config):
    trainer = Trainer(config(gamma=0.5), corpus, shard=1, sampler_seed=2)
    assert trainer.tensor_names() == ("phi", "delta_update")
    phi0 = trainer.slow_weights.clone()
    trainer.run_round()
    sent = trainer.outgoing_tensors()
    theta = phi0 + torch.from_numpy(sent["delta_update"].copy())
    partner_phi = phi0 + 0.01
    partner_delta = torch.full_like(phi0, 0.02)
    trainer.apply_outer_step({"phi": partner_phi.numpy(), "delta_update": partner_delta.numpy()})
    want_phi, _ = outer_step_full(phi0, theta, torch.zeros_like(phi0), partner_phi, partner_delta,
                                  OuterHyper(0.5, 0.7, 0.5))
    torch.testing.assert_close(trainer.slow_weights, want_phi)


def test_local_outer_step_and_eval_of_slow_weights(corpus, config):
    trainer = Trainer(config(), corpus, shard=0, sampler_seed=3)
    before = trainer.evaluate()
    for _ in range(3):
        trainer.run_round()
        assert trainer.apply_outer_step(None) is None
    assert trainer.evaluate() < before


def test_lr_schedule_warms_up_then_decays_to_a_floor():
    cfg = NodeConfig(lr=1.0, warmup_steps=10, lr_schedule_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(10_000, cfg) == pytest.approx(0.1)


def _run_rounds(trainer: Trainer, rounds: int) -> list[float]:
    losses: list[float] = []
    for _ in range(rounds):
        losses += trainer.run_round().losses
        trainer.apply_outer_step(None)
    return losses


def _interrupt_after(trainer: Trainer, steps: int) -> None:
    """Set the trainer's interrupt once `steps` more batches have been drawn (as a SIGTERM would)."""
    draw = trainer.sampler.next_batch
    count = 0

    def counting():
        nonlocal count
        count += 1
        if count == steps:
            trainer.interrupt.set()
        return draw()

    trainer.sampler.next_batch = counting


@pytest.mark.parametrize("cut_at_step", [3, 5, 7])  # a round boundary (3 = 1 round) and mid-round cuts
def test_stop_checkpoint_resume_continues_step_for_step(corpus, config, tmp_path, cut_at_step):
    """Stopped after any inner step, checkpointed to disk and resumed in a fresh trainer, training
    continues bit-identically to an uninterrupted run: same losses at every step, same final state."""
    from node.train.checkpoint import load_latest, save_checkpoint

    cfg = config()
    reference = Trainer(cfg, corpus, shard=0, sampler_seed=5)
    want_losses = _run_rounds(reference, 4)

    first = Trainer(cfg, corpus, shard=0, sampler_seed=5)
    _interrupt_after(first, cut_at_step)  # step cut_at_step completes, then the trainer stops
    losses: list[float] = []
    while True:
        stats = first.run_round()
        losses += stats.losses
        if not first.round_complete:
            break
        first.apply_outer_step(None)
        if first.interrupt.is_set():
            break
    assert len(losses) == cut_at_step
    meta, tensors = first.checkpoint_state()
    save_checkpoint(tmp_path, meta, tensors)
    del first

    checkpoint, skipped = load_latest(tmp_path)
    assert checkpoint is not None and not skipped
    resumed = Trainer(cfg, corpus, shard=0, sampler_seed=999)  # another seed: everything must come from disk
    resumed.restore(checkpoint.meta, checkpoint.tensors)
    while len(losses) < len(want_losses):
        losses += resumed.run_round().losses
        resumed.apply_outer_step(None)
    assert losses == want_losses  # exact float equality, step for step
    assert torch.equal(resumed.slow_weights, reference.slow_weights)
    assert torch.equal(resumed.outer_momentum, reference.outer_momentum)
    assert resumed.global_step == reference.global_step == 12


def test_adopt_takes_the_donors_slow_state_and_step(corpus, config):
    donor = Trainer(config(), corpus, shard=0, sampler_seed=1)
    _run_rounds(donor, 2)
    boundary = donor.published
    slow, momentum, step = boundary.slow, boundary.momentum, boundary.global_step
    joiner = Trainer(config(), corpus, shard=1, sampler_seed=2)
    joiner.adopt(slow.copy(), momentum.copy(), step)
    assert joiner.global_step == step == 6 and joiner.step_in_round == 0
    assert torch.equal(joiner.slow_weights, donor.slow_weights)
    assert joiner.evaluate() == pytest.approx(donor.evaluate(), abs=1e-6)
    with pytest.raises(ValueError, match="parameters"):
        joiner.adopt(slow[:10].copy(), momentum[:10].copy(), step)


def test_the_published_boundary_is_a_read_only_snapshot_that_training_does_not_move(corpus, config):
    trainer = Trainer(config(), corpus, shard=0, sampler_seed=1)
    _run_rounds(trainer, 1)
    boundary = trainer.published
    before = boundary.slow.copy()
    assert not boundary.slow.flags.writeable and not boundary.momentum.flags.writeable
    trainer.run_round()  # inner steps move θ only
    assert np.array_equal(boundary.slow, before)
    trainer.apply_outer_step(None)  # a new boundary is a new snapshot; the old one stays as it was
    assert trainer.published is not boundary and np.array_equal(boundary.slow, before)


def test_inner_steps_leave_the_slow_weights_alone(corpus, config):
    """φ is fixed during a round: Δ = θ − φ must be the round's whole update (regression: the
    parameters once aliased φ's storage, so every inner step rewrote φ and Δ was always 0)."""
    trainer = Trainer(config(), corpus, shard=0, sampler_seed=4)
    for _ in range(2):
        phi = trainer.slow_weights.clone()
        trainer.run_round()
        assert torch.equal(trainer.slow_weights, phi)
        delta = torch.from_numpy(trainer.outgoing_tensors()["theta"].copy()) - phi
        assert float(delta.norm()) > 1e-3
        trainer.apply_outer_step(None)
        trainer.evaluate()  # evaluating φ must not leave θ pointing at φ either


def test_on_the_default_bfloat16_wire_the_node_sends_its_theta_rounded_and_steps_with_its_own(corpus, tiny_config):
    from protocol import codecs

    trainer = Trainer(tiny_config(inner_steps=3), corpus, shard=0, sampler_seed=1)
    assert trainer.cfg.wire_dtype == "bfloat16"
    phi0 = trainer.slow_weights.clone()
    trainer.run_round()
    theta = trainer.fast_weights()
    sent = trainer.outgoing_tensors()["theta"]
    assert np.array_equal(sent, codecs.round_trip(theta.numpy(), "bfloat16"))  # what the partner will hold
    assert not np.array_equal(sent, theta.numpy())
    partner = codecs.round_trip(np.random.default_rng(0).standard_normal(trainer.numel).astype(np.float32), "bfloat16")
    trainer.apply_outer_step({"theta": partner})
    want_phi, _ = outer_step_theta(phi0, theta, torch.zeros_like(phi0), torch.from_numpy(partner), OuterHyper())
    torch.testing.assert_close(trainer.slow_weights, want_phi)  # its own θ unrounded
