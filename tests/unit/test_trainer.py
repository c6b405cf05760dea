"""The trainer wires θ, φ and δ into the outer step exactly as the equations say."""

import numpy as np
import pytest
import torch

from node.config import NodeConfig
from node.data import load_corpus
from node.outer_step import OuterHyper, outer_step_full, outer_step_theta
from node.trainer import Trainer, lr_at

TINY = dict(d_model=32, n_layers=1, n_heads=2, context=32, batch_size=4, inner_steps=3, eval_batches=2, threads=1)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_round_then_paired_theta_outer_step(corpus):
    trainer = Trainer(NodeConfig(**TINY), corpus, shard=0, sampler_seed=1)
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


def test_gamma_not_beta_sends_phi_and_delta_and_uses_full_form(corpus):
    trainer = Trainer(NodeConfig(**TINY, gamma=0.5), corpus, shard=1, sampler_seed=2)
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


def test_local_outer_step_and_eval_of_slow_weights(corpus):
    trainer = Trainer(NodeConfig(**TINY), corpus, shard=0, sampler_seed=3)
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
