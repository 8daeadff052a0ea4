"""send_stream's feeds cut frames by body size as well as by count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from client_sdk.client import STREAM_FRAME_BYTES, Draft, _AsyncFeed, _Ready, _SyncFeed

THREE_MIB = 3 * 1024 * 1024


def _drafts(sizes: list[int]) -> list[_Ready]:
    """Drafts as the feeds take them: built, with the size of their whole request."""
    return [_Ready.of(Draft(to=["X"], subject=str(i), body=b"x" * n)) for i, n in enumerate(sizes)]


async def _frames(feed: _SyncFeed | _AsyncFeed) -> list[list[str]]:
    frames = []
    while batch := await feed.next_batch():
        frames.append([d.request.draft.subject for d in batch])
    await feed.aclose()
    return frames


async def test_sync_feed_frames_stop_at_the_byte_limit_and_keep_every_draft_in_order() -> None:
    drafts = _drafts([THREE_MIB] * 5 + [10, 10])
    frames = await _frames(_SyncFeed(drafts, 64))
    assert frames == [["0", "1"], ["2", "3"], ["4", "5", "6"]]
    assert 3 * THREE_MIB > STREAM_FRAME_BYTES >= 2 * THREE_MIB


async def test_async_feed_frames_stop_at_the_byte_limit_and_keep_every_draft_in_order() -> None:
    async def produce() -> AsyncIterator[_Ready]:
        for draft in _drafts([THREE_MIB] * 5 + [10, 10]):
            yield draft

    feed = _AsyncFeed(produce(), 64, 8)
    await asyncio.sleep(0.01)  # let the pump queue everything
    assert await _frames(feed) == [["0", "1"], ["2", "3"], ["4", "5", "6"]]


async def test_one_draft_over_the_limit_still_goes_alone_and_count_still_limits() -> None:
    assert await _frames(_SyncFeed(_drafts([3 * STREAM_FRAME_BYTES, 1]), 64)) == [["0"], ["1"]]
    assert await _frames(_SyncFeed(_drafts([1] * 5), 2)) == [["0", "1"], ["2", "3"], ["4"]]


async def _first_frame_of_a_trickle(linger_s: float) -> list[str]:
    async def trickle() -> AsyncIterator[_Ready]:
        for draft in _drafts([10] * 6):
            yield draft
            await asyncio.sleep(0.05)

    feed = _AsyncFeed(trickle(), 64, 8, linger_s)
    try:
        return [d.request.draft.subject for d in await feed.next_batch()]
    finally:
        await feed.aclose()


async def test_a_frame_that_is_not_full_lingers_once_for_more_drafts() -> None:
    # A draft every 50 ms: without a linger each goes alone; lingering 0.2 s, the first
    # frame takes those that came meanwhile (about four) and no more than came.
    assert await _first_frame_of_a_trickle(0.0) == ["0"]
    first = await _first_frame_of_a_trickle(0.2)
    assert 2 <= len(first) <= 6
    assert first == [str(i) for i in range(len(first))]


async def test_a_flood_and_the_end_of_the_drafts_never_linger() -> None:
    async def produce() -> AsyncIterator[_Ready]:
        for draft in _drafts([10] * 5):
            yield draft

    feed = _AsyncFeed(produce(), 2, 8, linger_s=30.0)
    await asyncio.sleep(0.01)  # let the pump queue everything, then the end marker
    # Full frames go at once, and the last (short) one has the end behind it: a linger
    # here would take 30 s and time the test out.
    frames = await asyncio.wait_for(_frames(feed), timeout=5)
    assert frames == [["0", "1"], ["2", "3"], ["4"]]


async def test_a_quiet_stream_never_lingers() -> None:
    # busy() is False when no earlier frame is unanswered: a draft then goes at once,
    # whatever the linger (30 s here would time the test out).
    async def trickle() -> AsyncIterator[_Ready]:
        for draft in _drafts([10] * 3):
            yield draft
            await asyncio.sleep(0.05)

    feed = _AsyncFeed(trickle(), 64, 8, linger_s=30.0, busy=lambda: False)
    try:
        first = await asyncio.wait_for(feed.next_batch(), timeout=5)
    finally:
        await feed.aclose()
    assert [d.request.draft.subject for d in first] == ["0"]


@pytest.mark.parametrize("ending", ["exhausted", "failed"])
async def test_a_lingering_frame_goes_as_soon_as_the_drafts_end(ending: str) -> None:
    # The producer ends (or fails) while a frame waits for more: nothing more can come, so
    # the frame goes then. It waited out the whole linger (30 s here would time the test
    # out): a blocking send_stream over a list, whose drafts reach the loop one thread hop
    # after another, sent its last frame a linger late.
    go = asyncio.Event()

    async def produce() -> AsyncIterator[_Ready]:
        yield _drafts([10])[0]
        await go.wait()
        if ending == "failed":
            raise RuntimeError("producer failed")

    feed = _AsyncFeed(produce(), 64, 8, linger_s=30.0, busy=lambda: True)
    try:
        lingering = asyncio.create_task(feed.next_batch())
        await asyncio.sleep(0.05)
        assert not lingering.done()  # the frame holds draft 0 and waits for more
        go.set()
        first = await asyncio.wait_for(lingering, timeout=5)
        assert [d.request.draft.subject for d in first] == ["0"]
        if ending == "failed":
            with pytest.raises(RuntimeError, match="producer failed"):
                await feed.next_batch()
        else:
            assert await feed.next_batch() == []
    finally:
        await feed.aclose()


@pytest.mark.parametrize("limit", ["count", "bytes"])
async def test_a_lingering_frame_goes_as_soon_as_it_fills(limit: str) -> None:
    # The frame waits for more and the producer then gives a whole frame's worth at once:
    # the frame is full, so it goes then, not at the linger's end (30 s here would time
    # the test out). It waited out the linger, so a stream faster than a frame a linger
    # (64 drafts a 20 ms: 3,200 a second) sent each frame a linger late.
    go = asyncio.Event()
    sizes = [10] * 5 if limit == "count" else [10] + [STREAM_FRAME_BYTES // 2] * 3

    async def produce() -> AsyncIterator[_Ready]:
        drafts = _drafts(sizes)
        yield drafts[0]
        await go.wait()
        for draft in drafts[1:]:
            yield draft
        await asyncio.Event().wait()  # then nothing more, and no end either

    feed = _AsyncFeed(produce(), 4, 8, linger_s=30.0, busy=lambda: True)
    try:
        lingering = asyncio.create_task(feed.next_batch())
        await asyncio.sleep(0.05)
        assert not lingering.done()  # the frame holds draft 0 and waits for more
        go.set()
        first = await asyncio.wait_for(lingering, timeout=5)
    finally:
        await feed.aclose()
    expected = ["0", "1", "2", "3"] if limit == "count" else ["0", "1"]
    assert [d.request.draft.subject for d in first] == expected
