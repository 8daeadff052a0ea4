"""A welcome announces the frame limit the hub enforces, the one it started with, not one a
reload read (add_servicer's limit is fixed at start): a node told a raised limit accepted
a letter under it, the hub refused each frame carrying it (MESSAGE_TOO_LARGE), and the
same frame went again for ever (found by a review of this session's welcome field)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from client_sdk import ExchangeClient, ResourceExhausted
from node.cluster import Cluster

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"


def _accepted(root: Path, shams: str) -> bool:
    """Whether the hub accepted the letter (delivered and dequeued since, or not)."""
    conn = sqlite3.connect(f"file:{root / 'hub' / 'hub.db'}?mode=ro", uri=True)
    try:
        return (
            conn.execute("SELECT 1 FROM letters WHERE shams = ?", (shams,)).fetchone() is not None
        )
    finally:
        conn.close()


async def test_a_letter_accepted_under_the_announced_frame_limit_reaches_the_hub_after_a_reload(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(
        tmp_path,
        [A, B],
        hub_settings="max_frame_bytes = 65536\nreload_interval_s = 0.2",
        node_settings="reconnect_max_s = 1.0",
    )
    try:
        config = tmp_path / "hub" / "hub.toml"
        config.write_text(
            config.read_text().replace("max_frame_bytes = 65536", "max_frame_bytes = 1048576")
        )
        await asyncio.sleep(1.5)  # reloaded (reload_interval_s)
        cluster.nodes[A].terminate()  # A connects again: its welcome is read after the reload
        cluster.nodes[A].start()
        await cluster.nodes[A].wait_ready()
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            # Told the limit the hub enforces (64 KiB, until a restart): refused here, not
            # accepted and then refused by the hub at every frame for ever.
            with pytest.raises(ResourceExhausted) as refused:
                await a.send(to=[B], subject="large", body="x" * 200_000)
            assert refused.value.reason == "LETTER_TOO_LARGE_FOR_HUB"
            small = await a.send(to=[B], subject="small", body="fits")
        for _ in range(40):
            if _accepted(tmp_path, small.shams):
                break
            await asyncio.sleep(0.5)
        assert _accepted(tmp_path, small.shams), small.shams
        assert "MESSAGE_TOO_LARGE" not in cluster.hub.log_file.read_text()
    finally:
        cluster.stop()
