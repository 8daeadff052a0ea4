"""How much a recipient may add to a letter's record. The hub refuses a receipt over 64 KiB
(a recipient may not make a letter's record grow by megabytes a receipt: hub.MAX_RECEIPT_BYTES)
but keeps every receipt under it, however many: each is stored for good (evidence is never
purged), routed to the sender's node as a notice, and read by every Track of the letter.
An honest node issues one DELIVERY (or DELIVERY_FAILURE) and one HANDOVER per letter, and
sends the same ones again. Driven with a real HubStore."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client_sdk import pb
from client_sdk.shams import format_shams
from node.core.evidence import evidence_content
from node.hub import MAX_RECEIPT_BYTES
from node.storage.hub_store import HubStore, IncomingLetter

SENDER, RECIPIENT = "000.00.00.G22", "10101010101"
E = pb.EvidenceEvent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    hub_store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield hub_store
    finally:
        await hub_store.close()


def _letter() -> IncomingLetter:
    shams = pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=1)
    header = pb.EnvelopeHeader(shams=shams).SerializeToString()
    return IncomingLetter(
        shams=format_shams(shams),
        sender=SENDER,
        recipients=[RECIPIENT],
        envelope=pb.Envelope(header=header).SerializeToString(),
        envelope_sha256=hashlib.sha256(header).digest(),
        shams_pb=shams,
    )


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


def _handover(letter: IncomingLetter, detail: str) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
    data = evidence_content(
        E.EVIDENCE_EVENT_HANDOVER,
        issuer=f"urn:chapar:agency:{RECIPIENT}",
        shams=letter.shams_pb,
        envelope_sha256=letter.envelope_sha256,
        recipient=RECIPIENT,
        now=dt.datetime.now(dt.UTC),
        detail=detail,
    )
    return pb.Evidence(content=data), pb.EvidenceContent.FromString(data), letter.shams


async def test_a_recipient_cannot_grow_a_letters_record_without_bound(store: HubStore) -> None:
    # 50 HANDOVER receipts of the recipient about one letter, each with a fresh evidence
    # id and just under the 64 KiB limit: all 50 are stored (3 MB on one letter) and 50
    # notices queued for the sender's node. Nothing bounds the count: a recipient can
    # fill the hub's disk and its correspondent's inbox of evidence through one letter.
    letter = _letter()
    await store.accept([letter], _relay)
    detail = "x" * (MAX_RECEIPT_BYTES - 1024)
    for _ in range(5):
        batch = [_handover(letter, detail) for _ in range(10)]
        assert all(e.ByteSize() <= MAX_RECEIPT_BYTES for e, _, _ in batch)
        await store.record_receipts(RECIPIENT, batch)
    row = await store.db.fetchone(
        "SELECT count(*), sum(length(evidence)) FROM evidence WHERE shams = ? AND event = ?",
        (letter.shams, E.EVIDENCE_EVENT_HANDOVER),
    )
    assert row is not None
    kept, size = int(row[0]), int(row[1])
    notices = len(await store.notices(SENDER, 0, 1000))
    assert kept <= 2, f"{kept} HANDOVERs ({size} bytes) kept about one letter"
    assert notices <= 2, f"{notices} notices queued for the sender about one letter"
