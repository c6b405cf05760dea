"""Seeded chaos testing of a local swarm: SIGKILL, SIGTERM and SIGSTOP real node processes on a schedule.

`make_schedule` is a pure function of its arguments (a seeded `random.Random`), so a failing
run is reproduced by its seed. `run_chaos` starts a `LocalSwarm`, executes the schedule on
time, restarts killed and terminated nodes with the same work dir (bootstrapping each
restart through a randomly chosen live peer), watches every node's /metrics at about 1 Hz,
stops everything cleanly, checks the outcome and, optionally, compares the final held-out
loss with a fault-free swarm run for the same wall time. `ChaosReport.render` prints it.

Signals: `kill9` and `freeze` go to the node's whole process group (the node and its own
p2pd: a crashed or frozen machine), `term` to the node process only (its clean leave shuts
its p2pd down itself).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import FIELDS
from node.table import format_table
from node.tools import procs
from node.tools.procs import KILL_WAIT_S
from node.tools.swarm import (
    START_TIMEOUT,
    LocalSwarm,
    NodeProcess,
    SwarmError,
    exchange_counts,
    rounds_done,
    scrape,
)

KINDS = ("kill9", "term", "freeze")

TICK_S = 1.0  # monitoring period
SCRAPE_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class ChaosEvent:
    """At `at` seconds after the swarm is up, do `kind` to node `node` for `duration` seconds.

    kill9/term: `duration` is the downtime between the process exit and its restart; freeze: the
    time between SIGSTOP and SIGCONT.
    """

    at: float
    kind: str
    node: int
    duration: float

    def window_end(self, restart_recover_s: float, freeze_recover_s: float) -> float:
        """End of the disruption window: the action, then the time the node needs to be back and training."""
        return self.at + self.duration + (freeze_recover_s if self.kind == "freeze" else restart_recover_s)


def default_max_concurrent(num_nodes: int) -> int:
    """A minority of the swarm (2 of 5), at least 1: most nodes are always undisturbed."""
    return max(1, (num_nodes - 1) // 2)


def _check_schedule_args(num_nodes: int, limit: int, ranges: dict[str, tuple[float, float]],
                         times: tuple[float, ...]) -> None:
    if num_nodes < 2:
        raise ValueError("chaos needs at least 2 nodes (a restart bootstraps through a live peer)")
    if not 1 <= limit <= num_nodes - 1:
        raise ValueError(f"max_concurrent must be in [1, {num_nodes - 1}], got {limit}")
    for name, (low, high) in ranges.items():
        if not 0 < low <= high:
            raise ValueError(f"{name} must be a range 0 < low <= high, got {(low, high)}")
    if min(times) < 0:
        raise ValueError("first_s and the recover times must be >= 0")


def make_schedule(
    seed: int,
    num_nodes: int,
    duration_s: float,
    *,
    first_s: float = 10.0,
    gap_s: tuple[float, float] = (10.0, 25.0),
    downtime_s: tuple[float, float] = (3.0, 10.0),
    freeze_s: tuple[float, float] = (4.0, 12.0),
    restart_recover_s: float = 25.0,
    freeze_recover_s: float = 5.0,
    max_concurrent: int | None = None,
) -> list[ChaosEvent]:
    """A deterministic chaos schedule. Invariants (tests/unit/test_chaos_schedule.py checks each):

    1. Deterministic: the same arguments give the same list (all randomness from random.Random(seed)).
    2. Sorted by `at`; the first event at or after `first_s`; consecutive events at least gap_s[0]
       apart (usually at most gap_s[1]; later only when invariants 4-5 postpone an event).
    3. Durations lie in `downtime_s` (kill9, term) or `freeze_s` (freeze); every disruption window
       (`ChaosEvent.window_end`: the action, then `restart_recover_s` for a restart to rejoin and
       train, or `freeze_recover_s` after a thaw) ends by `duration_s`: the run ends with every
       node back.
    4. One node's windows never overlap, and at most `max_concurrent` windows are open at any
       time (default: a minority, 2 of 5 nodes), so a restart can always bootstrap through an
       undisturbed peer.
    5. Fair targets: each event picks a node with the fewest events so far, so per-node event
       counts differ by at most 1 (node 0, the original bootstrap peer, is not special).
    6. Kinds are dealt in seeded shuffles of all three, so per-kind counts differ by at most 1 and
       any schedule of 3 or more events contains every kind.
    """
    limit = default_max_concurrent(num_nodes) if max_concurrent is None else max_concurrent
    _check_schedule_args(num_nodes, limit, {"gap_s": gap_s, "downtime_s": downtime_s, "freeze_s": freeze_s},
                         (first_s, restart_recover_s, freeze_recover_s))
    rng = random.Random(seed)
    events: list[ChaosEvent] = []
    counts = [0] * num_nodes
    deck: list[str] = []

    def end(event: ChaosEvent) -> float:
        return event.window_end(restart_recover_s, freeze_recover_s)

    t = first_s
    for _ in range(int(duration_s / gap_s[0]) + 2):  # each pass places one event or stops; t grows >= gap_s[0]
        if not deck:
            deck = list(KINDS)
            rng.shuffle(deck)
        kind = deck[0]
        length = round(rng.uniform(*(freeze_s if kind == "freeze" else downtime_s)), 1)
        fewest = [i for i in range(num_nodes) if counts[i] == min(counts)]
        free: list[int] = []
        for _ in range(len(events) + 1):  # postpone to the next window end until a slot and a fair node are free
            open_windows = [e for e in events if end(e) > t]
            free = [i for i in fewest if all(e.node != i for e in open_windows)]
            if len(open_windows) < limit and free:
                break
            t = min(end(e) for e in open_windows)
        at = round(t, 1)
        if at < t:  # rounded to 0.1 s, never earlier than allowed
            at = round(at + 0.1, 1)
        event = ChaosEvent(at, kind, rng.choice(free), length)
        if end(event) > duration_s:
            break
        events.append(event)
        counts[event.node] += 1
        deck.pop(0)
        t = event.at + round(rng.uniform(*gap_s), 1)
    return events


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class LogEntry:
    t: float  # seconds since the swarm was up
    event: str
    node: int | str
    outcome: str

    def line(self) -> str:
        return f"[{self.t:7.1f}s] {self.event:<9} node {self.node!s:<2} {self.outcome}"


@dataclass
class Check:
    name: str
    passed: bool | None  # None: skipped
    detail: str

    @property
    def result(self) -> str:
        return "skipped" if self.passed is None else "pass" if self.passed else "FAIL"


@dataclass
class NodeReport:
    node: int
    starts: int = 0
    kill9: int = 0
    term: int = 0
    freeze: int = 0
    rounds: int = 0
    ex_ok: int = 0
    ex_failed: int = 0
    final_eval: float = math.nan
    max_stall_s: float = 0.0
    ckpts_ok: int = 0
    ckpts_total: int = 0

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "starts": self.starts, "kill9": self.kill9, "term": self.term,
                "freeze": self.freeze, "rounds": self.rounds, "ex ok": self.ex_ok, "ex failed": self.ex_failed,
                "final eval": self.final_eval, "max stall s": f"{self.max_stall_s:.1f}",
                "ckpts ok/total": f"{self.ckpts_ok}/{self.ckpts_total}"}


@dataclass
class ChaosReport:
    seed: int
    num_nodes: int
    phase_s: float  # wall time of the chaos phase: swarm up -> final SIGTERM
    schedule: list[ChaosEvent]
    log: list[LogEntry]
    nodes: list[NodeReport]
    checks: list[Check]
    chaos_loss: float = math.nan
    baseline_loss: float | None = None  # None: no fault-free run
    loss_tolerance: float = 0.3

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed is not False for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]

    def loss_line(self) -> str:
        if self.baseline_loss is None:
            return f"final eval loss: chaos {self.chaos_loss:.3f} (no fault-free baseline)"
        delta = self.chaos_loss - self.baseline_loss
        verdict = "pass" if delta <= self.loss_tolerance else "FAIL"
        return (f"final eval loss: chaos {self.chaos_loss:.3f} vs fault-free {self.baseline_loss:.3f} "
                f"({delta:+.3f} nats, tolerance {self.loss_tolerance:.3f}): {verdict}")

    def render(self) -> str:
        events = [{"t": f"{e.t:.1f}", "event": e.event, "node": e.node, "outcome": e.outcome} for e in self.log]
        checks = [{"check": c.name, "result": c.result, "detail": c.detail} for c in self.checks]
        return "\n\n".join([
            (f"chaos seed {self.seed}: {self.num_nodes} nodes, {len(self.schedule)} scheduled events, "
             f"chaos phase {self.phase_s:.0f} s"),
            "events\n" + format_table(_left_align(events, "event", "outcome")),
            "nodes\n" + format_table([n.row() for n in self.nodes]),
            "checks\n" + format_table(_left_align(checks, "result", "detail")),
            self.loss_line() + ("\nALL CHECKS PASSED" if self.passed else
                                f"\n{len(self.failures())} CHECK(S) FAILED"),
        ])


def _left_align(rows: list[dict[str, Any]], *columns: str) -> list[dict[str, Any]]:
    """format_table right-aligns every column but the first: pad text columns so they read left-aligned."""
    for column in columns:
        width = max([len(column)] + [len(str(row[column])) for row in rows])
        for row in rows:
            row[column] = str(row[column]).ljust(width)
    return rows


# ---------------------------------------------------------------------------------------------- helpers
def node_timeouts(node_args: Sequence[str]) -> tuple[float, float]:
    """(sync_timeout, io_timeout) as the nodes will see them: the last flag in node_args, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--sync-timeout", type=float, default=FIELDS["sync_timeout"].default)
    parser.add_argument("--io-timeout", type=float, default=FIELDS["io_timeout"].default)
    known, _ = parser.parse_known_args(list(node_args))
    return known.sync_timeout, known.io_timeout


