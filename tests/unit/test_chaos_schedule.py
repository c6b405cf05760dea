"""The chaos schedule is a pure, seeded function with simple invariants (see node.tools.chaos.make_schedule)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.tools.chaos import (
    KINDS,
    ChaosEvent,
    ChaosReport,
    Check,
    LogEntry,
    NodeReport,
    _loss_check,
    check_checkpoints,
    fresh_summary,
    make_schedule,
    node_timeouts,
)
from node.tools.swarm import NodeProcess

RESTART_RECOVER, FREEZE_RECOVER = 25.0, 5.0


def window_end(event: ChaosEvent, restart_recover: float = RESTART_RECOVER, freeze_recover: float = FREEZE_RECOVER):
    return event.window_end(restart_recover, freeze_recover)


def max_open_windows(events: list[ChaosEvent], **recover) -> int:
    """The most disruption windows open at once (the maximum is reached at some window's start)."""
    return max((sum(1 for f in events if f.at <= e.at < window_end(f, **recover)) for e in events), default=0)


def assert_invariants(events: list[ChaosEvent], num_nodes: int, duration: float, limit: int,
                      first_s: float = 10.0, gap_min: float = 10.0) -> None:
    # 2: sorted, first start, spacing
    assert [e.at for e in events] == sorted(e.at for e in events)
    if events:
        assert events[0].at >= first_s
    for a, b in itertools.pairwise(events):
        assert b.at - a.at >= gap_min - 1e-6, (a, b)
    # 3: durations in range, every window ends by the end of the run
    for e in events:
        assert e.kind in KINDS and 0 <= e.node < num_nodes
        low, high = (4.0, 12.0) if e.kind == "freeze" else (3.0, 10.0)
        assert low - 0.05 <= e.duration <= high + 0.05, e
        assert window_end(e) <= duration + 1e-6, e
    # 4: one node's windows never overlap; at most `limit` open at once
    for i in range(num_nodes):
        mine = [e for e in events if e.node == i]
        for a, b in itertools.pairwise(mine):
            assert b.at >= window_end(a) - 1e-6, (a, b)
    assert max_open_windows(events) <= limit
    # 5: fair targets at every prefix (node 0 is never picked more often than the others)
    counts = [0] * num_nodes
    for e in events:
        counts[e.node] += 1
        assert max(counts) - min(counts) <= 1, counts
    # 6: kinds dealt in shuffled blocks of three
    kinds = Counter(e.kind for e in events)
    if len(events) >= 3:
        assert set(kinds) == set(KINDS)
    assert max(kinds.values(), default=0) - min((kinds[k] for k in KINDS), default=0) <= 1


def test_same_seed_same_schedule_other_seed_other_schedule():
    assert make_schedule(7, 5, 600) == make_schedule(7, 5, 600)
    assert make_schedule(7, 5, 600) != make_schedule(8, 5, 600)


def test_default_long_run_invariants_and_every_kind():
    events = make_schedule(1, 5, 600)
    assert len(events) >= 15
    assert_invariants(events, 5, 600, limit=2)
    assert {e.node for e in events} == set(range(5))


def test_never_more_than_two_of_five_disrupted_even_when_crowded():
    # long downtimes, short gaps: events must be postponed to respect the limit
    events = make_schedule(3, 5, 900, gap_s=(1.0, 2.0), downtime_s=(20.0, 40.0), freeze_s=(20.0, 40.0))
    assert len(events) > 10
    assert max_open_windows(events) == 2
    assert all(b.at - a.at >= 1.0 for a, b in itertools.pairwise(events))


def test_explicit_max_concurrent_is_respected():
    events = make_schedule(5, 6, 800, gap_s=(2.0, 4.0), max_concurrent=1)
    assert events and max_open_windows(events) == 1
    with pytest.raises(ValueError):
        make_schedule(5, 5, 100, max_concurrent=5)  # no live peer left to bootstrap a restart through
    with pytest.raises(ValueError):
        make_schedule(5, 1, 100)


def test_short_run_has_no_event_that_cannot_finish():
    assert make_schedule(1, 5, 30) == []  # first at 10 s + >= 3 s down + 25 s to rejoin > 30 s
    for event in make_schedule(1, 5, 90):
        assert window_end(event) <= 90


def test_ci_schedule_has_each_kind():
    """The seed and length the integration test uses: each kind at least once within 90 s."""
    events = make_schedule(1, 5, 90)
    assert {e.kind for e in events} == set(KINDS)


def test_bad_ranges_are_refused():
    for bad in ({"gap_s": (0.0, 1.0)}, {"downtime_s": (5.0, 1.0)}, {"freeze_s": (-1.0, 2.0)}, {"first_s": -1.0}):
        with pytest.raises(ValueError):
            make_schedule(1, 5, 100, **bad)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), num_nodes=st.integers(2, 9), duration=st.floats(0, 1500))
