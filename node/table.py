"""Plain-text tables for the terminal (the swarm's progress and summary, benchmark results)."""

from __future__ import annotations

import math
from typing import Any


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Columns from the first row's keys; the first column left-aligned, the others right-aligned."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    table = [columns] + [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join([r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]) for r in table
    )
