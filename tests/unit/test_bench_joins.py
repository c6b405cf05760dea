"""`gossiptrain bench joins`: the join vetting replayed on run histories (node/bench/joins.py)."""

import json

from node.bench import joins


def write_run(tmp_path, series: dict[str, list[tuple[float, int, float]]]):
    for node, points in series.items():
        (tmp_path / node).mkdir()
        lines = [json.dumps({"time": t, "round": r, "eval_loss": loss}) for t, r, loss in points]
        (tmp_path / node / "history.jsonl").write_text("\n".join(lines + ["{cut"]) + "\n")  # a torn last line
    return joins.histories(tmp_path)


def test_a_donor_far_behind_the_swarms_loss_is_refused_and_a_join_fails_only_if_every_donor_is(tmp_path):
    run = write_run(tmp_path, {
        "node0": [(1.0, 1, 3.0), (2.0, 2, 2.0)],
        "node1": [(1.0, 1, 3.0), (2.5, 2, 2.0)],
        "node2": [(1.0, 0, 5.5), (1.5, 1, 3.9)],  # round 0 is never a donor; then 3.9 against a median of 3.0
    })
    judged, refused, moments, failed, margin = joins.judge(run, max_staleness=8)
    assert refused == 1 and judged == 5  # node2's round 1 (3.9 > 3.0 + 0.75); node0 and node1 twice each
    assert failed == 0 and moments == 4  # node0 and node1 were acceptable at every moment
    assert margin < 0


def test_a_join_fails_when_every_donor_it_would_ask_is_refused(tmp_path):
    run = write_run(tmp_path, {
        "a": [(1.0, 0, 2.0)], "b": [(1.0, 0, 2.0)], "c": [(1.0, 0, 2.0)],  # still at round 0: no donors
        "d": [(2.0, 3, 9.0)],  # the only donor, far above the median of 2.0
    })
    judged, refused, moments, failed, _ = joins.judge(run, max_staleness=8)
    assert (judged, refused, moments, failed) == (1, 1, 1, 1)
