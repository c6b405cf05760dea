"""`python -m node.bench.partition`: how long a swarm takes to become one view again after a network outage.

N real nodes (3 by default), each on a host of its own in an emulated network (node/tools/netns.py:
network namespaces on a bridge). Per trial, once every node sees every other, one host is cut off
(its bridge port down: packets dropped, nothing refused) for the trial's cut length, then restored.
The figure is the time from the restore to **one view**: every node's live view
(gossiptrain_peers_live, scraped from the root namespace) holds every other node, and keeps holding
it for ``--hold`` seconds. The hold makes the figure honest: a gauge last set before the cut can
read "full" for a few seconds after the restore; a swarm that stayed split shows it once the cut
node's presence has expired (presence TTL + a heartbeat), well inside the hold. A trial that does
not reach one view within ``--deadline`` seconds of the restore reports "split".

The cut host rotates through the hosts (trial k cuts host k mod N; host 0 is the node the others
bootstrapped from, with no initial peers of its own). Per trial it also reports the smallest view
seen from the cut to one view (did the swarm really split?), the DHT routing table sizes and the
re-bootstrap count at the end (gossiptrain_dht_routing_peers, gossiptrain_dht_rebootstraps_total),
and when the cut node's next exchange completed (its exchanges resumed).

Needs root and iproute2 (ip, tc). Not a CI test (tests/integration/test_partition.py is the CI-sized
one): about a minute to start the swarm, then cut + up to deadline + hold per trial.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.bench import split_node_args, stop_on_sigterm
from node.table import format_table
from node.tools import netns
from node.tools.swarm import LocalSwarm, SwarmError, exchange_count, scrape

# Small enough for a 2-core box (the same model the integration tests train); rounds never end by themselves.
NODE_ARGS = ["--d-model", "64", "--n-layers", "2", "--n-heads", "4", "--context", "64", "--batch-size", "8",
             "--eval-batches", "4", "--warmup-steps", "10", "--lr", "3e-3", "--inner-steps", "10",
             "--sync-timeout", "8", "--seed", "7", "--rounds", "0"]
DEFAULT_CUTS = (3.0, 10.0, 30.0)
SAMPLE_INTERVAL_S = 0.5
SCRAPE_TIMEOUT_S = 1.0  # a cut host does not answer: each sample waits at most this for it
DEFAULT_HOLD_S = 12.0  # > presence TTL (6 s) + heartbeat (2 s) + one heartbeat's DHT timeout (3 s)
DEFAULT_DEADLINE_S = 60.0
DEFAULT_EXCHANGE_WAIT_S = 75.0
PRE_CUT_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0

PEERS_LIVE = "gossiptrain_peers_live"
ROUTING_PEERS = "gossiptrain_dht_routing_peers"
REBOOTSTRAPS = "gossiptrain_dht_rebootstraps_total"


@dataclass(frozen=True)
class Sample:
    """One scrape of every node: its live-view size (None: it did not answer) at monotonic time `t`."""

    t: float
    views: tuple[int | None, ...]

    def full(self) -> bool:
        """Every node answered and sees every other."""
        return all(view == len(self.views) - 1 for view in self.views)


def one_view_since(samples: Sequence[Sample], after: float, hold: float) -> float | None:
    """Start of the first run of full samples taken at or after `after` that lasts at least `hold` seconds
    (None if there is none yet). A sample that is not full ends a run; the run's length is from its first
    full sample to its last."""
    start: float | None = None
    for sample in samples:
        if sample.t < after:
            continue
        if not sample.full():
            start = None
            continue
        if start is None:
            start = sample.t
        if sample.t - start >= hold:
            return start
    return None


def smallest_view(samples: Sequence[Sample], after: float, until: float | None = None) -> int | None:
    """The smallest live view any answering node reported in [after, until]."""
    views = [v for s in samples if s.t >= after and (until is None or s.t <= until) for v in s.views if v is not None]
    return min(views) if views else None


@dataclass
class Trial:
    index: int
    host: int
    cut_s: float
    heal_s: float | None = None  # restore -> one view (None: still split at the deadline)
    smallest_view: int | None = None  # from the cut to one view (or the deadline)
    routing_peers: list[int | None] = field(default_factory=list)  # per node, at the end
    rebootstraps: list[int | None] = field(default_factory=list)  # per node, at the end
    exchange_after_s: float | None = None  # restore -> the cut node's next completed exchange
    exchanges_at_cut: int = 0  # the cut node's completed exchanges when it was cut
    restored_at: float | None = None  # monotonic time of the restore
    restored_clock: str = ""  # wall-clock time of the restore (HH:MM:SS, to read the node logs by)
    error: str = ""


class Sampler:
    """Scrapes every node's /metrics concurrently (a cut node costs one timeout, not one per node)."""

    def __init__(self, swarm: LocalSwarm, timeout: float = SCRAPE_TIMEOUT_S) -> None:
        self.swarm, self.timeout = swarm, timeout
        self.pool = ThreadPoolExecutor(max_workers=max(1, swarm.num_nodes))
        self.samples: list[Sample] = []
        self.latest: list[dict[str, float]] = [{} for _ in range(swarm.num_nodes)]

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def take(self) -> Sample:
        urls = [node.metrics_url for node in self.swarm.nodes]
        scrapes = list(self.pool.map(lambda url: scrape(url, self.timeout), urls))
        views = []
        for index, samples in enumerate(scrapes):
            if samples:
                self.latest[index] = samples
            views.append(int(samples[PEERS_LIVE]) if PEERS_LIVE in samples else None)
        sample = Sample(time.monotonic(), tuple(views))
        self.samples.append(sample)
        return sample

    def until(self, done: Callable[[], bool], timeout: float, interval: float = SAMPLE_INTERVAL_S) -> bool:
        """Sample every `interval` until done() (True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while True:
            started = time.monotonic()
            self.take()
            if done():
                return True
            if started >= deadline:
                return False
            time.sleep(max(0.0, min(interval - (time.monotonic() - started), deadline - time.monotonic())))


def gauge(samples: dict[str, float], name: str) -> int | None:
    return int(samples[name]) if name in samples else None


def run_trial(net: netns.Network, swarm: LocalSwarm, sampler: Sampler, index: int, host: int, cut_s: float,
              deadline_s: float, hold_s: float, exchange_wait_s: float = 0.0) -> Trial:
    """Cut host `host` for `cut_s` seconds once the swarm is one view; measure restore -> one view. With
    `exchange_wait_s`, also wait (that long after the restore at most) for the cut node's next completed exchange."""
    wait_exchange = exchange_wait_s > 0
    trial = Trial(index, host, cut_s)
    if not sampler.until(lambda: sampler.samples[-1].full(), PRE_CUT_TIMEOUT_S):
        trial.error = f"not one view before the cut (views {sampler.samples[-1].views})"
        return trial
    exchanges_before = trial.exchanges_at_cut = exchange_count(sampler.latest[host], "ok")
    cut_at = time.monotonic()
    net.cut(host)
    try:  # sample through the cut (a sample may take SCRAPE_TIMEOUT_S), then restore on time
        sampler.until(lambda: time.monotonic() >= cut_at + cut_s - SCRAPE_TIMEOUT_S, cut_s)
        time.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
    finally:
        net.restore(host)
    restored = trial.restored_at = time.monotonic()
    trial.restored_clock = time.strftime("%H:%M:%S")

    exchanged: list[float] = []

    def done() -> bool:
        if not exchanged and exchange_count(sampler.latest[host], "ok") > exchanges_before:
            exchanged.append(time.monotonic())
        return one_view_since(sampler.samples, restored, hold_s) is not None and (bool(exchanged) or not wait_exchange)

    sampler.until(done, max(deadline_s + hold_s, exchange_wait_s if wait_exchange else 0.0))
    start = one_view_since(sampler.samples, restored, hold_s)
    trial.heal_s = None if start is None or start - restored > deadline_s else round(max(0.0, start - restored), 1)
    trial.smallest_view = smallest_view(sampler.samples, cut_at, start)
    trial.exchange_after_s = round(exchanged[0] - restored, 1) if exchanged else None
    trial.routing_peers = [gauge(s, ROUTING_PEERS) for s in sampler.latest]
    trial.rebootstraps = [gauge(s, REBOOTSTRAPS) for s in sampler.latest]
    return trial


