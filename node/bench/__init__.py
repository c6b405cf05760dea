"""Benchmarks that print figures: pair exchange, state sync, verification, wire dtypes, fuzzing, emulated
networks (never imported by the daemon). Below: what the benchmarks that launch real swarms share."""

from __future__ import annotations

import signal


def split_node_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own flags, the flags after `--` that go to every node)."""
    if "--" not in argv:
        return list(argv), []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM ends the benchmark like Ctrl-C: its `finally` blocks stop the nodes and tear the network down."""
    signal.signal(signal.SIGTERM, _interrupt)
