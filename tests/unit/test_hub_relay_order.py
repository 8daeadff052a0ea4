"""A node's relay frames are handled concurrently at the hub, and a recipient's queue keeps
the order in which their letters were handed to the store: one sender's letters to one
recipient arrive in submission order only if each frame hands its letters in before its
first wait. A frame holding a refused letter (its recipient suspended, say) used to wait
first for a look-up of letters sent again, so the next frame's letters went in ahead.
Driven with stand-ins for the hub's store, trust and signer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from types import SimpleNamespace
from typing import Any

from client_sdk import pb
from node.core.errors import ChaparError, Code
from node.hub import Hub
from node.storage.hub_store import IncomingLetter
from node.tasks import handle_concurrently

SENDER, RECIPIENT = "SENDER.A", "RECIPIENT.B"
REFUSED = b"to a suspended agency"


class _Hub:
    """What Hub._relay uses of the hub; records the order letters reach the store."""

    def __init__(self) -> None:
        self.handed_in: list[str] = []
        self.identity = SimpleNamespace(uri="urn:chapar:hub:test")
        self.trust = SimpleNamespace(verify_envelopes=lambda envelopes: [None] * len(envelopes))
        self.signer = SimpleNamespace(
            seal_evidence=lambda items: None,  # signed in place: the stand-in leaves them
            sign_evidence=lambda contents: [pb.Evidence(content=c) for c in contents],
        )
        self.store = SimpleNamespace(accept=self._accept, accepted_relays=self._accepted_relays)

    def _check_letter(self, agency: str, envelope: pb.Envelope, verified: object) -> IncomingLetter:
        if envelope.header == REFUSED:
            raise ChaparError(Code.FAILED_PRECONDITION, "RECIPIENT_SUSPENDED", "suspended")
        name = envelope.header.decode()
        return IncomingLetter(name, agency, [RECIPIENT], b"", name.encode().ljust(32, b"."))

    def _accept(
        self, letters: Sequence[IncomingLetter], *_: Any, **__: Any
    ) -> Coroutine[Any, Any, list[list[pb.Evidence]]]:
        self.handed_in.extend(letter.shams for letter in letters)  # the job is queued now

        async def committed() -> list[list[pb.Evidence]]:
            await asyncio.sleep(0.01)
            return [[pb.Evidence()] for _ in letters]

        return committed()

    @staticmethod
    async def _accepted_relays(*_: Any) -> dict[bytes, list[pb.Evidence]]:
        await asyncio.sleep(0.01)  # a read on the store's reader thread
        return {}


async def test_a_frame_with_a_refused_letter_keeps_its_place_in_the_queue() -> None:
    hub = _Hub()
    frames = [
        [pb.Envelope(header=b"L1"), pb.Envelope(header=REFUSED), pb.Envelope(header=b"L2")],
        [pb.Envelope(header=b"L3"), pb.Envelope(header=b"L4")],
    ]
    answers: list[list[pb.Evidence]] = []

    async def arriving() -> AsyncIterator[list[pb.Envelope]]:
        for frame in frames:
            yield frame

    async def relay(frame: list[pb.Envelope]) -> None:
        answers.append(await Hub._relay(hub, SENDER, frame))  # type: ignore[arg-type]

    await handle_concurrently(arriving(), relay, 4)
    assert hub.handed_in == ["L1", "L2", "L3", "L4"]
    # The refused letter is still answered, in its place: a signed RELAY_REJECTION.
    first = next(a for a in answers if len(a) == 3)
    rejection = pb.EvidenceContent.FromString(first[1].content)
    assert rejection.event == pb.EVIDENCE_EVENT_RELAY_REJECTION
    assert rejection.reason == "RECIPIENT_SUSPENDED"


async def test_a_receipt_that_does_not_verify_frees_its_letters_place_in_the_window() -> None:
    # Its letter stayed in the delivery window, unanswered, for the stream's life: a window
    # of them stopped the recipient's deliveries. Now it leaves the window, unanswered: it
    # goes again on the next stream (not on this one, whose answer would be the same) and
    # does not expire meanwhile. The receipts that verified are kept.
    from client_sdk.trust import VerificationError
    from node.hub import _Session

    def receipt(sequence: int, issuer: str) -> pb.Evidence:
        content = pb.EvidenceContent(
            evidence_id=f"d{sequence}",
            issuer=issuer,
            event=pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
            recipient=RECIPIENT,
            shams=pb.Shams(
                origin="000.00.00.G01",
                domain=pb.SHAMS_DOMAIN_OUTGOING,
                year=2026,
                sequence=sequence,
            ),
        )
        return pb.Evidence(content=content.SerializeToString())

    def verify_evidence_many(items: list[pb.Evidence]) -> list[object]:
        out: list[object] = []
        for item in items:
            content = pb.EvidenceContent.FromString(item.content)
            ok = content.issuer == f"urn:chapar:agency:{RECIPIENT}"
            out.append(content if ok else VerificationError("SIGNER_UNKNOWN", "no such key"))
        return out

    recorded: list[str] = []

    stranger = "000.00.00.G01/O/2026/0000003"

    async def record_receipts(
        agency: str, items: Sequence[Any], on_commit: Any, on_refused: Any = None
    ) -> Any:
        recorded.extend(shams for _, _, shams in items if shams != stranger)
        return [], 0, [stranger]  # it names another letter's digest, say

    hub = SimpleNamespace(
        trust=SimpleNamespace(verify_evidence_many=verify_evidence_many),
        store=SimpleNamespace(record_receipts=record_receipts),
        _unanswered={},
    )
    hub._unverified_receipt = lambda session, item: Hub._unverified_receipt(hub, session, item)  # type: ignore[arg-type]
    hub._leave_window = lambda session, shams: Hub._leave_window(hub, session, shams)  # type: ignore[arg-type]
    session = _Session(RECIPIENT, None)  # type: ignore[arg-type]
    session.inflight.update(
        {"000.00.00.G01/O/2026/0000001", "000.00.00.G01/O/2026/0000002", stranger}
    )
    frame = [
        receipt(1, f"urn:chapar:agency:{RECIPIENT}"),
        receipt(2, "urn:chapar:agency:X"),
        receipt(3, f"urn:chapar:agency:{RECIPIENT}"),
    ]
    await Hub._receipts(hub, session, frame)  # type: ignore[arg-type]
    assert recorded == ["000.00.00.G01/O/2026/0000001"]
    assert session.inflight == set()
    # Neither the one that does not verify nor the one the store took for a stranger's
    # (which used to leave the window as answered, though still queued).
    assert session.repushed == {"000.00.00.G01/O/2026/0000002", stranger}
    assert hub._unanswered == {RECIPIENT: {"000.00.00.G01/O/2026/0000002", stranger}}
