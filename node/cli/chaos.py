"""`gossiptrain chaos`: a seeded chaos run (SIGKILL, SIGTERM, SIGSTOP) over a local swarm, with checks."""

from __future__ import annotations

import argparse
import shutil
import signal
from pathlib import Path

from node.tools.chaos import LogEntry, make_schedule, run_chaos


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "chaos", help="seeded chaos test of a local swarm of N nodes on 127.0.0.1",
        description=__doc__ + " Unknown flags are passed to every node (e.g. --inner-steps 20). Exits 0 when"
        " every check passes, 1 otherwise.",
    )
    parser.add_argument("--nodes", type=int, default=5, help="number of node processes (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="schedule seed: the same seed, the same events")
    parser.add_argument("--duration", type=float, default=600.0, help="chaos phase in seconds (default 600)")
    parser.add_argument("--dir", default="runs/chaos", help="work dirs, logs and results (default runs/chaos)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the fault-free swarm of the same length (and the loss comparison)")
    parser.add_argument("--loss-tolerance", type=float, default=0.3,
                        help="allowed final eval loss above the fault-free run, in nats (default 0.3)")
    parser.add_argument("--max-stall", type=float, default=None,
                        help="seconds a live node may go without a round (default: 3 x (round time + "
                             "sync_timeout + io_timeout))")
    parser.add_argument("--metrics-base-port", type=int, default=0,
                        help="node i serves /metrics on base+i (default 0: free ports)")
    parser.add_argument("--threads-per-node", type=int, default=1, help="torch threads per node (default 1)")
    parser.set_defaults(handler=main, passthrough=True)


def main(args: argparse.Namespace) -> int:
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    schedule = make_schedule(args.seed, args.nodes, args.duration)
    print(f"chaos seed {args.seed}: {args.nodes} nodes for {args.duration:.0f}s in {base}/ "
          f"(logs: {base}/chaos/node*/node.log); {len(schedule)} events:", flush=True)
    for event in schedule:
        print(f"  at {event.at:6.1f}s  {event.kind:<6} node {event.node}  for {event.duration:.1f}s", flush=True)

    def show(entry: LogEntry) -> None:
        print(entry.line(), flush=True)

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # a SIGTERM to the harness stops the nodes too (they run in their own sessions)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        report = run_chaos(
            base, seed=args.seed, num_nodes=args.nodes, duration_s=args.duration, node_args=args.node_args,
            schedule=schedule, baseline=not args.no_baseline, loss_tolerance=args.loss_tolerance,
            max_stall_s=args.max_stall, threads_per_node=args.threads_per_node,
            metrics_base_port=args.metrics_base_port, on_event=show,
        )
    except KeyboardInterrupt:  # run_chaos has already stopped every node
        print("\ninterrupted: every node stopped", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\n{report.render()}", flush=True)
    return 0 if report.passed else 1
