"""Pure pairing decisions: whom to ask, whether to accept. Plain values in, plain values out.

The gossip loop (node/gossip/exchange.py) gathers the facts and acts on these answers; keeping
the decisions here lets the rules (staleness, one exchange at a time, the crossing
request tie-break) be tested exhaustively without a network.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from protocol.records import MAX_ROUND


def choose_partner(
    ready: Mapping[str, int], my_round: int, exclude: Collection[str], max_staleness: int, rng: random.Random
) -> str | None:
    """A uniformly random ready peer within max_staleness rounds, not yet tried this round."""
    candidates = sorted(
        peer for peer, their_round in ready.items()
        if peer not in exclude and abs(their_round - my_round) <= max_staleness
    )
    return rng.choice(candidates) if candidates else None


def partner_to_avoid(last_partner: str | None, live: Mapping[str, int], my_round: int, exclude: Collection[str],
                     max_staleness: int) -> str | None:
    """The peer not to pair with now: our last partner, while another live peer within max_staleness rounds
    (not excluded) could pair with us instead. The caller asks this only early in a round's search
    (`prefer_new_for`). Without it, two nodes whose boundaries fall together pair with each other round after
    round, and a node out of phase with them (its boundary a few seconds later) finds both busy every time:
    measured on a 20 Mbit/s WAN, 0 of 9 rounds paired for that node while the other two paired 8 of 9 with
    each other. Random pairing wants the partners mixed, not a fixed couple and a loner."""
    if last_partner is None:
        return None
    others = any(peer != last_partner and peer not in exclude and abs(their_round - my_round) <= max_staleness
                 for peer, their_round in live.items())
    return last_partner if others else None


def prefer_new_seconds(search_seconds: float, round_seconds: float) -> float:
    """How long a round's search avoids the last partner: half the search, and at most half the last round's
    compute (a node a few seconds out of phase arrives within that; tiny rounds wait only a moment)."""
    return max(0.0, min(0.5 * search_seconds, 0.5 * round_seconds))


def could_pair(live_rounds: Iterable[int], my_round: int, max_staleness: int) -> bool:
    """Is any live peer within max_staleness rounds? (Rounds only move forward on pairing, so a peer
    further away, ahead or behind, cannot become a partner within one deadline.)"""
    return any(abs(their_round - my_round) <= max_staleness for their_round in live_rounds)


def catch_up_step(max_staleness: int) -> int:
    """The most rounds a node's clock may jump at one round boundary."""
    return max(64, 16 * max_staleness)


def supported_round(live_rounds: Iterable[int]) -> int | None:
    """The (lower) median of the live peers' known rounds: at least half of them are at or past it, so peers
    that lie about their round (each signs only its own presence) cannot move it unless they are half the view."""
    rounds = sorted(r for r in live_rounds if 0 <= r <= MAX_ROUND)
    return rounds[(len(rounds) - 1) // 2] if rounds else None


def clock_catch_up(live_rounds: Iterable[int], my_round: int, max_staleness: int,
                   max_step: int | None = None) -> int | None:
    """The round to jump to when no live peer is within the staleness window, else None.

    Rounds only advance by this node's own work and by pairing, so a node that was frozen,
    slow or offline for a while would never be within anyone's window again. It jumps its
    clock (not its weights) towards the nearest peer ahead; its next exchanges then pull its
    weights to the swarm's. Peers that are only behind will catch up with us instead.

    Only as far as the live view supports: not at all unless the median live round is ahead of
    ours (one peer claiming round 2**63 - 1 moves nobody), and by at most `max_step` rounds
    (default `catch_up_step`) per round boundary, so even a lying majority moves the clock slowly.
    """
    rounds = [r for r in live_rounds if 0 <= r <= MAX_ROUND]
    if any(abs(r - my_round) <= max_staleness for r in rounds):
        return None
    median = supported_round(rounds)
    if median is None or median <= my_round:
        return None
    step = catch_up_step(max_staleness) if max_step is None else max_step
    target = min(min(r for r in rounds if r > my_round), my_round + step, MAX_ROUND - 1)
    return target if target > my_round else None


def crossing_request_wins(requester: str, me: str) -> bool:
    """Two nodes asking each other at once: the lower peer id's request wins, on both sides."""
    return requester < me


@dataclass(frozen=True)
class PairingState:
    me: str
    round: int | None  # None while training: not at a round boundary
    paired: bool  # this round already has its exchange
    in_exchange: bool  # an accepted exchange (either direction) is running
    requesting: str | None  # our own request in flight, to this peer
    deadline_passed: bool
    stopping: bool
    avoiding: str | None = None  # our last partner, avoided early in this round's search (partner_to_avoid)


def refusal_reason(
    state: PairingState, requester: str, request_round: int, same_manifest: bool, max_staleness: int
) -> str | None:
    """Why an incoming pairing request is refused (an ExchangeReject reason), or None to accept it."""
    if state.stopping:
        return "shutting_down"
    if not same_manifest:
        return "manifest"
    if state.round is None or state.paired or state.deadline_passed or requester == state.avoiding:
        return "not_ready"
    if abs(request_round - state.round) > max_staleness:
        return "stale"
    if state.in_exchange:
        return "busy"
    if state.requesting is not None:
        if state.requesting != requester or not crossing_request_wins(requester, state.me):
            return "busy"
    return None
