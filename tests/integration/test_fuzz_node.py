"""The fuzzer (node/bench/fuzz.py, `gossiptrain bench fuzz`) against one real node process, CI-sized.

300 random and mutated frames per stream handler (exchange, state, audit) and 300 random and mutated DHT
records per record kind go to a live node from a stranger with its own identity. The node must refuse them
without crashing or hanging, count every refusal, and still serve afterwards. The full run (10,000 per
handler and kind) is `gossiptrain bench fuzz`.
"""

from __future__ import annotations

import asyncio

import pytest

from node.bench.fuzz import RECORD_TARGETS, SLACK, STREAM_TARGETS, Report, fuzz_args, fuzz_node
from node.tools.swarm import LocalSwarm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

COUNT = 300
IO_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Report, LocalSwarm]:
    tmp = tmp_path_factory.mktemp("fuzz")
    swarm = LocalSwarm(1, tmp, fuzz_args(IO_TIMEOUT))
    swarm.start()
    try:
        result = asyncio.run(fuzz_node(swarm, tmp, COUNT, seed=13, io_timeout=IO_TIMEOUT))
        print(result.format())
        yield result, swarm
    finally:
        swarm.stop()


def rows(report: Report, targets: tuple[str, ...]) -> list:
    found = {row.target: row for row in report.rows}
    assert set(targets) <= set(found), f"not fuzzed: {set(targets) - set(found)}"
    return [found[target] for target in targets]


def test_the_node_survives_and_still_serves(report):
    result, swarm = report
    assert result.alive, f"the node exited ({result.exit_code}):\n{swarm.nodes[0].log_tail()}"
    assert result.metrics_served
    assert result.serving_problem is None, result.serving_problem
    assert result.rss_growth_mib < 300, f"RSS {result.rss_before_mib:.0f} -> {result.rss_after_mib:.0f} MiB"
    assert all(row.errors_logged == 0 for row in result.rows), "tracebacks in the node's log:\n" + \
        swarm.nodes[0].log_tail(60)


def test_every_fuzzed_stream_is_refused_in_time_and_counted(report):
    result, _ = report
    for row in rows(result, STREAM_TARGETS):
        assert row.sent == COUNT
        assert (row.crashes, row.hangs, row.failed) == (0, 0, 0), row.table_row()
        assert row.slowest < IO_TIMEOUT + SLACK, row.table_row()
        # most cases are refused with a typed error; a few stay valid (a mutation that kept the request whole)
        assert row.rejected > COUNT // 2, row.table_row()
        # every stream reached the node's handler and was counted once, but maybe some we closed at once
        assert 0 <= row.unseen <= row.cut, f"{row.target}: the node counted {row.seen} of {COUNT} streams"
        assert row.counted >= row.expected, row.table_row()
        assert {"malformed", "field"} <= set(row.kinds), row.kinds


def test_every_fuzzed_record_is_refused_and_counted(report):
    result, _ = report
    for row in rows(result, RECORD_TARGETS):
        assert row.sent == COUNT
        assert (row.crashes, row.hangs, row.failed, row.accepted_bad) == (0, 0, 0, 0), row.table_row()
        assert row.expected > COUNT // 2, row.table_row()
    for row in rows(result, RECORD_TARGETS):
        assert row.counted == row.expected, row.table_row()
