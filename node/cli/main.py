"""`gossiptrain` command line: one verb per module, each a thin shell over the library.

Verb modules are imported only after a stop signal is handled: a SIGTERM that lands while
Python is still importing (0.3-0.5 s without .pyc files) ends a starting node with exit 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from node import __version__

VERBS = ("run", "swarm", "status", "doctor", "report", "health", "bench", "chaos", "tokenizer")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_before_start(signum: int, frame: object) -> None:
    """Until a node's event loop takes over, a stop signal exits at once: nothing is running that needs stopping."""
    print("gossiptrain: stopped while starting", file=sys.stderr, flush=True)
    os._exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gossiptrain", description="Peer-to-peer decentralized training node")
    parser.add_argument("--version", action="version", version=f"gossiptrain {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        importlib.import_module(f"node.cli.{verb}").add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    previous = {sig: signal.signal(sig, stop_before_start) for sig in STOP_SIGNALS}
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "stop_while_starting", False):  # only `run` keeps it, until its node takes over
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if unknown and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.node_args = unknown
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
