"""Pure start-up decisions: resume, re-sync or start fresh; which donors to ask, in what order; whether a
downloaded state may be adopted.

Plain values in, plain values out (the daemon gathers the facts: its newest readable
checkpoint and the live view of the swarm), so the rules are tested without a network.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Mapping
from enum import Enum

from node.gossip.pairing import supported_round


class StartMode(str, Enum):
    RESUME = "resumed"  # from this node's own checkpoint
    SYNC = "synced"  # φ, δ and round downloaded from a live donor
    FRESH = "fresh"  # the seeded initial weights (a new swarm)


def plan_start(checkpoint_round: int | None, live_rounds: Collection[int], resume_max_lag: int) -> StartMode:
    """How a starting node gets its weights.

    - A swarm that has not finished a round yet (no live peer past round 0) has nothing newer
      than the seeded initial weights every node builds itself: resume if we have a
      checkpoint, else start fresh. No download.
    - Otherwise a checkpoint at most `resume_max_lag` rounds behind the swarm's front is
      resumed (our own optimizer state and data position continue exactly); an older one, or
      none, means downloading the swarm's current state from a donor. The front is the median
      of the live peers' rounds past 0, not the highest claim: each peer signs only its own
      presence, and one claiming a round far ahead must not decide how everyone else starts.
    """
    if max(live_rounds, default=0) <= 0:
        return StartMode.RESUME if checkpoint_round is not None else StartMode.FRESH
    swarm_round = supported_round(r for r in live_rounds if r > 0)
    if checkpoint_round is not None and swarm_round - checkpoint_round <= resume_max_lag:
        return StartMode.RESUME
    return StartMode.SYNC


def donor_order(live: Mapping[str, int], max_staleness: int, rng: random.Random) -> list[str]:
    """Donors to try, in order: peers near the swarm's front first, each group shuffled.

    The front is the median of the donors' rounds (pairing.supported_round), not the highest
    claim: a peer announcing a round far ahead of everyone (to be every joiner's first donor and
    hand out weights of its choosing) is tried last, after every peer within `max_staleness`
    rounds of the median.

    The shuffle (seeded by the joiner's own id) spreads simultaneous joiners over
    different donors; a donor already serving its maximum of uploads refuses as busy
    and the joiner moves on, so no donor serves a queue. Peers still at round 0 have
    nothing to give and are left out.
    """
    candidates = {peer: round_ for peer, round_ in live.items() if round_ > 0}
    if not candidates:
        return []
    front = supported_round(candidates.values())
    near = sorted(peer for peer, round_ in candidates.items() if abs(front - round_) <= max_staleness)
    far = sorted(peer for peer in candidates if peer not in near)
    rng.shuffle(near)
    rng.shuffle(far)
    return near + far


# A donor's state is adopted only if its held-out loss is at most this far above the median the live peers report
# (each signs its own presence, with the loss of its φ on the same held-out set): honest states differ by a few
# hundredths; a poisoned one (a random φ: loss ~ln(vocab) or far worse) by whole units.
STATE_LOSS_SLACK = 0.5
STATE_LOSS_SLACK_RATIO = 0.25


def state_problem(loss: float, reported: Iterable[float]) -> str | None:
    """Why a downloaded state must not be adopted (None: it may be): a held-out loss that is not finite, or above
    the median of the losses the live peers report by more than max(STATE_LOSS_SLACK, STATE_LOSS_SLACK_RATIO ×
    median). No finite report: nothing to judge by, so only finiteness is checked. Peers that lie about their
    loss move the median only if they are half the view."""
    if not math.isfinite(loss):
        return f"held-out loss {loss} is not finite"
    losses = sorted(x for x in reported if math.isfinite(x))
    if not losses:
        return None
    typical = losses[(len(losses) - 1) // 2]
    bound = typical + max(STATE_LOSS_SLACK, STATE_LOSS_SLACK_RATIO * abs(typical))
    if loss > bound:
        return f"held-out loss {loss:.3f} is far above the swarm's (median reported {typical:.3f}, bound {bound:.3f})"
    return None
