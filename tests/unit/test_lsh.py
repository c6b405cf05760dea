"""The structured LSH signature: exact where it must be, and its estimates track the true distances."""

import math

import numpy as np
import pytest
import torch

from protocol.verification import Tolerances, compare, hamming_fraction, sketch_rel_l2

from node.verify.lsh import UpdateSigner


@pytest.fixture(scope="module")
def signer():
    return UpdateSigner(50_000, seed=7)


def test_fold_matches_the_definition():
    signer = UpdateSigner(10_000, seed=3, buckets=64)
    delta = torch.randn(10_000)
    signs = signer.signs.double()
    want = torch.zeros(64, dtype=torch.float64)
    for i in range(10_000):
        want[i % 64] += signs[i] * delta[i].double()
    torch.testing.assert_close(signer.fold(delta), want)


def test_deterministic_and_seeded(signer):
    delta = torch.randn(50_000)
    assert signer.sign(delta) == UpdateSigner(50_000, seed=7).sign(delta.clone())
    assert signer.sign(delta).bits != UpdateSigner(50_000, seed=8).sign(delta).bits


def test_scale_keeps_bits_and_changes_norm_and_sketch(signer):
    delta = torch.randn(50_000)
    a, b = signer.sign(delta), signer.sign(2 * delta)
    assert a.bits == b.bits and b.norm == pytest.approx(2 * a.norm)
    assert sketch_rel_l2(b.sketch, a.sketch) == pytest.approx(1.0, rel=1e-6)
    assert hamming_fraction(signer.sign(-delta).bits, a.bits) == 1.0


@pytest.mark.parametrize("relative", [0.01, 0.1, 0.5, 1.0])
def test_estimates_track_true_relative_distance(signer, relative):
    generator = torch.Generator().manual_seed(int(relative * 1000))
    base = torch.randn(50_000, generator=generator)
    noise = torch.randn(50_000, generator=generator)
    other = base + relative * noise * base.norm() / noise.norm()
    a, b = signer.sign(other), signer.sign(base)
    true_rel = float((other - base).norm() / base.norm())
    assert sketch_rel_l2(a.sketch, b.sketch) == pytest.approx(true_rel, rel=0.3)
    angle = math.acos(float(torch.dot(other, base) / (other.norm() * base.norm())))
    assert hamming_fraction(a.bits, b.bits) == pytest.approx(angle / math.pi, abs=0.08)


def test_identical_updates_pass_and_tiny_float_noise_stays_far_below_tolerance(signer):
    delta = torch.randn(50_000) * 1e-3
    jitter = delta * (1 + 1e-6 * torch.randn(50_000))
    result = compare(signer.sign(jitter), signer.sign(delta), Tolerances(0.1, 0.25, 1.1))
    assert result.ok and result.rel_l2 < 1e-4


def test_shape_is_checked(signer):
    with pytest.raises(ValueError):
        signer.sign(torch.zeros(10))
    assert np.isfinite(signer.sign(torch.zeros(50_000)).norm)
