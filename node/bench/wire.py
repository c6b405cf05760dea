"""`gossiptrain bench wire`: what a wire dtype costs in loss and saves in bytes, side by side in one run.

In one process, without a network: N trainers of the real training code (its model, data shards, AdamW
and NoLoCo outer step) run R rounds; each round the same seeded random perfect matching pairs them, and
each pair swaps its outgoing tensors exactly as the node does (rounded to the wire dtype before the
commitment, decoded by the partner: protocol/codecs.py). Everything but the wire dtype is identical
between the runs (seeds, pairing, data order), so the held-out losses differ only by the wire's rounding.
Reported per seed and wire dtype: mean held-out loss of the nodes' slow weights at the end, its ratio to
float32's, bytes per exchange each way, and the transfer time of one exchange of the 19M-parameter model
(`--d-model 512 --n-layers 6 --n-heads 8`) at 20 and 100 Mbit/s.

    python -m node.bench.wire [--nodes 4] [--rounds 30] [--seeds 0 1 2] [--inner-steps 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import numpy as np

from protocol import codecs

from node.config import NodeConfig
from node.table import format_table
from node.train.data import load_corpus
from node.train.trainer import PartnerUpdate, Trainer

LINK_NUMEL = 19_210_240  # the 19M model of the WAN measurements (--d-model 512 --n-layers 6 --n-heads 8)
LINKS_MBIT = (20, 100)


def run(cfg: NodeConfig, nodes: int, rounds: int, seed: int, corpus, overlap: bool = False) -> tuple[float, float]:
    """(mean held-out loss of the nodes' slow weights, their mean drift ‖φ − θ₀‖ / ‖θ₀‖ from the initial
    weights) after `rounds` paired rounds on `cfg.wire_dtype`.

    `overlap`: the eager engine of `overlap on` (protocol/SPEC.md §4.1) with every exchange landing one boundary
    after it started (m = 1, the case when a transfer takes less than a round): at each boundary the node
    commits its tensors, lands the previous exchange's correction, takes its local outer step, and the pair's
    correction lands at the next boundary; the last one lands after the last round, as a stopping node does."""
    trainers = [Trainer(cfg, corpus, shard=i, sampler_seed=seed * 1000 + i) for i in range(nodes)]
    initial = trainers[0].slow_weights.clone()
    pairing = random.Random(seed)
    pending: list[list[PartnerUpdate]] = [[] for _ in trainers]  # exchanges in flight, landing next boundary
    for _ in range(rounds):
        for trainer in trainers:
            trainer.run_round()
        sent = [trainer.outgoing_tensors() for trainer in trainers]  # rounded to the wire dtype, as committed
        order = list(range(nodes))
        pairing.shuffle(order)
        partner = {}
        for a, b in zip(order[::2], order[1::2]):
            partner[a], partner[b] = b, a
        for i, trainer in enumerate(trainers):
            j = partner.get(i)
            # what arrives: the partner's tensors through encode/decode (exact for what it committed)
            received = None if j is None else {
                name: codecs.round_trip(array, cfg.wire_dtype, codecs.reference_for(name, trainers[j].wire_reference))
                for name, array in sent[j].items()}
            if not overlap:
                trainer.apply_outer_step(received)
                continue
            _, shift = trainer.apply_eager_outer_step(pending[i])
            pending[i] = [] if received is None else [PartnerUpdate(sent[i], received, lag=1, shift=shift)]
    for i, trainer in enumerate(trainers):
        if pending[i]:
            trainer.apply_late_corrections(pending[i])
    drift = statistics.mean(float((t.slow_weights - initial).norm() / initial.norm()) for t in trainers)
    final, reference = trainers[0].slow_weights.numpy(), codecs.make_reference(initial.numpy())
    errors = ", ".join(
        f"{dtype} {np.linalg.norm(codecs.round_trip(final, dtype, reference) - final) / np.linalg.norm(final):.2e}"
        for dtype in ("bfloat16", "blockwise8"))
    print(f"  final φ: drift {drift:.3f}, round-trip rel. error {errors}", flush=True)
    return statistics.mean(trainer.evaluate() for trainer in trainers), drift


def drift_study(model: dict, corpus, fractions=(0.001, 0.01, 0.03, 0.1, 0.3, 1.0)) -> list[dict]:
    """Round-trip error of each wire dtype on the model's initial weights moved by Gaussian noise of a given
    fraction of their RMS: blockwise8 codes the difference from the initial weights, so its error grows
    with how far training has taken them; bfloat16's does not."""
    cfg = NodeConfig(wire_dtype="blockwise8", threads=1, **model).validate()
    trainer = Trainer(cfg, corpus, shard=0, sampler_seed=0)
    initial = trainer.slow_weights.numpy()
    rms = float(np.sqrt(np.mean(initial.astype(np.float64) ** 2)))
    rng = np.random.default_rng(0)
    rows = []
    for fraction in fractions:
        x = initial + (rng.standard_normal(initial.size) * rms * fraction).astype(np.float32)
        errors = {dtype: float(np.linalg.norm(codecs.round_trip(x, dtype, trainer.wire_reference) - x) / np.linalg.norm(x))
                  for dtype in ("bfloat16", "blockwise8")}
        rows.append({"drift (RMS of θ₀)": f"{fraction:g}", **{f"{d} rel. error": f"{e:.2e}" for d, e in errors.items()},
                     "blockwise8 / bfloat16": f"{errors['blockwise8'] / errors['bfloat16']:.2f}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gossiptrain bench wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dtypes", nargs="+", default=list(codecs.WIRE_DTYPES), choices=codecs.WIRE_DTYPES)
    parser.add_argument("--tiny", action="store_true", help="a small model and 5 rounds of 4 steps: a smoke run")
    parser.add_argument("--drift", action="store_true",
                        help="only the round-trip error against drift from the initial weights (seconds)")
    parser.add_argument("--overlap", action="store_true",
                        help="compare the sequential and the overlapped engine (on the first of --dtypes) instead")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.rounds < 1 or args.inner_steps < 1:
        parser.error("need --nodes >= 2, --rounds >= 1, --inner-steps >= 1")
    model = dict(d_model=32, n_layers=1, n_heads=2, context=32, batch_size=4) if args.tiny else {}
    rounds, inner = (5, 4) if args.tiny else (args.rounds, args.inner_steps)
    corpus = load_corpus()
    if args.drift:
        print(format_table(drift_study(model, corpus)))
        return 0
    print(f"{args.nodes} nodes, {rounds} rounds of {inner} inner steps, random perfect matching per round; "
          f"seeds {args.seeds}", flush=True)
    if args.overlap:
        return compare_engines(args, model, rounds, inner, corpus)
    losses: dict[str, list[float]] = {dtype: [] for dtype in args.dtypes}
    rows = []
    for seed in args.seeds:
        for dtype in args.dtypes:
            cfg = NodeConfig(seed=seed, inner_steps=inner, wire_dtype=dtype, threads=1, **model).validate()
            started = time.perf_counter()
            loss, drift = run(cfg, args.nodes, rounds, seed, corpus)
            losses[dtype].append(loss)
            base = losses["float32"][-1] if losses.get("float32") else None
            rows.append({"seed": seed, "wire dtype": dtype, "eval loss": f"{loss:.4f}",
                         "vs float32": f"{loss / base:.4f}" if base else "-", "drift": f"{drift:.3f}",
                         "seconds": f"{time.perf_counter() - started:.0f}"})
            print(f"seed {seed} {dtype}: eval loss {loss:.4f}", flush=True)
    print()
    print(format_table(rows))
    print()
    base = statistics.mean(losses["float32"]) if losses.get("float32") else None
    summary = []
    for dtype, values in losses.items():
        nbytes = codecs.wire_bytes(LINK_NUMEL, dtype)
        mean = statistics.mean(values)
        summary.append({"wire dtype": dtype, "mean eval loss": f"{mean:.4f}",
                        "vs float32": f"{mean / base:.4f}" if base else "-",
                        "bytes/exchange (19M model)": f"{nbytes / 1e6:.1f} MB",
                        **{f"s at {rate} Mbit/s": f"{nbytes * 8 / (rate * 1e6):.1f}" for rate in LINKS_MBIT}})
    print(format_table(summary))
    if len(args.seeds) > 1 and base is not None:
        spread = statistics.stdev(losses["float32"])
        print(f"\nseed-to-seed spread of float32's loss (stdev): {spread:.4f}")
    return 0 if all(np.isfinite(v).all() for v in losses.values()) else 1


def compare_engines(args, model: dict, rounds: int, inner: int, corpus) -> int:
    """Sequential against overlapped outer steps, same seeds, pairing and data: held-out loss at equal tokens."""
    dtype = args.dtypes[0]
    losses: dict[str, list[float]] = {"sequential": [], "overlap": []}
    rows = []
    for seed in args.seeds:
        cfg = NodeConfig(seed=seed, inner_steps=inner, wire_dtype=dtype, threads=1, **model).validate()
        for engine in losses:
            loss, drift = run(cfg, args.nodes, rounds, seed, corpus, overlap=engine == "overlap")
            losses[engine].append(loss)
            print(f"seed {seed} {engine}: eval loss {loss:.4f}", flush=True)
        rows.append({"seed": seed, "sequential": f"{losses['sequential'][-1]:.4f}",
                     "overlap": f"{losses['overlap'][-1]:.4f}",
                     "overlap − sequential": f"{losses['overlap'][-1] - losses['sequential'][-1]:+.4f}"})
    print()
    print(format_table(rows))
    differences = [o - s for o, s in zip(losses["overlap"], losses["sequential"])]
    spread = f" ± {statistics.stdev(differences):.4f} (stdev over seeds)" if len(differences) > 1 else ""
    print(f"\nwire {dtype}: overlap − sequential held-out loss {statistics.mean(differences):+.4f} nats{spread}")
    return 0 if all(np.isfinite(v).all() for v in losses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
