"""`gossiptrain bench exchange|state-sync`: pair-exchange throughput; how long a joiner takes to download the state."""

from __future__ import annotations

import argparse
import sys

EXCHANGE_NUMEL = 25_000_000


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("bench", help="benchmarks that print figures")
    parser.add_argument("what", choices=["exchange", "state-sync"])
    parser.add_argument(
        "--numel", type=int, nargs="+", default=None, metavar="N",
        help="exchange: fp32 parameters per side, one value (default 25M); state-sync: state sizes in parameters, "
             "one or more (default: the default model's parameter count and 100M)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    if args.what == "state-sync":
        from node import bench_state

        return bench_state.run_benchmark(args.numel or bench_state.default_sizes(), args.repeats)
    from node.bench_exchange import run_benchmark

    if args.numel is not None and len(args.numel) != 1:
        print("bench exchange: --numel takes one value", file=sys.stderr)
        return 2
    return run_benchmark(args.numel[0] if args.numel else EXCHANGE_NUMEL, args.repeats)
