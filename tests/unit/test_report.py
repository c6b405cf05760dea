"""`gossiptrain report`: loading history.jsonl (malformed, truncated, restarted), finding the files, the PNG it draws
and the CLI verb. Histories are synthetic: 3 nodes, 30 rounds; node1's last line is cut mid-write; node2 restarts
half-way with a new peer id (its counters start again at 0)."""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import report as cli_report
from node.ops.report import (
    MISSING_MATPLOTLIB,
    ReportError,
    find_histories,
    load_history,
    natural_key,
    network_rates,
    render,
    segments,
    summary,
)

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 30
T0 = 1_795_300_000.0


def png_dims(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header: the 8-byte signature, then the IHDR chunk (length, type, w, h)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def node_records(index: int, rounds: int = ROUNDS, restart_at: int | None = None) -> list[dict]:
    """One node's history: a start-up line and one line per round; a restart begins a new process (new peer id,
    counters from 0, rounds_done from the checkpoint) after a gap."""
    rng = random.Random(index)
    records, t, peer = [], T0 + 3.0 * index, f"12D3KooWnode{index}aaaa{index:04d}"
    ex = dict.fromkeys(("ok", "rejected", "timeout", "peer_gone", "protocol_error", "aborted", "no_partner"), 0)
    sent = received = 0
    rounds_done = 0
    for rnd in range(rounds + 1):
        if restart_at is not None and rnd == restart_at:
            t += 25.0
            peer = f"12D3KooWnode{index}bbbb{index:04d}"
            ex = dict.fromkeys(ex, 0)
            sent = received = 0
            rounds_done -= 2  # resumed from a checkpoint two rounds back
            records.append(record(t, peer, rnd + 2 * index - 2, rounds_done, None, 3.95 * math.exp(-rnd / 9) + 1.6, None,
                                  None, None, None, ex, sent, received))
        partner = distance = None
        if rnd > 0:
            rounds_done += 1
            t += 2.0 + rng.random()
            if rng.random() < 0.85:
                partner, distance = f"12D3KooWnode{(index + 1) % 3}", 0.9 * math.exp(-rnd / 15) + 0.05 * rng.random()
                if rng.random() < 0.1:
                    ex["timeout"] += 1
                else:
                    ex["ok"] += 1
                    sent += 2_000_000 + rng.randrange(10_000)
                    received += 2_000_000 + rng.randrange(10_000)
            else:
                ex["no_partner"] += 1
        loss = 3.95 * math.exp(-rnd / 9) + 1.6
        records.append(record(
            t, peer, rnd + 2 * index, rounds_done, None if rnd == 0 else loss + 0.05 * rng.random(),
            loss + 0.02 * rng.random(), None if rnd == 0 else 24_000 + 800 * rng.random(), partner, distance,
            None if rnd == 0 else rng.random(), ex, sent, received))
    return records


def record(t, peer, rnd, done, train, evl, tps, partner, distance, wait, ex, sent, received) -> dict:
    return {"time": round(t, 3), "peer_id": peer, "round": rnd, "rounds_done": done, "train_loss": train,
            "eval_loss": evl, "tokens_per_second": tps, "partner": partner, "partner_distance": distance,
            "wait_seconds": wait, "exchanges": dict(ex), "bytes_sent": sent, "bytes_received": received,
            "utilisation": None if tps is None else round(tps / 30_000, 4)}


@pytest.fixture
def swarm_dir(tmp_path: Path) -> Path:
    """runs/swarm-like: node0 clean (plus a blank line), node1 with a truncated last line, node2 restarted."""
    base = tmp_path / "swarm"
    for index in range(3):
        (base / f"node{index}").mkdir(parents=True)
        (base / f"node{index}" / "node.log").write_text("not a history\n")
    lines0 = [json.dumps(r) for r in node_records(0)]
    (base / "node0" / "history.jsonl").write_text("\n".join(lines0[:5] + [""] + lines0[5:]) + "\n")
    lines1 = [json.dumps(r) for r in node_records(1)]
    (base / "node1" / "history.jsonl").write_text("\n".join(lines1) + "\n" + json.dumps(node_records(1)[-1])[:37])
    (base / "node2" / "history.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in node_records(2, restart_at=15)))
    (base / "notes").mkdir()  # a subdir without a history is ignored
    return base


# ---------------------------------------------------------------------------------------------------- loading
def test_load_counts_and_skips_blank_and_truncated_lines(swarm_dir: Path):
    clean = load_history(swarm_dir / "node0" / "history.jsonl")
    assert (len(clean), clean.skipped, clean.blank) == (ROUNDS + 1, 0, 1)
    cut = load_history(swarm_dir / "node1" / "history.jsonl")
    assert (len(cut), cut.skipped) == (ROUNDS + 1, 1)
    assert "line 32" in cut.problems[0] and "JSON" in cut.problems[0]
    restarted = load_history(swarm_dir / "node2" / "history.jsonl")
    assert (len(restarted), restarted.skipped) == (ROUNDS + 2, 0)
    assert len({r["peer_id"] for r in restarted}) == 2
    assert [len(part) for part in segments(restarted)] == [15, 17]


def test_load_validates_types_and_normalises(tmp_path: Path):
    good = record(T0, "12D3KooWx", 3, 2, float("nan"), 2.5, None, None, None, 0.1, {"ok": 2}, 10, 20)
    bad_lines = [
        json.dumps({**good, "round": "3"}),  # wrong type
        json.dumps({**good, "round": True}),  # a bool is not a round
        json.dumps({**good, "eval_loss": "low"}),
        json.dumps({k: v for k, v in good.items() if k != "peer_id"}),  # missing field
        json.dumps({**good, "exchanges": {"ok": 1.5}}),
        json.dumps([1, 2, 3]),  # not an object
        "garbage {",
    ]
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join([json.dumps(good)] + bad_lines + ["   ", json.dumps({**good, "future_field": 1})]) + "\n")
    history = load_history(path)
    assert (len(history), history.skipped, history.blank) == (2, len(bad_lines), 1)
    first = history[0]
    assert first["train_loss"] is None  # NaN (json.dumps of an unknown loss) reads as unknown
    assert first["exchanges"]["ok"] == 2 and first["exchanges"]["timeout"] == 0  # every result present
    assert history[1]["future_field"] == 1  # unknown fields survive
    assert any("round must be an integer" in p for p in history.problems)


def test_load_missing_file_raises_report_error(tmp_path: Path):
    with pytest.raises(ReportError, match="no history found"):
        load_history(tmp_path / "nope" / "history.jsonl")
    assert issubclass(ReportError, ValueError)


# ---------------------------------------------------------------------------------------------------- finding
def test_find_histories_swarm_dir_node_dir_and_file(swarm_dir: Path):
    found = find_histories([swarm_dir])
    assert list(found) == ["node0", "node1", "node2"]
    assert found["node1"] == swarm_dir / "node1" / "history.jsonl"
    assert find_histories([swarm_dir / "node2"]) == {"node2": swarm_dir / "node2" / "history.jsonl"}
    assert find_histories([swarm_dir / "node1" / "history.jsonl"]) == {
        "node1": swarm_dir / "node1" / "history.jsonl"}
    # several paths, the same file twice, natural order
    both = find_histories([swarm_dir / "node2", swarm_dir / "node0", swarm_dir / "node2" / "history.jsonl"])
    assert list(both) == ["node0", "node2"]


def test_find_histories_sorts_naturally_and_keeps_same_names_apart(tmp_path: Path):
    for name in ("node10", "node2", "node0", "node1"):
        (tmp_path / "a" / name).mkdir(parents=True)
        (tmp_path / "a" / name / "history.jsonl").write_text("")
    assert list(find_histories([tmp_path / "a"])) == ["node0", "node1", "node2", "node10"]
    assert sorted(["node10", "node9", "Node1"], key=natural_key) == ["Node1", "node9", "node10"]
    (tmp_path / "b" / "node0").mkdir(parents=True)
    (tmp_path / "b" / "node0" / "history.jsonl").write_text("")
    labels = list(find_histories([tmp_path / "a" / "node0", tmp_path / "b" / "node0"]))
    assert labels == ["b/node0", "node0"]


def test_find_histories_errors(tmp_path: Path):
    with pytest.raises(ReportError, match="does not exist"):
        find_histories([tmp_path / "missing"])
    (tmp_path / "empty" / "node0").mkdir(parents=True)
    with pytest.raises(ReportError, match="no history found"):
        find_histories([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------------- summary
def test_summary_rows_survive_a_restart(swarm_dir: Path):
    histories = {label: load_history(path) for label, path in find_histories([swarm_dir]).items()}
    rows = {row["node"]: row for row in summary(histories)}
    plain, restarted = node_records(0), node_records(2, restart_at=15)
    assert rows["node0"]["ex ok"] == plain[-1]["exchanges"]["ok"]
    assert rows["node0"]["util"] == plain[-1]["utilisation"] > 0  # the last recorded share of wall time training
    assert rows["node0"]["rounds"] == ROUNDS and rows["node0"]["restarts"] == 0
    # counters restart at 0 in the new process: the node's total is the sum of both lifetimes
    first_life = next(r for r in reversed(restarted) if r["peer_id"] == restarted[0]["peer_id"])
    assert rows["node2"]["ex ok"] == first_life["exchanges"]["ok"] + restarted[-1]["exchanges"]["ok"]
    assert rows["node2"]["ex failed"] == first_life["exchanges"]["timeout"] + restarted[-1]["exchanges"]["timeout"]
    assert rows["node2"]["restarts"] == 1 and rows["node2"]["rounds"] == ROUNDS
    assert rows["node2"]["peer"] == restarted[-1]["peer_id"][-8:]
    assert rows["node1"]["skipped"] == 1
    assert rows["node0"]["eval first"] > 5 and rows["node0"]["eval last"] < 2


def test_network_rates_drop_the_diff_across_a_restart():
    records = node_records(2, restart_at=15)
    rates = network_rates(segments(records))
    assert len(rates) == ROUNDS  # 32 records in two lifetimes of 15 and 17: 14 + 16 diffs, none across the restart
    assert all(rate >= 0 for _, rate in rates)
    assert max(rate for _, rate in rates) <= 4_020_000 / 2.0  # at most one exchange's bytes per >= 2 s round


# ---------------------------------------------------------------------------------------------------- rendering
def test_render_exact_size_and_not_blank(swarm_dir: Path, tmp_path: Path):
    import matplotlib  # noqa: F401 - a test dependency: these tests must run, not skip
    from matplotlib.image import imread

    histories = {label: load_history(path) for label, path in find_histories([swarm_dir]).items()}
    out = render(histories, tmp_path / "out" / "report.png", title="test run")
    assert out == tmp_path / "out" / "report.png"
    assert png_dims(out) == (1600, 1000)
    assert out.stat().st_size > 40_000
    pixels = imread(out)
    assert pixels.shape[:2] == (1000, 1600)
    assert pixels[..., :3].std() > 0.05
    colours = {tuple(p) for p in (pixels[..., :3].reshape(-1, 3) * 255).round().astype(int).tolist()}
    assert len(colours) > 500
    assert not list((tmp_path / "out").glob(".*.tmp"))  # the temporary file was renamed


@pytest.mark.parametrize("size", [(800, 600), (1201, 777)])
def test_render_other_sizes(swarm_dir: Path, tmp_path: Path, size):
    import matplotlib  # noqa: F401 - a test dependency: these tests must run, not skip
    histories = {label: load_history(path) for label, path in find_histories([swarm_dir]).items()}
    assert png_dims(render(histories, tmp_path / "r.png", *size)) == size


def test_render_refuses_nothing_to_plot_and_bad_sizes(tmp_path: Path):
    with pytest.raises(ReportError, match="no history records"):
        render({"node0": []}, tmp_path / "r.png")
    with pytest.raises(ReportError, match="out of range"):
        render({"node0": node_records(0, rounds=3)}, tmp_path / "r.png", 10, 10)


def test_importable_without_matplotlib(tmp_path: Path):
    """The module and the CLI import without matplotlib; render then says how to install it."""
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import node.ops.report, node.cli.report\n"
        "r = [{'time': 1.0, 'peer_id': 'p', 'round': 0, 'rounds_done': 0, 'exchanges': {}}]\n"
        "try:\n"
        f"    node.ops.report.render({{'n': [node.ops.report.validate_record(x) for x in r]}}, {str(tmp_path / 'r.png')!r})\n"
        "except node.ops.report.ReportError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == MISSING_MATPLOTLIB


# ---------------------------------------------------------------------------------------------------- CLI
def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gossiptrain")
    cli_report.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["report", *argv])


def test_cli_defaults():
    args = cli_args()
    assert (args.paths, args.out, args.size, args.title) == (["runs/swarm"], None, "1600x1000", None)
    assert args.handler is cli_report.main


def test_cli_writes_the_png_next_to_the_histories(swarm_dir: Path, capsys):
    import matplotlib  # noqa: F401 - a test dependency: these tests must run, not skip
    assert cli_report.main(cli_args(str(swarm_dir))) == 0
    out = swarm_dir / "report.png"
    assert png_dims(out) == (1600, 1000)
    printed = capsys.readouterr()
    assert f"wrote {out} (1600x1000, " in printed.out
    header, *rows = printed.out.splitlines()[:4]
    assert header.split()[:3] == ["node", "peer", "records"]
    assert [row.split()[0] for row in rows] == ["node0", "node1", "node2"]
    assert "node1: skipped 1" in printed.err


def test_cli_size_title_and_file_path(swarm_dir: Path, tmp_path: Path, capsys):
    import matplotlib  # noqa: F401 - a test dependency: these tests must run, not skip
    history = swarm_dir / "node0" / "history.jsonl"
    assert cli_report.main(cli_args(str(history), "--size", "900x700", "--title", "one node")) == 0
    assert png_dims(swarm_dir / "node0" / "report.png") == (900, 700)
    out = tmp_path / "elsewhere" / "r.png"
    args = argparse.Namespace(paths=[str(swarm_dir / "node2")], out=str(out), size="1000x640", title=None)
    assert cli_report.main(args) == 0
    assert png_dims(out) == (1000, 640)
    assert "(1000x640, " in capsys.readouterr().out


def test_cli_returns_2_with_a_clear_message(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_report.main(cli_args(str(tmp_path / "empty"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("gossiptrain report: error: no history found")
    assert cli_report.main(cli_args(str(tmp_path / "missing"))) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "fresh" / "node0").mkdir(parents=True)
    (tmp_path / "fresh" / "node0" / "history.jsonl").write_text("")  # started, nothing recorded yet
    assert cli_report.main(cli_args(str(tmp_path / "fresh"))) == 2
    assert "no history records yet" in capsys.readouterr().err
    assert cli_report.main(cli_args(str(tmp_path / "fresh"), "--size", "big")) == 2
    assert "1600x1000" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))