def report(trials: Sequence[Trial], nodes: int) -> str:
    rows = [{
        "trial": t.index, "cut host": t.host, "cut s": f"{t.cut_s:g}",
        "restore->one view s": "split" if t.heal_s is None else f"{t.heal_s:.1f}",
        f"min view (of {nodes - 1})": "-" if t.smallest_view is None else t.smallest_view,
        "exchange after s": "-" if t.exchange_after_s is None else f"{t.exchange_after_s:.1f}",
        "routing peers": " ".join("-" if v is None else str(v) for v in t.routing_peers),
        "rebootstraps": " ".join("-" if v is None else str(v) for v in t.rebootstraps),
        "error": t.error or "",
    } for t in trials]
    healed = [t.heal_s for t in trials if t.heal_s is not None]
    summary = (f"{len(healed)}/{len(trials)} trials reached one view"
               + (f"; restore->one view max {max(healed):.1f} s" if healed else ""))
    return f"{format_table(rows)}\n{summary}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node.bench.partition", description=__doc__.split("\n\n")[0],
                                     epilog="Flags after -- go to every node, e.g. -- --presence-ttl 10.")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cuts", type=float, nargs="+", default=list(DEFAULT_CUTS), metavar="S",
                        help=f"cut lengths in seconds, one trial each, in order (default {' '.join(map(str, DEFAULT_CUTS))})")
    parser.add_argument("--repeat", type=int, default=1, help="run the list of cuts this many times (default 1)")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds after a restore before the trial counts as split (default {DEFAULT_DEADLINE_S:g})")
    parser.add_argument("--hold", type=float, default=DEFAULT_HOLD_S,
                        help=f"one view must hold this long to count (default {DEFAULT_HOLD_S:g})")
    parser.add_argument("--exchange-wait", type=float, default=DEFAULT_EXCHANGE_WAIT_S,
                        help="also wait this long after a restore for the cut node's next completed exchange "
                             f"(0: do not wait; default {DEFAULT_EXCHANGE_WAIT_S:g}: a node that saw an exchange with "
                             "a peer fail does not pair with it for 60 s)")
    parser.add_argument("--dir", default="runs/partition", help="work dirs, logs, results.json (default runs/partition)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_node_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.repeat < 1 or any(cut <= 0 for cut in args.cuts) or args.deadline <= 0 or args.hold < 0:
        parser.error("--nodes >= 2, --repeat >= 1, cuts and --deadline > 0, --hold >= 0")
    reason = netns.unavailable_reason()
    if reason:
        print(f"bench partition: {reason}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    cuts = [cut for _ in range(args.repeat) for cut in args.cuts]
    trials: list[Trial] = []
    with netns.Network(args.nodes) as net:
        swarm = LocalSwarm(args.nodes, base, [*NODE_ARGS, *extra], hosts=net.swarm_hosts())
        sampler = Sampler(swarm)
        print(f"bench partition: {args.nodes} nodes on hosts {net.addresses}; cuts {cuts} s; hold {args.hold:g} s, "
              f"deadline {args.deadline:g} s; logs {base}/node*/node.log", flush=True)
        try:
            swarm.start()
            print("all nodes up", flush=True)
            for index, cut_s in enumerate(cuts):
                trial = run_trial(net, swarm, sampler, index, index % args.nodes, cut_s, args.deadline, args.hold,
                                  args.exchange_wait)
                trials.append(trial)
                heal = "split" if trial.heal_s is None else f"{trial.heal_s:.1f} s"
                print(f"trial {index}: host {trial.host} cut {cut_s:g} s, restored at {trial.restored_clock} -> "
                      f"one view after {heal} "
                      f"(smallest view {trial.smallest_view}) {trial.error}", flush=True)
        except (SwarmError, KeyboardInterrupt) as error:
            print(f"bench partition stopped: {str(error).splitlines()[0] if str(error) else 'interrupted'}",
                  file=sys.stderr, flush=True)
        finally:
            sampler.close()
            swarm.stop(grace=STOP_GRACE_S)
    print(report(trials, args.nodes), flush=True)
    (base / "results.json").write_text(json.dumps({"nodes": args.nodes, "hold": args.hold, "deadline": args.deadline,
                                                   "trials": [asdict(t) for t in trials]}, indent=1))
    return 0 if trials and all(t.heal_s is not None and t.heal_s <= 10.0 for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
