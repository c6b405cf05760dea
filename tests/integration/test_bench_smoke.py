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


def test_bench_verify_prints_its_tables():
    result = subprocess.run(
        [sys.executable, "-m", "node", "bench", "verify", "--tiny", "--trials", "2", "--numel", "200000",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for header in (["replayed with", "replays", "hamming max / mean", "rejects"],
                   ["tolerance", "honest max", "suggested", "configured"],
                   ["committed update", "1 verifier rejects", "2 of 3 flag", "exact rel-L2"],
                   ["model", "round (train)", "replay", "verification / training"],
                   ["numel", "LSH sign", "start digest (φ, m, v)"]):
        assert any(line.startswith(header[0]) and all(h in line for h in header) for line in lines), header

    def row(label: str) -> list[str]:
        found = [line[len(label):].split() for line in lines if line.startswith(label + "  ")]
        assert len(found) == 1, (label, result.stdout)
        return found[0]

    honest = ["threads 1, micro 1 (= committed)", "threads 2, micro 1", "threads 1, micro 2", "threads 2, micro 2",
              "threads 1, micro 4"]
    assert all(row(label)[-2] == "0/2" for label in honest), result.stdout  # no honest replay rejected
    assert row("honest (false rejects)")[:4] == ["0/6", "<39.3%", "0/2", "<77.6%"], result.stdout
    for label in ("sign flip", "zero update", "scale x2"):  # blatant cheats: every vote rejects
        assert row(label)[:3] == ["6/6", ">60.7%", "2/2"], result.stdout
    assert {"hamming fraction", "sketch rel-L2"} <= {line.split("  ")[0] for line in lines}, result.stdout
    assert row("200,000"), result.stdout


def test_bench_wire_prints_both_dtypes_side_by_side():
    result = subprocess.run([sys.executable, "-m", "node", "bench", "wire", "--tiny", "--seeds", "0"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split()[:1] in (["float32"], ["bfloat16"]) and "MB" in line}
    assert set(rows) == {"float32", "bfloat16"}, result.stdout
    assert rows["float32"][2] == "1.0000" and float(rows["bfloat16"][2]) > 0, result.stdout  # the ratio to float32
    assert float(rows["bfloat16"][3]) * 2 == float(rows["float32"][3]), result.stdout  # MB per exchange: half


def test_bench_verify_calibrates_for_a_transformers_preset():
    result = subprocess.run(
        [sys.executable, "-m", "node", "bench", "verify", "--tiny", "--model", "llama-test", "--trials", "1",
         "--numel", "100000", "--repeats", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llama-test (transformers" in result.stdout
    assert "suggested tolerances" in result.stdout
