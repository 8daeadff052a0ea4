"""A review's proof: ``hub.max_frame_bytes`` is accepted from 1 byte up, and a node cuts
only its frames of letters below it (``frame_room``), not its frames of receipts (up to
1,024 receipts, several hundred bytes each). With a limit an operator may well choose for
letters of a few tens of KiB (64 KiB here), a recipient node returning to a backlog
answers a frame of deliveries with a receipts frame over the limit: the hub ends its
stream (``RESOURCE_EXHAUSTED`` / ``MESSAGE_TOO_LARGE``), the node connects again, is
pushed the same letters again, answers with the same receipts, and so on: no letter of
the backlog is ever dequeued or reported delivered to its sender."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from client_sdk import Draft, ExchangeClient
from node.cluster import Cluster

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"
LETTERS = 600


def _queued_for(root: Path, code: str) -> int:
    conn = sqlite3.connect(f"file:{root / 'hub' / 'hub.db'}?mode=ro", uri=True)
    try:
        return int(
            conn.execute("SELECT count(*) FROM queue WHERE recipient = ?", (code,)).fetchone()[0]
        )
    finally:
        conn.close()


async def test_a_recipient_returning_to_a_backlog_gets_it_under_a_64_kib_frame_limit(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(
        tmp_path,
        [A, B],
        hub_settings="max_frame_bytes = 65536",
        node_settings="reconnect_max_s = 1.0",
    )
    try:
        cluster.nodes[B].terminate()
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            drafts = [Draft(to=[B], subject=f"backlog {i}", body="x") for i in range(LETTERS)]
            results = await a.send_many(drafts)
            assert all(not isinstance(r, Exception) for r in results)
        deadline = time.monotonic() + 30
        while _queued_for(tmp_path, B) < LETTERS:
            assert time.monotonic() < deadline, "A's letters never reached the hub"
            await asyncio.sleep(0.2)
        cluster.nodes[B].start()
        await cluster.nodes[B].wait_ready()
        deadline = time.monotonic() + 40
        for _ in range(80):  # a bounded loop of reads (40 s)
            left = _queued_for(tmp_path, B)
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        hub_log = cluster.hub.log_file.read_text()
        refused = hub_log.count("MESSAGE_TOO_LARGE")
        assert left == 0, (
            f"{left} of {LETTERS} letters still queued for B after 40 s;"
            f" the hub logged MESSAGE_TOO_LARGE {refused} times"
        )
    finally:
        cluster.stop()
