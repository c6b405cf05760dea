"""Pure bookkeeping of a node's accepted pair exchanges: why they fail, and whom not to pair with for a while.

- `ExchangeHealth` keeps the last `window` accepted exchanges (result, bytes, time) for the
  completion-ratio and bytes/s gauges, and says in one line why exchanges keep failing
  ("0 of the last 10 exchanges completed (10 too_slow): 77.0 MB each way at ~0.12 MB/s ...").
- `Penalties`: a peer that broke an exchange by its own doing (too slow, stalled, invalid data)
  is neither asked nor accepted for a while, `base` seconds doubling per repeat up to `cap`, and
  forgiven by a completed exchange. So a peer that trickles or stalls costs this node about one
  I/O timeout per penalty, not one per round.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

__all__ = ["ExchangeRecord", "ExchangeHealth", "Penalties", "PUNISHED_RESULTS"]

PUNISHED_RESULTS = ("too_slow", "timeout", "protocol_error")  # failures a partner causes (not a crash, not a refusal)


@dataclass(frozen=True)
class ExchangeRecord:
    result: str  # "ok" or an exchanges_total failure result (timeout, too_slow, peer_gone, protocol_error, aborted)
    nbytes: int  # tensor bytes each way of a complete exchange
    received: int  # bytes of the partner's tensors that arrived
    seconds: float  # from the accept to the end

    @property
    def rate(self) -> float | None:
        """Bytes/s at which the partner's tensors arrived (None if nothing arrived)."""
        return self.received / self.seconds if self.received and self.seconds > 0 else None


def _megabytes(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


class ExchangeHealth:
    """The last `window` accepted exchanges of a node."""

    def __init__(self, window: int = 10, min_rate: float | None = None) -> None:
        self.window = window
        self.min_rate = min_rate
        self.records: deque[ExchangeRecord] = deque(maxlen=window)
        self._since_report = 0

    @property
    def completion_ratio(self) -> float:
        """Completed share of the last `window` accepted exchanges (1.0 before the first)."""
        if not self.records:
            return 1.0
        return sum(r.result == "ok" for r in self.records) / len(self.records)

    @property
    def rate(self) -> float | None:
        """Median bytes/s at which partners' tensors arrived over the window (None if nothing arrived)."""
        rates = [r.rate for r in self.records if r.rate is not None]
        return statistics.median(rates) if rates else None

    def record(self, record: ExchangeRecord) -> str | None:
        """Add one exchange; returns a diagnosis to log when at most half of the last `window` completed
        (at most once per `window` exchanges), else None."""
        self.records.append(record)
        self._since_report += 1
        if len(self.records) < self.window or self._since_report < self.window or self.completion_ratio > 0.5:
            return None
        self._since_report = 0
        return self.diagnosis()

    def diagnosis(self) -> str:
        records = list(self.records)
        done = sum(r.result == "ok" for r in records)
        failures: dict[str, int] = {}
        for r in records:
            if r.result != "ok":
                failures[r.result] = failures.get(r.result, 0) + 1
        reasons = ", ".join(f"{count} {result}" for result, count in sorted(failures.items(), key=lambda kv: -kv[1]))
        line = f"{done} of the last {len(records)} exchanges completed ({reasons})"
        nbytes = max(r.nbytes for r in records)
        rate = self.rate
        if rate is None:
            return f"{line}: no partner's tensors arrived at all ({_megabytes(nbytes)} each way expected)"
        line += f": {_megabytes(nbytes)} each way at ~{rate / 1e6:.2f} MB/s takes ~{nbytes / rate:.0f}s"
        if self.min_rate is not None and rate < self.min_rate:
            return (f"{line}, but a transfer slower than the minimum transfer rate of {self.min_rate / 1e6:.2f} MB/s "
                    "is cut: this link is too slow for this model (min_transfer_rate)")
        worst = max(failures, key=lambda result: failures[result]) if failures else ""
        why = {
            "too_slow": "partners' transfers fell below the minimum transfer rate",
            "timeout": "partners stalled mid-transfer for an I/O timeout",
            "peer_gone": "partners closed or lost the stream mid-exchange",
            "protocol_error": "partners sent invalid data (see protocol_errors_total)",
            "aborted": "partners did not confirm",
        }.get(worst, "")
        return f"{line}; mostly {why}" if why else line


class Penalties:
    """Peers not to pair with until a time (see the module doc); times are the caller's clock (monotonic)."""

    MAX_PEERS = 4096

    def __init__(self, base: float = 60.0, cap: float = 3600.0) -> None:
        self.base, self.cap = base, cap
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def punish(self, peer: str, now: float) -> float:
        """One more strike against `peer`; returns how long it is now excluded (seconds)."""
        strikes = self._strikes.pop(peer, 0) + 1
        if len(self._strikes) >= self.MAX_PEERS:  # forget the oldest offender
            oldest = next(iter(self._strikes))
            self._strikes.pop(oldest)
            self._until.pop(oldest, None)
        self._strikes[peer] = strikes
        seconds = min(self.cap, self.base * 2 ** (strikes - 1))
        self._until[peer] = now + seconds
        return seconds

    def forgive(self, peer: str) -> None:
        self._strikes.pop(peer, None)
        self._until.pop(peer, None)

    def blocked(self, peer: str, now: float) -> bool:
        return self._until.get(peer, 0.0) > now

    def active(self, now: float) -> set[str]:
        return {peer for peer, until in self._until.items() if until > now}
