"""Start-up decisions: resume vs re-sync vs fresh, and the donor order that spreads joiners."""

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from node.join.plan import StartMode, donor_order, plan_start


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
