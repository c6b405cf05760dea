"""Verification replays: re-run a peer's round from its committed start state, and the digest that binds it.

A replay runs the very same inner step as training (`trainer.inner_step`) on a model and
optimizer of its own, so the node's own training state is never touched.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from protocol.verification import data_assignment

from node.config import MAX_RANKS, NodeConfig
from node.train.data import Corpus, ShardSampler
from node.train.model import make_model
from node.train.trainer import START_TENSORS, RoundStart, autocast_dtype, inner_step, lr_at


class ReplayError(ValueError):
    """A start state cannot be replayed (malformed data assignment, wrong sizes)."""


def start_digest(tensors: dict[str, np.ndarray], data: str, global_step: int) -> str:
    """blake2b-256 over the start tensors (float32 little-endian, fixed order) and the replay meta."""
    digest = hashlib.blake2b(digest_size=32, person=b"gt-start-state")
    for name in START_TENSORS:
        digest.update(memoryview(np.ascontiguousarray(tensors[name], dtype="<f4")).cast("B"))
    digest.update(f"|{global_step}|".encode() + data.encode())
    return digest.hexdigest()


def sent_digest(tensors: dict[str, np.ndarray]) -> str:
    """blake2b-256 over the tensors a peer sends its partner, in wire order: binds them to its commitment."""
    digest = hashlib.blake2b(digest_size=32, person=b"gt-sent-tensors")
    for name, array in tensors.items():
        digest.update(name.encode() + b"\0")
        digest.update(memoryview(np.ascontiguousarray(array, dtype="<f4")).cast("B"))
    return digest.hexdigest()


def describe_start(start: RoundStart) -> tuple[dict[str, np.ndarray], str]:
    """(tensors, data assignment JSON) of a captured round start, as committed and served."""
    return start.tensors(), data_assignment(start.shard, start.sampler, start.adam_step, start.micro_batches,
                                            start.ranks)


def start_from_wire(tensors: dict[str, np.ndarray], data: str, global_step: int, numel: int) -> RoundStart:
    """Rebuild a RoundStart from what an audited peer served and committed. Raises ReplayError."""
    try:
        meta = json.loads(data)
        shard, sampler, adam_step = int(meta["shard"]), meta["sampler"], int(meta["adam_step"])
        micro_batches, ranks = int(meta.get("micro_batches", 1)), int(meta.get("ranks", 1))
        if not isinstance(sampler, dict) or adam_step < 0 or not 1 <= micro_batches <= 1024:
            raise ValueError("bad sampler state, Adam step or micro-batch split")
        if not 1 <= ranks <= MAX_RANKS:  # a replay costs `ranks` times a one-process round: bounded
            raise ValueError(f"ranks must be in [1, {MAX_RANKS}]")
    except (ValueError, KeyError, TypeError) as error:
        raise ReplayError(f"malformed data assignment: {error}") from error
    arrays = {}
    for name in START_TENSORS:
        array = tensors[name]
        if array.shape != (numel,):
            raise ReplayError(f"start tensor {name} of shape {array.shape}, expected ({numel},)")
        arrays[name] = torch.from_numpy(np.array(array, dtype=np.float32))
    return RoundStart(global_step, shard, sampler, adam_step, arrays["phi"], arrays["adam_m"], arrays["adam_v"],
                      micro_batches, ranks)


class Replayer:
    """Replays rounds of this run's model on a private model + AdamW (use from one thread)."""

    def __init__(self, cfg: NodeConfig, corpus: Corpus, device: torch.device | str = "cpu") -> None:
        self.cfg, self.corpus, self.device = cfg, corpus, torch.device(device)
        # eager even under `--compile on`, and no init-weights file: the start state overwrites every weight
        self.model = make_model(cfg, corpus.vocab_size, load_weights=False).to(self.device)
        self.autocast = autocast_dtype(self.device)  # the precision training used on this kind of device
        self.numel = sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def _load(self, start: RoundStart) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        offset = 0
        for parameter in self.model.parameters():
            count = parameter.numel()
            parameter.copy_(start.phi[offset: offset + count].view_as(parameter))
            if start.adam_step > 0:
                optimizer.state[parameter] = {
                    "step": torch.tensor(float(start.adam_step)),
                    "exp_avg": start.adam_m[offset: offset + count].view_as(parameter).to(self.device).clone(),
                    "exp_avg_sq": start.adam_v[offset: offset + count].view_as(parameter).to(self.device).clone(),
                }
            offset += count
        return optimizer

    def sampler(self, start: RoundStart) -> ShardSampler:
        if not 0 <= start.shard < self.cfg.num_shards:
            raise ReplayError(f"shard {start.shard} outside [0, {self.cfg.num_shards})")
        sampler = ShardSampler(self.corpus, start.shard, self.cfg.num_shards, self.cfg.context,
                               self.cfg.batch_size, seed=0)
        try:
            sampler.load_state_dict(start.sampler)
        except (KeyError, TypeError, ValueError) as error:
            raise ReplayError(f"malformed sampler state: {error}") from error
        return sampler

    def replay(self, start: RoundStart, steps: int, micro_batches: int | None = None,
               sampler: ShardSampler | None = None, skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """Δ = θ − φ after `steps` inner steps from `start` (float32, on the replay device).

        The micro-batch split is the committed one unless `micro_batches` overrides it (the
        benchmark does, to measure what a different split would cost in agreement).

        A data-parallel peer's step (`start.ranks` > 1) is replayed in this one process: the same
        `ranks` consecutive batches concatenated, each rank's micro-batch split kept. The mean loss of
        the concatenation is the mean of the ranks' losses, so this equals the peer's all-reduced step in
        exact arithmetic; float reduction order differs (tests/unit/test_parallel.py measures by how much).

        `sampler` and `skip` exist for the verification benchmark, which simulates cheaters
        (other data, skipped steps) with this same code; verifiers never pass them.
        """
        if start.phi.shape != (self.numel,):
            raise ReplayError(f"start state of {start.phi.numel()} parameters, this model has {self.numel}")
        optimizer = self._load(start)
        sampler = sampler or self.sampler(start)
        self.model.train()
        for index in range(steps):
            inputs, targets = sampler.next_batch()
            if start.ranks > 1:
                draws = [(inputs, targets)] + [sampler.next_batch() for _ in range(start.ranks - 1)]
                inputs, targets = torch.cat([x for x, _ in draws]), torch.cat([y for _, y in draws])
            if index in skip:
                continue
            inner_step(self.model, optimizer, inputs, targets, lr_at(start.global_step + index, self.cfg),
                       self.cfg.grad_clip, (micro_batches or start.micro_batches) * start.ranks, self.autocast)
        theta = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
        return theta - start.phi.to(self.device)
