"""Pairing rules: staleness, one exchange at a time, and the crossing-request tie-break."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.gossip.pairing import (
    PairingState,
    choose_partner,
    clock_catch_up,
    could_pair,
    partner_to_avoid,
    prefer_new_seconds,
    refusal_reason,
)

peer_ids = st.text(alphabet="123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", min_size=4, max_size=12)


def waiting(me: str, round_: int = 5, **changes) -> PairingState:
    state = dict(me=me, round=round_, paired=False, in_exchange=False, requesting=None,
                 deadline_passed=False, stopping=False)
    state.update(changes)
    return PairingState(**state)


@given(peer_ids, peer_ids)
def test_crossing_requests_exactly_one_wins(a, b):
    if a == b:
        return
    a_accepts_b = refusal_reason(waiting(a, requesting=b), b, 5, True, 2) is None
    b_accepts_a = refusal_reason(waiting(b, requesting=a), a, 5, True, 2) is None
    assert a_accepts_b != b_accepts_a


def test_waiting_node_accepts_a_fresh_request():
    assert refusal_reason(waiting("B"), "A", 6, True, 2) is None


@pytest.mark.parametrize(
    "changes, request_round, same_manifest, reason",
    [
        ({"stopping": True}, 5, True, "shutting_down"),
        ({}, 5, False, "manifest"),
        ({"round": None}, 5, True, "not_ready"),
        ({"paired": True}, 5, True, "not_ready"),
        ({"deadline_passed": True}, 5, True, "not_ready"),
        ({}, 8, True, "stale"),
        ({"in_exchange": True}, 5, True, "busy"),
        ({"requesting": "C"}, 5, True, "busy"),  # asking someone else: one exchange at a time
        ({"avoiding": "A"}, 5, True, "not_ready"),  # our last partner, early in the search, another peer around
    ],
)
def test_refusals(changes, request_round, same_manifest, reason):
    assert refusal_reason(waiting("B", **changes), "A", request_round, same_manifest, 2) == reason


def test_choose_partner_respects_staleness_and_exclusions():
    rng = random.Random(0)
    ready = {"A": 5, "B": 9, "C": 4, "D": 6}
    picks = {choose_partner(ready, 5, {"D"}, 2, rng) for _ in range(200)}
    assert picks == {"A", "C"}
    assert choose_partner(ready, 20, set(), 2, rng) is None


def test_choose_partner_is_uniform():
    rng = random.Random(1)
    ready = {p: 0 for p in "ABCD"}
    counts = {p: 0 for p in ready}
    for _ in range(4000):
        counts[choose_partner(ready, 0, (), 1, rng)] += 1
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_could_pair_only_when_someone_is_not_too_far_ahead():
    assert not could_pair([], 3, 2)
    assert not could_pair([9, 12], 3, 2)
    assert could_pair([9, 5], 3, 2)
    assert not could_pair([0], 30, 2)  # far behind: it cannot catch up within one deadline
    assert could_pair([29], 30, 2)


def test_a_node_left_behind_catches_its_clock_up_to_the_nearest_peer_ahead():
    assert clock_catch_up([40, 35, 52], 10, 8) == 35
    assert clock_catch_up([40, 15], 10, 8) is None  # someone is still within reach
    assert clock_catch_up([], 10, 8) is None  # alone: nothing to catch up with
    assert clock_catch_up([3, 1], 30, 8) is None  # ahead of everyone: they catch up with us
    assert clock_catch_up([3, 60, 90], 30, 8) == 60  # between a laggard and the leaders: join the leaders


def test_the_last_partner_is_avoided_only_while_another_peer_could_pair():
    live = {"A": 5, "B": 5, "C": 30}
    assert partner_to_avoid("A", live, 5, set(), 2) == "A"  # B could pair instead
    assert partner_to_avoid("A", live, 5, {"B"}, 2) is None  # B is flagged: A is the only one
    assert partner_to_avoid("A", {"A": 5, "C": 30}, 5, set(), 2) is None  # C is out of the staleness window
    assert partner_to_avoid(None, live, 5, set(), 2) is None
    assert refusal_reason(waiting("B", avoiding="A"), "C", 5, True, 2) is None  # anyone else is accepted


def test_three_nodes_in_two_phases_all_pair_when_the_last_partner_is_avoided():
    """Nodes 1 and 2 reach their boundaries together, node 0 a few seconds later; an exchange outlasts that
    gap. Each round the first ready pair forms (a requester picks uniformly among the ready peers it does not
    avoid). Without avoidance 1 and 2 pair every round and 0 never; with it every node pairs in most rounds."""
    def simulate(avoid: bool, rounds: int = 30) -> dict[str, int]:
        rng, last, paired = random.Random(3), {}, {"0": 0, "1": 0, "2": 0}
        for _ in range(rounds):
            free = ["1", "2"]  # ready first
            taken = set()
            for arriving in (None, "0"):  # then node 0 arrives while the other two still search
                if arriving:
                    free.append(arriving)
                for me in list(free):
                    if me in taken:
                        continue
                    avoid_me = partner_to_avoid(last.get(me), {p: 5 for p in "012" if p != me}, 5, set(), 2) if avoid else None
                    options = [p for p in free if p not in taken and p != me and p != avoid_me
                               and not (avoid and partner_to_avoid(last.get(p), {q: 5 for q in "012" if q != p},
                                                                   5, set(), 2) == me)]
                    if options:
                        other = rng.choice(options)
                        taken |= {me, other}
                        last[me], last[other] = other, me
                        paired[me] += 1
                        paired[other] += 1
        return paired

    assert simulate(avoid=False)["0"] == 0
    with_avoidance = simulate(avoid=True)
    assert min(with_avoidance.values()) >= 15, with_avoidance  # every node paired in at least half the rounds
    assert prefer_new_seconds(17.0, 20.0) == 8.5 and prefer_new_seconds(10.0, 0.3) == 0.15
