"""The trainer: inner steps, held-out evaluation and the outer step, on torch.

All methods run on one dedicated thread (the daemon calls them through a
single-worker executor), so the event loop never blocks on compute and the model is
never touched by two threads at once. Tensors cross to the network side as flat
float32 CPU arrays: that is the one narrow seam between the two worlds.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from node.config import NodeConfig
from node.data import Corpus, ShardSampler, heldout_batches
from node.model import ModelConfig, build_model
from node.outer_step import OuterHyper, outer_step_full, outer_step_theta


@dataclass(frozen=True)
class RoundStats:
    steps: int
    mean_loss: float
    last_loss: float
    tokens: int
    seconds: float


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine."""


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {requested} requested but CUDA is not available (torch {torch.__version__})")
    return torch.device(requested)


def lr_at(step: int, cfg: NodeConfig) -> float:
    """Linear warm-up, then cosine decay to 10% over lr_schedule_steps (a function of the global step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.lr_schedule_steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg: NodeConfig, corpus: Corpus, shard: int, sampler_seed: int) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        model_cfg = ModelConfig(context=cfg.context, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
        self.model = build_model(model_cfg, cfg.seed).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.hyper = OuterHyper(cfg.alpha, cfg.beta, cfg.gamma)
        self.slow_weights = self._fast_vector()  # parameters_to_vector already copies
        self.outer_momentum = torch.zeros_like(self.slow_weights)
        self.sampler = ShardSampler(corpus, shard, cfg.num_shards, cfg.context, cfg.batch_size, sampler_seed)
        self.heldout = heldout_batches(corpus, cfg.context, cfg.batch_size, cfg.eval_batches)
        self.global_step = 0
        self.numel = self.slow_weights.numel()
        self.interrupt = threading.Event()  # set by the daemon on leave: the round ends early

    def _fast_vector(self) -> torch.Tensor:
        return parameters_to_vector(self.model.parameters()).detach()

    def run_round(self) -> RoundStats:
        """H inner AdamW steps from θ = φ on this node's shard."""
        self.model.train()
        started = time.perf_counter()
        losses = []
        for _ in range(self.cfg.inner_steps):
            if self.interrupt.is_set() and losses:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.global_step, self.cfg)
            inputs, targets = self.sampler.next_batch()
            loss = self.model.loss(inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            losses.append(loss.detach())
            self.global_step += 1
        values = torch.stack(losses).float().cpu()
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        tokens = len(losses) * self.cfg.batch_size * self.cfg.context
        return RoundStats(len(losses), float(values.mean()), float(values[-1]), tokens, time.perf_counter() - started)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss of the slow weights φ on the shared held-out set."""
        fast = self._fast_vector().clone()
        vector_to_parameters(self.slow_weights, self.model.parameters())
        self.model.eval()
        total = sum(float(self.model.loss(x.to(self.device), y.to(self.device))) for x, y in self.heldout)
        vector_to_parameters(fast, self.model.parameters())
        return total / len(self.heldout)

    def outgoing_tensors(self) -> dict[str, np.ndarray]:
        """What this node sends its partner: θ when γ = β, else φ and Δ (flat float32, CPU)."""
        fast = self._fast_vector()
        if self.hyper.theta_only:
            tensors = {"theta": fast}
        else:
            tensors = {"phi": self.slow_weights, "delta_update": fast - self.slow_weights}
        return {name: t.float().cpu().contiguous().numpy() for name, t in tensors.items()}

    def tensor_names(self) -> tuple[str, ...]:
        return ("theta",) if self.hyper.theta_only else ("phi", "delta_update")

    @torch.no_grad()
    def apply_outer_step(self, partner: dict[str, np.ndarray] | None) -> float | None:
        """Outer step with the partner's tensors (or alone); sets θ ← φ. Returns ‖θ_i − θ_j‖ if paired."""
        fast = self._fast_vector()
        received = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in (partner or {}).items()}
        distance = None
        if self.hyper.theta_only:
            partner_fast = received.get("theta")
            if partner_fast is not None:
                distance = float(torch.linalg.vector_norm(fast - partner_fast))
            slow, momentum = outer_step_theta(self.slow_weights, fast, self.outer_momentum, partner_fast, self.hyper)
        else:
            partner_slow, partner_delta = received.get("phi"), received.get("delta_update")
            if partner_slow is not None and partner_delta is not None:
                distance = float(torch.linalg.vector_norm(fast - (partner_slow + partner_delta)))
            slow, momentum = outer_step_full(
                self.slow_weights, fast, self.outer_momentum, partner_slow, partner_delta, self.hyper
            )
        self.slow_weights, self.outer_momentum = slow, momentum
        vector_to_parameters(self.slow_weights, self.model.parameters())
        return distance

    def state_for_save(self) -> dict:
        return {
            "slow_weights": self.slow_weights.cpu(),
            "outer_momentum": self.outer_momentum.cpu(),
            "global_step": self.global_step,
        }
