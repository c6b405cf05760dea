"""`gossiptrain bench verify`: does replaying a round tell honest peers from cheaters, and what does it cost?

A verifier replays an audited peer's round from the committed start state (φ, AdamW moments
and step, data position) on the committed data, with the very code training runs
(``node.verify.replay.Replayer`` → ``node.train.trainer.inner_step``) and judges it as
``node.verify.service.judge_audit`` does: the committed LSH signature (public, run-wide
projection) must describe the update the peer actually sent, and the sent update and the
replay, both signed with a projection drawn from the audit seed (``audit_signer``: unknown
to the peer when it committed), are compared (``protocol.verification.compare``) under the
configured tolerances. Three verifiers vote; 2 rejects of 3 flag the peer. One run prints
three tables, side by side:

1. Honest variation. Per trial (one start state), the honest peer trains the round with
   1 torch thread and no micro-batching and commits the signature of its Δ = θ − φ. The
   round is then replayed under other conditions a verifier may have (torch threads 1 or
   2, the batch split into 1, 2 or 4 micro-batches for gradient accumulation, CUDA when
   there is one): how far apart are the signatures of honest work? (The split is committed
   with the start state and a node's verifiers replay with it; the benchmark overrides it to
   show what a different split would cost in agreement.) Besides the signature
   distances it prints the exact relative L2 distance ‖Δc − Δr‖ / ‖Δr‖ of the full tensors,
   so the sketch's estimate can be checked. From the honest maxima it derives suggested
   tolerances (a safety factor, with floors) and prints them next to the configured ones.
2. Attacks. Per trial, three verifiers under three different honest conditions replay the
   round once (two of them with another micro-batch split than committed: a pessimistic
   committee); every attack's committed signature is compared with those same three
   replays (a verifier's replay does not depend on what the peer committed). Tensor
   attacks (``node.verify.faults.Fault``) transform the honest Δ; the others change the training
   and are trained by the cheater with the honest peer's conditions: copying another
   peer's update (another shard from the same start), skipping inner steps (their batches
   drawn, not trained on), training from a stale φ while committing the current start
   state, training on other data than committed. Two rows model an attacker who knows the
   run-wide LSH seed (it is derived from the public run manifest): it adds a perturbation in
   the null space of that projection's signed fold; the audit projection sees it. Two
   "honest signature committed" rows send an attacked update but commit the honest one's
   signature: the commitment check catches them whatever the replay says.
   Verdicts use the configured default tolerances; one more column applies the suggested
   ones.
3. Cost. One honest round, one replay, signing an update and digesting a start state on
   the benchmark model (medians over the trials, 1 torch thread); signing and digesting
   random vectors of 1M, 10M and 100M parameters; and verification compute as a fraction of
   training compute at the configured sampling rate.

A trial is one start state: one round of an honest peer, a Trainer on its own shard and
sampler seed that trains with local outer steps. Each peer gives four trials, its rounds
2, 10, 18 and 26 (0-based), so the trials cover early and later training (φ, the moments,
the data position and the learning rate differ); trials 4k to 4k+3 belong to peer k, on
shard 5k mod num_shards. Every loop is bounded by the number of trials, conditions,
attacks and sizes; nothing waits on anything.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from protocol.verification import COMMITTEE_SIZE, Comparison, Tolerances, UpdateSignature, compare

from node.config import NodeConfig
from node.table import format_table
from node.train.data import Corpus, ShardSampler, load_corpus
from node.train.trainer import RoundStart, Trainer
from node.verify.faults import Fault
from node.verify.lsh import DEFAULT_BITS, UpdateSigner
from node.verify.replay import Replayer, describe_start, start_digest
from node.verify.service import audit_signer

DEFAULT_TRIALS = 12
DEFAULT_SIZES = (1_000_000, 10_000_000, 100_000_000)
TINY_SIZES = (1_000_000,)
LSH_SEED = 0x5EED  # any seed: the node derives its own from the manifest hash
WARMUP_THREADS = 2  # rounds between the measured ones only produce start states: as fast as possible
FIRST_ROUND = 2  # a peer's first measured round (0-based); the stale-start attack needs φ of 2 rounds before it
ROUND_GAP = 8  # rounds from one measured round of a peer to its next
TRIALS_PER_PEER = 4  # measured rounds FIRST_ROUND, +8, +16, +24 of each peer: early and later training
# suggested tolerances: SAFETY × the largest honest distance, never below the floor
SAFETY = 10.0
FLOOR_HAMMING = 0.02  # about 5 of 256 SimHash bits
FLOOR_REL_L2 = 0.01
FLOOR_NORM_EXCESS = 0.01  # norm ratio 1.01
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Condition:
    """Where and how a round is computed: torch threads, micro-batches per batch, device."""

    threads: int
    micro_batches: int
    device: str = "cpu"

    @property
    def name(self) -> str:
        if self.device != "cpu":
            return f"{self.device}, micro {self.micro_batches}"
        return f"threads {self.threads}, micro {self.micro_batches}"


COMMITTED = Condition(1, 1)  # the honest peer's (and the cheater's) own conditions
CPU_CONDITIONS = (Condition(1, 1), Condition(2, 1), Condition(1, 2), Condition(2, 2), Condition(1, 4))
VERIFIERS = (Condition(1, 1), Condition(2, 2), Condition(1, 4))  # one committee: three different honest setups


@dataclass(frozen=True)
class Attack:
    """One way to cheat. kind: a node.verify.faults tensor attack, or copy, skip, stale, other_data, null_noise, null_swap."""

    label: str
    kind: str
    strength: float = 1.0
    hide: bool = False  # commit the honest update's signature, send the attacked update


def attacks(inner_steps: int) -> list[Attack]:
    """Every attack row, honest first; skip counts scale with H (1, H/10 and H/2 of H steps)."""
    rows = [Attack("honest", "honest")]
    rows += [Attack(f"noise {s:g}x|Δ|", "noise", s) for s in (0.05, 0.2, 1.0)]
    rows += [Attack(f"scale x{s:g}", "scale", s) for s in (0.5, 0.9, 1.1, 2.0)]
    rows += [Attack("sign flip", "sign_flip"), Attack("zero update", "zero"), Attack("random update", "random")]
    rows.append(Attack("copy another peer's Δ", "copy"))
    skips = sorted({1, max(1, round(inner_steps / 10)), inner_steps // 2} - {0, inner_steps})
    rows += [Attack(f"skip {k} of {inner_steps} steps", "skip", k) for k in skips]
    rows += [Attack(f"stale start ({k} round{'s' if k > 1 else ''} old)", "stale", k) for k in (1, 2)]
    rows.append(Attack("other data than committed", "other_data"))
    rows.append(Attack("null-space noise 0.4x|Δ| (seed known)", "null_noise", 0.4))
    rows.append(Attack("null-space swap (seed known)", "null_swap"))
    rows.append(Attack("sign flip, honest signature committed", "sign_flip", hide=True))
    rows.append(Attack("noise 1x|Δ|, honest signature committed", "noise", 1.0, hide=True))
    return rows


@dataclass(frozen=True)
class Measure:
    """A committed update against one replay: the two signatures and the exact relative L2 distance."""

    committed: UpdateSignature  # of the sent update, under the audit projection
    replayed: UpdateSignature  # of the replay, under the audit projection
    exact_rel_l2: float  # ‖Δc − Δr‖ / ‖Δr‖ from the full tensors
    consistent: bool = True  # the committed run-wide signature describes the sent update

    def compare(self, tolerances: Tolerances) -> Comparison:
        result = compare(self.committed, self.replayed, tolerances)
        if self.consistent:
            return result
        return replace(result, failed=result.failed + ("commitment",))


@dataclass
class Results:
    """Everything the tables are made of, gathered trial by trial."""

    honest: dict[str, list[Measure]] = field(default_factory=dict)  # condition name -> one per trial
    attacked: dict[str, list[list[Measure]]] = field(default_factory=dict)  # attack label -> per trial, per verifier
    round_seconds: list[float] = field(default_factory=list)
    replay_seconds: list[float] = field(default_factory=list)  # under COMMITTED conditions, like the round
    sign_seconds: list[float] = field(default_factory=list)
    digest_seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------- configurations
def bench_config(tiny: bool, model: str = "builtin") -> NodeConfig:
    """The default model and round (NodeConfig defaults) on CPU; --tiny: a small model and a short round;
    `model`: another model to calibrate for (a preset or a transformers config; --model)."""
    if tiny:
        return NodeConfig(device="cpu", d_model=32, n_layers=1, n_heads=2, context=32, batch_size=8,
                          inner_steps=8, warmup_steps=8, model=model).validate()
    return NodeConfig(device="cpu", model=model).validate()


def _model_name(cfg: NodeConfig) -> str:
    if cfg.model == "builtin":
        return f"byte GPT d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads"
    return f"{cfg.model} (transformers, byte vocabulary 256)"


def configured_tolerances(cfg: NodeConfig) -> Tolerances:
    return Tolerances(cfg.verify_max_hamming, cfg.verify_max_rel_l2, cfg.verify_max_norm_ratio)


def cuda_condition() -> Condition | None:
    return Condition(1, 1, "cuda") if torch.cuda.is_available() else None


# ---------------------------------------------------------------------- distances
def _exact_rel_l2(committed: torch.Tensor, replayed: torch.Tensor) -> float:
    difference = float(torch.linalg.vector_norm((committed - replayed).double()))
    reference = float(torch.linalg.vector_norm(replayed.double()))
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference


def _orthogonal_unit(signer: UpdateSigner, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random unit vector in the fold's null space, orthogonal to Δ (it is orthogonal to the folded part
    of Δ by construction, so it is made orthogonal to Δ's null-space part)."""
    direction = signer.null_space_part(torch.randn(delta.shape, generator=generator)).double()
    hidden = signer.null_space_part(delta).double()
    direction -= hidden * (direction @ hidden) / max(float(hidden @ hidden), 1e-300)
    return (direction / torch.linalg.vector_norm(direction)).float()


