"""node.tasks.Cadence: bookkeeping frames at most once an interval; a lone one at once,
or after a short linger when asked."""

from __future__ import annotations

import asyncio

from node.tasks import Cadence


async def test_a_frame_after_a_quiet_spell_goes_at_once_and_the_next_waits_the_interval() -> None:
    loop = asyncio.get_running_loop()
    woken: list[float] = []
    cadence = Cadence(0.05, lambda: woken.append(loop.time()))
    assert cadence.ready()  # nothing sent yet: at once
    cadence.sent()
    sent_at = loop.time()
    assert not cadence.ready()  # too soon: a wake-up is arranged
    assert not cadence.ready()  # asking again arranges no second one
    await asyncio.sleep(0.1)
    assert len(woken) == 1
    assert woken[0] >= sent_at + 0.05
    assert cadence.ready()


async def test_closing_cancels_the_wake_up() -> None:
    woken: list[bool] = []
    cadence = Cadence(0.02, lambda: woken.append(True))
    cadence.sent()
    assert not cadence.ready()
    cadence.close()
    await asyncio.sleep(0.05)
    assert woken == []
    assert cadence.ready()  # the interval passed: the next frame may go


async def test_with_a_linger_the_first_frame_after_a_quiet_spell_gathers_first() -> None:
    loop = asyncio.get_running_loop()
    woken: list[float] = []
    cadence = Cadence(0.05, lambda: woken.append(loop.time()), linger_s=0.03)
    asked = loop.time()
    assert not cadence.ready()  # the first frame waits for company
    assert not cadence.ready()  # asking again during the linger: still no, one wake-up
    await asyncio.sleep(0.06)
    assert len(woken) == 1
    assert woken[0] >= asked + 0.03
    assert cadence.ready()  # the linger is over: the gathered frame goes
    cadence.sent()
    sent_at = loop.time()
    assert not cadence.ready()  # then the interval, as without a linger
    await asyncio.sleep(0.08)
    assert len(woken) == 2
    assert woken[1] >= sent_at + 0.05
    assert cadence.ready()  # a frame held through the interval goes when it ends
    cadence.sent()
    await asyncio.sleep(0.06)  # a quiet spell longer than the interval
    assert not cadence.ready()  # the next first frame gathers again
