"""`gossiptrain` command line: one verb per module, each a thin shell over the library."""

from __future__ import annotations

import argparse
import sys

from node import __version__
from node.cli import bench, chaos, doctor, health, report, run, status, swarm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossiptrain", description="Peer-to-peer decentralized training node")
    parser.add_argument("--version", action="version", version=f"gossiptrain {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in (run, swarm, status, doctor, report, health, bench, chaos):
        verb.add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.node_args = unknown
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
