"""Backlogs of large letters on the hub link: relayed whatever relay_frame_bytes allows, and
without loading the backlog to send a frame of it (found by a review; real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from client_sdk import ExchangeClient, ResourceExhausted
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B, db_count

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


async def test_letters_waiting_while_the_hub_was_down_are_relayed_with_a_large_relay_frame(
    tmp_path: Path,
) -> None:
    """node.relay_frame_bytes = 128 MiB is accepted (documented: at most 256 MiB, keep it
    under the hub's max_frame_bytes, here 256 MiB). The hub link's own channel sends 64 MiB
    at most, so a frame of letters that gathered in the outbox while the hub was down can
    never be written: the session fails, the node reconnects and builds the same frame
    again, for ever. Not one letter of the outbox is relayed again."""
    cluster = await Cluster.start(
        tmp_path,
        [AGENCY_A, AGENCY_B],
        hub_settings=f"max_frame_bytes = {256 * MIB}",
        node_settings=f"relay_frame_bytes = {128 * MIB}",
    )
    try:
        cluster.hub.terminate()
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
        ) as a:
            for i in range(17):  # 17 x 4 MB: 68 MB, over 64 MiB
                await a.send(to=[AGENCY_B], subject=f"big {i}", body=bytes([i]) * 4_000_000)
        cluster.hub.start()
        await cluster.hub.wait_ready()
        db = tmp_path / f"node-{AGENCY_A}" / "node.db"
        for _ in range(120):
            if db_count(db, "SELECT count(*) FROM outbox WHERE relay_state = 0") == 0:
                break
            await asyncio.sleep(0.5)
        waiting = db_count(db, "SELECT count(*) FROM outbox WHERE relay_state = 0")
        assert waiting == 0, f"{waiting} letters never relayed:\n" + cluster.nodes[
            AGENCY_A
        ].log_tail(6)
    finally:
        cluster.stop()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_relaying_a_backlog_of_large_letters_keeps_the_nodes_memory_flat(
    tmp_path: Path,
) -> None:
    """A frame of letters to the hub is at most relay_frame_bytes (8 MiB), yet the hub link
    reads relay_batch (256) outbox rows, bodies included, before it cuts the frame
    (NodeStore.outbox_to_relay has no byte limit, unlike unacked_inbox): a backlog of
    100 letters of 4 MB that gathered while the hub was down is loaded whole (and copied
    by _with_body) to send two of them, and again for every frame."""
    cluster = await Cluster.start(tmp_path, [AGENCY_A, AGENCY_B])
    try:
        cluster.hub.terminate()
        node = cluster.nodes[AGENCY_A]
        assert node.proc is not None
        async with ExchangeClient(node.address, cluster.credentials(AGENCY_A)) as a:
            for i in range(100):
                await a.send(to=[AGENCY_B], subject=f"big {i}", body=bytes([i]) * 4_000_000)
        before = _peak_rss_mb(node.proc.pid)
        cluster.hub.start()
        await cluster.hub.wait_ready()
        db = tmp_path / f"node-{AGENCY_A}" / "node.db"
        for _ in range(240):
            if db_count(db, "SELECT count(*) FROM outbox WHERE relay_state = 0") == 0:
                break
            await asyncio.sleep(0.5)
        assert db_count(db, "SELECT count(*) FROM outbox WHERE relay_state = 0") == 0
        grown = _peak_rss_mb(node.proc.pid) - before
        assert grown < 150, f"node A's peak RSS grew by {grown:.0f} MB relaying 8 MiB frames"
    finally:
        cluster.stop()


async def _delivered(client: ExchangeClient, shams: str, timeout: float = 30.0) -> None:
    async def find() -> None:
        async for letter in client.inbox():
            await letter.ack()
            if letter.shams == shams:
                return
        raise AssertionError("inbox stream ended")

    await asyncio.wait_for(find(), timeout)


async def test_a_letter_larger_than_the_hub_takes_is_refused_or_held_not_blocking_the_outbox(
    tmp_path: Path,
) -> None:
    """The hub takes frames of 1 MiB, node A letters of up to 4 MB (its own limits). A letter
    of 2 MB was accepted, and the hub refused every frame that carried it: each session of
    A ended the same way and no letter behind it was relayed again. The hub's welcome now
    says its limit: such a letter is refused at submission, and one accepted before the node
    knew (the hub down since a node that never heard it started) stays in the outbox, the
    others going on."""
    cluster = await Cluster.start(
        tmp_path, [AGENCY_A, AGENCY_B], hub_settings=f"max_frame_bytes = {MIB}"
    )
    db = tmp_path / f"node-{AGENCY_A}" / "node.db"
    try:
        async with (
            ExchangeClient(cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)) as a,
            ExchangeClient(cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)) as b,
        ):
            with pytest.raises(ResourceExhausted) as refused:
                await a.send(to=[AGENCY_B], subject="big", body=b"\1" * 2_000_000)
            assert refused.value.reason == "LETTER_TOO_LARGE_FOR_HUB"
            assert not refused.value.retryable
            small = await a.send(to=[AGENCY_B], subject="small", body="goes")
            await _delivered(b, small.shams)

        cluster.hub.terminate()
        # A node that knows no hub limit until a welcome: one whose database no hub has
        # welcomed since the limit was kept (a node of an earlier version, or a new one).
        node_a = cluster.nodes[AGENCY_A]
        node_a.terminate()
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("DELETE FROM meta WHERE key = 'hub_max_frame_bytes'")
        node_a.start()
        await node_a.wait_ready()
        async with ExchangeClient(
            cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A)
        ) as a:
            big = await a.send(to=[AGENCY_B], subject="big", body=b"\2" * 2_000_000)
            after = await a.send(to=[AGENCY_B], subject="after", body="goes too")
        cluster.hub.start()
        await cluster.hub.wait_ready()
        async with ExchangeClient(
            cluster.nodes[AGENCY_B].address, cluster.credentials(AGENCY_B)
        ) as b:
            await _delivered(b, after.shams)
        waiting = "SELECT count(*) FROM outbox WHERE relay_state = 0 AND shams = ?"
        assert db_count(db, waiting, (big.shams,)) == 1  # kept, not lost
        assert "larger than the hub takes" in cluster.nodes[AGENCY_A].log_tail(200)
    finally:
        cluster.stop()
