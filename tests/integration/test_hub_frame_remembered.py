"""A node remembers the frame limit the hub's welcome announced (``hub.max_frame_bytes``)
across a restart: kept in memory only, a node restarted while the hub was down accepted
letters larger than the hub takes until it connected again, and each of them stayed in
its outbox for ever ("kept in the outbox ... until the hub's max_frame_bytes is raised"),
its sender told nothing."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from client_sdk import ExchangeClient, ResourceExhausted
from node.cluster import Cluster
from node.config import frame_room

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"
LIMIT = 65536


def _accepted(root: Path, shams: str) -> bool:
    """Whether the hub accepted the letter."""
    conn = sqlite3.connect(f"file:{root / 'hub' / 'hub.db'}?mode=ro", uri=True)
    try:
        return (
            conn.execute("SELECT 1 FROM letters WHERE shams = ?", (shams,)).fetchone() is not None
        )
    finally:
        conn.close()


async def test_a_node_restarted_while_the_hub_is_down_refuses_a_letter_larger_than_the_hub_takes(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(
        tmp_path,
        [A, B],
        hub_settings=f"max_frame_bytes = {LIMIT}",
        node_settings="reconnect_max_s = 1.0",
        without_node=[B],
    )
    try:
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            small = await a.send(to=[B], subject="small", body="fits")
            # Relayed only after the welcome was read: the node has learnt the limit.
            for _ in range(40):
                if _accepted(tmp_path, small.shams):
                    break
                await asyncio.sleep(0.5)
            assert _accepted(tmp_path, small.shams), small.shams
            with pytest.raises(ResourceExhausted) as before:
                await a.send(to=[B], subject="large", body="x" * 200_000)
            assert before.value.reason == "LETTER_TOO_LARGE_FOR_HUB"
        cluster.hub.terminate()
        cluster.nodes[A].terminate()
        cluster.nodes[A].start()
        await cluster.nodes[A].wait_ready()
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            # The hub is down: only what the node kept tells it the limit.
            with pytest.raises(ResourceExhausted) as after:
                await a.send(to=[B], subject="large", body="x" * 200_000)
            assert after.value.reason == "LETTER_TOO_LARGE_FOR_HUB"
            assert after.value.metadata["limit"] == str(frame_room(LIMIT))
            await a.send(to=[B], subject="small again", body="fits")  # taken, to relay later
    finally:
        cluster.stop()