def check_checkpoints(work_dir: Path) -> tuple[int, int, list[str]]:
    """(verified, total, problems) for `<work_dir>/checkpoints`; no such dir: (0, 0, [])."""
    directory = work_dir / "checkpoints"
    if not directory.is_dir():
        return 0, 0, []
    try:
        from node.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
    except ImportError as error:
        return 0, len(list(directory.glob("ckpt-*.gtc"))), [f"cannot verify: {error}"]
    paths = list_checkpoints(directory)
    problems = []
    for path in paths:
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            problems.append(f"{path.name}: {error}")
    return len(paths) - len(problems), len(paths), problems


def fresh_summary(node: NodeProcess, since: float) -> dict[str, Any] | None:
    """The node's summary.json if it was written by the process started at wall time `since`."""
    path = node.work_dir / "summary.json"
    try:
        if path.stat().st_mtime < since:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _signal(node: NodeProcess, sig: int, group: bool) -> None:
    """Signal the node (group=True: its whole process group, p2pd included); a vanished target is ignored."""
    if group:
        procs.signal_group(node.process.pid, sig)  # start_new_session=True: the node leads its own group
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            node.process.send_signal(sig)


def cleanup(nodes: Sequence[NodeProcess], grace: float = 20.0) -> None:
    """Leave nothing running, whatever happened: SIGCONT, SIGTERM, then SIGKILL each group after `grace`."""
    processes = [node.process for node in nodes]
    try:
        procs.wait_all(procs.terminate_all(processes, thaw=True), grace)
    finally:  # also after a second Ctrl-C during the grace period
        procs.kill_all(processes, check=False)


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class _Life:
    """One process of a node: from its start to its exit."""

    started_mono: float
    started_wall: float
    restart: bool
    bootstrap: int | None = None
    up_at: float | None = None  # monotonic time it reported status running
    start_mode: str | None = None  # node.json "start" (resumed / synced / fresh) when the node reports it
    # (rounds, ok exchanges, failed exchanges) of this process: Prometheus counters start at 0 in a new process
    last: tuple[int, int, int] = (0, 0, 0)
    eval_loss: float = math.nan
    exit_code: int | None = None

    @property
    def trained(self) -> bool:
        """Rejoined and trained: running, >= 2 rounds and >= 1 ok exchange in this life."""
        rounds, ok, _ = self.last
        return self.up_at is not None and rounds >= 2 and ok >= 1


