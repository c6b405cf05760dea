"""`python -m node.bench.wan` (also `gossiptrain bench wan`): a real swarm over an emulated WAN link.

N real nodes (3 by default), each on a host of its own in an emulated network
(node/tools/netns.py: network namespaces on a bridge, every host's egress limited to
``--rate`` by tbf), train a model of the given size for ``--seconds`` after they are all
up. Then, per node, from its own /metrics (scraped from the root namespace):

  paired %    outer rounds that averaged with a partner, of all rounds it computed
  ex ok       pair exchanges completed; then every failure by reason (timeout, peer_gone,
              protocol_error, aborted), refused pairing requests and rounds alone
  MB/ex       exchange bytes this node sent per exchange that started (ok or failed); a full
              exchange sends the model once (in the wire dtype: 2 bytes per parameter in bfloat16,
              the default, 4 in float32, about 1 in blockwise8; the header gives each)
  tok/s       training tokens per second over the measured window
  util        trainer compute seconds (gossiptrain_train_compute_seconds_total) per wall
              second over the window; "-" when the node does not export it
  eval        held-out loss of its slow weights at the end

Rows compare engines: each row is a label and a list of extra node flags, run one after
the other on a fresh network with the same rate, model and duration. The default is one
row, ``current`` (no extra flags). Add rows with ``--row 'LABEL: --flag value ...'``
(repeatable); flags after ``--`` go to every node of every row. Results are also written
to ``DIR/results.json``.

Needs root and iproute2 (ip, tc): it creates and removes network namespaces, veths and a
bridge (all named with a random tag) and sends traffic only between them. Not a CI test:
minutes per row. The baseline it reproduces (DESIGN.md): at 20 Mbit/s a 19M-parameter
model (``--d-model 512 --n-layers 6 --n-heads 8``, 77 MB per exchange, about 31 s of
transfer) cannot finish an exchange within the default 10 s sync deadline.

Keep nodes <= cores when judging utilisation (``--pin`` puts node i on core i mod cores,
``--cpu-quota`` caps each node): on oversubscribed cores one node's wait is another's compute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.codecs import WIRE_DTYPES, wire_bytes

from node.bench import split_node_args, stop_on_sigterm
from node.metrics import FAILED_RESULTS
from node.table import format_table
from node.tools import netns
from node.tools.swarm import LocalSwarm, SwarmError, exchange_count, progress_row, rounds_done

DEFAULT_ROWS = ("current:",)
STOP_GRACE_S = 90.0  # a leaving node finishes an exchange under way (bounded by its leave_timeout, 60 s)


@dataclass(frozen=True)
class Row:
    """One engine configuration to measure: a label and the extra flags every node gets."""

    label: str
    node_args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Row:
        """'LABEL: --flag value ...' (the flags shell-quoted); 'LABEL' alone means no extra flags."""
        label, _, args = text.partition(":")
        label = label.strip()
        if not label or not label.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"bad row {text!r}: 'LABEL: --flag value ...' with a label of letters, digits, - or _")
        return cls(label, tuple(shlex.split(args)))


@dataclass
class Window:
    """A node's counters at the start of the measured window."""

    wall: float
    tokens: float
    compute: float | None


@dataclass
class RowResult:
    row: Row
    nodes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def parameter_count(d_model: int, n_layers: int, context: int, vocab: int = 256) -> int:
    """Parameters of the built-in ByteGPT (node/train/model.py), without building it."""
    block = 2 * 2 * d_model + (3 * d_model * d_model + 3 * d_model) + (d_model * d_model + d_model) \
        + (4 * d_model * d_model + 4 * d_model) + (4 * d_model * d_model + d_model)
    return vocab * d_model + context * d_model + n_layers * block + 2 * d_model + d_model * vocab


def node_figures(index: int, samples: dict[str, float], start: Window | None, end_wall: float) -> dict[str, Any]:
    """One node's table row from its last scrape and the counters at the start of the window."""
    paired = samples.get('gossiptrain_outer_rounds_total{mode="paired"}', 0.0)
    rounds = rounds_done(samples)
    ok = exchange_count(samples, "ok")
    failed = {reason: exchange_count(samples, reason) for reason in FAILED_RESULTS}
    started = ok + sum(failed.values())
    sent = samples.get('gossiptrain_bytes_sent_total{kind="exchange"}', 0.0)
    seconds = end_wall - start.wall if start else math.nan
    tokens = samples.get("gossiptrain_tokens_total", math.nan)
    compute = samples.get("gossiptrain_train_compute_seconds_total")
    row = {
        "node": index, "rounds": rounds,
        "paired %": 100.0 * paired / rounds if rounds else math.nan,
        "ex ok": ok, **failed,
        "refused": exchange_count(samples, "rejected"), "alone": exchange_count(samples, "no_partner"),
        "MB/ex": sent / started / 1e6 if started else math.nan,
        "tok/s": (tokens - start.tokens) / seconds if start and seconds > 0 else math.nan,
        "util": math.nan,
        "eval": samples.get("gossiptrain_eval_loss", math.nan),
    }
    if start and start.compute is not None and compute is not None and seconds > 0:
        row["util"] = (compute - start.compute) / seconds
    return row


def window_start(samples: dict[str, float]) -> Window:
    return Window(time.monotonic(), samples.get("gossiptrain_tokens_total", 0.0),
                  samples.get("gossiptrain_train_compute_seconds_total"))


def cpu_shares(args: argparse.Namespace) -> list[netns.CpuShare | None] | None:
    if not args.pin and args.cpu_quota is None:
        return None
    cores = os.cpu_count() or 1
    return [netns.CpuShare(core=i % cores if args.pin else None, quota=args.cpu_quota) for i in range(args.nodes)]


