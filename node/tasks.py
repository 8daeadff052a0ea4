"""Small background-task helpers shared by the node and hub roles."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = [
    "BOOKKEEPING_INTERVAL_S",
    "Cadence",
    "drain",
    "every",
    "handle_concurrently",
    "unless_set",
    "wait_period",
]

T = TypeVar("T")

log = logging.getLogger("chapar.tasks")


# How often bookkeeping frames may go on one hub stream (evidence for a letter's sender,
# a recipient's receipts): their readers see them at most this much later.
BOOKKEEPING_INTERVAL_S = 0.05
# How often frames of letters may go on one hub stream (a node relaying its outbox, the hub
# delivering a queue) once one has gone: the first after a quiet spell goes at once, and at
# a few hundred letters a second the rest go a few a frame rather than one. Measured at an
# offered 1,000 letters/s, four alternating pairs: p99 submit-to-delivered 83-93 ms without,
# 67-82 ms with (BENCHMARKS.md, sixth round).
LETTER_INTERVAL_S = 0.005


class Cadence:
    """At most one send every ``interval_s``: the first after a quiet spell goes at once
    (or, with ``linger_s``, after gathering that long), a later one waits out the interval
    and then carries all that gathered meanwhile.

    For bookkeeping frames nobody waits on (evidence for a letter's sender, a recipient's
    receipts): at moderate rates they come in fewer, fuller frames, each frame a gRPC
    message, a store transaction and a signature check less at both ends; a lone letter's
    frame is not delayed, unless ``linger_s`` asks it to wait for company (a recipient's
    DELIVERY receipt for the HANDOVER of a back-end that reads at once).
    """

    def __init__(self, interval_s: float, wake: Callable[[], None], linger_s: float = 0.0) -> None:
        self.interval_s = interval_s
        self.linger_s = linger_s
        self._wake = wake
        self._next = 0.0
        self._waiting = False  # a frame is held until _next
        self._timer: asyncio.TimerHandle | None = None

    def ready(self) -> bool:
        """Whether a frame may go now; if not, ``wake`` is called when it may."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._waiting and now >= self._next:  # the first after a quiet spell
            if not self.linger_s:
                return True
            self._next = now + self.linger_s
        if now >= self._next:
            self._waiting = False
            return True
        self._waiting = True
        if self._timer is None:
            self._timer = loop.call_at(self._next, self._fire)
        return False

    def sent(self) -> None:
        """A frame went: the next one waits ``interval_s``."""
        self._next = asyncio.get_running_loop().time() + self.interval_s

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._wake()


async def wait_period(
    interval_s: float | Callable[[], float],
    changed: Callable[[], asyncio.Event] | None = None,
) -> None:
    """Waits one period of a repeating task. With ``changed``, ``interval_s`` is a callable
    (a reloadable configuration's value) and ``changed`` gives the event that is set when it
    may have changed (a reload): the wait under way is then measured again, from when it
    began, so a period lowered from an hour to a second ends it at once, not in an hour."""
    if not callable(interval_s):
        await asyncio.sleep(interval_s)
        return
    if changed is None:
        await asyncio.sleep(interval_s())
        return
    loop = asyncio.get_running_loop()
    began = loop.time()
    # interval_s() and changed() are read in one step: a change after it sets the event.
    while (left := began + interval_s() - loop.time()) > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed().wait(), left)


async def every(
    interval_s: float | Callable[[], float],
    action: Callable[[], Awaitable[int]],
    name: str,
    changed: Callable[[], asyncio.Event] | None = None,
) -> None:
    """Runs ``action`` every ``interval_s`` (a number, or a callable read each period, and
    with ``changed`` during it: ``wait_period``) until cancelled; a failure is logged, not
    fatal."""
    while True:
        await wait_period(interval_s, changed)
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


async def handle_concurrently(
    frames: AsyncIterable[T], handle: Callable[[T], Coroutine[Any, Any, None]], limit: int
) -> None:
    """Handles each frame of a stream in its own task, at most ``limit`` at once.

    Handlers start in arrival order, so whatever a handler hands to the store before its
    first wait (a group-commit job) is queued in arrival order; their commits then share
    transactions instead of waiting for each other's. The first handler to fail ends the
    whole stream with its exception (the others are cancelled).
    """
    slots = asyncio.Semaphore(limit)
    try:
        async with asyncio.TaskGroup() as group:
            async for frame in frames:
                await slots.acquire()
                task = group.create_task(handle(frame))
                task.add_done_callback(lambda _: slots.release())
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None


async def unless_set(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Runs ``work`` until it ends (True; its exception, if any, raised) or ``stop`` is set
    first (``work`` is then cancelled wherever it waits, a write to a slow reader included:
    False).

    For a call that a revocation must end now (a document transfer): the caller answers
    with the status the revocation gives, nothing more of ``work`` runs."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are cancelled ourselves, not only ``work``
    if task.cancelled():
        return False
    task.result()
    return True
