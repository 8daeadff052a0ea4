"""Small background-task helpers shared by the node and hub roles."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["drain", "every"]

log = logging.getLogger("chapar.tasks")


async def every(interval_s: float, action: Callable[[], Awaitable[int]], name: str) -> None:
    """Runs ``action`` every ``interval_s`` until cancelled; a failure is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await action()
        except Exception:
            log.exception("periodic %s failed", name)


async def drain(step: Callable[[], Awaitable[int]]) -> int:
    """Calls ``step`` (which does a bounded amount of work) until it reports none; the total."""
    total = 0
    while (n := await step()) > 0:
        total += n
    return total
