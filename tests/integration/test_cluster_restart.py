"""A server restarted on its pinned port waits out whoever holds the port for a moment."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from node.cluster import Cluster

A = "SENDER.A"


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
