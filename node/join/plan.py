"""Pure start-up decisions: resume, re-sync or start fresh; and which donors to ask, in what order.

Plain values in, plain values out (the daemon gathers the facts: its newest readable
checkpoint and the live view of the swarm), so the rules are tested without a network.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from enum import Enum


class StartMode(str, Enum):
    RESUME = "resumed"  # from this node's own checkpoint
    SYNC = "synced"  # φ, δ and round downloaded from a live donor
    FRESH = "fresh"  # the seeded initial weights (a new swarm)


def plan_start(checkpoint_round: int | None, live_rounds: Collection[int], resume_max_lag: int) -> StartMode:
    """How a starting node gets its weights.

    - A swarm that has not finished a round yet (no live peer past round 0) has nothing newer
      than the seeded initial weights every node builds itself: resume if we have a
      checkpoint, else start fresh. No download.
    - Otherwise a checkpoint at most `resume_max_lag` rounds behind the most advanced live
      peer is resumed (our own optimizer state and data position continue exactly); an
      older one, or none, means downloading the swarm's current state from a donor.
    """
    swarm_round = max(live_rounds, default=0)
    if swarm_round <= 0:
        return StartMode.RESUME if checkpoint_round is not None else StartMode.FRESH
    if checkpoint_round is not None and swarm_round - checkpoint_round <= resume_max_lag:
        return StartMode.RESUME
    return StartMode.SYNC


def donor_order(live: Mapping[str, int], max_staleness: int, rng: random.Random) -> list[str]:
    """Donors to try, in order: peers near the front of the swarm first, each group shuffled.

    The shuffle (seeded by the joiner's own id) spreads simultaneous joiners over
    different donors; a donor already serving its maximum of uploads refuses as busy
    and the joiner moves on, so no donor serves a queue. Peers still at round 0 have
    nothing to give and are left out.
    """
    candidates = {peer: round_ for peer, round_ in live.items() if round_ > 0}
    if not candidates:
        return []
    front = max(candidates.values())
    near = sorted(peer for peer, round_ in candidates.items() if front - round_ <= max_staleness)
    far = sorted(peer for peer in candidates if peer not in near)
    rng.shuffle(near)
    rng.shuffle(far)
    return near + far
