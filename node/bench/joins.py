"""`gossiptrain bench joins DIR...`: how often the join vetting would refuse an honest donor's state.

A joiner adopts a downloaded φ only if its held-out loss is within max(0.5, 25%) of the median loss the
live peers report (node/join/plan.py `state_problem`). This replays that rule on real runs: every round
boundary in every node's history.jsonl (an honest donor's state at that moment, with the held-out loss the
node measured on it, the same held-out batches a joiner uses) is judged against the latest loss every
node of the run had reported by then (what their presence records said), if a joiner would ask that donor
first then: past round 0 and within `--max-staleness` rounds of the median front (`donor_order`). Each
such boundary is one honest join that could have happened; a refusal there is a false reject.

    python -m node.bench.joins runs/swarm [more run dirs or node work dirs ...]

Prints per run: distinct donor states judged and refused, the moments judged and those at which every donor
a joiner would ask first would be refused (that join fails, or falls back to farther donors), and the
smallest margin (bound − loss) seen: how close an honest state came to being refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from node.config import NodeConfig
from node.gossip.pairing import supported_round
from node.join.plan import STATE_LOSS_SLACK, STATE_LOSS_SLACK_RATIO, state_problem
from node.table import format_table


def histories(path: Path) -> dict[str, list[tuple[float, int, float]]]:
    """(time, round, eval loss) per node of a run dir (its node*/history.jsonl) or of one node work dir."""
    files = [path / "history.jsonl"] if (path / "history.jsonl").is_file() else sorted(path.glob("*/history.jsonl"))
    out: dict[str, list[tuple[float, int, float]]] = {}
    for file in files:
        points = []
        for line in file.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            loss, round_ = entry.get("eval_loss"), entry.get("round")
            if isinstance(loss, (int, float)) and math.isfinite(loss) and isinstance(round_, int):
                points.append((float(entry["time"]), round_, float(loss)))
        if points:
            out[file.parent.name] = sorted(points)
    return out


def latest(points: list[tuple[float, int, float]], at: float) -> tuple[float, int, float] | None:
    before = [point for point in points if point[0] <= at]
    return before[-1] if before else None


def judge(run: dict[str, list[tuple[float, int, float]]], max_staleness: int) -> tuple[int, int, int, int, float]:
    """At every moment a history changed: the donors a joiner would ask first then (`donor_order`'s near group:
    past round 0, within `max_staleness` of the median front), each judged on its latest boundary against the
    latest losses of all. Returns (distinct donor states judged, refused, moments, moments at which every such
    donor would be refused: a join that fails, smallest margin bound − loss)."""
    judged: set[tuple[str, int]] = set()
    refused: set[tuple[str, int]] = set()
    moments = failed = 0
    margin = math.inf
    for time in sorted({point[0] for points in run.values() for point in points}):
        view = {node: point for node, points in run.items() if (point := latest(points, time)) is not None}
        rounds = [r for _, r, _ in view.values() if r > 0]
        if not rounds:
            continue
        front = supported_round(rounds)
        donors = {node: point for node, point in view.items() if point[1] > 0 and abs(front - point[1]) <= max_staleness}
        reported = [loss for _, _, loss in view.values()]
        typical = sorted(reported)[(len(reported) - 1) // 2]
        bound = typical + max(STATE_LOSS_SLACK, STATE_LOSS_SLACK_RATIO * abs(typical))
        bad = {node for node, (_, _, loss) in donors.items() if state_problem(loss, reported) is not None}
        moments += 1
        failed += bool(donors) and bad == set(donors)
        for node, (_, round_, loss) in donors.items():
            judged.add((node, round_))
            margin = min(margin, bound - loss)
            if node in bad:
                refused.add((node, round_))
    return len(judged), len(refused), moments, failed, margin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gossiptrain bench joins", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs (with node*/history.jsonl) or node work dirs")
    parser.add_argument("--max-staleness", type=int, default=NodeConfig.max_staleness)
    args = parser.parse_args(argv)
    rows, total_judged, total_refused, total_moments, total_failed = [], 0, 0, 0, 0
    seen: set[int] = set()
    for path in args.dirs:
        run = histories(path)
        if len(run) < 2:
            print(f"bench joins: {path}: fewer than 2 node histories, skipped", file=sys.stderr)
            continue
        if (key := hash(tuple(sorted((node, tuple(points)) for node, points in run.items())))) in seen:
            print(f"bench joins: {path}: a copy of a run already judged, skipped", file=sys.stderr)
            continue
        seen.add(key)
        judged, refused, moments, failed, margin = judge(run, args.max_staleness)
        total_judged, total_refused = total_judged + judged, total_refused + refused
        total_moments, total_failed = total_moments + moments, total_failed + failed
        rows.append({"run": str(path), "nodes": len(run), "donor states": judged, "refused": refused,
                     "moments": moments, "joins failed": failed, "smallest margin (nats)": f"{margin:.3f}"})
    if not rows or not total_judged:
        return 2
    print(format_table(rows))
    print(f"\nhonest donor states refused: {total_refused} of {total_judged} ({total_refused / total_judged:.2%}); "
          f"joins refused by every donor a joiner would ask first: {total_failed} of {total_moments} moments "
          f"({total_failed / max(total_moments, 1):.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
