"""`gossiptrain status`: join the DHT as a client (no training) and print the swarm: peers, rounds, losses,
last exchanges and flagged peers."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import TYPE_CHECKING

import uvloop

from node.cli.run import add_config_flags, load_config_or_exit
from node.join.peers_file import PeersFileError, all_initial_peers
from node.metrics import FAILED_RESULTS
from node.table import format_table

if TYPE_CHECKING:
    from node.ops.status import SwarmStatus

CLIENT_START_TIMEOUT = 30.0  # p2pd start plus the first contact with an initial peer (hivemind loads lazily)

EXIT_NO_PEERS = 1


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "status", help="print a swarm's peers, rounds, losses and flagged peers (joins the DHT as a client)",
        description=__doc__ + " Needs --initial-peer (or --config with initial_peers); --run-id picks the swarm.",
    )
    parser.add_argument("--config", default=None, help="TOML config file (initial_peers and run_id are used)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=CLIENT_START_TIMEOUT, help="seconds to reach the swarm")
    add_config_flags(parser)
    parser.set_defaults(handler=main)


def _ago(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _short(peer_id: str | None) -> str:
    return f"…{peer_id[-8:]}" if peer_id else "-"


def render(swarm: SwarmStatus) -> str:
    lines = [f"swarm {swarm.run_id!r}  manifest {(swarm.manifest or 'unknown')[:16]}  live peers {len(swarm.peers)}"]
    if swarm.peers:
        rounds = [p.round for p in swarm.peers if p.round is not None]
        if rounds:
            lines[0] += f"  rounds {min(rounds)}..{max(rounds)}"
        rows = []
        for p in swarm.peers:
            rows.append({
                "peer": p.peer_id, "round": p.round if p.round is not None else "-",
                "eval loss": p.eval_loss if p.eval_loss is not None else math.nan,
                "train loss": p.train_loss if p.train_loss is not None else math.nan,
                "tok/s": p.tokens_per_second if p.tokens_per_second is not None else math.nan,
                "util": p.utilisation if p.utilisation is not None else math.nan,
                "ex ok": p.exchanges.get("ok", 0),
                "ex failed": sum(p.exchanges.get(k, 0) for k in FAILED_RESULTS),
                "last exchange": (f"{_ago(p.last_exchange_age)} with {_short(p.last_exchange_partner)}"
                                  if p.last_exchange_partner else "none yet"),
                "flagged by": len(p.flagged_by) or "-",
                "version": p.version or "?",
            })
        lines.append(format_table(rows))
    else:
        lines.append("no live peers in this swarm")
    if swarm.flagged:
        lines.append("flagged peers (excluded from pairing by the peers that flagged them):")
        for target, by in swarm.flagged.items():
            lines.append(f"  {target}  flagged by {len(by)}: {', '.join(_short(p) for p in by)}")
    else:
        lines.append("flagged peers: none")
    if swarm.other_manifest:
        lines.append(f"{len(swarm.other_manifest)} live peer(s) run another manifest (they cannot average with "
                     f"this swarm): {', '.join(_short(p.peer_id) for p in swarm.other_manifest)}")
    if swarm.left:
        lines.append(f"recently left: {', '.join(_short(p) for p in swarm.left)}")
    return "\n".join(lines)


async def collect(initial_peers: list[str], run_id: str, timeout: float) -> SwarmStatus:
    from node.ops.status import dht_client, read_swarm

    async with dht_client(initial_peers, timeout) as dht:
        return await read_swarm(dht, run_id)


def main(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args, "gossiptrain status: config error: ")
    if isinstance(cfg, int):
        return cfg
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    from node.ops.status import SwarmUnreachable

    try:
        peers = all_initial_peers(cfg.initial_peers, cfg.initial_peers_file)
        swarm = uvloop.run(collect(peers, cfg.run_id, args.timeout))
    except (SwarmUnreachable, PeersFileError) as error:
        print(f"gossiptrain status: error: {error}", file=sys.stderr)
        return EXIT_NO_PEERS
    print(json.dumps(swarm.to_json(), indent=1) if args.json else render(swarm), flush=True)
    return 0 if swarm.peers else EXIT_NO_PEERS