# ---------------------------------------------------------------------- one trial
@dataclass
class TrialContext:
    """What an attack needs to build the cheater's update for one trial."""

    index: int
    cfg: NodeConfig
    corpus: Corpus
    signer: UpdateSigner
    replayers: dict[str, Replayer]
    start: RoundStart
    history: list[torch.Tensor]  # φ at the start of each earlier round, oldest first
    generator: torch.Generator


def _replay(replayer: Replayer, start: RoundStart, cfg: NodeConfig, condition: Condition,
            sampler: ShardSampler | None = None, skip: frozenset[int] = frozenset(),
            phi: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(Δ on the CPU, seconds) of one replay under `condition`; `phi` replaces the start's φ (a stale start)."""
    torch.set_num_threads(condition.threads)
    begin = replace(start, phi=phi) if phi is not None else start
    started = time.perf_counter()
    delta = replayer.replay(begin, cfg.inner_steps, condition.micro_batches, sampler=sampler, skip=skip)
    if condition.device != "cpu":
        torch.cuda.synchronize()
    return delta.cpu(), time.perf_counter() - started


def _cheat(attack: Attack, honest: torch.Tensor, trial: TrialContext) -> torch.Tensor:
    """The update the cheater sends (and signs) in place of the honest Δ."""
    cfg, start, replayer = trial.cfg, trial.start, trial.replayers["cpu"]
    if attack.kind == "honest":
        return honest
    if attack.kind in ("noise", "scale", "sign_flip", "zero", "random"):
        return Fault(attack.kind, attack.strength).apply(honest, trial.generator)
    if attack.kind == "null_noise":
        unit = _orthogonal_unit(trial.signer, honest, trial.generator)
        return honest + attack.strength * float(torch.linalg.vector_norm(honest)) * unit
    if attack.kind == "null_swap":  # keep what the fold sees, replace the rest by a random direction of equal norm
        hidden = trial.signer.null_space_part(honest)
        unit = _orthogonal_unit(trial.signer, honest, trial.generator)
        return honest - hidden + float(torch.linalg.vector_norm(hidden)) * unit
    if attack.kind == "copy":  # another peer's update: another shard, trained from the same start
        other = (start.shard + 1) % cfg.num_shards
        sampler = ShardSampler(trial.corpus, other, cfg.num_shards, cfg.context, cfg.batch_size, 3000 + trial.index)
        return _replay(replayer, start, cfg, COMMITTED, sampler=sampler)[0]
    if attack.kind == "skip":  # k steps spread over the round: their batches drawn, not trained on
        count = int(attack.strength)
        skipped = frozenset(int((j + 0.5) * cfg.inner_steps / count) for j in range(count))
        return _replay(replayer, start, cfg, COMMITTED, skip=skipped)[0]
    if attack.kind == "stale":  # trained from an old φ; commits (and is measured against) the current one
        old = trial.history[-int(attack.strength)]
        return _replay(replayer, start, cfg, COMMITTED, phi=old)[0] + (old - start.phi)
    if attack.kind == "other_data":  # its own shard, other windows than the committed sampler state gives
        sampler = ShardSampler(trial.corpus, start.shard, cfg.num_shards, cfg.context, cfg.batch_size,
                               2000 + trial.index)
        return _replay(replayer, start, cfg, COMMITTED, sampler=sampler)[0]
    raise ValueError(f"unknown attack {attack.kind!r}")


class Peer:
    """An honest peer training on its own shard with local outer steps; trials take some of its rounds."""

    def __init__(self, number: int, cfg: NodeConfig, corpus: Corpus) -> None:
        self.number = number
        self.trainer = Trainer(cfg, corpus, (5 * number) % cfg.num_shards, sampler_seed=1000 + number)
        self.history: list[torch.Tensor] = []  # φ at the start of each finished round, oldest first

    def train_until(self, rounds: int) -> None:
        """Train (fast, with WARMUP_THREADS) until `rounds` rounds are finished."""
        torch.set_num_threads(WARMUP_THREADS)
        while len(self.history) < rounds:
            self.trainer.run_round()
            self.finish_round()

    def finish_round(self) -> None:
        self.history.append(self.trainer.slow_weights)  # φ is replaced, never mutated, by the outer step
        self.trainer.apply_outer_step(None)

    def measured_round(self) -> tuple[RoundStart, torch.Tensor, float]:
        """The round a trial audits, trained under COMMITTED conditions: (its start, honest Δ, seconds).
        The caller finishes it (finish_round) when the trial is done with it."""
        torch.set_num_threads(COMMITTED.threads)
        stats = self.trainer.run_round()
        start = self.trainer.round_start
        if start is None or not self.trainer.round_complete:
            raise RuntimeError("the measured round did not complete")
        return start, self.trainer.fast_weights() - self.trainer.slow_weights, stats.seconds


def run_trial(index: int, peer: Peer, cfg: NodeConfig, corpus: Corpus, signer: UpdateSigner,
              replayers: dict[str, Replayer], conditions: list[Condition], rows: list[Attack], results: Results) -> str:
    """One start state: the honest round, its replays under every condition, every attack against the committee."""
    peer.train_until(FIRST_ROUND + ROUND_GAP * (index % TRIALS_PER_PEER))
    start, honest, round_seconds = peer.measured_round()
    results.round_seconds.append(round_seconds)
    started = time.perf_counter()
    committed = signer.sign(honest)
    results.sign_seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    tensors, data = describe_start(start)
    start_digest(tensors, data, start.global_step)
    results.digest_seconds.append(time.perf_counter() - started)

    # the audit projection: drawn per audit from a seed the peer did not know when it committed
    auditor = audit_signer(honest.numel(), hashlib.blake2b(f"trial {index}".encode(), digest_size=32).digest())
    audited = auditor.sign(honest)
    replays: dict[Condition, tuple[torch.Tensor, UpdateSignature]] = {}
    for condition in conditions:
        delta, seconds = _replay(replayers[condition.device], start, cfg, condition)
        if condition == COMMITTED:
            results.replay_seconds.append(seconds)
        replays[condition] = (delta, auditor.sign(delta))
        results.honest.setdefault(condition.name, []).append(
            Measure(audited, replays[condition][1], _exact_rel_l2(honest, delta)))

    trial = TrialContext(index, cfg, corpus, signer, replayers, start, peer.history,
                         torch.Generator().manual_seed(index))
    for attack in rows:
        torch.set_num_threads(COMMITTED.threads)
        sent = _cheat(attack, honest, trial)
        # the commitment check: the published run-wide signature against the update actually sent
        published = committed if attack.hide else signer.sign(sent)
        consistent = compare(published, signer.sign(sent), configured_tolerances(cfg)).ok
        signature = auditor.sign(sent)
        results.attacked.setdefault(attack.label, []).append([
            Measure(signature, replays[v][1], _exact_rel_l2(sent, replays[v][0]), consistent) for v in VERIFIERS])
    peer.finish_round()
    return f"peer {peer.number}, shard {start.shard}, round {len(peer.history)}, step {start.global_step}"


# ---------------------------------------------------------------------- statistics and formatting
def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    if value == 0.0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def _ratio(value: float) -> str:
    """A norm ratio; close to 1 as 1+excess, so honest figures stay readable."""
    if math.isfinite(value) and value - 1.0 < 1e-3:
        return "1" if value == 1.0 else f"1+{value - 1.0:.1e}"
    return _fmt(value)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def upper_bound_zero(n: int) -> float:
    """One-sided 95% (Clopper–Pearson) upper bound on a rate observed as 0 of n: 1 − 0.05^(1/n) ≈ 3/n."""
    return 1.0 - (1.0 - CONFIDENCE) ** (1.0 / n)


def _rate(hits: int, n: int) -> str:
    """'k/n p%', with the 95% bound where k is 0 (< bound) or n (> 1 − bound)."""
    if n == 0:
        return "-"
    if hits == 0:
        return f"0/{n} <{100 * upper_bound_zero(n):.1f}%"
    if hits == n:
        return f"{n}/{n} >{100 * (1 - upper_bound_zero(n)):.1f}%"
    return f"{hits}/{n} {100 * hits / n:.0f}%"


def _margin(threshold: float, honest_max: float) -> str:
    return "∞ (honest max 0)" if honest_max <= 0 else f"{threshold / honest_max:,.0f}x"


def honest_maxima(measures: list[Measure]) -> Tolerances:
    """The largest distance of each kind over honest replays (as a Tolerances: the tightest that accepts them all)."""
    comparisons = [m.compare(Tolerances(0.5, math.inf, math.inf)) for m in measures]
    return Tolerances(max(c.hamming for c in comparisons), max(c.rel_l2 for c in comparisons),
                      max(c.norm_ratio for c in comparisons))


def suggested_tolerances(honest: Tolerances) -> Tolerances:
    """SAFETY × the largest honest distance of each kind (of the norm ratio's excess over 1), never below its floor."""
    return Tolerances(max(FLOOR_HAMMING, SAFETY * honest.max_hamming), max(FLOOR_REL_L2, SAFETY * honest.max_rel_l2),
                      1.0 + max(FLOOR_NORM_EXCESS, SAFETY * (honest.max_norm_ratio - 1.0)))


def honest_table(results: Results, tolerances: Tolerances) -> str:
    rows = []
    for name, measures in results.honest.items():
        comparisons = [m.compare(tolerances) for m in measures]
        hamming = [c.hamming for c in comparisons]
        rel = [c.rel_l2 for c in comparisons]
        exact = [m.exact_rel_l2 for m in measures]
        ratio = [c.norm_ratio for c in comparisons]
        rows.append({
            "replayed with": name + (" (= committed)" if name == COMMITTED.name else ""),
            "replays": len(measures),
            "hamming max / mean": f"{_fmt(max(hamming))} / {_fmt(_mean(hamming))}",
            "sketch rel-L2 max / mean": f"{_fmt(max(rel))} / {_fmt(_mean(rel))}",
            "exact rel-L2 max / mean": f"{_fmt(max(exact))} / {_fmt(_mean(exact))}",
            "norm ratio max / mean": f"{_ratio(max(ratio))} / {_ratio(_mean(ratio))}",
            "rejects": _rate(sum(not c.ok for c in comparisons), len(comparisons)),
        })  # fmt: skip
    return format_table(rows)


def threshold_table(honest: Tolerances, configured: Tolerances, suggested: Tolerances) -> str:
    rows = []
    for name, attribute, show, offset in (
        ("hamming fraction", "max_hamming", _fmt, 0.0),
        ("sketch rel-L2", "max_rel_l2", _fmt, 0.0),
        ("norm ratio (margin on the excess over 1)", "max_norm_ratio", _ratio, 1.0),
    ):
        worst, proposed, current = (getattr(t, attribute) for t in (honest, suggested, configured))
        rows.append({
            "tolerance": name, "honest max": show(worst),
            "suggested": f"{proposed:.4f}", "suggested margin": _margin(proposed - offset, worst - offset),
            "configured": f"{current:.4f}", "configured margin": _margin(current - offset, worst - offset),
        })  # fmt: skip
    return format_table(rows)


def attack_table(results: Results, configured: Tolerances, suggested: Tolerances) -> str:
    rows = []
    for label, trials in results.attacked.items():
        verdicts = [[m.compare(configured) for m in committee] for committee in trials]
        stricter = [[m.compare(suggested) for m in committee] for committee in trials]
        single = sum(not c.ok for committee in verdicts for c in committee)
        flagged = sum(sum(not c.ok for c in committee) * 2 > COMMITTEE_SIZE for committee in verdicts)
        flagged_strict = sum(sum(not c.ok for c in committee) * 2 > COMMITTEE_SIZE for committee in stricter)
        every = [c for committee in verdicts for c in committee]
        rows.append({
            "committed update": label + (" (false rejects)" if label == "honest" else ""),
            "1 verifier rejects": _rate(single, len(every)),
            "2 of 3 flag": _rate(flagged, len(trials)),
            "2 of 3 @suggested": _rate(flagged_strict, len(trials)),
            "hamming": _fmt(_mean([c.hamming for c in every])),
            "sketch rel-L2": _fmt(_mean([c.rel_l2 for c in every])),
            "exact rel-L2": _fmt(_mean([m.exact_rel_l2 for committee in trials for m in committee])),
            "norm ratio": _ratio(_mean([c.norm_ratio for c in every])),
        })  # fmt: skip
    return format_table(rows)


# ---------------------------------------------------------------------- cost
@dataclass(frozen=True)
class SizeCost:
    numel: int
    setup: float  # building the signer: n random signs and the projection (once per node)
    sign: float  # median seconds of one signature
    digest: float  # median seconds of one start digest over φ, m, v (3 × n fp32)


def measure_size(numel: int, repeats: int) -> SizeCost:
    """Time the LSH signer and the start digest on a random vector of `numel` parameters (1 torch thread).

    One untimed call first (first-touch page faults of its buffers), then the median of `repeats`."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    signer = UpdateSigner(numel, LSH_SEED)
    setup = time.perf_counter() - started
    vector = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    array = vector.numpy()
    tensors = {"phi": array, "adam_m": array, "adam_v": array}  # same bytes hashed three times: no 3x memory

    def timed(work) -> float:
        work()
        seconds = []
        for _ in range(repeats):
            begin = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - begin)
        return statistics.median(seconds)

    sign = timed(lambda: signer.sign(vector))
    digest = timed(lambda: start_digest(tensors, "{}", 0))
    return SizeCost(numel, setup, sign, digest)


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _bytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value / 1e3:,.1f} kB"


def cost_tables(results: Results, cfg: NodeConfig, numel: int, sizes: list[SizeCost]) -> str:
    round_s = statistics.median(results.round_seconds)
    replay_s = statistics.median(results.replay_seconds)
    sign_s = statistics.median(results.sign_seconds)
    digest_s = statistics.median(results.digest_seconds)
    commit = sign_s + digest_s  # every round, on every node
    # an audit: the replay, three signatures (commitment check, sent and replayed update under the
    # audit projection) and two digests (start state, sent tensors); expected per round
    audit = COMMITTEE_SIZE * cfg.verify_rate * (replay_s + 3 * sign_s + 2 * digest_s)
    model = format_table([{
        "model": f"{numel:,} params, H={cfg.inner_steps}",
        "round (train)": _seconds(round_s),
        "replay": _seconds(replay_s),
        "LSH sign": _seconds(sign_s),
        "start digest": _seconds(digest_s),
        "commit / round": f"{100 * commit / round_s:.2f}%",
        f"audits / round (rate {cfg.verify_rate:g})": f"{100 * audit / round_s:.2f}%",
        "verification / training": f"{100 * (commit + audit) / round_s:.2f}%",
    }])  # fmt: skip
    vectors = format_table([{
        "numel": f"{size.numel:,}",
        "signer setup (once)": _seconds(size.setup),
        "LSH sign": _seconds(size.sign),
        "start digest (φ, m, v)": _seconds(size.digest),
        "sign MB/s": f"{4 * size.numel / size.sign / 1e6:,.0f}",
        "dense 256×n Gaussian instead": f"{_bytes(4.0 * DEFAULT_BITS * size.numel)} fp32, "
                                        f"{2 * DEFAULT_BITS * size.numel / 1e9:,.1f} GFLOP",
    } for size in sizes])  # fmt: skip
    return model + "\n\n" + vectors


# ---------------------------------------------------------------------- report
def _header(cfg: NodeConfig, numel: int, trials: int, configured: Tolerances, cuda: Condition | None) -> str:
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    rounds = ", ".join(str(FIRST_ROUND + ROUND_GAP * k) for k in range(min(trials, TRIALS_PER_PEER)))
    return (
        "verification: a verifier replays a peer's round from its committed start state on the committed data "
        "(node.verify.replay.Replayer, the training code), checks that the committed LSH signature describes the update "
        "actually sent, and compares the sent update with the replay under a projection drawn from the audit seed "
        f"(node.verify.service.judge_audit); a committee of {COMMITTEE_SIZE} votes, 2 rejects of 3 flag the peer\n"
        f"model: {_model_name(cfg)}, context {cfg.context}, "
        f"batch {cfg.batch_size}, {numel:,} parameters; H = {cfg.inner_steps} inner AdamW steps per round; "
        f"lr {cfg.lr:g} (warm-up {cfg.warmup_steps} steps); LSH {DEFAULT_BITS} bits, 128-dim sketch\n"
        f"{trials} trials: rounds {rounds} (0-based) of honest peers k = 0, 1, ... on shard 5k mod {cfg.num_shards}, "
        f"{TRIALS_PER_PEER} trials each, training with local outer steps; the measured rounds are trained with "
        f"{COMMITTED.name}\n"
        f"tolerances used for every verdict (configured defaults): hamming <= {configured.max_hamming:g}, sketch "
        f"rel-L2 <= {configured.max_rel_l2:g}, norm ratio <= {configured.max_norm_ratio:g}\n"
        f"Python {platform.python_version()}, torch {torch.__version__}, CPUs {cpus} ({usable} usable); CUDA: "
        + ("available, " + torch.cuda.get_device_name(0) if cuda else
           "not available (torch.cuda.is_available() is False): no CUDA replay measured")
    )


HOW_TO_READ = """\
how to read this:
- hamming: fraction of the 256 SimHash bits that differ (≈ angle/π between the two updates); sketch rel-L2: \
‖s(Δc) − s(Δr)‖/‖s(Δr)‖ from the 128-dim sketches, an estimate of the exact ‖Δc − Δr‖/‖Δr‖ computed from the full \
tensors next to it; norm ratio: max(r, 1/r) of the exact norms (1 = equal). Δc is the update the peer sent, Δr a \
replay; both signatures use the audit's own projection (drawn from the audit seed), as verifiers do.
- honest rows: how much honest work differs between setups (summation order of threaded kernels, gradient \
accumulation); a replay with the committed setup is bit-identical. suggested tolerance = max(floor, {safety:g} × \
honest max) with floors hamming {fh:g}, rel-L2 {fr:g}, norm ratio 1+{fn:g}; margin = tolerance / honest max.
- attacks: each trial's committee is three verifiers replaying with {verifiers} (a node's verifiers replay \
with the committed split, so this committee is pessimistic); "1 verifier rejects" counts \
single votes (3 per trial), "2 of 3 flag" counts trials. A rate of 0 of n is shown with its one-sided 95% upper \
bound (Clopper–Pearson, ≈ 3/n), a rate of n of n with its lower bound; the three votes of a trial share one start \
state, so single-vote bounds are optimistic. Distances are means over every vote.
- "seed known": the run-wide LSH projection (the one in commitments) comes from a seed every peer knows, so a \
peer that did the work can add anything in the null space of its signed fold (all but 4096 directions) and its \
commitment still matches; the audit projection is drawn after the peer committed, so it sees the change. \
"null-space swap" keeps the folded part of Δ and replaces the rest by a random direction of the same norm.
- "honest signature committed": the peer sends an attacked update but publishes the honest update's signature; \
every verifier rejects it because the committed signature does not describe the sent tensors (their digest is \
committed and was checked by the receiver).
- cost: medians over the trials, 1 torch thread; verification / training = (sign + digest)/round for the \
commitment every round, plus {committee} × rate × (replay + 3 sign + 2 digest)/round for the expected audits."""


def run_benchmark(trials: int = DEFAULT_TRIALS, tiny: bool = False, sizes: list[int] | None = None,
                  repeats: int = 3, model: str = "builtin") -> int:
    """Measure honest variation, attack detection and cost for `model` (on the byte-level built-in corpus, so a
    transformers model gets vocabulary 256); print the tables; 0 on success."""
    if trials <= 0 or repeats <= 0 or (sizes is not None and min(sizes, default=1) <= 0):
        print("trials, repeats and numel must be positive", file=sys.stderr)
        return 2
    sizes = list(sizes) if sizes else list(TINY_SIZES if tiny else DEFAULT_SIZES)
    cfg = bench_config(tiny, model)
    configured = Tolerances(cfg.verify_max_hamming, cfg.verify_max_rel_l2, cfg.verify_max_norm_ratio)
    began = time.perf_counter()
    corpus = load_corpus()
    cuda = cuda_condition()
    conditions = [c for c in CPU_CONDITIONS if c.micro_batches <= cfg.batch_size] + ([cuda] if cuda else [])
    replayers = {"cpu": Replayer(cfg, corpus, "cpu")}
    if cuda:  # what node.train.trainer.Trainer sets on CUDA while verification is on
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        replayers[cuda.device] = Replayer(cfg, corpus, cuda.device)
    numel = replayers["cpu"].numel
    signer = UpdateSigner(numel, LSH_SEED)
    rows = attacks(cfg.inner_steps)
    results = Results()
    peer: Peer | None = None
    for index in range(trials):
        started = time.perf_counter()
        if index % TRIALS_PER_PEER == 0:
            peer = Peer(index // TRIALS_PER_PEER, cfg, corpus)
        assert peer is not None
        where = run_trial(index, peer, cfg, corpus, signer, replayers, conditions, rows, results)
        print(f"verify: trial {index + 1}/{trials} ({where}) {time.perf_counter() - started:.1f}s",
              file=sys.stderr, flush=True)
    costs = []
    for size in sizes:
        costs.append(measure_size(size, repeats))
        print(f"verify: LSH and digest of {size:,} parameters timed", file=sys.stderr, flush=True)

    honest = honest_maxima([m for measures in results.honest.values() for m in measures])
    suggested = suggested_tolerances(honest)
    print(_header(cfg, numel, trials, configured, cuda))
    print(f"\n1. honest variation: committed by a peer training with {COMMITTED.name}, replayed under each "
          f"condition ({trials} trials)")
    print(honest_table(results, configured))
    print("\nsuggested tolerances from the honest maxima, next to the configured ones")
    print(threshold_table(honest, configured, suggested))
    print(f"\n2. attacks ({trials} trials × {COMMITTEE_SIZE} verifiers; verdicts under the configured tolerances; "
          f"'@suggested': hamming <= {suggested.max_hamming:.4f}, rel-L2 <= {suggested.max_rel_l2:.4f}, norm ratio "
          f"<= {suggested.max_norm_ratio:.4f})")
    print(attack_table(results, configured, suggested))
    print("\n3. cost (medians, 1 torch thread)")
    print(cost_tables(results, cfg, numel, costs))
    print()
    print(HOW_TO_READ.format(safety=SAFETY, fh=FLOOR_HAMMING, fr=FLOOR_REL_L2, fn=FLOOR_NORM_EXCESS,
                             verifiers="; ".join(v.name for v in VERIFIERS), committee=COMMITTEE_SIZE))
    print(f"\n(total {time.perf_counter() - began:.0f}s)")
    return 0
