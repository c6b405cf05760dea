"""NoLoCo outer step: pure functions on flat tensors, no I/O, tested against the equations.

    Δ_i  = θ_i − φ_i
    δ_i ← α·δ_i + β·mean(Δ_i, Δ_j) + γ·(mean(φ_i, φ_j) − φ_i)
    φ_i ← φ_i + δ_i ;   θ_i ← φ_i

With no partner (deadline passed, or ``--sync local``) the group is just i: the mean of
one is itself and the γ term vanishes. When γ = β the update only needs mean(θ_i, θ_j),
which is what the wire carries by default (half the bytes of sending φ and Δ).
"""

from __future__ import annotations

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
