"""What one peer may cost this node on its streams: pure rules, no I/O (the stream code applies them).

- `TransferMeter`: a transfer lives while bytes flow. One direction of a transfer starts with an
  allowance of `window` seconds; every second spent waiting on the peer (for its bytes, or for it to
  take ours) spends one second of it, and every byte moved earns `1 / min_rate` seconds back, never
  above `window`. A transfer whose allowance runs out is too slow. So a stalled peer is cut after at
  most `window` seconds, a trickle of r < min_rate bytes/s after window / (1 - r / min_rate), and a
  transfer at min_rate or faster never is; over any stretch of T seconds of waiting it moved at least
  min_rate * (T - window) bytes. Only waiting counts: time this node spends on its own work (hashing,
  copying, a busy event loop) is never charged to the peer.
- `ConcurrencyLimiter`: at most `per_peer` things at once per peer and `total` in all. A node's open
  streams (every stream protocol together: a stream over a cap is refused before a byte of it is
  read) and a donor's state upload slots (one requester cannot hold them all) are counted so.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

__all__ = ["RateRule", "TransferMeter", "ConcurrencyLimiter", "PEER_LIMIT", "TOTAL_LIMIT"]

PEER_LIMIT = "peer_limit"
TOTAL_LIMIT = "total_limit"


@dataclass(frozen=True)
class RateRule:
    """The progress a transfer must make: `min_rate` bytes/s, with `window` seconds of slack."""

    min_rate: float  # bytes per second of waiting
    window: float  # seconds: the most a transfer may wait on its peer without earning it back

    def __post_init__(self) -> None:
        if not (self.min_rate > 0 and self.window > 0 and math.isfinite(self.min_rate) and math.isfinite(self.window)):
            raise ValueError(f"need min_rate > 0 and window > 0, got {self.min_rate}, {self.window}")

    def seconds_for(self, nbytes: int) -> float:
        """The longest a transfer of `nbytes` may keep waiting on its peer under this rule."""
        return nbytes / self.min_rate + self.window


class TransferMeter:
    """One direction of one transfer: its bytes and waiting time, and, under a RateRule, its allowance
    (see the module doc). Without a rule it only counts, and the allowance never runs out."""

    def __init__(self, rule: RateRule | None) -> None:
        self.rule = rule
        self.allowance = rule.window if rule is not None else math.inf  # seconds the peer may still keep us waiting
        self.bytes = 0  # moved so far
        self.waited = 0.0  # seconds spent waiting on the peer so far
        self.elapsed = 0.0  # seconds the transfer took, once it is over (set by its owner)

    def timeout(self, io_timeout: float) -> float:
        """How long the next wait on the peer may last: the I/O timeout, or less once the allowance is lower."""
        return max(1e-3, min(io_timeout, self.allowance))

    def record(self, waited: float, nbytes: int) -> None:
        """A wait of `waited` seconds that moved `nbytes` (0 if it expired)."""
        waited = max(0.0, waited)
        self.waited += waited
        self.bytes += nbytes
        if self.rule is not None:
            self.allowance = min(self.rule.window, self.allowance - waited + nbytes / self.rule.min_rate)

    @property
    def exhausted(self) -> bool:
        """The transfer is too slow: it waited on its peer longer than its bytes earned."""
        return self.allowance <= 0

    def too_slow(self, io_timeout: float) -> bool:
        """Is the next wait bounded by the allowance rather than the I/O timeout? (Ask before recording it:
        if it expires, the transfer was too slow, not stalled for a whole I/O timeout.)"""
        return self.allowance < io_timeout

    @property
    def rate(self) -> float | None:
        """Bytes per second of waiting so far (None before any wait)."""
        return self.bytes / self.waited if self.waited > 0 else None


class ConcurrencyLimiter:
    """Things held at once (streams, upload slots), per peer and in total: `admit`, then `release` when done."""

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer, self.total = per_peer, total
        self.open: Counter[str] = Counter()
        self.open_total = 0

    def admit(self, peer: str) -> str | None:
        """None (admitted: counted until `release`), or why not: PEER_LIMIT or TOTAL_LIMIT."""
        if self.open[peer] >= self.per_peer:
            return PEER_LIMIT
        if self.open_total >= self.total:
            return TOTAL_LIMIT
        self.open[peer] += 1
        self.open_total += 1
        return None

    def release(self, peer: str) -> None:
        if self.open[peer] <= 0:
            raise ValueError(f"release for {peer} that was not admitted")
        self.open[peer] -= 1
        self.open_total -= 1
        if not self.open[peer]:
            del self.open[peer]