def run_row(row: Row, args: argparse.Namespace, base: Path, common: list[str]) -> RowResult:
    result = RowResult(row)
    node_args = [*common, *row.node_args]
    with netns.Network(args.nodes, rate=args.rate, cpu=cpu_shares(args)) as net:
        swarm = LocalSwarm(args.nodes, base / row.label, node_args, threads_per_node=args.threads_per_node,
                           hosts=net.swarm_hosts())
        print(f"\n== row {row.label}: {' '.join(row.node_args) or '(no extra flags)'}; hosts {net.addresses} "
              f"at {args.rate}, bridge {net.bridge_address}; logs {base / row.label}/node*/node.log", flush=True)
        try:
            swarm.start()
            latest = [swarm.metrics(i) for i in range(args.nodes)]
            starts = [window_start(samples) for samples in latest]
            print(f"all {args.nodes} nodes up; measuring {args.seconds:.0f}s", flush=True)
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline and all(n.process.poll() is None for n in swarm.nodes):
                time.sleep(min(args.refresh, max(0.1, deadline - time.monotonic())))
                latest = [swarm.metrics(i) or latest[i] for i in range(args.nodes)]
                rows = [progress_row(i, samples) for i, samples in enumerate(latest)]
                print(f"\n[{row.label} {time.strftime('%H:%M:%S')}]\n{format_table(rows)}", flush=True)
            end = time.monotonic()
            result.nodes = [node_figures(i, latest[i], starts[i], end) for i in range(args.nodes)]
            exited = [n.index for n in swarm.nodes if n.process.poll() is not None]
            if exited:
                result.error = f"nodes {exited} exited during the window"
        except SwarmError as error:
            result.error = str(error).splitlines()[0]
            print(f"row {row.label}: {error}", file=sys.stderr, flush=True)
        finally:
            swarm.stop(grace=STOP_GRACE_S)
    return result


def report(results: list[RowResult], header: str) -> str:
    rows = []
    for result in results:
        for node in result.nodes:
            rows.append({"row": result.row.label, **node})
        if not result.nodes:
            rows.append({"row": result.row.label, "node": f"failed: {result.error}"})
    lines = [header, format_table(rows)]
    lines += [f"row {r.row.label}: {r.error}" for r in results if r.error and r.nodes]
    lines += [f"row {r.row.label} flags: {' '.join(r.row.node_args) or '-'}" for r in results]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m node.bench.wan", description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to every node, e.g. -- --sync-timeout 30.",
    )
    parser.add_argument("--rate", default="20mbit", help="egress limit of every host, tc syntax (default 20mbit)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=180.0, help="measured training time per row (default 180)")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, default=20, help="H (default 20: a round of the 19M model "
                        "takes ~20-30 s on a shared 2-core CPU)")
    parser.add_argument("--row", action="append", default=None, metavar="'LABEL: FLAGS'",
                        help="an engine to measure: label and extra node flags (repeatable; default 'current:')")
    parser.add_argument("--dir", default="runs/wan", help="work dirs, logs, results.json (default runs/wan)")
    parser.add_argument("--threads-per-node", type=int, default=1)
    parser.add_argument("--pin", action="store_true", help="pin node i to core i mod cores (taskset)")
    parser.add_argument("--cpu-quota", type=float, default=None, help="cap every node at this many CPUs (cgroup)")
    parser.add_argument("--refresh", type=float, default=15.0, help="seconds between progress tables")
    return parser


def _plain(value: Any) -> Any:
    """JSON-safe: NaN (no figure) becomes null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_node_args(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        netns.rate_bits(args.rate)
        rows = [Row.parse(text) for text in (args.row or DEFAULT_ROWS)]
    except ValueError as error:
        parser.error(str(error))
    if len({row.label for row in rows}) != len(rows):
        parser.error("row labels must differ")
    reason = netns.unavailable_reason()
    if reason:
        print(f"bench wan: {reason}", file=sys.stderr)
        return 2
    stop_on_sigterm()
    base = Path(args.dir)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    params = parameter_count(args.d_model, args.n_layers, args.context)
    common = ["--d-model", str(args.d_model), "--n-layers", str(args.n_layers), "--n-heads", str(args.n_heads),
              "--context", str(args.context), "--inner-steps", str(args.inner_steps), *extra]
    header = (f"\nbench wan: {args.nodes} nodes, egress {args.rate} each ({netns.rate_bits(args.rate) / 1e6:g} Mbit/s), "
              f"model {params / 1e6:.1f}M params (per exchange each way: "
              + ", ".join(f"{dtype} {wire_bytes(params, dtype) / 1e6:.0f} MB, "
                          f"{wire_bytes(params, dtype) * 8 / netns.rate_bits(args.rate):.0f} s" for dtype in WIRE_DTYPES)
              + f" at the rate), H={args.inner_steps}, "
              f"{args.seconds:.0f} s per row, {os.cpu_count()} cores; node flags: {' '.join(common)}")
    print(header, flush=True)
    results: list[RowResult] = []
    try:
        for row in rows:
            results.append(run_row(row, args, base, common))
    except KeyboardInterrupt:
        print("\ninterrupted: the rows measured so far", flush=True)
    text = report(results, header)
    print(text, flush=True)
    (base / "results.json").write_text(json.dumps({
        "rate": args.rate, "nodes": args.nodes, "params": params, "seconds": args.seconds, "common_flags": common,
        "rows": [{"label": r.row.label, "flags": list(r.row.node_args), "error": r.error,
                  "nodes": [{key: _plain(value) for key, value in node.items()} for node in r.nodes]}
                 for r in results],
    }, indent=1))
    return 0 if results and all(r.nodes and not r.error for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
