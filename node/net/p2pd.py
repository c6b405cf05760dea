"""Starting hivemind's bundled libp2p daemon (p2pd) without ever leaking it.

hivemind's `P2P.create` spawns p2pd, then waits for it; cancelled during that wait (a stop
signal, an outer timeout) it leaves the daemon running with nobody to stop it. `start_p2p`
lets the start-up finish in a task of its own and, if the caller gave up meanwhile, waits
(bounded) for it and shuts the daemon down.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from hivemind.p2p import P2P

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0


async def start_p2p(timeout: float, **kwargs: Any) -> P2P:
    """P2P.create(**kwargs), bounded by `timeout` (TimeoutError after it); cancellable without a leak."""
    starting = asyncio.ensure_future(P2P.create(startup_timeout=timeout, **kwargs))
    try:
        # hivemind gives up by itself after startup_timeout; the extra second is for its own clean-up
        return await asyncio.wait_for(asyncio.shield(starting), timeout + 1)
    except BaseException:  # timed out, failed, or cancelled: whatever started must stop
        await _discard(starting, timeout)
        raise


async def _discard(starting: asyncio.Future, timeout: float) -> None:
    try:
        p2p = await asyncio.wait_for(starting, timeout)
    except Exception as error:  # noqa: BLE001 - it failed by itself: hivemind stopped what it had started
        logger.debug("abandoned p2pd start-up ended with %s", error or type(error).__name__)
        return
    try:
        await asyncio.wait_for(p2p.shutdown(), SHUTDOWN_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - the caller's own error matters more; say this one too
        logger.warning("could not stop an abandoned p2pd: %s", error or type(error).__name__)