@dataclass
class _Slot:
    index: int
    state: str = "starting"  # starting | up | frozen | terminating | down | stopping | stopped | crashed
    lives: list[_Life] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    due: float | None = None  # monotonic time of the pending restart (down) or thaw (frozen)
    downtime: float = 0.0  # terminating: the downtime to wait after the exit, before the restart
    signalled_at: float | None = None  # SIGTERM time (terminating, stopping)
    stall: float = 0.0
    max_stall: float = 0.0
    max_stall_at: float = 0.0
    last_tick: float | None = None

    @property
    def life(self) -> _Life:
        return self.lives[-1]


class _ChaosRun:
    def __init__(self, swarm: LocalSwarm, schedule: list[ChaosEvent], seed: int, duration_s: float,
                 max_concurrent: int, term_timeout: float, rejoin_timeout: float, defer_limit_s: float,
                 on_event: Callable[[LogEntry], None] | None) -> None:
        self.swarm = swarm
        self.pending = list(schedule)
        self.deferred_since: float | None = None
        self.duration_s = duration_s
        self.max_concurrent = max_concurrent
        self.term_timeout = term_timeout
        self.rejoin_timeout = rejoin_timeout
        self.defer_limit_s = defer_limit_s
        self.on_event = on_event
        self.rng = random.Random(f"gossiptrain-chaos-bootstrap/{seed}")
        self.slots = [_Slot(i) for i in range(swarm.num_nodes)]
        self.log: list[LogEntry] = []
        self.problems: dict[str, list[str]] = {"crash": [], "term": [], "restart": [], "stop": [], "skipped": []}
        self.t0 = time.monotonic()
        self.eligible_s = 0.0  # node-seconds of stall-eligible time and the rounds done in it: the round time
        self.eligible_rounds = 0
        self.pool = ThreadPoolExecutor(max_workers=swarm.num_nodes, thread_name_prefix="scrape")

    # -------------------------------------------------------------- bookkeeping
    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, event: str, node: int | str, outcome: str) -> None:
        entry = LogEntry(round(self.now(), 1), event, node, outcome)
        self.log.append(entry)
        if self.on_event:
            self.on_event(entry)

    def node(self, index: int) -> NodeProcess:
        return self.swarm.nodes[index]

    def start_initial(self) -> None:
        """Start the swarm (node 0, then the others through it) and begin the clock."""
        for slot in self.slots:
            slot.lives.append(_Life(time.monotonic(), time.time(), restart=False))
        self.swarm.start()
        self.t0 = time.monotonic()
        for slot in self.slots:
            slot.state = "up"
            slot.life.up_at = self.t0
            slot.life.start_mode = self.node(slot.index).status.get("start")
        self.record("start", "all", f"{len(self.slots)} nodes up (node i>0 bootstrapped via node 0)")

    def disrupted(self) -> int:
        """Nodes not up, or restarted and not yet trained again."""
        return sum(1 for s in self.slots if s.state != "up" or (s.life.restart and not s.life.trained))

    def bootstrapping_from(self, index: int) -> bool:
        return any(s.state == "starting" and s.life.bootstrap == index for s in self.slots)

    def not_ready(self, event: ChaosEvent) -> str | None:
        """Why `event` cannot run now (None: it can)."""
        slot = self.slots[event.node]
        if slot.state != "up":
            return f"node is {slot.state}"
        if not slot.life.trained:
            return "node has not yet done 2 rounds and 1 ok exchange since its start"
        if self.bootstrapping_from(event.node):
            return "a starting node bootstraps through it"
        if self.disrupted() >= self.max_concurrent:
            return f"{self.disrupted()} nodes already disrupted"
        return None

    # -------------------------------------------------------------- actions
    def run_due_event(self, now_mono: float) -> None:
        if not self.pending or self.pending[0].at > self.now():
            return
        event = self.pending[0]
        reason = self.not_ready(event)
        if reason is None:
            self.pending.pop(0)
            self.deferred_since = None
            late = self.now() - event.at
            self.execute(event, late)
            return
        if self.deferred_since is None:
            self.deferred_since = now_mono
        since = self.deferred_since
        if now_mono - since > self.defer_limit_s or self.now() > self.duration_s:
            self.pending.pop(0)
            self.deferred_since = None
            self.problems["skipped"].append(f"{event.kind} node {event.node} at {event.at:.1f}s: {reason}")
            self.record(event.kind, event.node, f"SKIPPED after {now_mono - since:.0f}s deferred: {reason}")

    def execute(self, event: ChaosEvent, late: float) -> None:
        slot, node = self.slots[event.node], self.node(event.node)
        slot.counts[event.kind] += 1
        slot.last_tick = None
        note = f" ({late:.1f}s late)" if late >= 2 * TICK_S else ""
        if event.kind == "kill9":
            _signal(node, signal.SIGKILL, group=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=KILL_WAIT_S)
            slot.life.exit_code = node.process.poll()
            slot.state, slot.due = "down", time.monotonic() + event.duration
            self.record("kill9", event.node, f"SIGKILL node+p2pd; restart in {event.duration:.1f}s{note}")
        elif event.kind == "term":
            _signal(node, signal.SIGTERM, group=False)
            slot.state, slot.signalled_at, slot.due, slot.downtime = "terminating", time.monotonic(), None, event.duration
            self.record("term", event.node, f"SIGTERM; expect exit 0 within {self.term_timeout:.0f}s{note}")
        else:
            _signal(node, signal.SIGSTOP, group=True)
            slot.state, slot.due = "frozen", time.monotonic() + event.duration
            self.record("freeze", event.node, f"SIGSTOP node+p2pd for {event.duration:.1f}s{note}")

    def advance(self, now_mono: float) -> None:
        """Move every node's pending action along: exits, terminations, thaws, restarts, start-ups."""
        for slot in self.slots:
            node = self.node(slot.index)
            code = node.process.poll()
            if slot.state in ("up", "starting") and code is not None:
                what = "during its start" if slot.state == "starting" else "unsignalled"
                slot.life.exit_code = code
                slot.state, slot.last_tick = "crashed", None
                self.problems["crash"].append(f"node {slot.index} exited {code} {what}: {_last_line(node)}")
                self.record("exit", slot.index, f"CRASH: exited {code} without a signal; log: {_last_line(node)}")
            elif slot.state == "terminating":
                waited = now_mono - (slot.signalled_at or now_mono)
                if code is not None:
                    slot.life.exit_code = code
                    downtime = slot.downtime
                    slot.state, slot.due = "down", now_mono + downtime
                    if code != 0:
                        self.problems["term"].append(f"node {slot.index} exited {code} on SIGTERM")
                    self.record("exited", slot.index, f"{'exit 0' if code == 0 else f'EXIT {code}'} "
                                f"{waited:.1f}s after SIGTERM; restart in {downtime:.1f}s")
                elif waited > self.term_timeout:
                    _signal(node, signal.SIGKILL, group=True)
                    self.problems["term"].append(f"node {slot.index} still running {waited:.0f}s after SIGTERM")
                    self.record("exited", slot.index, f"NO EXIT within {self.term_timeout:.0f}s of SIGTERM: SIGKILL")
                    # the next tick sees the exit (code -9) and schedules the restart
            elif slot.state == "frozen" and slot.due is not None and now_mono >= slot.due:
                _signal(node, signal.SIGCONT, group=True)
                slot.state, slot.due = "up", None
                self.record("thaw", slot.index, "SIGCONT")
            elif slot.state == "down" and slot.due is not None and now_mono >= slot.due:
                self.restart(slot, now_mono)
            elif slot.state == "starting":
                status = node.poll_status()
                if status.get("status") == "running":
                    life = slot.life
                    life.up_at, life.start_mode = now_mono, status.get("start")
                    slot.state, slot.stall, slot.last_tick = "up", 0.0, None
                    mode = f", start: {life.start_mode}" if life.start_mode else ""
                    self.record("up", slot.index, f"running {now_mono - life.started_mono:.1f}s after restart{mode}")
                elif now_mono - slot.life.started_mono > START_TIMEOUT:
                    _signal(node, signal.SIGKILL, group=True)
                    self.problems["restart"].append(f"node {slot.index} not running {START_TIMEOUT:.0f}s after restart")
                    self.record("up", slot.index, f"NOT RUNNING {START_TIMEOUT:.0f}s after restart: SIGKILL")
                    # the next tick sees the exit and records the crash

    def restart(self, slot: _Slot, now_mono: float) -> None:
        """Restart with the same work dir through a random live, not frozen peer (none: retry next tick)."""
        live = [s.index for s in self.slots
                if s.index != slot.index and s.state == "up" and self.node(s.index).status.get("maddrs")]
        if not live:
            if now_mono - (slot.due or now_mono) > START_TIMEOUT:
                slot.state, slot.due = "crashed", None
                self.problems["restart"].append(f"node {slot.index}: no live peer to bootstrap through")
                self.record("restart", slot.index, "GAVE UP: no live peer to bootstrap through")
            return
        via = self.rng.choice(live)
        slot.lives.append(_Life(now_mono, time.time(), restart=True, bootstrap=via))
        slot.state, slot.due, slot.stall, slot.last_tick = "starting", None, 0.0, None
        self.swarm.start_node(slot.index, [self.node(via).maddr], ["--min-peers", "1"])
        self.record("restart", slot.index, f"same work dir, bootstrap via node {via}, --min-peers 1")

    # -------------------------------------------------------------- monitoring
    def scrape_all(self, states: tuple[str, ...] = ("up",)) -> None:
        """Scrape every node in `states` in parallel; track progress and the stall clock."""
        targets = [s for s in self.slots if s.state in states and self.node(s.index).status.get("metrics_port")]
        results = list(self.pool.map(lambda s: scrape(self.node(s.index).metrics_url, SCRAPE_TIMEOUT_S), targets))
        now_mono = time.monotonic()
        for slot, samples in zip(targets, results):
            life = slot.life
            before = life.last[0]
            if samples:
                current = (rounds_done(samples), *exchange_counts(samples))
                life.last = tuple(max(a, b) for a, b in zip(life.last, current))  # type: ignore[assignment]
                life.eval_loss = samples.get("gossiptrain_eval_loss", life.eval_loss)
            advanced = life.last[0] - before
            # the stall clock runs only while the node is up (not frozen, not signalled) and past its
            # first completed round of this life; a stall is the clock's value when a new round is seen
            # (or now): the time between two observations of progress, to the sampling period
            if slot.state == "up" and before >= 1 and slot.last_tick is not None:
                dt = now_mono - slot.last_tick
                self.eligible_s += dt
                self.eligible_rounds += advanced
                slot.stall += dt
                if slot.stall > slot.max_stall:
                    slot.max_stall, slot.max_stall_at = slot.stall, self.now()
            if advanced:
                slot.stall = 0.0
            slot.last_tick = now_mono if slot.state == "up" else None

    # -------------------------------------------------------------- phases
    def settled(self) -> bool:
        return all(s.state in ("up", "crashed") for s in self.slots) and all(
            s.life.trained for s in self.slots if s.state == "up" and s.life.restart)

    def chaos_phase(self) -> None:
        """Run the schedule, then wait (bounded) until every node is back and every restart has trained."""
        hard_stop = self.duration_s + self.rejoin_timeout
        max_ticks = int((hard_stop + self.defer_limit_s) / TICK_S * 4) + 100  # a tick lasts >= TICK_S / 4
        for _ in range(max_ticks):
            tick_start = time.monotonic()
            self.advance(tick_start)
            self.run_due_event(tick_start)
            self.scrape_all()
            t = self.now()
            if t >= self.duration_s and not self.pending and self.settled():
                return
            if t >= hard_stop:
                waiting = [f"node {s.index} {s.state}" + ("" if s.state != "up" else " (not trained yet)")
                           for s in self.slots if s.state not in ("up", "crashed")
                           or (s.life.restart and not s.life.trained)]
                self.record("end", "-", f"not settled {self.rejoin_timeout:.0f}s after the phase: {', '.join(waiting)}")
                return
            next_event = self.pending[0].at - t if self.pending else TICK_S
            time.sleep(max(TICK_S / 4, min(TICK_S - (time.monotonic() - tick_start), next_event)))

    def stop_all(self) -> float:
        """Final clean leave: thaw what is frozen, SIGTERM every running node, expect exit 0. Returns phase wall s."""
        self.scrape_all()
        phase_s = self.now()
        for slot in self.slots:
            node = self.node(slot.index)
            if slot.state == "frozen":
                _signal(node, signal.SIGCONT, group=True)
                self.record("thaw", slot.index, "SIGCONT (end of run)")
            if node.process.poll() is None:
                _signal(node, signal.SIGTERM, group=False)
                slot.state, slot.signalled_at = "stopping", time.monotonic()
        self.record("stop", "all", "SIGTERM to every running node")
        deadline = time.monotonic() + self.term_timeout
        for slot in self.slots:
            node = self.node(slot.index)
            if slot.state != "stopping":
                self.problems["stop"].append(f"node {slot.index} was {slot.state} at the end")
                continue
            try:
                code = node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(node, signal.SIGKILL, group=True)
                code = None
            waited = time.monotonic() - (slot.signalled_at or 0.0)
            slot.life.exit_code = code
            slot.state = "stopped"
            if code != 0:
                self.problems["stop"].append(f"node {slot.index} {'did not exit' if code is None else f'exited {code}'}"
                                             f" on the final SIGTERM")
            self.record("exited", slot.index,
                        f"exit 0 {waited:.1f}s after SIGTERM" if code == 0 else
                        f"NO EXIT within {self.term_timeout:.0f}s: SIGKILL" if code is None else
                        f"EXIT {code} {waited:.1f}s after SIGTERM")
        return phase_s

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        cleanup(self.swarm.nodes)


