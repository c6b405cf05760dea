"""NoLoCo outer step: pure functions on flat tensors, no I/O, tested against the equations.

    Δ_i  = θ_i − φ_i
    δ_i ← α·δ_i + β·mean(Δ_i, Δ_j) + γ·(mean(φ_i, φ_j) − φ_i)
    φ_i ← φ_i + δ_i ;   θ_i ← φ_i

With no partner (deadline passed, or ``--sync local``) the group is just i: the mean of
one is itself and the γ term vanishes. When γ = β the update only needs mean(θ_i, θ_j),
which is what the wire carries by default (half the bytes of sending φ and Δ).

With ``overlap on`` the step is taken eagerly (local, at once) and the pair's part lands later as a
correction (`eager_outer_step`, `apply_correction`; protocol/SPEC.md §4.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OuterHyper:
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7

    @property
    def theta_only(self) -> bool:
        """True when the pair may exchange θ alone (γ = β)."""
        return self.gamma == self.beta


def outer_step_full(
    slow: torch.Tensor,
    fast: torch.Tensor,
    momentum: torch.Tensor,
    partner_slow: torch.Tensor | None,
    partner_delta: torch.Tensor | None,
    hyper: OuterHyper,
) -> tuple[torch.Tensor, torch.Tensor]:
    """General form (any γ): needs the partner's φ_j and Δ_j. Returns (new φ, new δ)."""
    delta_i = fast - slow
    if partner_slow is None or partner_delta is None:
        mean_delta, slow_pull = delta_i, torch.zeros_like(slow)
    else:
        mean_delta = (delta_i + partner_delta) * 0.5
        slow_pull = (slow + partner_slow) * 0.5 - slow
    new_momentum = hyper.alpha * momentum + hyper.beta * mean_delta + hyper.gamma * slow_pull
    return slow + new_momentum, new_momentum


def outer_step_theta(
    slow: torch.Tensor,
    fast: torch.Tensor,
    momentum: torch.Tensor,
    partner_fast: torch.Tensor | None,
    hyper: OuterHyper,
) -> tuple[torch.Tensor, torch.Tensor]:
    """γ = β shortcut: δ ← α·δ + β·(mean(θ_i, θ_j) − φ_i). Returns (new φ, new δ)."""
    if not hyper.theta_only:
        raise ValueError("the θ-only outer step is exact only when gamma == beta")
    mean_fast = fast if partner_fast is None else (fast + partner_fast) * 0.5
    new_momentum = hyper.alpha * momentum + hyper.beta * (mean_fast - slow)
    return slow + new_momentum, new_momentum


# --------------------------------------------------------------------------- overlapped (eager) outer step
# With `overlap on` a node takes the local (n = 1) outer step at once and exchanges in the background. When the
# partner's tensors arrive, the paired step differs from the local one by a correction c, added to δ (paired δ =
# local δ + c, see `pair_correction_*`). The outer step is linear in δ, so c applied m ≥ 1 boundaries later, just
# before that boundary's outer step, gives exactly the state the paired step would have given (for the same Δs):
#     φ += c·Σ_{k=0}^{m−1} α^k ,   δ += α^{m−1}·c
# c must be taken from the node's slow weights AT the exchange's boundary, i.e. the round's start φ_s plus what
# a correction landing at that same boundary added. Taken from φ_s alone, the pull overshoots by that earlier
# correction and the pair's difference grows (spectral radius 1.09 at α = 0.5, β = γ = 0.7: a pair that
# exchanges every round diverges; tests/unit/test_overlap.py).


def pair_correction_theta(fast: torch.Tensor, partner_fast: torch.Tensor, hyper: OuterHyper) -> torch.Tensor:
    """γ = β: paired δ − local δ = β·(mean(θ_i, θ_j) − θ_i) = β·(θ_j − θ_i)/2, with θ_i = φ_i + Δ_i for the
    node's slow weights φ_i at the exchange's boundary."""
    if not hyper.theta_only:
        raise ValueError("the θ-only correction is exact only when gamma == beta")
    return hyper.beta * 0.5 * (partner_fast - fast)


def pair_correction_full(
    slow: torch.Tensor,
    delta_update: torch.Tensor,
    partner_slow: torch.Tensor,
    partner_delta: torch.Tensor,
    hyper: OuterHyper,
) -> torch.Tensor:
    """Any γ: paired δ − local δ = β·(Δ_j − Δ_i)/2 + γ·(φ_j − φ_i)/2 (φ_i: the node's slow weights at the
    exchange's boundary)."""
    return hyper.beta * 0.5 * (partner_delta - delta_update) + hyper.gamma * 0.5 * (partner_slow - slow)


def apply_correction(
    slow: torch.Tensor, momentum: torch.Tensor, correction: torch.Tensor, lag: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A correction from `lag` (m ≥ 1) boundaries ago, applied before this boundary's outer step (equivalently:
    just after the previous one). Returns (new φ, new δ)."""
    if lag < 1:
        raise ValueError(f"a correction lands at least one boundary after its exchange, not {lag}")
    return slow + correction * sum(alpha**k for k in range(lag)), momentum + correction * alpha ** (lag - 1)


def local_outer_step(
    slow: torch.Tensor, delta_update: torch.Tensor, momentum: torch.Tensor, hyper: OuterHyper
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n = 1 outer step on a given Δ: δ ← α·δ + β·Δ ; φ ← φ + δ. Returns (new φ, new δ)."""
    new_momentum = hyper.alpha * momentum + hyper.beta * delta_update
    return slow + new_momentum, new_momentum


def eager_outer_step(
    slow: torch.Tensor,
    fast: torch.Tensor,
    momentum: torch.Tensor,
    corrections: Sequence[tuple[torch.Tensor, int]],
    hyper: OuterHyper,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`overlap on` at a boundary: Δ = θ − φ (φ: this round's start), then every landed correction (c, m),
    then the local outer step with Δ. Returns (new φ, new δ, φ after the corrections: the slow weights an
    exchange started at this boundary measures its pull from)."""
    delta_update = fast - slow
    for correction, lag in corrections:
        slow, momentum = apply_correction(slow, momentum, correction, lag, hyper.alpha)
    return (*local_outer_step(slow, delta_update, momentum, hyper), slow)
