"""The trainer: inner steps, held-out evaluation and the outer step, on torch.

All methods run on one dedicated thread (the daemon calls them through a
single-worker executor), so the event loop never blocks on compute and the model is
never touched by two threads at once. Tensors cross to the network side as flat
float32 CPU arrays: that is the one narrow seam between the two worlds.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

from protocol import codecs

from node.config import ConfigError, NodeConfig
from node.train.data import Corpus, ShardSampler, heldout_batches
from node.train.model import make_model
from node.train.outer_step import (
    OuterHyper,
    apply_correction,
    eager_outer_step,
    outer_step_full,
    outer_step_theta,
    pair_correction_full,
    pair_correction_theta,
)
from node.train.parallel import DataParallel, rank_devices


@dataclass(frozen=True)
class RoundStats:
    steps: int
    mean_loss: float
    tokens: int
    seconds: float
    losses: tuple[float, ...] = ()  # every inner step's loss, in order


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The inner step's autocast precision on `device`: bfloat16 on a CUDA GPU that has it, else none (float32).
    A function of the device alone, so a replay on the same kind of device computes exactly what training did
    (a model whose `mixed_precision` is False stays float32 anyway)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def inner_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               lr: float, grad_clip: float, micro_batches: int = 1, autocast: torch.dtype | None = None,
               average: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One inner AdamW step (gradient accumulated over `micro_batches` splits of the batch); returns the loss.

    `autocast`: the forward pass's precision (`autocast_dtype`); parameters, gradients and AdamW stay float32.
    Shared by training and by verification replays, so a replay runs exactly this code.
    """
    device = next(model.parameters()).device
    if not getattr(model, "mixed_precision", True):
        autocast = None  # a model that trains in float32 everywhere (the builtin GPT: see ByteGPT.mixed_precision)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    batch = inputs.shape[0]
    for x, y in zip(torch.tensor_split(inputs, micro_batches), torch.tensor_split(targets, micro_batches)):
        if not len(x):
            continue
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) * (len(x) / batch)
        loss.backward()
        total += loss.detach()
    if average is not None:  # data-parallel ranks (node/train/parallel.py): every rank's mean gradient and loss
        total = average(model, total)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return total


@dataclass(frozen=True)
class RoundStart:
    """What a verifier needs to replay a round: φ, the AdamW moments and step, the data position.

    Captured before the round's first inner step. φ is never mutated (it is replaced at the
    outer step), so it is shared, not copied; the moments are copies.
    """

    global_step: int
    shard: int
    sampler: dict
    adam_step: int
    phi: torch.Tensor
    adam_m: torch.Tensor
    adam_v: torch.Tensor
    micro_batches: int = 1  # the gradient-accumulation split: committed, so a replay uses the same one
    ranks: int = 1  # data-parallel ranks (`--devices`): a step is the mean over this many consecutive batches

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name).float().cpu().contiguous().numpy() for name in START_TENSORS}


START_TENSORS = ("phi", "adam_m", "adam_v")


@dataclass(frozen=True)
class PartnerUpdate:
    """An exchange that completed in the background (`overlap on`): what this node sent at the boundary it
    started at, what the partner sent, `lag`, how many outer steps this node has taken since then (m ≥ 1; its
    own local step at that boundary included), and `shift`, what the correction that landed at that boundary
    added to φ (None: none landed). The sent tensors describe the round's start φ_s; the node's slow weights
    at that boundary were φ_s + shift, and the pair's pull is measured from there."""

    sent: dict[str, np.ndarray]
    received: dict[str, np.ndarray]
    lag: int
    shift: torch.Tensor | None = None


@dataclass(frozen=True)
class SlowState:
    """φ, δ (flat float32 CPU arrays, read-only) and the global step at a round boundary.

    Made on the trainer thread when a round ends, never written to afterwards: the event loop
    (a donor serving a joiner) reads it without touching the trainer or the device.
    """

    slow: np.ndarray
    momentum: np.ndarray
    global_step: int

    @classmethod
    def of(cls, slow: torch.Tensor, momentum: torch.Tensor, global_step: int) -> SlowState:
        arrays = []
        for tensor in (slow, momentum):
            array = tensor.float().cpu().numpy()  # on CPU a view: φ and δ are replaced, never mutated in place
            array.flags.writeable = False
            arrays.append(array)
        return cls(arrays[0], arrays[1], global_step)



