"""A letter numbered again after a site's hub and sender's node were both restored from
copies, at a recipient that holds the lost letter under that number: refused with its own
DELIVERY_FAILURE (SHAMS_REUSED), never answered with the held letter's DELIVERY. Driven with
a real HubStore and a real NodeStore (found by a review)."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from client_sdk import pb
from client_sdk.shams import format_shams
from client_sdk.statuses import StatusFault
from node.core.evidence import evidence_content
from node.storage.hub_store import HubStore, IncomingLetter
from node.storage.node_store import NodeStore

SENDER, RECIPIENT = "000.00.00.G22", "10101010101"
RECIPIENT_URI = f"urn:chapar:agency:{RECIPIENT}"
E = pb.EvidenceEvent


def _letter(sequence: int = 1, subject: str = "") -> tuple[IncomingLetter, pb.Envelope]:
    shams = pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence)
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=SENDER),
        subject=subject,
        recipients=[pb.Address(agency=RECIPIENT, mailbox="legal")],
    ).SerializeToString()
    envelope = pb.Envelope(header=header, body=b"body")
    incoming = IncomingLetter(
        shams=format_shams(shams),
        sender=SENDER,
        recipients=[RECIPIENT],
        envelope=envelope.SerializeToString(),
        envelope_sha256=hashlib.sha256(header).digest(),
        shams_pb=shams,
    )
    return incoming, envelope


def _relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:
    return pb.Evidence(
        content=evidence_content(
            E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
            issuer="urn:chapar:hub:test",
            shams=letter.shams_pb,
            envelope_sha256=letter.envelope_sha256,
            recipient=recipient,
            now=dt.datetime.now(dt.UTC),
        )
    )


def _receipt(letter: IncomingLetter, event: pb.EvidenceEvent.ValueType) -> pb.Evidence:
    """A receipt the recipient's node issues (signing is the shell's: not needed here)."""
    return pb.Evidence(
        content=evidence_content(
            event,
            issuer=RECIPIENT_URI,
            shams=letter.shams_pb,
            envelope_sha256=letter.envelope_sha256,
            recipient=RECIPIENT,
            now=dt.datetime.now(dt.UTC),
        )
    )


def _as_hub_gets_it(
    evidence: pb.Evidence, shams: str
) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
    """What ``Hub._receipts`` hands ``HubStore.record_receipts`` for a verified receipt."""
    return evidence, pb.EvidenceContent.FromString(evidence.content), shams


async def test_a_recipient_answers_another_letter_under_a_number_it_holds_about_that_letter(
    tmp_path: Path,
) -> None:
    """A site lost with the hub and a sender's node on it, both restored from their copies
    (the canonical disaster): the letters the node numbered and relayed after its copy are
    lost at both, and were delivered to their recipients. The restored node numbers on
    from the highest the restored hub holds (its welcome's accepted_sequences), so a new
    letter gets a number a recipient already holds for the lost one, and the hub, which
    lost that one, accepts it. Its recipient's node (``store_incoming``) takes any letter
    under a number in its inbox for a redelivery, whatever its digest, and answers with
    the DELIVERY (and HANDOVER) of the letter it holds: the hub refuses that answer as
    naming another letter (a stranger), the new letter stays queued, is pushed again on
    every stream and refused again, and is never delivered, never expires (unanswered)
    and its sender never gets any evidence. (``earlier_answers`` compares digests; the
    inbox look-up does not.)"""
    hub = await HubStore.open(tmp_path / "hub.db", durability="normal")
    node = await NodeStore.open(tmp_path / "node.db", durability="normal")
    try:
        lost, lost_envelope = _letter(7, subject="delivered, then lost with the site")
        (held,) = await node.store_incoming(
            [(lost.shams, SENDER, ["legal"], lost_envelope)],
            lambda _: _receipt(lost, E.EVIDENCE_EVENT_DELIVERY),
        )
        # The restored hub holds neither letter: it accepts the new one under that number.
        new, new_envelope = _letter(7, subject="numbered again after the restores")
        assert new.shams == lost.shams
        assert new.envelope_sha256 != lost.envelope_sha256
        (relays,) = await hub.accept([new], _relay)
        assert relays
        refusals: list[StatusFault] = []

        def refuse(_: int, fault: StatusFault) -> pb.Evidence:
            refusals.append(fault)
            return _receipt(new, E.EVIDENCE_EVENT_DELIVERY_FAILURE)

        def take_it_again() -> object:
            return node.store_incoming(
                [(new.shams, SENDER, ["legal"], new_envelope)],
                lambda _: _receipt(new, E.EVIDENCE_EVENT_DELIVERY),
                make_refusal=refuse,
                issuer=RECIPIENT_URI,
            )

        (answer,) = await take_it_again()  # type: ignore[misc]
        assert [f.reason for f in refusals] == ["SHAMS_REUSED"]
        # Pushed again (its receipt lost): the same refusal, not a second one.
        (again,) = await take_it_again()  # type: ignore[misc]
        assert again == answer
        assert len(refusals) == 1
        evidence = pb.Evidence.FromString(answer.blob)
        _, dequeued, strangers = await hub.record_receipts(
            RECIPIENT, [_as_hub_gets_it(evidence, new.shams)]
        )
        assert (dequeued, strangers) == (1, []), (
            f"the recipient answered the new letter with its DELIVERY of the one it holds"
            f" (same evidence: {answer == held}); the hub refused it as another letter's and"
            f" keeps the new one queued ({await hub.queue_depth(RECIPIENT)}) for good"
        )
    finally:
        await hub.close()
        await node.close()


async def test_a_shams_reused_refusal_is_not_filed_as_evidence_of_the_held_letter(
    tmp_path: Path,
) -> None:
    """(Found by a review of the mend above.) store_incoming's SHAMS_REUSED refusal is about the new letter (its envelope digest),
    but it is stored in ``evidence`` under the number, the held letter's: the held letter's
    evidence (GetLetter / Letter.verify, the node's evidence listener) now carries a
    DELIVERY_FAILURE about another letter, and an honest letter's verification fails with
    EVIDENCE_MISMATCH ("evidence ... is about another letter")."""
    node = await NodeStore.open(tmp_path / "node.db", durability="normal")
    try:
        lost, lost_envelope = _letter(7, subject="held")
        await node.store_incoming(
            [(lost.shams, SENDER, ["legal"], lost_envelope)],
            lambda _: _receipt(lost, E.EVIDENCE_EVENT_DELIVERY),
        )
        new, new_envelope = _letter(7, subject="numbered again")

        def refuse(_: int, fault: StatusFault) -> pb.Evidence:
            # As the hub link makes it: the fault's reason in the evidence.
            return pb.Evidence(
                content=evidence_content(
                    E.EVIDENCE_EVENT_DELIVERY_FAILURE,
                    issuer=RECIPIENT_URI,
                    shams=new.shams_pb,
                    envelope_sha256=new.envelope_sha256,
                    recipient=RECIPIENT,
                    now=dt.datetime.now(dt.UTC),
                    reason=fault.reason,
                    detail=fault.message,
                )
            )

        await node.store_incoming(
            [(new.shams, SENDER, ["legal"], new_envelope)],
            lambda _: _receipt(new, E.EVIDENCE_EVENT_DELIVERY),
            make_refusal=refuse,
            issuer=RECIPIENT_URI,
        )
        held = await node.letter(lost.shams)
        assert held is not None
        digest = hashlib.sha256(lost_envelope.header).digest()
        about_other = [
            pb.EvidenceContent.FromString(e.content)
            for e in held.evidence
            if pb.EvidenceContent.FromString(e.content).envelope_sha256 != digest
        ]
        assert about_other == [], (
            "the held letter's evidence carries the refusal of another letter:"
            f" {[pb.EvidenceEvent.Name(c.event) for c in about_other]}"
        )
    finally:
        await node.close()
