"""The node's stream handlers answer frames in order, eight at most waiting ahead, and end
promptly however the stream ends: a half-close, a stopping node, a caller gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from node.agency import _answer_in_order

AHEAD = 8  # frames handled ahead of the answer being written


class _Context:
    def __init__(self) -> None:
        self.written: list[int] = []
        self.fail_writes = False

    async def write(self, message: int) -> None:
        if self.fail_writes:
            raise ConnectionError("the caller is gone")
        self.written.append(message)


async def _frames(
    count: int, read: list[int], more: asyncio.Event | None = None
) -> AsyncIterator[int]:
    for n in range(count):
        read.append(n)
        yield n
    if more is not None:  # a caller that keeps its stream open
        await more.wait()


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_frames_are_answered_in_order() -> None:
    context = _Context()
    read: list[int] = []

    async def handle(n: int) -> int:
        await asyncio.sleep(0.001 * (n % 3))  # they finish out of order
        return n * 10

    await asyncio.wait_for(
        _answer_in_order(_frames(20, read), handle, lambda r: r, context, asyncio.Event()),  # type: ignore[arg-type]
        5,
    )
    assert context.written == [n * 10 for n in range(20)]


async def test_a_half_close_with_every_place_taken_ends_when_the_node_stops() -> None:
    # The caller sends one frame more than fit ahead and half-closes; the node stops while
    # the reader waits to say "no more". The frames read are answered and the stream ends,
    # at once, not when the grace period runs out.
    context = _Context()
    closing = asyncio.Event()
    gate = asyncio.Event()
    read: list[int] = []

    async def handle(n: int) -> int:
        await gate.wait()
        return n

    answering = asyncio.create_task(
        _answer_in_order(_frames(AHEAD + 1, read), handle, lambda r: r, context, closing)  # type: ignore[arg-type]
    )
    await _settle()
    assert len(read) == AHEAD + 1  # one being answered, the others waiting ahead
    closing.set()
    await _settle()
    gate.set()
    await asyncio.wait_for(answering, 5)
    assert context.written == list(range(AHEAD + 1))


async def test_a_caller_gone_with_every_place_taken_leaves_no_reader_behind() -> None:
    context = _Context()
    gate = asyncio.Event()
    read: list[int] = []
    more = asyncio.Event()
    handled: list[asyncio.Task[Any]] = []

    async def handle(n: int) -> int:
        handled.append(asyncio.current_task())  # type: ignore[arg-type]
        await gate.wait()
        return n

    answering = asyncio.create_task(
        _answer_in_order(_frames(50, read, more), handle, lambda r: r, context, asyncio.Event())  # type: ignore[arg-type]
    )
    await _settle()
    assert len(read) == AHEAD + 2  # one answered, eight ahead, one waiting for a place
    readers = {t for t in asyncio.all_tasks() if t is not answering} - set(handled)
    context.fail_writes = True
    gate.set()
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(answering, 5)
    await _settle()
    left = {t for t in readers if not t.done()} - {asyncio.current_task()}
    assert not left, left