def outgoing_tensors(slow: torch.Tensor, fast: torch.Tensor, theta_only: bool, wire_dtype: str,
                     reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The tensors a node with slow weights `slow` and fast weights `fast` sends its partner, as they arrive
    (flat float32, CPU, rounded to `wire_dtype`; blockwise8 weights against the swarm's `reference`): θ when
    γ = β, else φ and Δ. A verifier rebuilds them from its replay the same way (node/verify/service.py)."""
    if theta_only:
        tensors = {"theta": fast}
    else:
        tensors = {"phi": slow, "delta_update": fast - slow}
    return {name: codecs.round_trip(t.float().cpu().contiguous().numpy(), wire_dtype,
                                    codecs.reference_for(name, reference))
            for name, t in tensors.items()}

def training_model(cfg: NodeConfig, vocab_size: int, device: torch.device,
                   load_weights: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and AdamW that train: the node's (rank 0) and each data-parallel worker's are built here, so the
    replicas cannot drift apart in how they are set up. (`load_weights` False: a worker, whose weights come from
    rank 0, skips reading --init-weights.)"""
    if device.type == "cuda":
        if device.index is not None:  # a data-parallel rank's own GPU ("cuda" alone: the current one)
            torch.cuda.set_device(device)
        if cfg.verify == "on":
            # verifiers replay our rounds: keep cheap sources of nondeterminism off (TF32 alone changes
            # matmul results by ~1e-3 relative); what remains is measured by `gossiptrain bench verify`
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.deterministic = True
    model = make_model(cfg, vocab_size, load_weights=load_weights).to(device)
    if cfg.compile == "on":
        # compiles this module's forward in place: parameters, their order and the state dict stay as they
        # are; verification replays build their own model and run it eagerly
        if not hasattr(model, "compile"):
            raise ConfigError(f"compile on needs torch >= 2.2 (nn.Module.compile); this is {torch.__version__}")
        model.compile()
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class Trainer:
    """Owns the model, the optimizer and φ/δ. Its methods run on the trainer thread only (the node's
    single-worker executor); what the event loop gets are return values and `published`, an
    immutable snapshot of the last round boundary."""

    def __init__(self, cfg: NodeConfig, corpus: Corpus, shard: int, sampler_seed: int) -> None:
        self.cfg = cfg
        devices = rank_devices(cfg.devices)  # data-parallel ranks, rank 0 (this process) first; []: one process
        self.device = devices[0] if devices else resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.model, self.optimizer = training_model(cfg, corpus.vocab_size, self.device)
        self.autocast = autocast_dtype(self.device)
        self.hyper = OuterHyper(cfg.alpha, cfg.beta, cfg.gamma)
        self.slow_weights = self._fast_vector()  # parameters_to_vector already copies
        # blockwise8 codes weights against the swarm's initial weights (protocol/codecs.py): these, before
        # any checkpoint or state sync replaces them, as every node builds them from the manifest
        self.wire_reference = (codecs.make_reference(self.slow_weights.float().cpu().numpy())
                               if cfg.wire_dtype == "blockwise8" else None)
        self.outer_momentum = torch.zeros_like(self.slow_weights)
        self.published = SlowState.of(self.slow_weights, self.outer_momentum, 0)
        self.sampler = ShardSampler(corpus, shard, cfg.num_shards, cfg.context, cfg.batch_size, sampler_seed)
        self.heldout = heldout_batches(corpus, cfg.context, cfg.batch_size, cfg.eval_batches)
        self.global_step = 0
        self.step_in_round = 0  # inner steps of the current round done so far (a leave may cut a round)
        self.numel = self.slow_weights.numel()
        self.interrupt = threading.Event()  # set by the daemon on leave: the round ends early
        self.shard = shard
        self.round_start: RoundStart | None = None  # the current round's start (None: resumed mid-round)
        # ranks 1..N-1 (`--devices`): worker processes that mirror this model and step with it
        self.parallel = DataParallel(cfg, self.model, self.optimizer, devices, corpus.vocab_size) if len(devices) > 1 else None
        self.ranks = len(devices) if self.parallel is not None else 1

    def fast_weights(self) -> torch.Tensor:
        """θ as a flat copy."""
        return self._fast_vector()

    def load_fast_weights(self, flat: torch.Tensor) -> None:
        """θ ← flat (copied)."""
        self._load_parameters(flat)

    def _fast_vector(self) -> torch.Tensor:
        return parameters_to_vector(self.model.parameters()).detach()  # a copy

    @torch.no_grad()
    def _load_parameters(self, flat: torch.Tensor) -> None:
        """θ ← flat, copied into the parameters' own storage. (torch's vector_to_parameters would make
        the parameters views of `flat`, so the inner steps would silently rewrite φ as well.)"""
        offset = 0
        for parameter in self.model.parameters():
            count = parameter.numel()
            parameter.copy_(flat[offset : offset + count].view_as(parameter))
            offset += count

    def flat_moments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """AdamW's first and second moments as flat copies in parameter order, and its step count."""
        m, v, step = [], [], 0
        for parameter in self.model.parameters():
            state = self.optimizer.state.get(parameter, {})
            if "exp_avg" in state:
                m.append(state["exp_avg"].reshape(-1))
                v.append(state["exp_avg_sq"].reshape(-1))
                step = int(state["step"])
            else:
                m.append(torch.zeros_like(parameter).reshape(-1))
                v.append(torch.zeros_like(parameter).reshape(-1))
        return torch.cat(m).detach(), torch.cat(v).detach(), step  # torch.cat copies

    def _capture_start(self) -> RoundStart:
        m, v, step = self.flat_moments()
        return RoundStart(self.global_step, self.shard, copy.deepcopy(self.sampler.state_dict()), step,
                          self.slow_weights, m, v, self.cfg.micro_batches, self.ranks)

    @property
    def round_complete(self) -> bool:
        return self.step_in_round >= self.cfg.inner_steps

    def run_round(self) -> RoundStats:
        """The rest of the round's H inner AdamW steps from θ = φ on this node's shard.

        A set `interrupt` stops between two steps; `step_in_round` remembers where, so a
        checkpoint taken then resumes the round exactly (the next call does the remaining steps).
        """
        self.model.train()
        started = time.perf_counter()
        losses = []
        if self.parallel is not None and not self.round_complete:
            self.parallel.sync_state()  # what changed here since the last step (outer step, sync, restore) reaches all
        while self.step_in_round < self.cfg.inner_steps:
            if self.interrupt.is_set():
                break
            if self.step_in_round == 0 and self.cfg.verify == "on":  # only verifiers replay rounds
                self.round_start = self._capture_start()
            lr = lr_at(self.global_step, self.cfg)
            if self.parallel is not None:
                loss = self.parallel.inner_step(self.sampler, lr, self.autocast)
            else:
                inputs, targets = self.sampler.next_batch()
                loss = inner_step(self.model, self.optimizer, inputs, targets, lr, self.cfg.grad_clip,
                                  self.cfg.micro_batches, self.autocast)
            losses.append(loss)
            self.global_step += 1
            self.step_in_round += 1
        if not losses:
            return RoundStats(0, math.nan, 0, time.perf_counter() - started)
        values = torch.stack(losses).float().cpu()
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite training loss at step {self.global_step}")
        tokens = len(losses) * self.ranks * self.cfg.batch_size * self.cfg.context
        return RoundStats(len(losses), float(values.mean()), tokens, time.perf_counter() - started,
                          tuple(values.tolist()))

    def close(self) -> None:
        """Stop the data-parallel workers, if any (the node is leaving)."""
        if self.parallel is not None:
            self.parallel.close()

    def evaluate(self) -> float:
        """Mean loss of the slow weights φ on the shared held-out set."""
        return self.heldout_loss_of(self.slow_weights)

    @torch.no_grad()
    def heldout_loss_of(self, weights: torch.Tensor | np.ndarray) -> float:
        """Mean held-out loss of flat `weights` (φ, or a donor's φ before it is adopted); θ is left as it was."""
        if isinstance(weights, np.ndarray):
            weights = torch.from_numpy(weights)
        self._check_numel(weights)
        fast = self._fast_vector()  # a copy
        try:
            self._load_parameters(weights.to(self.device))
            self.model.eval()
            total = sum(float(self.model.loss(x.to(self.device), y.to(self.device))) for x, y in self.heldout)
        finally:
            self._load_parameters(fast)
        return total / len(self.heldout)

    def outgoing_tensors(self) -> dict[str, np.ndarray]:
        """What this node sends its partner: θ when γ = β, else φ and Δ (flat float32, CPU), as the partner
        will hold them after the wire (rounded to the run's wire dtype): what is committed and audited."""
        return outgoing_tensors(self.slow_weights, self._fast_vector(), self.hyper.theta_only, self.cfg.wire_dtype,
                                self.wire_reference)

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
        self._set_slow_state(slow, momentum)
        return distance

    @torch.no_grad()
    def apply_eager_outer_step(self, landed: Sequence[PartnerUpdate]) -> tuple[float | None, torch.Tensor | None]:
        """`overlap on`, at a boundary: the corrections of the exchanges that landed since the last one, then
        the local outer step with this round's Δ; sets θ ← φ. Returns (‖θ_i − θ_j‖ of the last one landed,
        what the corrections added to φ: the shift of an exchange started at this boundary; None if nothing
        landed)."""
        corrections, distance = self._corrections(landed)
        slow, momentum, corrected = eager_outer_step(self.slow_weights, self._fast_vector(), self.outer_momentum,
                                                     corrections, self.hyper)
        shift = corrected - self.slow_weights if corrections else None
        self._set_slow_state(slow, momentum)
        return distance, shift

    @torch.no_grad()
    def apply_late_corrections(self, landed: Sequence[PartnerUpdate]) -> float | None:
        """Right after a boundary (the node's last round): land corrections without an outer step; θ ← φ."""
        corrections, distance = self._corrections(landed)
        slow, momentum = self.slow_weights, self.outer_momentum
        for correction, lag in corrections:
            slow, momentum = apply_correction(slow, momentum, correction, lag, self.hyper.alpha)
        self._set_slow_state(slow, momentum)
        return distance

    def _corrections(self, landed: Sequence[PartnerUpdate]) -> tuple[list[tuple[torch.Tensor, int]], float | None]:
        """(c, m) per landed exchange and the distance ‖θ_i − θ_j‖ of the last one. c is the paired minus the
        local outer step at the exchange's boundary, from the node's slow weights there (φ_s + shift)."""
        corrections, distance = [], None
        for update in landed:
            sent, received = (
                {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in tensors.items()}
                for tensors in (update.sent, update.received)
            )
            shift = 0.0 if update.shift is None else update.shift
            if self.hyper.theta_only:
                correction = pair_correction_theta(sent["theta"] + shift, received["theta"], self.hyper)
                distance = float(torch.linalg.vector_norm(sent["theta"] - received["theta"]))
            else:
                correction = pair_correction_full(sent["phi"] + shift, sent["delta_update"], received["phi"],
                                                  received["delta_update"], self.hyper)
                distance = float(torch.linalg.vector_norm(
                    sent["phi"] + sent["delta_update"] - received["phi"] - received["delta_update"]))
            corrections.append((correction, update.lag))
        return corrections, distance

    def _set_slow_state(self, slow: torch.Tensor, momentum: torch.Tensor) -> None:
        """Start a new round from φ: θ ← φ, and publish the boundary (on CUDA this copies φ and δ to
        the host here, on the trainer thread, not on the event loop)."""
        self.slow_weights, self.outer_momentum = slow, momentum
        self._load_parameters(self.slow_weights)
        self.step_in_round = 0
        self.published = SlowState.of(slow, momentum, self.global_step)

    # ------------------------------------------------------------------ state: checkpoints and joins
    def checkpoint_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Everything needed to continue exactly here: (JSON-able meta, tensors)."""
        tensors = {"phi": self.slow_weights, "momentum": self.outer_momentum, "rng.torch": torch.get_rng_state()}
        if self.step_in_round:  # mid-round (a leave cut the round): θ differs from φ
            tensors["theta"] = self._fast_vector()
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"adam.{index}.{key}"] = value
        meta = {"global_step": self.global_step, "step_in_round": self.step_in_round,
                "sampler": self.sampler.state_dict(), "numel": self.numel}
        return meta, tensors

    def restore(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint_state() (from this node's own checkpoint): continues step for step."""
        self._check_numel(tensors["phi"], tensors["momentum"])
        optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, key = name.split(".", 2)
                optimizer_state.setdefault(int(index), {})[key] = value
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
        self.sampler.load_state_dict(meta["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.global_step = int(meta["global_step"])
        self._set_slow_state(tensors["phi"].to(self.device), tensors["momentum"].to(self.device))
        if "theta" in tensors:
            self._load_parameters(tensors["theta"].to(self.device))
        self.step_in_round = int(meta["step_in_round"])

    def adopt(self, slow: np.ndarray, momentum: np.ndarray, global_step: int) -> None:
        """Take the swarm's φ and δ from a donor. This node's own optimizer state and data position stay."""
        slow_t, momentum_t = torch.from_numpy(slow), torch.from_numpy(momentum)
        self._check_numel(slow_t, momentum_t)
        self.global_step = global_step
        self._set_slow_state(slow_t.to(self.device), momentum_t.to(self.device))

    def _check_numel(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            if tensor.shape != (self.numel,):
                raise ValueError(f"state of shape {tuple(tensor.shape)} for a model of {self.numel} parameters")
