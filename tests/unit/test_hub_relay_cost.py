"""What one envelopes frame may cost the hub. The hub reads frames of up to 256 MiB
(node.server), and answers each letter it refuses with a RELAY_REJECTION it signs on its
own, in the event loop, with a warning logged: an empty envelope is 2 bytes on the wire and
costs a signature (tens of microseconds) and some 275 bytes of answer. Driven with the real
checks, a real signer and trust store, and a stand-in store."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.signing import MAX_EVIDENCE_BATCH, Signer
from client_sdk.trust import TrustStore
from node.config import MAX_FRAME_LETTERS
from node.core.errors import ChaparError, Code
from node.hub import Hub

HUB = "urn:chapar:hub:test"
NODE = "000.00.00.G22"


def _hub() -> SimpleNamespace:
    key = generate_key("ed25519")
    certificate = issue_certificate(
        issuer_cert=None, issuer_key=key, subject_key=key, identity_uri=HUB, kind="signing"
    )

    async def accepted_relays(*_: object) -> dict[bytes, list[pb.Evidence]]:
        return {}

    hub = SimpleNamespace(
        identity=SimpleNamespace(uri=HUB),
        signer=Signer(key, certificate),
        trust=TrustStore([certificate]),
        store=SimpleNamespace(accepted_relays=accepted_relays),
    )
    hub._check_letter = lambda agency, envelope, verified: Hub._check_letter(  # type: ignore[arg-type]
        hub, agency, envelope, verified
    )
    return hub


async def test_a_small_frame_of_empty_envelopes_does_not_stall_the_hub() -> None:
    # 100,000 empty envelopes: a 200 KB frame, a thousandth of what the hub reads. The hub
    # verifies each, signs a rejection for each and logs a warning for each, all without
    # letting the event loop run: every other agency's stream stands still meanwhile (some
    # seconds here; a frame at the hub's limit, 134 million envelopes, holds it for hours
    # and needs tens of GB for its answer, which no node could receive anyway).
    hub = _hub()
    wire = pb.EnvelopeBatch(envelopes=[pb.Envelope() for _ in range(100_000)]).SerializeToString()
    assert len(wire) == 200_000
    envelopes = pb.EnvelopeBatch.FromString(wire).envelopes
    longest = 0.0
    stop = False

    async def tick() -> None:
        nonlocal longest
        last = time.monotonic()
        while not stop:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    answer: list[pb.Evidence] | None = None
    try:
        answer = await Hub._relay(hub, NODE, envelopes)  # type: ignore[arg-type]
    except ChaparError:
        pass  # a frame refused whole is a fine answer
    finally:
        stop = True
        await ticker
    assert longest < 1.0, f"the event loop stood still for {longest:.1f} s"
    if answer is not None:
        size = pb.ConnectResponse(relay_results=pb.EvidenceBatch(evidence=answer)).ByteSize()
        assert size < 20 * len(wire), f"{len(wire)} bytes answered with {size}"


async def test_a_refusal_does_not_name_another_agencys_letter() -> None:
    # Node A sends an envelope it did not sign (any key the hub does not know) whose header
    # claims a number of agency B. The hub refuses it, and signs a RELAY_REJECTION quoting
    # B's number as the header claims it, unverified: A now holds the hub's signed word
    # that "letter B/O/2026/0000007 was rejected" (reason SIGNER_UNKNOWN), for a number B
    # may well have used for a real letter the hub relayed. A refusal may quote a number
    # only of the connected node's own origin (or none).
    hub = _hub()
    other = pb.Shams(origin="10101010101", domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=7)
    header = pb.EnvelopeHeader(
        shams=other, sender=pb.Address(agency="10101010101")
    ).SerializeToString()
    envelope = pb.Envelope(header=header, signature=pb.Signature(key_id=b"k" * 32, value=b"v"))
    (answer,) = await Hub._relay(hub, NODE, [envelope])  # type: ignore[arg-type]
    content = pb.EvidenceContent.FromString(answer.content)
    assert content.event == pb.EVIDENCE_EVENT_RELAY_REJECTION
    assert answer.signature.value  # signed by the hub
    assert not content.HasField("shams") or content.shams.origin == NODE, (
        f"the hub signed a rejection of {content.shams.origin}'s number for {NODE}"
    )


async def test_a_full_frame_of_refused_letters_is_answered_under_one_signature_a_tree_and_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each refusal was signed alone (a signature each, tens of microseconds in the event
    # loop) and logged in a line of its own; a frame's are now sealed together, as its
    # acceptances are, and each still verifies on its own.
    hub = _hub()
    envelopes = [pb.Envelope() for _ in range(MAX_FRAME_LETTERS)]
    with caplog.at_level(logging.WARNING, logger="chapar.hub"):
        answer = await Hub._relay(hub, NODE, envelopes)  # type: ignore[arg-type]
    assert len(answer) == MAX_FRAME_LETTERS
    # One signature a Merkle tree of MAX_EVIDENCE_BATCH (a frame's acceptances are sealed so).
    assert len({e.signature.value for e in answer}) == MAX_FRAME_LETTERS // MAX_EVIDENCE_BATCH
    # Sealed by Signer.seal_evidence, as the acceptances (each with its inclusion proof).
    assert all(e.batch_proof.tree_size == MAX_EVIDENCE_BATCH for e in answer)
    events = {pb.EvidenceContent.FromString(e.content).event for e in answer}
    assert events == {pb.EVIDENCE_EVENT_RELAY_REJECTION}
    (line,) = [r for r in caplog.records if "relay rejected" in r.getMessage()]
    assert f"{MAX_FRAME_LETTERS} letters" in line.getMessage()
    assert line.__dict__["count"] == MAX_FRAME_LETTERS
    with pytest.raises(ChaparError) as over:
        await Hub._relay(hub, NODE, [*envelopes, pb.Envelope()])  # type: ignore[arg-type]
    assert (over.value.code, over.value.reason) == (Code.INVALID_ARGUMENT, "TOO_MANY_LETTERS")


async def test_receipt_frames_are_bounded_too() -> None:
    # A frame of receipts is verified in the event loop one by one: bounded as letters are.
    session = SimpleNamespace(agency=NODE)
    too_many = [pb.Evidence() for _ in range(MAX_FRAME_LETTERS + 1)]
    with pytest.raises(ChaparError) as over:
        await Hub._receipts(_hub(), session, too_many)  # type: ignore[arg-type]
    assert (over.value.code, over.value.reason) == (Code.INVALID_ARGUMENT, "TOO_MANY_LETTERS")


async def test_a_full_frame_of_refused_receipts_is_logged_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each refused receipt was logged in a warning of its own: a node sending frames of
    # empty receipts (2 bytes each on the wire, MAX_FRAME_LETTERS a frame, one frame after
    # another) wrote 4,096 lines a frame into the hub's log, burying everything else and
    # filling its disk. Refused letters are logged one line a frame (_log_rejected); so
    # are refused receipts now, with their count by reason.
    from node.hub import MAX_RECEIPT_BYTES, _Session

    hub = _hub()
    hub._unanswered = {}
    hub._unverified_receipt = lambda session, item: Hub._unverified_receipt(hub, session, item)  # type: ignore[arg-type]
    hub._leave_window = lambda session, shams: Hub._leave_window(hub, session, shams)  # type: ignore[arg-type]
    # Three that verify (a stand-in check passes the signed ones; the rest go to the real
    # trust store) but are not the node's: refused as RECEIPT_ISSUER_MISMATCH; and one too
    # large to keep.
    shams = pb.Shams(origin=NODE, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=1)
    strangers = hub.signer.sign_evidence(
        [
            pb.EvidenceContent(
                evidence_id=f"e{i}", issuer=HUB, event=pb.EVIDENCE_EVENT_DELIVERY, shams=shams
            ).SerializeToString()
            for i in range(3)
        ]
    )
    trust = hub.trust

    def verify_evidence_many(items: list[pb.Evidence]) -> list[object]:
        checked: list[object] = list(trust.verify_evidence_many(items))
        return [
            pb.EvidenceContent.FromString(item.content) if item.signature.value else result
            for item, result in zip(items, checked, strict=True)
        ]

    hub.trust = SimpleNamespace(verify_evidence_many=verify_evidence_many)
    too_large = pb.Evidence(content=b"x" * (MAX_RECEIPT_BYTES + 1))
    empty = [pb.Evidence() for _ in range(MAX_FRAME_LETTERS - len(strangers) - 1)]
    frame = [*empty, too_large, *strangers]
    session = _Session(NODE, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="chapar.hub"):
        acknowledged = await Hub._receipts(hub, session, frame)  # type: ignore[arg-type]
    assert acknowledged == ["e0", "e1", "e2"]  # verified: taken or refused for good
    lines = [r for r in caplog.records if r.name == "chapar.hub"]
    assert len(lines) == 1, f"{len(lines)} log lines for one frame of receipts"
    (line,) = lines
    assert line.levelno == logging.WARNING
    assert line.__dict__["peer"] == NODE
    assert line.__dict__["count"] == MAX_FRAME_LETTERS
    assert f"{MAX_FRAME_LETTERS} receipts" in line.getMessage()
    assert "RECEIPT_ISSUER_MISMATCH 3" in line.getMessage()
    assert "EVIDENCE_TOO_LARGE 1" in line.getMessage()
