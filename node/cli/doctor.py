"""`gossiptrain doctor`: preflight checks for this machine and config, each with a verdict and a fix.

It checks Python and package versions, that the bundled p2pd starts, that the listen and
metrics ports are free, the GPU/CUDA and its memory against the configured model (or RAM on
CPU), disk space for checkpoints, and, given --initial-peer, that the swarm is reachable, runs
the same manifest, and that clocks agree. Takes the same flags and config file as `run`.
Exit 0: no check failed; 1: at least one failed; 2: the config itself is invalid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

import uvloop

from node.cli.run import add_config_flags, load_config_or_exit
from node.join.peers_file import PeersFileError, all_initial_peers
from node.ops.doctor import FAIL, Check, run_checks, to_json

MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser("doctor", help="preflight checks with a verdict and a fix for each",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("GOSSIPTRAIN_CONFIG"), help="TOML config file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def line(check: Check) -> str:
    text = f"[{MARKS[check.verdict]}] {check.name:<13} {check.detail}"
    return text + (f"\n       {'':<13} fix: {check.fix}" if check.fix and check.verdict in ("warn", "fail") else "")


def main(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args, "[FAIL] config        ",
                              f"\n       {'':<13} fix: correct the flag, environment variable or config file named above")
    if isinstance(cfg, int):
        return cfg
    try:
        cfg = dataclasses.replace(cfg, initial_peers=all_initial_peers(cfg.initial_peers, cfg.initial_peers_file))
    except PeersFileError as error:
        print(f"[FAIL] peers file    {error}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.CRITICAL)
    progress = (lambda check: None) if args.json else (lambda check: print(line(check), flush=True))
    checks = uvloop.run(run_checks(cfg, progress=progress))
    report = to_json(checks)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        counts = report["counts"]
        print(f"\n{report['verdict'].upper()}: {counts['ok']} ok, {counts['warn']} warning(s), "
              f"{counts['fail']} failed, {counts['skip']} skipped", flush=True)
    return 1 if any(c.verdict == FAIL for c in checks) else 0
