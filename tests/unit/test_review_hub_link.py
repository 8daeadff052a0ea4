"""Review of the node's hub link: evidence about this node's letters acknowledged unstored."""

from __future__ import annotations

from types import SimpleNamespace

import grpc

from client_sdk import pb
from client_sdk.trust import VerificationError
from node.rpc.hub_link import _Session
from tests.unit.test_hub_link_writes import HUB, _evidence, _Refetching, _StuckCall


class _FetchFails(_Refetching):
    """A link whose directory fetch fails (the hub slow to answer GetDirectory)."""

    async def _fetch_directory(self) -> None:
        self.fetches += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata()
        )


async def test_evidence_signed_with_a_key_not_yet_known_is_not_acknowledged_unstored() -> None:
    """Evidence the hub routes about this node's letters (a recipient's DELIVERY or
    HANDOVER, signed with a key rotated a moment ago) that fails only for a key this node
    does not know yet (SIGNER_UNKNOWN) is acknowledged when the directory refetch fails
    (or is skipped: at most once a second, up to 5 minutes apart after fruitless ones),
    as if it could never verify. The hub then forgets the notice and never sends it again:
    the sender's node never stores that evidence, its recipient's state stays RELAYED
    (or DELIVERED) for good, and the letter's body is never purged. Relay results in the
    same case are kept to come again (they leave the window, still to relay)."""
    recorded: list[str] = []

    async def record_sender_evidence(items: list[tuple[object, object, str]]) -> None:
        recorded.extend(c.evidence_id for _, c, _ in items)  # type: ignore[attr-defined]

    agency = SimpleNamespace(
        trust=SimpleNamespace(
            verify_evidence_many=lambda items: [
                VerificationError("SIGNER_UNKNOWN", "signed by a key no directory held lists")
            ]
            * len(items)
        ),
        store=SimpleNamespace(record_sender_evidence=record_sender_evidence),
        directory=SimpleNamespace(version=7),
    )
    link = _FetchFails(agency)  # type: ignore[arg-type]
    session = _Session(link, _StuckCall())  # type: ignore[arg-type]
    await session._evidence([_evidence("d1", HUB)])
    assert link.fetches == 1
    assert recorded == []
    frames = [session.outgoing.get_nowait() for _ in range(session.outgoing.qsize())]
    acked = [i for f in frames for i in f.evidence_acks.evidence_ids]
    assert "d1" not in acked, "evidence that may verify later was acknowledged, never stored"
