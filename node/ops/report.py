"""`gossiptrain report`: load the per-node metrics history (history.jsonl) of a run and draw it as one PNG.

Every node appends one JSON object per line to <work_dir>/history.jsonl: one at start-up (after the first held-out
eval) and one after every outer round. This module reads those files (tolerating blank, malformed and truncated
lines: a node may be writing while we read, or may have been killed mid-line), summarises them as table rows, and
renders a 2x3 grid of plots with matplotlib's Agg canvas. matplotlib is imported only by `render`, so the rest of
this module (and the CLI's error paths) work without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.metrics import EXCHANGE_RESULTS, FAILED_RESULTS

HISTORY_FILE = "history.jsonl"
MISSING_MATPLOTLIB = "matplotlib is missing: pip install 'gossiptrain[report]'"
MIN_SIZE_PX = (640, 400)  # below this the six panels stop being readable
MAX_SIZE_PX = (10_000, 10_000)
DPI = 100
RATE_WINDOW = 5  # the network panel's bold line: bytes/s over the last 5 intervals (per interval: thin)

_REQUIRED_INT = ("round", "rounds_done")
_OPTIONAL_FLOAT = ("train_loss", "eval_loss", "tokens_per_second", "utilisation", "partner_distance", "wait_seconds")
_OPTIONAL_INT = ("bytes_sent", "bytes_received")


class ReportError(ValueError):
    """A report cannot be made: no history found, nothing valid in it, a bad size, matplotlib missing, ..."""


class History(list):
    """The valid records of one history file in file (append) order, plus what was left out.

    `skipped` counts non-blank lines that were not a valid record (malformed JSON, a line truncated by a kill or
    still being written, a wrong type); `blank` counts empty lines; `problems` holds a reason for the first few.
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), *, path: Path | None = None, skipped: int = 0,
                 blank: int = 0, problems: Sequence[str] = ()) -> None:
        super().__init__(records)
        self.path = path
        self.skipped = skipped
        self.blank = blank
        self.problems = list(problems)


