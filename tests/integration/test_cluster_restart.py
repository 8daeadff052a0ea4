"""Servers stopping and restarting: a restart on its pinned port waits out whoever holds
the port for a moment; a node stops without waiting for its back-ends' streams."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from client_sdk import Draft, ExchangeClient, Unavailable
from node.cluster import Cluster, ServerProcess

A = "SENDER.A"
B = "RECIPIENT.B"
T = TypeVar("T")


async def test_a_restart_whose_port_is_briefly_taken_comes_up_on_the_same_port(
    tmp_path: Path,
) -> None:
    # The kill-hub fault of the load harness once failed this way: after SIGKILL, an
    # outgoing connection took the hub's (ephemeral) port before the hub came back.
    cluster = Cluster.prepare(tmp_path, [A])
    hub = cluster.hub
    hub.start()
    address = await hub.wait_ready()
    try:
        hub.kill()
        host, port = address.rsplit(":", 1)
        squatter = socket.socket()
        squatter.bind((host, int(port)))
        squatter.listen()
        hub.start()
        waiting = asyncio.create_task(hub.wait_ready())
        await asyncio.sleep(1.5)
        assert not waiting.done()  # refused while the port is taken, and trying again
        squatter.close()
        assert await asyncio.wait_for(waiting, 20) == address
        assert "(address in use?)" in hub.log_file.read_text()
    finally:
        cluster.stop()


async def test_a_node_stops_at_once_while_a_back_end_holds_its_acknowledgement_stream(
    tmp_path: Path,
) -> None:
    # A back-end keeps its acknowledgement stream open for as long as it runs. The node's
    # stop ends that stream, as it ends inbox streams, instead of waiting out its grace
    # period (60 s here: terminate gives up after 30 s and kills, exit code -9).
    cluster = await Cluster.start(tmp_path, [A, B], node_settings="shutdown_grace_s = 60")
    node = cluster.nodes[B]
    try:
        async with (
            ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a,
            ExchangeClient(node.address, cluster.credentials(B)) as b,
        ):
            await a.send(to=[B], subject="before the stop", body="x")
            async with contextlib.aclosing(b.inbox()) as inbox:
                letter = await anext(inbox)
            first = await letter.ack()  # the stream is open from now on
            again = await _stopped_at_once_then(node, letter.ack)  # on a new stream
            assert again == first  # the same evidence
    finally:
        cluster.stop()


async def test_a_node_stops_at_once_while_a_back_end_holds_a_shared_submission_stream(
    tmp_path: Path,
) -> None:
    # The README's advice for busy back-ends is one SharedStream for all their producers,
    # open for as long as they run: the node's stop ends it too (60 s grace, as above).
    cluster = await Cluster.start(tmp_path, [A, B], node_settings="shutdown_grace_s = 60")
    node = cluster.nodes[A]
    try:
        async with (
            ExchangeClient(node.address, cluster.credentials(A)) as a,
            a.shared_stream() as shared,
        ):
            first = await shared.send(Draft(to=[B], subject="before the stop", body="x"))
            draft = Draft(to=[B], subject="after the restart", body="y")
            second = await _stopped_at_once_then(node, lambda: shared.send(draft))
            assert second.shams != first.shams
    finally:
        cluster.stop()


async def _stopped_at_once_then(node: ServerProcess, again: Callable[[], Awaitable[T]]) -> T:
    """Stops ``node`` with SIGTERM (given 30 s against its 60 s grace), starts it again and
    returns ``again()`` once the client's channel has reconnected."""
    assert await asyncio.to_thread(node.terminate, 30) == 0
    node.start()
    await node.wait_ready()
    for _ in range(60):
        try:
            return await again()
        except Unavailable:
            await asyncio.sleep(0.5)
    raise AssertionError("the restarted node was not reached")