def _last_line(node: NodeProcess) -> str:
    lines = [line for line in node.log_tail(8).splitlines() if line.strip()]
    return lines[-1][-160:] if lines else "(empty log)"


def run_baseline(base_dir: Path, num_nodes: int, node_args: Sequence[str], wall_s: float, *, threads_per_node: int = 1,
                 metrics_base_port: int = 0, term_timeout: float = 60.0,
                 on_event: Callable[[LogEntry], None] | None = None) -> tuple[float, int, list[str]]:
    """A fault-free swarm with the same node args for `wall_s` seconds: (mean final eval loss, rounds, problems).

    `rounds` is the swarm's total (rounds computed, summed over nodes): with the same wall time it
    shows whether both runs had the same machine to themselves.
    """
    swarm = LocalSwarm(num_nodes, base_dir, list(node_args), metrics_base_port, threads_per_node)
    problems: list[str] = []
    t0 = time.monotonic()

    def note(event: str, outcome: str) -> None:
        if on_event:
            on_event(LogEntry(round(time.monotonic() - t0, 1), event, "all", outcome))

    try:
        started = time.time()
        swarm.start()
        t0 = time.monotonic()
        note("baseline", f"fault-free swarm of {num_nodes} up; running {wall_s:.0f}s")
        for _ in range(int(wall_s / TICK_S) + 2):
            if time.monotonic() - t0 >= wall_s:
                break
            crashed = [n.index for n in swarm.nodes if n.process.poll() is not None]
            if crashed:
                problems.append(f"baseline nodes {crashed} exited by themselves")
                break
            time.sleep(min(TICK_S, max(0.0, wall_s - (time.monotonic() - t0))))
        swarm.stop(grace=term_timeout)
        codes = [n.process.returncode for n in swarm.nodes]
        if any(code != 0 for code in codes):
            problems.append(f"baseline exit codes {codes}")
        losses, rounds = [], 0
        for node in swarm.nodes:
            summary = fresh_summary(node, started) or {}
            if summary.get("eval_loss") is None:
                problems.append(f"baseline node {node.index} has no summary.json eval_loss")
            else:
                losses.append(float(summary["eval_loss"]))
                rounds += int(summary.get("rounds_done", 0))
        mean = statistics.fmean(losses) if losses else math.nan
        note("baseline", f"stopped; mean final eval loss {mean:.3f}")
        return mean, rounds, problems
    except SwarmError as error:
        return math.nan, 0, [f"baseline swarm failed: {error}"]
    finally:
        cleanup(swarm.nodes)