def test_invariants_hold_for_any_seed(seed, num_nodes, duration):
    events = make_schedule(seed, num_nodes, duration)
    assert events == make_schedule(seed, num_nodes, duration)
    assert_invariants(events, num_nodes, duration, limit=max(1, (num_nodes - 1) // 2))


def test_report_renders_tables_and_verdict():
    report = ChaosReport(
        seed=1, num_nodes=2, phase_s=90.0, schedule=[ChaosEvent(10.0, "kill9", 1, 5.0)],
        log=[LogEntry(10.0, "kill9", 1, "SIGKILL node+p2pd; restart in 5.0s"), LogEntry(15.2, "restart", 1, "ok")],
        nodes=[NodeReport(0, starts=1, rounds=40), NodeReport(1, starts=2, kill9=1, rounds=30, ckpts_total=2,
                                                             ckpts_ok=2)],
        checks=[Check("(a) no unsignalled exit", True, "fine"), Check("(f) loss", None, "skipped")],
        chaos_loss=2.1, baseline_loss=2.0, loss_tolerance=0.3,
    )
    text = report.render()
    assert report.passed
    for needle in ("events", "nodes", "checks", "ckpts ok/total", "2/2", "SIGKILL node+p2pd", "+0.100 nats",
                   "ALL CHECKS PASSED", "skipped"):
        assert needle in text, needle
    report.checks.append(Check("(b) stall", False, "too long"))
    assert not report.passed and "1 CHECK(S) FAILED" in report.render()


def test_node_timeouts_follow_the_last_flag_else_the_node_default():
    assert node_timeouts([]) == (10.0, 5.0)
    assert node_timeouts(["--inner-steps", "10", "--sync-timeout", "3", "--io-timeout", "2", "--sync-timeout", "4"]) \
        == (4.0, 2.0)


def test_checkpoint_check_without_a_dir_is_trivially_true(tmp_path):
    assert check_checkpoints(tmp_path) == (0, 0, [])


def test_checkpoint_check_reports_a_damaged_file(tmp_path):
    pytest.importorskip("node.train.checkpoint")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "ckpt-0000000001.gtc").write_bytes(b"GTCKPT\x00\x01 torn write")
    ok, total, problems = check_checkpoints(tmp_path)
    assert (ok, total) == (0, 1) and "ckpt-0000000001.gtc" in problems[0]


def test_a_summary_older_than_the_process_is_ignored(tmp_path):
    node = NodeProcess(0, tmp_path, subprocess.Popen(["true"]), tmp_path / "node.log")
    node.process.wait()
    (tmp_path / "summary.json").write_text(json.dumps({"eval_loss": 2.5}))
    assert fresh_summary(node, since=time.time() - 60) == {"eval_loss": 2.5}
    assert fresh_summary(node, since=time.time() + 60) is None


def test_the_loss_check_runs_the_fault_free_swarm_only_when_asked_and_a_chaos_phase_ran():
    nodes = [NodeReport(0, rounds=40), NodeReport(1, rounds=30)]
    walls: list[float] = []

    def fault_free(wall_s: float) -> tuple[float, int, list[str]]:
        walls.append(wall_s)
        return 1.9, 80, []

    check, baseline = _loss_check(None, 90.0, nodes, {0: 2.0, 1: 2.2}, 2.1, 0.3)
    assert (check.passed, baseline) == (None, None) and "--no-baseline" in check.detail
    check, baseline = _loss_check(fault_free, 0.0, nodes, {}, math.nan, 0.3)
    assert (check.passed, baseline, check.detail) == (False, None, "no chaos phase ran") and walls == []
    check, baseline = _loss_check(fault_free, 90.0, nodes, {0: 2.0, 1: 2.2}, 2.1, 0.3)
    assert walls == [90.0] and baseline == 1.9 and check.passed is True
    assert "+0.200 nats" in check.detail and "swarm rounds 70 vs 80" in check.detail
    check, _ = _loss_check(fault_free, 90.0, nodes, {0: 2.0}, 2.0, 0.3)  # node 1's last process left no summary
    assert check.passed is False and "chaos nodes [1] left no summary.json" in check.detail
    check, _ = _loss_check(lambda wall_s: (1.7, 80, []), 90.0, nodes, {0: 2.0, 1: 2.2}, 2.1, 0.3)
    assert check.passed is False and "+0.400 nats" in check.detail  # beyond the tolerance
