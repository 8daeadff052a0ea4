"""A running server's configuration edited, as an operator does: what it takes without a
restart, seen from outside the process.

A node read its configuration once, at start: a back-end's mailboxes (``[[clients]]``)
changed in the file were not in force until the node was restarted, and nothing said so.
It now reads the file again when it changes (``node.reload_interval_s``), as the hub does
(tests/unit/test_reload_keys.py holds what a reload applies and what it warns of). And
``shutdown_grace_s``, which both roles apply live, is the grace a stop after the reload
uses.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from client_sdk import ExchangeClient, PermissionDenied, Unavailable
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B

pytestmark = pytest.mark.integration

A, B = AGENCY_A, AGENCY_B
RELOAD = "reload_interval_s = 0.2"


def _edit(path: Path, table: str, old: str = "", new: str = "", *, add: str = "") -> None:
    """The file with ``old`` replaced by ``new``, and ``add`` put at the top of ``[table]``."""
    text = path.read_text()
    assert old in text
    text = text.replace(old, new).replace(f"[{table}]\n", f"[{table}]\n{add}\n", 1)
    path.write_text(text)


async def test_a_node_takes_a_backends_new_mailbox_and_its_grace_without_a_restart(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(
        tmp_path,
        [A, B],
        without_node=[B],
        node_settings=f'{RELOAD}\n[[clients]]\nname = "backend"\nmailboxes = ["a"]',
    )
    try:
        node = cluster.nodes[A]
        async with ExchangeClient(node.address, cluster.credentials(A)) as backend:
            with pytest.raises(PermissionDenied) as refused:
                await backend.send(to=[B], subject="from b", body="x", sender_mailbox="b")
            assert refused.value.reason == "MAILBOX_NOT_ALLOWED"

            async def read() -> None:
                async for _ in backend.inbox("a"):
                    pass

            reading = asyncio.create_task(read())
            await asyncio.sleep(0.5)  # the inbox stream of "a" is open
            assert not reading.done()
            _edit(
                node.config,
                "node",
                'mailboxes = ["a"]',
                'mailboxes = ["a", "b"]',
                add="shutdown_grace_s = 3.5",
            )
            receipt = None
            for _ in range(50):  # reloaded within reload_interval_s: 0.2 s
                await asyncio.sleep(0.2)
                try:
                    receipt = await backend.send(
                        to=[B], subject="from b", body="x", sender_mailbox="b"
                    )
                    break
                except PermissionDenied:
                    continue
            assert receipt is not None, node.log_tail()
            # The stream admitted with the old mailboxes ended; reading again, the
            # back-end is admitted with the new ones.
            with pytest.raises(Unavailable) as ended:
                await asyncio.wait_for(reading, 10)
            assert ended.value.reason == "STREAM_ENDED"
            # Said as what it may be: the node did not stop (the message said it did).
            assert "mailboxes" in str(ended.value), ended.value
    finally:
        codes = cluster.stop()
    assert codes == {A: 0, "hub": 0}, codes
    log = node.log_file.read_text()
    assert "configuration reloaded" in log
    assert "node stopping (grace 3.5s)" in log, node.log_tail()


async def test_a_hub_stops_with_the_grace_a_reload_set(tmp_path: Path) -> None:
    cluster = await Cluster.start(tmp_path, [A, B], without_node=[A, B], hub_settings=RELOAD)
    try:
        _edit(cluster.hub.config, "hub", add="shutdown_grace_s = 2.5")
        await asyncio.sleep(1.5)  # reloaded (reload_interval_s)
    finally:
        codes = cluster.stop()
    assert codes == {"hub": 0}, codes
    assert "hub stopping (grace 2.5s)" in cluster.hub.log_file.read_text(), cluster.hub.log_tail()