def run_chaos(
    base_dir: str | Path,
    *,
    seed: int = 1,
    num_nodes: int = 5,
    duration_s: float = 600.0,
    node_args: Sequence[str] = (),
    schedule: list[ChaosEvent] | None = None,
    schedule_options: dict[str, Any] | None = None,
    baseline: bool = True,
    loss_tolerance: float = 0.3,
    max_stall_s: float | None = None,
    stall_factor: float = 3.0,
    term_timeout: float = 60.0,
    rejoin_timeout: float = 120.0,
    defer_limit_s: float = 30.0,
    threads_per_node: int = 1,
    metrics_base_port: int = 0,
    on_event: Callable[[LogEntry], None] | None = None,
) -> ChaosReport:
    """Start `num_nodes` nodes under `base_dir/chaos`, run the chaos schedule for `duration_s`, check, report.

    `schedule` overrides `make_schedule(seed, num_nodes, duration_s, **schedule_options)`.
    `max_stall_s` (default: `stall_factor` x (mean observed round time + sync_timeout + io_timeout))
    bounds check (b). With `baseline`, a fault-free swarm then runs under `base_dir/baseline` for the
    chaos phase's wall time and check (f) compares the mean final eval loss. Every node process is
    gone when this returns or raises (KeyboardInterrupt included).

    Runtime rules: an event runs when its node is up and has trained in its current process (>= 2
    rounds, >= 1 ok exchange), no starting node bootstraps through it, and fewer than
    `max_concurrent` nodes are disrupted (not up, or restarted and not trained yet); otherwise it is
    deferred, and skipped after `defer_limit_s` (check (g) fails). After `duration_s` the run waits
    (at most `rejoin_timeout`) until every node is back and every restart has trained, then stops.

    Checks: (a) no process exited without our signal and every SIGTERM gave exit 0 within
    `term_timeout`; (b) the longest time a node went without a new round, counted only while it was
    up (not frozen, not signalled) and past its first round in that process, is within the bound;
    (c) every restarted process reached status running, did >= 2 rounds and >= 1 ok exchange;
    (d) the final SIGTERM stopped every node with exit 0; (e) every `checkpoints/ckpt-*.gtc`
    verifies (no such dir: trivially true); (f) mean final summary.json eval_loss <= fault-free +
    `loss_tolerance`; (g) every scheduled event ran.
    """
    base_dir = Path(base_dir)
    options = dict(schedule_options or {})
    max_concurrent = options.get("max_concurrent") or default_max_concurrent(num_nodes)
    if schedule is None:
        schedule = make_schedule(seed, num_nodes, duration_s, **options)
    swarm = LocalSwarm(num_nodes, base_dir / "chaos", list(node_args), metrics_base_port, threads_per_node)
    run = _ChaosRun(swarm, schedule, seed, duration_s, max_concurrent, term_timeout, rejoin_timeout, defer_limit_s,
                    on_event)
    phase_s = _run_phases(run)

    nodes, checkpoint_problems, final_losses = _node_reports(run)
    checks = _checks(run, nodes, node_args, max_stall_s, stall_factor, checkpoint_problems)
    chaos_loss = statistics.fmean(final_losses.values()) if final_losses else math.nan
    fault_free = None  # check (f)'s reference: a fault-free swarm, same node args, for the chaos phase's wall time
    if baseline:
        fault_free = functools.partial(run_baseline, base_dir / "baseline", num_nodes, node_args,
                                       threads_per_node=threads_per_node, metrics_base_port=metrics_base_port,
                                       term_timeout=term_timeout, on_event=on_event)
    loss_check, baseline_loss = _loss_check(fault_free, phase_s, nodes, final_losses, chaos_loss, loss_tolerance)
    checks += [loss_check, _schedule_check(run)]
    return ChaosReport(seed, num_nodes, phase_s, schedule, run.log, nodes, checks, chaos_loss, baseline_loss,
                       loss_tolerance)


