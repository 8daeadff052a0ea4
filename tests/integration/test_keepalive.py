"""A peer that hangs with its connection open (SIGSTOP: no FIN, no RST, as a frozen process
or a vanished host behind a firewall) is found out by the pings of the other side, which
ends its calls instead of waiting on TCP for many minutes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from client_sdk import Draft, ExchangeClient, Receipt, Unavailable
from node.cluster import Cluster, ServerProcess

pytestmark = pytest.mark.integration

A = "SENDER.A"
B = "RECIPIENT.B"
KEEPALIVE_S = 1.0  # pings every second, an answer due within half a second
# Found out within 1.5 x KEEPALIVE_S; the rest is slack for a busy machine. Without pings
# the calls below wait for ever (the tests' own limit, 20 s, then fails them).
FOUND_WITHIN_S = 8.0
T = TypeVar("T")


@contextlib.asynccontextmanager
async def started(tmp_path: Path, **settings: str) -> AsyncIterator[Cluster]:
    cluster = await Cluster.start(tmp_path, [A, B], **settings)
    try:
        yield cluster
    finally:
        codes = cluster.stop()
        assert set(codes.values()) == {0}, codes


async def fails_while_hung(process: ServerProcess, call: Awaitable[T]) -> float:
    """Hangs ``process`` and returns how long ``call`` took to raise ``Unavailable``."""
    process.pause()
    hung = time.monotonic()
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(call, 20)
        return time.monotonic() - hung
    finally:
        process.resume()


def client(cluster: Cluster, code: str) -> ExchangeClient:
    return ExchangeClient(
        cluster.nodes[code].address, cluster.credentials(code), keepalive_s=KEEPALIVE_S
    )


async def test_an_inbox_stream_on_a_hung_node_ends_within_the_keepalive(tmp_path: Path) -> None:
    async with started(tmp_path) as cluster, client(cluster, A) as a, client(cluster, B) as b:
        await a.send(to=[B], subject="first", body="x")
        async with contextlib.aclosing(b.inbox()) as inbox:
            await (await anext(inbox)).ack()  # the stream is up, and now quiet
            took = await fails_while_hung(cluster.nodes[B], anext(inbox))
        assert took <= FOUND_WITHIN_S
        # The node is back: the back-end reads on a new stream, nothing lost.
        await a.send(to=[B], subject="second", body="y")
        async with contextlib.aclosing(b.inbox()) as inbox:
            assert (await asyncio.wait_for(anext(inbox), 30)).subject == "second"


async def test_a_shared_stream_on_a_hung_node_fails_its_waiting_draft(tmp_path: Path) -> None:
    async with started(tmp_path) as cluster, client(cluster, A) as a, a.shared_stream() as shared:
        await shared.send(Draft(to=[B], subject="first", body="x"))
        draft = Draft(to=[B], subject="while hung", body="y", request_id="while-hung")
        took = await fails_while_hung(cluster.nodes[A], shared.send(draft))
        assert took <= FOUND_WITHIN_S

        # Sent again under its request id once the node is back: one letter, one number.
        def again() -> Awaitable[Receipt]:
            return a.send(to=[B], subject="while hung", body="y", request_id="while-hung")

        for _ in range(60):
            try:
                receipt = await again()
                break
            except Unavailable:
                await asyncio.sleep(0.5)
        assert (await again()).shams == receipt.shams


async def test_the_hub_ends_the_session_of_a_hung_node_and_takes_it_back(tmp_path: Path) -> None:
    async with started(tmp_path, hub_settings=f"keepalive_s = {KEEPALIVE_S}") as cluster:
        node = cluster.nodes[B]
        await asyncio.sleep(6 * KEEPALIVE_S)  # pings on a quiet session: no GOAWAY
        assert f"node {B} disconnected" not in cluster.hub.log_file.read_text()
        node.pause()
        try:
            hung = time.monotonic()
            while f"node {B} disconnected" not in cluster.hub.log_file.read_text():
                assert time.monotonic() - hung < 20, "the hub kept the hung node's session"
                await asyncio.sleep(0.1)
            assert time.monotonic() - hung <= FOUND_WITHIN_S
        finally:
            node.resume()
        async with client(cluster, A) as a, client(cluster, B) as b:
            receipt = await a.send(to=[B], subject="after", body="z")
            async with contextlib.aclosing(b.inbox()) as inbox:
                letter = await asyncio.wait_for(anext(inbox), 30)
            assert letter.shams == receipt.shams


async def test_a_node_ends_its_session_with_a_hung_hub_and_reconnects(tmp_path: Path) -> None:
    settings = f"keepalive_s = {KEEPALIVE_S}\nreconnect_max_s = 1.0"
    async with started(tmp_path, node_settings=settings) as cluster:
        log = cluster.nodes[A].log_file
        await asyncio.sleep(6 * KEEPALIVE_S)  # pings on a quiet session: no GOAWAY
        assert "hub stream ended" not in log.read_text()
        cluster.hub.pause()
        try:
            hung = time.monotonic()
            while "hub stream ended: UNAVAILABLE" not in log.read_text():
                assert time.monotonic() - hung < 20, "the node kept its session with a hung hub"
                await asyncio.sleep(0.1)
            assert time.monotonic() - hung <= FOUND_WITHIN_S
        finally:
            cluster.hub.resume()
        async with client(cluster, A) as a, client(cluster, B) as b:
            receipt = await a.send(to=[B], subject="after", body="z")
            async with contextlib.aclosing(b.inbox()) as inbox:
                letter = await asyncio.wait_for(anext(inbox), 30)
            assert letter.shams == receipt.shams
