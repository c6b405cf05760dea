"""`gossiptrain bench exchange` runs end to end and prints its table (figures are not asserted)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_exchange_prints_all_three_modes():
    result = subprocess.run(
        [sys.executable, "-m", "node", "bench", "exchange", "--numel", "200000", "--repeats", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0] + " " + line.split()[1] for line in result.stdout.splitlines() if line.count("x ") >= 2}
    assert {"raw TCP", "p2pd stream"} <= rows and any(r.startswith("gossiptrain") for r in rows), result.stdout


def test_bench_state_sync_prints_its_table():
    result = subprocess.run(
        [sys.executable, "-m", "node", "bench", "state-sync", "--numel", "200000", "300000", "--repeats", "2"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["numel", "MB"] and "MB/s" in line for line in lines), result.stdout
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["200,000"], ["300,000"])}
    assert set(rows) == {"200,000", "300,000"}, result.stdout
    assert all(row[5].endswith("x") for row in rows.values()), result.stdout  # the peak RSS growth ratio
