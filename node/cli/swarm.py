"""`gossiptrain swarm`: a local swarm of N real node processes with live progress and a summary table."""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import time
from pathlib import Path

from node.metrics import FAILED_RESULTS
from node.table import format_table
from node.tools.swarm import LocalSwarm, SwarmError, progress_row


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "swarm", help="run a local swarm of N nodes on 127.0.0.1",
        description=__doc__ + " Unknown flags are passed to every node (e.g. --inner-steps 20 --sync local).",
    )
    parser.add_argument("--nodes", type=int, default=3, help="number of node processes (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="outer rounds each node runs (default 30)")
    parser.add_argument("--dir", default="runs/swarm", help="work dirs, logs and results (default runs/swarm)")
    parser.add_argument("--metrics-base-port", type=int, default=9400, help="node i serves /metrics on base+i")
    parser.add_argument("--threads-per-node", type=int, default=1, help="torch threads per node (default 1)")
    parser.add_argument("--refresh", type=float, default=5.0, help="seconds between progress tables")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop the swarm after this many seconds")
    parser.set_defaults(handler=main, passthrough=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, docker stop, CI) stops the nodes like Ctrl-C does


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    node_args = ["--rounds", str(args.rounds)] + list(args.node_args)
    swarm = LocalSwarm(args.nodes, base, node_args, args.metrics_base_port, args.threads_per_node)
    print(f"starting {args.nodes} nodes in {base}/ (logs: {base}/node*/node.log)", flush=True)
    try:
        swarm.start()
        print(f"swarm up; bootstrap peer {swarm.nodes[0].maddr}", flush=True)
        latest: list[dict] = [{} for _ in swarm.nodes]  # a node that has exited keeps its last figures
        deadline = time.monotonic() + args.timeout
        while any(n.process.poll() is None for n in swarm.nodes) and time.monotonic() < deadline:
            time.sleep(args.refresh)
            latest = [(swarm.metrics(i) if n.process.poll() is None else {}) or latest[i]
                      for i, n in enumerate(swarm.nodes)]
            rows = [progress_row(i, samples) for i, samples in enumerate(latest)]
            print(f"\n[{time.strftime('%H:%M:%S')}]\n{format_table(rows)}", flush=True)
    except SwarmError as error:
        print(f"gossiptrain swarm: {error}", file=sys.stderr)
        swarm.stop()
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping nodes (clean leave)", flush=True)
    finally:
        swarm.stop()
    rows = []
    for index, summary in enumerate(swarm.summaries()):
        exchanges = summary.get("exchanges", {})
        rows.append({
            "node": index, "round": summary.get("round", 0), "rounds done": summary.get("rounds_done", 0),
            "eval start": summary.get("initial_eval_loss") or math.nan, "eval end": summary.get("eval_loss") or math.nan,
            "ex ok": exchanges.get("ok", 0),
            "ex failed": sum(exchanges.get(k, 0) for k in FAILED_RESULTS),
            "refused": exchanges.get("rejected", 0),
            "alone": exchanges.get("no_partner", 0), "seconds": summary.get("seconds", math.nan),
            "peak MiB": summary["peak_rss_bytes"] / 2**20 if "peak_rss_bytes" in summary else math.nan,
            "exit": swarm.nodes[index].process.returncode,
        })
    print(f"\nsummary\n{format_table(rows)}", flush=True)
    print(f"per-node history in {base}/node*/history.jsonl; plots: gossiptrain report {base}", flush=True)
    return 0 if all(row["exit"] == 0 for row in rows) else 1
