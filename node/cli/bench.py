"""`gossiptrain bench exchange`: pair-exchange throughput against raw TCP and a plain p2pd stream."""

from __future__ import annotations

import argparse


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("bench", help="benchmarks that print figures")
    parser.add_argument("what", choices=["exchange"])
    parser.add_argument("--numel", type=int, default=25_000_000, help="fp32 parameters per side (default 25M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from node.bench_exchange import run_benchmark

    return run_benchmark(args.numel, args.repeats)
