"""`gossiptrain report`: a summary table and one PNG of plots from the nodes' recorded history (history.jsonl)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.ops.report import ReportError, find_histories, load_history, parse_size, png_size, render, summary
from node.table import format_table

DEFAULT_PATHS = ["runs/swarm"]


def add_parser(verbs: argparse._SubParsersAction) -> None:
    parser = verbs.add_parser(
        "report", help="plot a run's recorded metrics history as one PNG",
        description=__doc__ + " Each path is a node work dir, a history.jsonl file, or a dir whose immediate"
        " subdirs are node work dirs (e.g. runs/swarm). Exits 2 when there is nothing to plot.",
    )
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS,
                        help="node work dirs, history files or swarm dirs (default runs/swarm)")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: <first path>/report.png, or next to it when it is a file)")
    parser.add_argument("--size", default="1600x1000", help="image size in pixels, WxH (default 1600x1000)")
    parser.add_argument("--title", default=None, help="figure title (default: gossiptrain run: <paths>)")
    parser.set_defaults(handler=main)


def default_out(first: Path) -> Path:
    return first / "report.png" if first.is_dir() else first.parent / "report.png"


def main(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in (getattr(args, "paths", None) or DEFAULT_PATHS)]
    try:
        width, height = parse_size(getattr(args, "size", None) or "1600x1000")
        histories = {label: load_history(file) for label, file in find_histories(paths).items()}
        for label, records in histories.items():
            if records.skipped:
                print(f"note: {label}: skipped {records.skipped} unreadable line(s) in {records.path} "
                      f"({'; '.join(records.problems[:2])})", file=sys.stderr)
        if not any(histories.values()):
            raise ReportError(f"no history records yet in {', '.join(str(p) for p in paths)}")
        print(format_table(summary(histories)), flush=True)
        out = Path(args.out) if getattr(args, "out", None) else default_out(paths[0])
        title = getattr(args, "title", None) or f"gossiptrain run: {paths[0]}" + (
            f" and {len(paths) - 1} more" if len(paths) > 1 else "")
        written = render(histories, out, width, height, title=title)
    except ReportError as error:
        print(f"gossiptrain report: error: {error}", file=sys.stderr)
        return 2
    w, h = png_size(written)
    print(f"wrote {written} ({w}x{h}, {round(written.stat().st_size / 1024)} KiB)", flush=True)
    return 0
