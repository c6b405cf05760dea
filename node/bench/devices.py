"""`gossiptrain bench devices`: one node on several CPU processes (`--devices cpu:N`) against one process on the
same cores, side by side in one run.

Both sides train the real trainer (its model, sampler, AdamW) on the same effective batch: one process with
N x batch_size sequences per step and N torch threads, against N gloo ranks of batch_size sequences and one
thread each. Reported per model width: tokens/s of each side, their ratio, and the rel-L2 distance between
the data-parallel round's Δ and a verifier's one-process replay of it (what the replay tolerance must cover).
Warm-up rounds are not timed; each side's best of `--repeats` timed rounds is reported.

    python -m node.bench.devices [--ranks 2] [--d-models 128 512] [--steps 20] [--repeats 3] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from node.config import NodeConfig
from node.table import format_table
from node.train.data import Corpus, load_corpus
from node.train.trainer import Trainer
from node.verify.replay import Replayer


def tokens_per_second(trainer: Trainer, repeats: int) -> float:
    """The best of `repeats` timed rounds, after one untimed warm-up round (allocator, thread pools, workers)."""
    trainer.run_round()
    best = 0.0
    for _ in range(repeats):
        trainer.apply_outer_step(None)
        started = time.perf_counter()
        stats = trainer.run_round()
        best = max(best, stats.tokens / (time.perf_counter() - started))
    return best


def replay_distance(trainer: Trainer, corpus: Corpus) -> float:
    """rel-L2 between the last round's Δ and a one-process replay of it from the committed start."""
    honest = trainer.fast_weights() - trainer.slow_weights
    replayed = Replayer(trainer.cfg, corpus).replay(trainer.round_start, trainer.cfg.inner_steps)
    return float((replayed - honest).norm() / honest.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gossiptrain bench devices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes of the data-parallel node (default 2)")
    parser.add_argument("--d-models", type=int, nargs="+", default=[128, 512],
                        help="model widths to measure (default 128, the builtin default, and 512)")
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step (default 8)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="inner steps per timed round (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--tiny", action="store_true", help="a small model and short rounds: a smoke run")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.steps < 1 or args.repeats < 1 or min(args.d_models) < 4:
        parser.error("need --ranks >= 2, --steps >= 1, --repeats >= 1 and --d-models >= 4")
    if args.tiny:
        args.d_models, args.n_layers, args.batch_size, args.context, args.steps, args.repeats = [32], 1, 4, 32, 4, 1
    corpus = load_corpus()
    print(f"{args.ranks} gloo ranks x 1 thread x batch {args.batch_size}  vs  1 process x {args.ranks} threads x "
          f"batch {args.ranks * args.batch_size}; context {args.context}, {args.steps} steps per round, "
          f"best of {args.repeats}; {os.cpu_count()} CPUs visible", flush=True)
    rows = []
    for d_model in args.d_models:
        shape = dict(d_model=d_model, n_layers=args.n_layers, n_heads=4 if d_model % 4 == 0 else 1,
                     context=args.context, inner_steps=args.steps, warmup_steps=1)
        single_cfg = NodeConfig(**shape, batch_size=args.ranks * args.batch_size, threads=args.ranks).validate()
        single = Trainer(single_cfg, corpus, shard=0, sampler_seed=1)
        single_rate = tokens_per_second(single, args.repeats)
        parallel_cfg = NodeConfig(**shape, batch_size=args.batch_size, threads=1, devices=f"cpu:{args.ranks}").validate()
        parallel = Trainer(parallel_cfg, corpus, shard=0, sampler_seed=1)
        try:
            parallel_rate = tokens_per_second(parallel, args.repeats)
            distance = replay_distance(parallel, corpus)
        finally:
            parallel.close()
        rows.append({"d_model": d_model, "parameters": f"{single.numel / 1e6:.2f}M",
                     "1 process tok/s": f"{single_rate:,.0f}", f"cpu:{args.ranks} tok/s": f"{parallel_rate:,.0f}",
                     "ratio": f"{parallel_rate / single_rate:.2f}x", "replay rel-L2": f"{distance:.1e}"})
        print(f"d_model {d_model}: {single_rate:,.0f} vs {parallel_rate:,.0f} tokens/s", flush=True)
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