def _run_phases(run: _ChaosRun) -> float:
    """Start the swarm, run the chaos phase, stop every node: the chaos phase's wall time (0: the start failed).

    Every node process is gone when this returns or raises (KeyboardInterrupt included)."""
    try:
        try:
            run.start_initial()
        except SwarmError as error:
            run.problems["crash"].append(f"initial start failed: {error}")
            run.record("start", "all", f"FAILED: {str(error).splitlines()[0]}")
            return 0.0
        run.chaos_phase()
        return run.stop_all()
    finally:
        run.close()


def _node_reports(run: _ChaosRun) -> tuple[list[NodeReport], list[str], dict[int, float]]:
    """Each node's report, the checkpoint problems (check (e)) and {node: final eval loss} of the nodes whose
    last process left a summary.json."""
    nodes, checkpoint_problems, final_losses = [], [], {}
    for slot in run.slots:
        rounds, ok, failed = (sum(column) for column in zip(*(life.last for life in slot.lives)))
        report = NodeReport(slot.index, starts=len(slot.lives), rounds=rounds, ex_ok=ok, ex_failed=failed,
                            max_stall_s=slot.max_stall, **slot.counts)
        report.final_eval = slot.life.eval_loss  # the last scrape, unless the last process left a summary
        if slot.index < len(run.swarm.nodes):
            node = run.swarm.nodes[slot.index]
            summary = fresh_summary(node, slot.life.started_wall) or {}
            if summary.get("eval_loss") is not None:
                report.final_eval = final_losses[slot.index] = float(summary["eval_loss"])
            report.ckpts_ok, report.ckpts_total, problems = check_checkpoints(node.work_dir)
            checkpoint_problems += [f"node {slot.index} {p}" for p in problems]
        nodes.append(report)
    return nodes, checkpoint_problems, final_losses


