"""The node's hub stream: handlers of incoming frames never wait for the network.

A frame handler that answers (evidence acks, receipts) used to write under a lock; when the
hub stopped reading (its own writes to us blocked by flow control), our write blocked, the
handler blocked, we stopped reading, and both ends waited for each other for good.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from client_sdk import pb
from node.rpc.hub_link import _Session


class _StuckCall:
    """A stream whose writes never complete (the peer does not read)."""

    def __init__(self) -> None:
        self.started: list[pb.ConnectRequest] = []

    async def write(self, frame: pb.ConnectRequest) -> None:
        self.started.append(frame)
        await asyncio.Event().wait()

    def cancel(self) -> None:
        pass


def _ack(evidence_id: str) -> pb.ConnectRequest:
    return pb.ConnectRequest(evidence_acks=pb.EvidenceAckBatch(evidence_ids=[evidence_id]))


async def test_writes_return_at_once_while_the_stream_cannot_take_them_and_keep_their_order() -> (
    None
):
    call = _StuckCall()
    link = SimpleNamespace(agency=SimpleNamespace(), _wake=asyncio.Event(), _stopping=False)
    session = _Session(link, call)  # type: ignore[arg-type]
    writer = asyncio.create_task(session._write_all())
    try:
        for i in range(5):  # a handler answering frames while the peer reads nothing
            session.write(_ack(f"e{i}"))
        await asyncio.sleep(0.05)
        assert [f.evidence_acks.evidence_ids[0] for f in call.started] == ["e0"]  # stuck there
        assert session.outgoing.qsize() == 4  # the rest wait, in order, for the writer
        waiting = [session.outgoing.get_nowait() for _ in range(4)]
        assert [f.evidence_acks.evidence_ids[0] for f in waiting] == ["e1", "e2", "e3", "e4"]
    finally:
        writer.cancel()
