"""The NoLoCo outer step against the equations in DESIGN.md §4, element by element."""

import pytest
import torch

from node.train.outer_step import OuterHyper, outer_step_full, outer_step_theta


def random_state(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(5)]


def reference(phi, theta, delta, phi_j, theta_j, a, b, c):
    """The equations, written out per element with plain floats."""
    new_phi, new_delta = [], []
    for k in range(len(phi)):
        d_i = theta[k] - phi[k]
        if phi_j is None:
            mean_d, pull = d_i, 0.0
        else:
            d_j = theta_j[k] - phi_j[k]
            mean_d, pull = (d_i + d_j) / 2, (phi[k] + phi_j[k]) / 2 - phi[k]
        m = a * delta[k] + b * mean_d + c * pull
        new_delta.append(m)
        new_phi.append(phi[k] + m)
    return torch.tensor(new_phi, dtype=torch.float64), torch.tensor(new_delta, dtype=torch.float64)


@pytest.mark.parametrize("hyper", [OuterHyper(0.5, 0.7, 0.7), OuterHyper(0.3, 0.9, 0.5), OuterHyper(0.0, 1.0, 1.2)])
def test_full_form_matches_equations_including_gamma_not_beta(hyper):
    phi, theta, delta, phi_j, theta_j = random_state(1)
    got_phi, got_delta = outer_step_full(phi, theta, delta, phi_j, theta_j - phi_j, hyper)
    want_phi, want_delta = reference(phi.tolist(), theta.tolist(), delta.tolist(), phi_j.tolist(), theta_j.tolist(),
                                     hyper.alpha, hyper.beta, hyper.gamma)
    torch.testing.assert_close(got_phi, want_phi)
    torch.testing.assert_close(got_delta, want_delta)


def test_local_fallback_is_outer_momentum_on_own_delta():
    hyper = OuterHyper(0.5, 0.7, 0.3)
    phi, theta, delta, _, _ = random_state(2)
    got_phi, got_delta = outer_step_full(phi, theta, delta, None, None, hyper)
    torch.testing.assert_close(got_delta, 0.5 * delta + 0.7 * (theta - phi))
    torch.testing.assert_close(got_phi, phi + got_delta)
    want_phi, _ = reference(phi.tolist(), theta.tolist(), delta.tolist(), None, None, 0.5, 0.7, 0.3)
    torch.testing.assert_close(got_phi, want_phi)


def test_theta_only_shortcut_equals_full_form_when_gamma_equals_beta():
    hyper = OuterHyper(0.5, 0.7, 0.7)
    for seed in range(5):
        phi, theta, delta, phi_j, theta_j = random_state(seed, n=1000)
        full = outer_step_full(phi, theta, delta, phi_j, theta_j - phi_j, hyper)
        short = outer_step_theta(phi, theta, delta, theta_j, hyper)
        torch.testing.assert_close(short[0], full[0])
        torch.testing.assert_close(short[1], full[1])


def test_theta_only_local_fallback_equals_full_local():
    hyper = OuterHyper(0.5, 0.7, 0.7)
    phi, theta, delta, _, _ = random_state(3)
    torch.testing.assert_close(outer_step_theta(phi, theta, delta, None, hyper)[0],
                               outer_step_full(phi, theta, delta, None, None, hyper)[0])


def test_theta_only_refuses_gamma_not_beta():
    phi, theta, delta, _, theta_j = random_state(4)
    with pytest.raises(ValueError, match="gamma == beta"):
        outer_step_theta(phi, theta, delta, theta_j, OuterHyper(0.5, 0.7, 0.6))


def test_pair_updates_pull_replicas_together():
    """Two nodes that average with each other end closer than two that step alone."""
    hyper = OuterHyper(0.5, 0.7, 0.7)
    phi_a, theta_a, _, phi_b, theta_b = random_state(5)
    zero = torch.zeros_like(phi_a)
    paired_a, _ = outer_step_theta(phi_a, theta_a, zero, theta_b, hyper)
    paired_b, _ = outer_step_theta(phi_b, theta_b, zero, theta_a, hyper)
    alone_a, _ = outer_step_theta(phi_a, theta_a, zero, None, hyper)
    alone_b, _ = outer_step_theta(phi_b, theta_b, zero, None, hyper)
    assert (paired_a - paired_b).norm() < 0.5 * (alone_a - alone_b).norm()


def test_inputs_are_not_modified():
    hyper = OuterHyper(0.5, 0.7, 0.6)
    state = random_state(6)
    copies = [t.clone() for t in state]
    phi, theta, delta, phi_j, theta_j = state
    outer_step_full(phi, theta, delta, phi_j, theta_j, hyper)
    for before, after in zip(copies, state):
        assert torch.equal(before, after)