def _loss_check(fault_free: Callable[[float], tuple[float, int, list[str]]] | None, phase_s: float,
                nodes: list[NodeReport], final_losses: dict[int, float], chaos_loss: float,
                loss_tolerance: float) -> tuple[Check, float | None]:
    """Check (f) and the fault-free loss: `fault_free(wall_s)` (None: no baseline) runs the fault-free swarm for
    the chaos phase's wall time, as run_baseline does."""
    name = "(f) final eval loss within tolerance of fault-free"
    if fault_free is None:
        return Check(name, None, "no fault-free baseline (--no-baseline)"), None
    if phase_s <= 0:
        return Check(name, False, "no chaos phase ran"), None
    base_loss, base_rounds, problems = fault_free(phase_s)
    missing = [report.node for report in nodes if report.node not in final_losses]
    if missing:
        problems.append(f"chaos nodes {missing} left no summary.json from their last process")
    delta = chaos_loss - base_loss
    detail = (f"chaos {chaos_loss:.3f} vs fault-free {base_loss:.3f}: {delta:+.3f} nats "
              f"(tolerance {loss_tolerance:.3f}; same node args, {phase_s:.0f}s each; swarm rounds "
              f"{sum(n.rounds for n in nodes)} vs {base_rounds})")
    return Check(name, not problems and delta <= loss_tolerance, "; ".join([*problems, detail])), base_loss


