"""Test-only fault injection: make this node cheat, to prove that verification catches it.

It is off unless TWO environment variables are set: GOSSIPTRAIN_TEST_FAULT names the
attack and GOSSIPTRAIN_TEST_FAULT_ACK must equal FAULT_ACK exactly. There is no flag and
no config key, so a normal run cannot enable it by accident; when enabled the node
logs it loudly at start and on every round.

A cheating node sends θ' = φ + attack(Δ). By default it commits to exactly that (its
signed commitment is consistent with what it sends), so only a replay can expose it;
with `+hide` it commits to the honest update instead, so the signature it publishes
does not describe what it sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

FAULT_ENV = "GOSSIPTRAIN_TEST_FAULT"
FAULT_ACK_ENV = "GOSSIPTRAIN_TEST_FAULT_ACK"
FAULT_ACK = "this-node-cheats-for-a-test"

# attacks on the update tensor; the benchmark adds the ones that change the training itself
TENSOR_ATTACKS = ("noise", "scale", "sign_flip", "zero", "random")
# a donor that serves joiners a poisoned φ (a random direction, `strength` × ‖φ‖; default 10) and trains honestly
STATE_ATTACKS = ("poison_state",)


class FaultConfigError(ValueError):
    """GOSSIPTRAIN_TEST_FAULT is malformed or not acknowledged."""


@dataclass(frozen=True)
class Fault:
    kind: str
    strength: float = 1.0
    hide: bool = False  # commit to the honest update, send the attacked one

    def __str__(self) -> str:
        return f"{self.kind}:{self.strength:g}" + ("+hide" if self.hide else "")

    @property
    def poisons_state(self) -> bool:
        """A state attack (what a donor serves joiners), not an attack on the exchanged update."""
        return self.kind in STATE_ATTACKS

    def poison(self, slow: np.ndarray, seed: int) -> np.ndarray:
        """The φ a poisoning donor serves instead of `slow`: a random direction of `strength` × ‖φ‖."""
        noise = np.random.default_rng(seed).standard_normal(slow.shape).astype(np.float32)
        noise *= self.strength * float(np.linalg.norm(slow)) / max(float(np.linalg.norm(noise)), 1e-12)
        return noise

    def apply(self, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cheater's update in place of the honest Δ (a new tensor)."""
        norm = float(torch.linalg.vector_norm(delta))
        unit = norm / math.sqrt(max(1, delta.numel()))

        def gaussian() -> torch.Tensor:
            return torch.randn(delta.shape, generator=generator, dtype=delta.dtype).to(delta.device)

        if self.kind == "noise":  # Gaussian noise whose norm is `strength` × ‖Δ‖
            return delta + self.strength * unit * gaussian()
        if self.kind == "scale":
            return delta * self.strength
        if self.kind == "sign_flip":
            return -delta
        if self.kind == "zero":
            return torch.zeros_like(delta)
        if self.kind == "random":  # a random direction of `strength` × ‖Δ‖
            return self.strength * unit * gaussian()
        raise FaultConfigError(f"unknown attack {self.kind!r}")


def parse_fault(text: str) -> Fault:
    """`kind[:strength][+hide]`, e.g. `sign_flip`, `noise:0.5`, `scale:2+hide`."""
    text, hide = (text[: -len("+hide")], True) if text.endswith("+hide") else (text, False)
    kind, _, strength = text.partition(":")
    if kind not in TENSOR_ATTACKS + STATE_ATTACKS:
        raise FaultConfigError(f"{FAULT_ENV}={text!r}: attack must be one of "
                               f"{', '.join(TENSOR_ATTACKS + STATE_ATTACKS)}")
    try:
        value = float(strength) if strength else (10.0 if kind in STATE_ATTACKS else 1.0)
    except ValueError:
        raise FaultConfigError(f"{FAULT_ENV}={text!r}: strength must be a number") from None
    return Fault(kind, value, hide)


def fault_from_env(environ: Mapping[str, str]) -> Fault | None:
    text = environ.get(FAULT_ENV, "")
    if not text:
        return None
    if environ.get(FAULT_ACK_ENV) != FAULT_ACK:
        raise FaultConfigError(f"{FAULT_ENV} is set but {FAULT_ACK_ENV} is not {FAULT_ACK!r}: refusing to cheat")
    return parse_fault(text)


def cheat(trainer: Any, fault: Fault, generator: torch.Generator, round_: int) -> torch.Tensor | None:
    """θ ← φ + attack(θ − φ) on the trainer thread. Returns the update to commit to instead of the
    one sent (the honest Δ, with `+hide`), or None."""
    phi = trainer.slow_weights
    delta = trainer.fast_weights() - phi
    trainer.load_fast_weights(phi + fault.apply(delta, generator))
    logger.warning("TEST FAULT INJECTION: round %d sends a %s update", round_, fault)
    return delta if fault.hide else None