# ---------------------------------------------------------------------------------------------------- loading
def _number(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a number or null, not {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None  # json.dumps writes NaN/Infinity for an unknown loss


def _integer(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be an integer, not {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{field} must be an integer, not {value!r}")
    return int(value)


def validate_record(raw: Any) -> dict[str, Any]:
    """One history line's object, normalised (every known field present, NaN -> None).

    ValueError or TypeError when it is not a valid record."""
    if not isinstance(raw, dict):
        raise TypeError(f"a record must be a JSON object, not {type(raw).__name__}")
    record = dict(raw)  # unknown fields are kept (a newer writer may add some)
    if "time" not in raw or "peer_id" not in raw:
        raise ValueError("missing field " + ("time" if "time" not in raw else "peer_id"))
    time_s = _number(raw["time"], "time")
    if time_s is None:
        raise ValueError("time must be a finite number")
    record["time"] = time_s
    if not isinstance(raw["peer_id"], str) or not raw["peer_id"]:
        raise TypeError("peer_id must be a non-empty string")
    for field in _REQUIRED_INT:
        if field not in raw:
            raise ValueError(f"missing field {field}")
        record[field] = _integer(raw[field], field)
    for field in _OPTIONAL_FLOAT:
        record[field] = _number(raw.get(field), field)
    for field in _OPTIONAL_INT:
        record[field] = None if raw.get(field) is None else _integer(raw[field], field)
    partner = raw.get("partner")
    if partner is not None and not isinstance(partner, str):
        raise TypeError(f"partner must be a string or null, not {type(partner).__name__}")
    record["partner"] = partner or None
    exchanges = raw.get("exchanges") or {}
    if not isinstance(exchanges, dict):
        raise TypeError(f"exchanges must be an object, not {type(exchanges).__name__}")
    counts = {result: 0 for result in EXCHANGE_RESULTS}
    for result, count in exchanges.items():
        counts[str(result)] = _integer(count, f"exchanges.{result}")
    record["exchanges"] = counts
    return record


def load_history(path: str | Path) -> History:
    """The valid records of one history.jsonl (a list with .skipped/.blank counts); ReportError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no history found: {path} does not exist")
    if not path.is_file():
        raise ReportError(f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ReportError(f"cannot read {path}: {error.strerror or error}") from error
    records: list[dict[str, Any]] = []
    skipped = blank = 0
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            records.append(validate_record(json.loads(line)))
        except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError too
            skipped += 1
            if len(problems) < 5:
                reason = "not valid JSON (truncated?)" if isinstance(error, json.JSONDecodeError) else str(error)
                problems.append(f"line {number}: {reason}")
    return History(records, path=path, skipped=skipped, blank=blank, problems=problems)


def natural_key(text: str) -> list[Any]:
    """Sort key putting node2 before node10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", text)]


def find_histories(paths: Iterable[str | Path]) -> dict[str, Path]:
    """history.jsonl files by node label (the work dir's name), naturally sorted.

    Each path is a node work dir holding history.jsonl, a history file itself, or a parent dir (e.g. runs/swarm)
    whose immediate subdirs hold history.jsonl. ReportError when a path does not exist or holds no history.
    """
    found: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"no history found: {path} does not exist")
        if path.is_file():
            work_dir = path.resolve().parent
            found.append((work_dir.name if path.name == HISTORY_FILE else path.stem, path))
        elif (path / HISTORY_FILE).is_file():
            found.append((path.resolve().name, path / HISTORY_FILE))
        else:
            children = sorted((c for c in path.iterdir() if (c / HISTORY_FILE).is_file()), key=lambda c: c.name)
            if not children:
                raise ReportError(f"no history found: no {HISTORY_FILE} in {path} or its immediate subdirectories"
                                  " (has the run started?)")
            found.extend((child.name, child / HISTORY_FILE) for child in children)
    result: dict[str, Path] = {}
    seen: set[Path] = set()
    for label, file in found:
        resolved = file.resolve()
        if resolved in seen:
            continue  # the same file named twice
        seen.add(resolved)
        if label in result:  # e.g. runs/a/node0 and runs/b/node0
            label = f"{resolved.parent.parent.name}/{label}"
        unique, suffix = label, 2
        while unique in result:
            unique, suffix = f"{label}#{suffix}", suffix + 1
        result[unique] = file
    return {label: result[label] for label in sorted(result, key=natural_key)}


# ---------------------------------------------------------------------------------------------------- derived series
def segments(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split one node's records into process lifetimes: a new peer_id, or rounds_done going back, is a restart."""
    parts: list[list[dict[str, Any]]] = []
    for record in records:
        if parts and record["peer_id"] == parts[-1][-1]["peer_id"] \
                and record["rounds_done"] >= parts[-1][-1]["rounds_done"]:
            parts[-1].append(record)
        else:
            parts.append([record])
    return parts


def _monotone(parts: list[list[dict[str, Any]]], value) -> list[float | None]:
    """A per-process cumulative counter made cumulative over the node's whole history (counters restart at 0)."""
    out: list[float | None] = []
    offset = 0.0
    for part in parts:
        last = None
        for record in part:
            current = value(record)
            if current is None:
                out.append(None)
                continue
            if last is not None and current < last:  # a reset inside one process: count it like a restart
                offset += last
            out.append(offset + current)
            last = current
        if last is not None:
            offset += last
    return out


def failed_count(record: dict[str, Any]) -> int:
    return sum(record["exchanges"].get(result, 0) for result in FAILED_RESULTS)


def _bytes_total(record: dict[str, Any]) -> int | None:
    if record.get("bytes_sent") is None or record.get("bytes_received") is None:
        return None
    return record["bytes_sent"] + record["bytes_received"]


def network_rates(parts: list[list[dict[str, Any]]], window: int = 1) -> list[tuple[float, float]]:
    """(time, bytes/s sent+received) over the last `window` intervals between records of one process (fewer at a
    process's start); a diff across a restart, or a negative one, is dropped."""
    rates = []
    for part in parts:
        for index, after in enumerate(part[1:], start=1):
            before = part[max(index - window, 0)]
            b0, b1 = _bytes_total(before), _bytes_total(after)
            dt = after["time"] - before["time"]
            if b0 is None or b1 is None or dt <= 0 or b1 < b0:
                continue
            rates.append((after["time"], (b1 - b0) / dt))
    return rates


def last_value(records: Sequence[dict[str, Any]], field: str) -> Any:
    return next((r[field] for r in reversed(records) if r.get(field) is not None), None)


def first_value(records: Sequence[dict[str, Any]], field: str) -> Any:
    return next((r[field] for r in records if r.get(field) is not None), None)


def summary(histories: dict[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One table row per node (a node with no valid record gets a row of dashes)."""
    rows = []
    for label, records in histories.items():
        parts = segments(records)
        ok = _monotone(parts, lambda r: r["exchanges"].get("ok", 0))
        failed = _monotone(parts, failed_count)
        peer = records[-1]["peer_id"][-8:] if records else "-"
        first_eval, last_eval = first_value(records, "eval_loss"), last_value(records, "eval_loss")
        utilisation = last_value(records, "utilisation")
        rows.append({
            "node": label, "peer": peer, "records": len(records), "restarts": max(len(parts) - 1, 0),
            "eval first": math.nan if first_eval is None else first_eval,
            "eval last": math.nan if last_eval is None else last_eval,
            "round": records[-1]["round"] if records else "-",
            "rounds": sum(p[-1]["rounds_done"] - p[0]["rounds_done"] for p in parts),
            "ex ok": int(ok[-1]) if ok else 0, "ex failed": int(failed[-1]) if failed else 0,
            "util": math.nan if utilisation is None else utilisation,
            "skipped": getattr(records, "skipped", 0),
        })
    return rows


def run_summary(histories: dict[str, Sequence[dict[str, Any]]]) -> str:
    """One line: nodes, wall-clock span, rounds, the range of the nodes' final held-out losses."""
    times = [r["time"] for records in histories.values() for r in records]
    span = max(times) - min(times) if times else 0.0
    duration = (f"{span:.0f} s" if span < 120 else f"{span / 60:.1f} min" if span < 7200
                else f"{int(span // 3600)} h {int(span % 3600 // 60):02d} min")
    finals = [v for v in (last_value(r, "eval_loss") for r in histories.values()) if v is not None]
    loss = ("no held-out loss yet" if not finals else f"final held-out loss {finals[0]:.3f}" if len(finals) == 1
            else f"final held-out loss {min(finals):.3f}\u2013{max(finals):.3f}")
    rounds = max((r[-1]["round"] for r in histories.values() if r), default=0)
    nodes = len(histories)
    return f"{nodes} node{'s' if nodes != 1 else ''} \u00b7 {duration} \u00b7 up to round {rounds} \u00b7 {loss}"


# ---------------------------------------------------------------------------------------------------- rendering
def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """'1600x1000' (or a (w, h) pair) -> (1600, 1000), within sane bounds; ReportError otherwise."""
    if isinstance(text, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*", text)
        if not match:
            raise ReportError(f"size must look like 1600x1000, not {text!r}")
        width, height = int(match[1]), int(match[2])
    else:
        width, height = (int(v) for v in text)
    if not (MIN_SIZE_PX[0] <= width <= MAX_SIZE_PX[0] and MIN_SIZE_PX[1] <= height <= MAX_SIZE_PX[1]):
        raise ReportError(f"size {width}x{height} is out of range: width {MIN_SIZE_PX[0]}..{MAX_SIZE_PX[0]}, "
                          f"height {MIN_SIZE_PX[1]}..{MAX_SIZE_PX[1]} pixels")
    return width, height


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as file:
        head = file.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ReportError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(MISSING_MATPLOTLIB) from error
    return matplotlib, Figure, FigureCanvasAgg


def node_colors(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per node, the same in every panel: tab10 up to 10 nodes, tab20 up to 20, then a spectrum."""
    import matplotlib

    n = len(labels)
    if n <= 10:
        cmap, picks = matplotlib.colormaps["tab10"], range(n)
        return {label: cmap(i) for label, i in zip(labels, picks)}
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return {label: cmap(i) for label, i in zip(labels, list(range(0, 20, 2)) + list(range(1, 20, 2)))}
    cmap = matplotlib.colormaps["turbo"]
    return {label: cmap(0.05 + 0.9 * i / (n - 1)) for i, label in enumerate(labels)}


def _byte_unit(peak: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB/s"), (2**20, "MiB/s"), (2**10, "KiB/s")):
        if peak >= scale:
            return scale, unit
    return 1.0, "B/s"


def render(histories: dict[str, Sequence[dict[str, Any]]], out: str | Path, width_px: int = 1600,
           height_px: int = 1000, title: str | None = None) -> Path:
    """Draw the run as a width_px x height_px PNG at `out` (written atomically) and return its path.

    Panels (x = minutes since the earliest record, one colour per node throughout, dotted verticals at restarts):
    held-out loss (solid) and train loss (thin); partner distance at paired rounds; cumulative ok and failed
    exchanges; tokens/s; network bytes/s; outer round.
    """
    width_px, height_px = parse_size((width_px, height_px))
    histories = {label: records for label, records in histories.items() if records}
    if not histories:
        raise ReportError("no history records to plot (the nodes have not finished their first held-out eval?)")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ReportError(f"the output must be a .png file, not {out.name!r}")
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    scale = min(max(min(width_px / 1600, height_px / 1000), 0.55), 2.5)  # fonts and lines follow the image size
    with matplotlib.rc_context(_style(scale)):
        fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        canvas = _Canvas(fig=fig, axes=fig.subplots(2, 3, sharex=True), scale=scale,
                         colors=node_colors(list(histories)),
                         t0=min(r["time"] for records in histories.values() for r in records))
        drawn = _plot_nodes(canvas, histories)
        unit = _plot_network(canvas, drawn.rate_series)
        _label_loss(canvas)
        _label_distance(canvas, drawn.any_distance)
        _label_exchanges(canvas)
        _label_throughput(canvas, drawn.any_tokens)
        _label_network(canvas, unit, drawn.any_rate)
        _label_round(canvas, drawn.any_restart)
        _label_figure(canvas, histories, title)
        _save(fig, out)
    return out


def _style(scale: float) -> dict[str, Any]:
    """matplotlib rc settings for an image `scale` times the 1600x1000 default."""
    return {
        "font.size": 11 * scale, "axes.titlesize": 12.5 * scale, "axes.titleweight": "bold",
        "axes.labelsize": 11 * scale, "xtick.labelsize": 10 * scale, "ytick.labelsize": 10 * scale,
        "legend.fontsize": 9.5 * scale, "legend.title_fontsize": 10 * scale, "figure.titlesize": 15 * scale,
        "lines.linewidth": 1.9 * scale, "lines.markersize": 5 * scale, "axes.linewidth": 0.8 * scale,
        "axes.grid": True, "grid.alpha": 0.35, "grid.linewidth": 0.7 * scale, "grid.color": "#b0b0b0",
        "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#555555",
        "axes.titlepad": 8 * scale, "axes.facecolor": "white", "figure.facecolor": "white",
        "savefig.facecolor": "white", "legend.frameon": True, "legend.framealpha": 0.85,
        "legend.edgecolor": "#cccccc",
    }


@dataclass
class _Canvas:
    """The figure being drawn and what every panel needs: its 2x3 axes (loss, distance, exchanges / throughput,
    network, round), the time origin (the earliest record), the size scale and one colour per node."""

    fig: Any
    axes: Any
    t0: float
    scale: float
    colors: dict[str, Any]
    utilisation_axis: Any = None  # the throughput panel's right axis (made when a node recorded utilisation)

    @property
    def panels(self) -> tuple[Any, ...]:
        return tuple(self.axes.flat)

    def minutes(self, t: float) -> float:
        return (t - self.t0) / 60.0

    def line(self, ax, parts: list[list[dict[str, Any]]], field: str, color, **kwargs) -> None:
        """One line per process lifetime (none across a restart); a None value is skipped."""
        for part in parts:
            points = [(self.minutes(r["time"]), r[field]) for r in part if r[field] is not None]
            if points:
                ax.plot(*zip(*points), color=color, marker="o" if len(points) == 1 else None, **kwargs)

    def empty(self, ax, text: str) -> None:
        """A grey note in the middle of a panel that has nothing to show yet."""
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#888888",
                fontsize=11 * self.scale, style="italic")


@dataclass
class _Drawn:
    """What the per-node pass found: which panels got data, and each node's network rates per process lifetime
    ((per interval, RATE_WINDOW average) pairs), drawn once their common unit is known."""

    any_restart: bool = False
    any_distance: bool = False
    any_rate: bool = False
    any_tokens: bool = False
    any_utilisation: bool = False
    rate_series: dict[str, list[tuple[list[tuple[float, float]], list[tuple[float, float]]]]] = dataclasses.field(
        default_factory=dict)


def _plot_nodes(canvas: _Canvas, histories: dict[str, Sequence[dict[str, Any]]]) -> _Drawn:
    """Each node's lines on every panel but the network one, node after node (the drawing order)."""
    ax_loss, ax_dist, ax_ex, ax_tok, _ax_net, ax_round = canvas.panels
    drawn = _Drawn()
    for label, records in histories.items():
        color = canvas.colors[label]
        parts = segments(records)
        _plot_loss(canvas, ax_loss, parts, color)
        drawn.any_distance |= _plot_distance(canvas, ax_dist, records, parts, color)
        _plot_exchanges(canvas, ax_ex, records, parts, color)
        drawn.any_tokens |= any(r["tokens_per_second"] is not None for r in records)
        canvas.line(ax_tok, parts, "tokens_per_second", color)
        if any(r["utilisation"] is not None for r in records):
            drawn.any_utilisation = True
            if canvas.utilisation_axis is None:
                canvas.utilisation_axis = ax_tok.twinx()
            canvas.line(canvas.utilisation_axis, parts, "utilisation", color, linestyle=(0, (2, 2)),
                        linewidth=1.1 * canvas.scale)
        drawn.rate_series[label] = [(network_rates([part]), network_rates([part], RATE_WINDOW)) for part in parts]
        drawn.any_rate |= any(raw for raw, _ in drawn.rate_series[label])
        canvas.line(ax_round, parts, "round", color, drawstyle="steps-post")
        drawn.any_restart |= _plot_restarts(canvas, parts, color)
    return drawn


def _plot_loss(canvas: _Canvas, ax, parts: list[list[dict[str, Any]]], color) -> None:
    canvas.line(ax, parts, "train_loss", color, linewidth=0.9 * canvas.scale, alpha=0.45)
    canvas.line(ax, parts, "eval_loss", color)


def _plot_distance(canvas: _Canvas, ax, records: Sequence[dict[str, Any]], parts: list[list[dict[str, Any]]],
                   color) -> bool:
    """Distance at paired rounds (at every round with a distance if the node never names a partner): a faint line
    and dots. True if anything was drawn."""
    scale = canvas.scale
    has_partner = any(r["partner"] for r in records)
    any_distance = False
    for part in parts:
        paired = [(canvas.minutes(r["time"]), r["partner_distance"]) for r in part
                  if r["partner_distance"] is not None and (r["partner"] or not has_partner)]
        if paired:
            any_distance = True
            ax.plot(*zip(*paired), color=color, linewidth=0.8 * scale, alpha=0.35)
            ax.plot(*zip(*paired), color=color, linestyle="none", marker="o",
                    markersize=4.5 * scale, markeredgecolor="white", markeredgewidth=0.5 * scale)
    return any_distance


def _plot_exchanges(canvas: _Canvas, ax, records: Sequence[dict[str, Any]], parts: list[list[dict[str, Any]]],
                    color) -> None:
    """Cumulative ok (solid) and failed (dashed) exchanges, carried across restarts."""
    xs = [canvas.minutes(r["time"]) for r in records]
    ok = _monotone(parts, lambda r: r["exchanges"].get("ok", 0))
    failed = _monotone(parts, failed_count)
    ax.plot(xs, ok, color=color, drawstyle="steps-post")
    ax.plot(xs, failed, color=color, drawstyle="steps-post", linestyle=(0, (4, 2)), linewidth=1.4 * canvas.scale)


def _plot_restarts(canvas: _Canvas, parts: list[list[dict[str, Any]]], color) -> bool:
    """A dotted vertical on every panel where a process of this node started again; True if there was one."""
    for part in parts[1:]:
        for ax in canvas.panels:
            ax.axvline(canvas.minutes(part[0]["time"]), color=color, linestyle=":", linewidth=1.1 * canvas.scale,
                       alpha=0.8)
    return len(parts) > 1


def _plot_network(canvas: _Canvas, rate_series: dict[str, list[tuple[list, list]]]) -> str:
    """Every node's bytes/s (thin per interval, bold RATE_WINDOW average) in one unit fitting the peak; the unit."""
    ax = canvas.panels[4]
    peak = max((rate for lives in rate_series.values() for _, smooth in lives for _, rate in smooth), default=0.0)
    unit_scale, unit = _byte_unit(peak)
    raw_alpha = 0.3 if len(rate_series) <= 4 else 0.15  # the per-round lines are a backdrop to the averages
    for label, lives in rate_series.items():
        for raw, smooth in lives:
            for series, kwargs in ((raw, {"linewidth": 0.8 * canvas.scale, "alpha": raw_alpha}), (smooth, {})):
                if series:
                    ax.plot([canvas.minutes(t) for t, _ in series], [rate / unit_scale for _, rate in series],
                            color=canvas.colors[label], marker="o" if len(series) == 1 else None, **kwargs)
    return unit


def _key(**kwargs):
    """A legend entry that is not a plotted line (grey unless coloured)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], **{"color": "#333333", **kwargs})


def _label_loss(canvas: _Canvas) -> None:
    ax = canvas.panels[0]
    ax.set(title="Loss", ylabel="loss (nats/token; a byte for the builtin model)")
    ax.legend(handles=[_key(label="held-out"), _key(linewidth=0.9 * canvas.scale, alpha=0.45, label="train")],
              loc="upper right")


def _label_distance(canvas: _Canvas, any_distance: bool) -> None:
    ax = canvas.panels[1]
    ax.set(title="Distance to partner at exchange", ylabel="L2 distance")
    if not any_distance:
        canvas.empty(ax, "no paired rounds yet")


def _label_exchanges(canvas: _Canvas) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = canvas.panels[2]
    ax.set(title="Exchanges (cumulative)", ylabel="exchanges")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.legend(handles=[_key(label="ok"), _key(linestyle=(0, (4, 2)), linewidth=1.4 * canvas.scale, label="failed")],
              loc="upper left")


def _label_throughput(canvas: _Canvas, any_tokens: bool) -> None:
    from matplotlib.ticker import EngFormatter

    ax = canvas.panels[3]
    ax.set(title="Training throughput", ylabel="tokens/s")
    ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylim(bottom=0)
    if canvas.utilisation_axis is not None:  # dotted: the share of wall time spent in inner steps
        canvas.utilisation_axis.set(ylabel="utilisation (dotted)", ylim=(0, 1.05))
    if not any_tokens:
        canvas.empty(ax, "no throughput recorded yet")


def _label_network(canvas: _Canvas, unit: str, any_rate: bool) -> None:
    ax = canvas.panels[4]
    ax.set(title="Network traffic (sent + received)", ylabel=unit)
    ax.set_ylim(bottom=0)
    ax.legend(handles=[_key(label=f"{RATE_WINDOW}-round average"),
                       _key(linewidth=0.8 * canvas.scale, alpha=0.3, label="per round")], loc="upper right")
    if not any_rate:
        canvas.empty(ax, "needs two records of a node")


def _label_round(canvas: _Canvas, any_restart: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = canvas.panels[5]
    ax.set(title="Outer round", ylabel="round")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if any_restart:
        ax.legend(handles=[_key(color="#555555", linestyle=":", linewidth=1.1 * canvas.scale, label="restart")],
                  loc="upper left")


def _label_figure(canvas: _Canvas, histories: dict[str, Sequence[dict[str, Any]]], title: str | None) -> None:
    """x labels and ticks on every panel, the node legend below the grid, the title and run summary above it."""
    for ax in canvas.axes[1]:
        ax.set_xlabel("minutes since the first record")
    for ax in canvas.panels:
        ax.tick_params(labelbottom=True)
        ax.margins(x=0.02)
    canvas.fig.legend(handles=[_key(color=canvas.colors[label], linewidth=3 * canvas.scale, label=label)
                               for label in histories],
                      loc="outside lower center", ncol=min(len(histories), 12), title="node", frameon=False)
    canvas.fig.suptitle(f"{title or 'gossiptrain run'}\n{run_summary(histories)}", linespacing=1.5)


def _save(fig, out: Path) -> None:
    """Write the PNG atomically (a temporary file beside it, then a rename); ReportError if it cannot be written."""
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(temporary, format="png", dpi=DPI)
        temporary.replace(out)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ReportError(f"cannot write {out}: {error.strerror or error}") from error