def _checks(run: _ChaosRun, nodes: list[NodeReport], node_args: Sequence[str], max_stall_s: float | None,
            stall_factor: float, checkpoint_problems: list[str]) -> list[Check]:
    checks = []
    terms = [s.counts["term"] for s in run.slots]
    a_problems = run.problems["crash"] + run.problems["term"]
    checks.append(Check(
        "(a) no unsignalled exit; SIGTERM -> exit 0", not a_problems,
        "; ".join(a_problems) if a_problems else
        f"no process exited unsignalled; {sum(terms)} SIGTERM(s), all exit 0"))

    sync_timeout, io_timeout = node_timeouts(node_args)
    round_s = run.eligible_s / run.eligible_rounds if run.eligible_rounds else math.nan
    if max_stall_s is None:
        bound = stall_factor * ((0.0 if math.isnan(round_s) else round_s) + sync_timeout + io_timeout)
        how = (f"{stall_factor:g} x (round {round_s:.2f}s + sync_timeout {sync_timeout:g}s + "
               f"io_timeout {io_timeout:g}s)")
    else:
        bound, how = max_stall_s, "given"
    worst = max(run.slots, key=lambda s: s.max_stall)
    checks.append(Check(
        "(b) no live node stalled", worst.max_stall <= bound,
        f"longest stall {worst.max_stall:.1f}s (node {worst.index}, at t={worst.max_stall_at:.0f}s); "
        f"bound {bound:.1f}s = {how}"))

    restarts, c_problems = 0, list(run.problems["restart"])
    for slot in run.slots:
        for number, life in enumerate(slot.lives):
            if not life.restart:
                continue
            restarts += 1
            rounds, ok, _ = life.last
            if not life.trained:
                c_problems.append(f"node {slot.index} start {number + 1}: "
                                  f"{'never running' if life.up_at is None else f'{rounds} rounds, {ok} ok exchanges'}")
    modes = sorted({str(life.start_mode) for s in run.slots for life in s.lives if life.restart and life.start_mode})
    checks.append(Check(
        "(c) every restart rejoined and trained", not c_problems,
        "; ".join(c_problems) if c_problems else
        f"{restarts} restart(s): each running, >= 2 rounds and >= 1 ok exchange"
        + (f" (start modes: {', '.join(modes)})" if modes else "")))

    d_problems = run.problems["stop"]
    checks.append(Check(
        "(d) clean stop at the end", not d_problems,
        "; ".join(d_problems) if d_problems else f"all {len(run.slots)} nodes exit 0 on SIGTERM"))

    total = sum(n.ckpts_total for n in nodes)
    checks.append(Check(
        "(e) every checkpoint verifies", not checkpoint_problems,
        "; ".join(checkpoint_problems[:5]) if checkpoint_problems else
        f"{total} checkpoint(s) verified" + (" (no checkpoints dir yet)" if total == 0 else "")))
    return checks


def _schedule_check(run: _ChaosRun) -> Check:
    skipped = run.problems["skipped"]
    executed = sum(run.slots[i].counts[k] for i in range(len(run.slots)) for k in KINDS)
    return Check("(g) every scheduled event ran", not skipped,
                 "; ".join(skipped) if skipped else f"{executed} event(s) executed, none skipped")
