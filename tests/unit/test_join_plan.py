"""Start-up decisions: resume vs re-sync vs fresh, the donor order that spreads joiners, and whether a downloaded
state may be adopted."""

import math
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.join.plan import StartMode, donor_order, plan_start, state_problem
from node.verify.faults import parse_fault


def test_new_swarm_needs_no_download():
    assert plan_start(None, [], 8) is StartMode.FRESH
    assert plan_start(None, [0, 0], 8) is StartMode.FRESH
    assert plan_start(3, [], 8) is StartMode.RESUME  # alone: our own checkpoint is the best there is
    assert plan_start(3, [0], 8) is StartMode.RESUME


def test_recent_checkpoint_resumes_stale_one_resyncs():
    assert plan_start(10, [12, 18], 8) is StartMode.RESUME  # 8 behind the front: still pairable
    assert plan_start(10, [19], 8) is StartMode.SYNC
    assert plan_start(25, [19], 8) is StartMode.RESUME  # ahead of everyone live (they restarted)
    assert plan_start(None, [1], 8) is StartMode.SYNC
    assert plan_start(5, [6], 0) is StartMode.SYNC  # threshold 0: always take the swarm's state


def test_donor_order_prefers_the_front_and_skips_round_zero():
    live = {"a": 20, "b": 19, "c": 5, "d": 0}
    order = donor_order(live, max_staleness=8, rng=random.Random(1))
    assert set(order[:2]) == {"a", "b"} and order[2:] == ["c"]


def test_a_peer_claiming_a_round_far_ahead_is_nobodys_first_donor_and_does_not_force_a_sync():
    live = {"honest1": 40, "honest2": 41, "honest3": 39, "liar": 90}
    for seed in range(200):
        order = donor_order(live, 8, random.Random(seed))
        assert order[-1] == "liar" and set(order[:3]) == {"honest1", "honest2", "honest3"}
    assert plan_start(36, live.values(), 8) is StartMode.RESUME  # 5 behind the median front, not 54 behind 90
    assert plan_start(30, live.values(), 8) is StartMode.SYNC


def test_simultaneous_joiners_spread_over_donors():
    live = {f"donor{i}": 30 for i in range(4)}
    firsts = Counter(donor_order(live, 8, random.Random(seed))[0] for seed in range(400))
    assert set(firsts) == set(live) and max(firsts.values()) < 160  # ~100 each, none a hotspot


@given(st.dictionaries(st.text(min_size=1, max_size=4), st.integers(0, 100), max_size=8), st.integers(0, 10),
       st.integers(0, 2**32))
def test_donor_order_is_a_permutation_of_the_peers_with_state(live, staleness, seed):
    order = donor_order(live, staleness, random.Random(seed))
    assert sorted(order) == sorted(peer for peer, round_ in live.items() if round_ > 0)


# ----------------------------------------------------------------------------- vetting a downloaded state
def test_a_state_near_the_swarms_reported_loss_is_adopted():
    reported = [1.71, 1.74, 1.69, 1.80]
    assert state_problem(1.75, reported) is None
    assert state_problem(1.71 + 0.49, reported) is None  # within the absolute slack of 0.5
    assert state_problem(1.0, reported) is None  # better than the swarm: welcome


def test_a_poisoned_or_broken_state_is_refused():
    reported = [2.14, 2.10, 2.20]
    assert "far above" in state_problem(9.7, reported)  # the measured attack: a random φ
    assert "far above" in state_problem(2.14 + 0.6, reported)  # bound: 2.14 + max(0.5, 25% of 2.14)
    assert "not finite" in state_problem(math.nan, reported)
    assert "not finite" in state_problem(math.inf, [])


def test_the_bound_follows_the_median_so_a_lying_minority_cannot_raise_it():
    honest = [2.1, 2.2, 2.15]
    liars = [50.0, 60.0]  # sybils reporting huge losses so that a poisoned state looks normal
    assert state_problem(9.7, honest + liars) is not None
    assert state_problem(9.7, [math.nan, math.inf]) is None  # no finite report: nothing to judge by
    assert state_problem(24.0, [20.0, 21.0]) is None  # large losses: the relative slack (25%) applies


def test_a_poisoning_donor_serves_a_random_direction_ten_times_its_norm():
    fault = parse_fault("poison_state")
    assert fault.poisons_state and fault.strength == 10.0 and not parse_fault("sign_flip").poisons_state
    phi = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    poisoned = fault.poison(phi, seed=3)
    assert np.linalg.norm(poisoned) == pytest.approx(10 * np.linalg.norm(phi), rel=1e-5)
    assert abs(float(np.dot(poisoned, phi))) < 0.2 * float(np.linalg.norm(poisoned) * np.linalg.norm(phi))
    assert np.array_equal(fault.poison(phi, seed=3), poisoned)
