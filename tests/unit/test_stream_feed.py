"""send_stream's feeds cut frames by body size as well as by count."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from client_sdk.client import STREAM_FRAME_BYTES, Draft, _AsyncFeed, _SyncFeed

THREE_MIB = 3 * 1024 * 1024


def _drafts(sizes: list[int]) -> list[Draft]:
    return [Draft(to=["X"], subject=str(i), body=b"x" * n) for i, n in enumerate(sizes)]


async def _frames(feed: _SyncFeed | _AsyncFeed) -> list[list[str]]:
    frames = []
    while batch := await feed.next_batch():
        frames.append([d.subject for d in batch])
    await feed.aclose()
    return frames


async def test_sync_feed_frames_stop_at_the_byte_limit_and_keep_every_draft_in_order() -> None:
    drafts = _drafts([THREE_MIB] * 5 + [10, 10])
    frames = await _frames(_SyncFeed(drafts, 64))
    assert frames == [["0", "1"], ["2", "3"], ["4", "5", "6"]]
    assert 3 * THREE_MIB > STREAM_FRAME_BYTES >= 2 * THREE_MIB


async def test_async_feed_frames_stop_at_the_byte_limit_and_keep_every_draft_in_order() -> None:
    async def produce() -> AsyncIterator[Draft]:
        for draft in _drafts([THREE_MIB] * 5 + [10, 10]):
            yield draft

    feed = _AsyncFeed(produce(), 64, 8)
    await asyncio.sleep(0.01)  # let the pump queue everything
    assert await _frames(feed) == [["0", "1"], ["2", "3"], ["4", "5", "6"]]


async def test_one_draft_over_the_limit_still_goes_alone_and_count_still_limits() -> None:
    assert await _frames(_SyncFeed(_drafts([3 * STREAM_FRAME_BYTES, 1]), 64)) == [["0"], ["1"]]
    assert await _frames(_SyncFeed(_drafts([1] * 5), 2)) == [["0", "1"], ["2", "3"], ["4"]]
