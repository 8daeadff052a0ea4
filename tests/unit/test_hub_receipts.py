"""What the hub makes of a recipient's receipts (HubStore.record_receipts), driven with a
real HubStore.

A receipt dequeues its letter only with its evidence: a recipient's receipt under an
evidence id the hub already stored about the same letter (its own RELAY_ACCEPTANCE, which
the recipient reads with Track, or an earlier receipt of another event) is taken for a
resent copy of that evidence.

How much a recipient may add to a letter's record. The hub refuses a receipt over 64 KiB
(a recipient may not make a letter's record grow by megabytes a receipt: hub.MAX_RECEIPT_BYTES)
but keeps every receipt under it, however many: each is stored for good (evidence is never
purged), routed to the sender's node as a notice, and read by every Track of the letter.
An honest node issues one DELIVERY (or DELIVERY_FAILURE) and one HANDOVER per letter, and
sends the same ones again."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from client_sdk import pb
from client_sdk.shams import format_shams
from node.core import lifecycle
from node.core.evidence import evidence_content
from node.hub import MAX_RECEIPT_BYTES, Hub, _Session
from node.storage.hub_store import HubStore, IncomingLetter

SENDER, RECIPIENT = "000.00.00.G22", "10101010101"
OTHER = "20202020202"
E = pb.EvidenceEvent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HubStore]:
    hub_store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield hub_store
    finally:
        await hub_store.close()


def _letter(sequence: int = 1) -> IncomingLetter:
    shams = pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence)
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


def _receipt(
    letter: IncomingLetter,
    event: pb.EvidenceEvent.ValueType,
    evidence_id: str | None = None,
    *,
    recipient: str = RECIPIENT,
    detail: str = "",
) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
    """What ``Hub._receipts`` hands ``record_receipts`` for a receipt of ``recipient``."""
    data = evidence_content(
        event,
        issuer=f"urn:chapar:agency:{recipient}",
        shams=letter.shams_pb,
        envelope_sha256=letter.envelope_sha256,
        recipient=recipient,
        now=dt.datetime.now(dt.UTC),
        detail=detail,
        evidence_id=evidence_id,
    )
    return pb.Evidence(content=data), pb.EvidenceContent.FromString(data), letter.shams


def _handover(letter: IncomingLetter, detail: str) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
    return _receipt(letter, E.EVIDENCE_EVENT_HANDOVER, detail=detail)


async def _events(store: HubStore, shams: str) -> list[int]:
    rows = await store.db.fetchall(
        "SELECT evidence FROM evidence WHERE shams = ? ORDER BY rowid", (shams,)
    )
    return [pb.EvidenceContent.FromString(pb.Evidence.FromString(r[0]).content).event for r in rows]


async def test_a_delivery_under_the_relay_acceptances_id_does_not_dequeue_without_evidence(
    store: HubStore,
) -> None:
    # The recipient's node signs a DELIVERY whose evidence id is the id of the hub's
    # RELAY_ACCEPTANCE for it (shown to the recipient by Track). The hub takes it for a
    # resent copy of evidence it holds: it stores nothing and routes nothing to the
    # sender, yet it deletes the queue row. The letter is then in no queue (it never
    # expires), its state stays RELAYED for good, and the sender never gets DELIVERY nor
    # EXPIRY evidence: a recipient that read the letter leaves no signed trace of it.
    letter = _letter(1)
    ((relay,),) = await store.accept([letter], _relay)
    relay_id = pb.EvidenceContent.FromString(relay.content).evidence_id
    senders, dequeued, _ = await store.record_receipts(
        RECIPIENT, [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY, relay_id)]
    )
    state = await store.db.fetchone(
        "SELECT state FROM recipient_state WHERE shams = ?", (letter.shams,)
    )
    assert state is not None
    # Either the receipt is refused (the letter stays queued) or it is stored as DELIVERY.
    if dequeued:
        assert E.EVIDENCE_EVENT_DELIVERY in await _events(store, letter.shams)
        assert senders == [SENDER]
        assert int(state[0]) == lifecycle.DELIVERED
    else:
        assert await store.queue_depth(RECIPIENT) == 1


async def test_a_delivery_under_an_earlier_handovers_id_is_stored(store: HubStore) -> None:
    # The same with the recipient's own HANDOVER: a DELIVERY reusing its id dequeues the
    # letter and no DELIVERY evidence is ever stored or routed to the sender. (A HANDOVER
    # kept with no DELIVERY before it, as a hub kept one before it refused that.)
    letter = _letter(2)
    await store.accept([letter], _relay)
    handover = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER)
    await store.db.write(
        lambda conn: conn.execute(
            "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
            " VALUES (?, ?, ?, ?, 0)",
            (handover[1].evidence_id, letter.shams, handover[1].event,
             handover[0].SerializeToString()),
        )
    )  # fmt: skip
    _, dequeued, _ = await store.record_receipts(
        RECIPIENT, [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY, handover[1].evidence_id)]
    )
    if dequeued:
        assert E.EVIDENCE_EVENT_DELIVERY in await _events(store, letter.shams)
    else:
        assert await store.queue_depth(RECIPIENT) == 1


async def test_two_deliveries_under_one_id_in_a_frame_each_leave_their_evidence(
    store: HubStore,
) -> None:
    # In one frame, DELIVERY receipts for two letters under one evidence id: the first is
    # stored, the second is taken for it (``known``) and its letter dequeued all the same,
    # with no evidence about it and its state RELAYED for good.
    x, y = _letter(3), _letter(4)
    await store.accept([x, y], _relay)
    first = _receipt(x, E.EVIDENCE_EVENT_DELIVERY)
    second = _receipt(y, E.EVIDENCE_EVENT_DELIVERY, first[1].evidence_id)
    _, dequeued, _ = await store.record_receipts(RECIPIENT, [first, second])
    if dequeued == 2:
        assert E.EVIDENCE_EVENT_DELIVERY in await _events(store, y.shams)
    else:
        assert await store.queue_depth(RECIPIENT) == 2 - dequeued
        assert await store.queue_depth(RECIPIENT) >= 1


async def test_the_same_receipt_sent_again_is_answered_and_stored_once(store: HubStore) -> None:
    # A receipt whose acknowledgement was lost comes again, byte for byte (the node sends
    # what it stored): taken for what it is, a resend, in a later frame or the same one.
    letter = _letter(5)
    await store.accept([letter], _relay)
    delivery = _receipt(letter, E.EVIDENCE_EVENT_DELIVERY)
    assert await store.record_receipts(RECIPIENT, [delivery, delivery]) == ([SENDER], 1, [])
    assert await store.record_receipts(RECIPIENT, [delivery]) == ([], 0, [])
    assert await _events(store, letter.shams) == [
        E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        E.EVIDENCE_EVENT_DELIVERY,
    ]
    assert len(await store.notices(SENDER, 0, 10)) == 1


async def test_a_resent_delivery_dequeues_a_letter_queued_again(store: HubStore) -> None:
    # The letter back in the queue with its DELIVERY stored (as after a lost answer, when
    # the queue row outlived it): the same DELIVERY sent again dequeues it, stores nothing.
    letter = _letter(6)
    await store.accept([letter], _relay)
    delivery = _receipt(letter, E.EVIDENCE_EVENT_DELIVERY)
    await store.record_receipts(RECIPIENT, [delivery])
    await store.db.write(
        lambda conn: conn.execute(
            "INSERT INTO queue (recipient, shams, enqueued_at) VALUES (?, ?, 0)",
            (RECIPIENT, letter.shams),
        )
    )
    assert await store.record_receipts(RECIPIENT, [delivery]) == ([], 1, [])
    assert await store.queue_depth(RECIPIENT) == 0
    assert await _events(store, letter.shams) == [
        E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        E.EVIDENCE_EVENT_DELIVERY,
    ]


async def test_another_content_under_a_receipts_own_id_is_refused(store: HubStore) -> None:
    # A HANDOVER under the id of the recipient's own HANDOVER of the same letter, signed
    # over other content: not a resend, refused.
    letter = _letter(7)
    await store.accept([letter], _relay)
    handover = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER)
    await store.record_receipts(RECIPIENT, [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY), handover])
    other = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER, handover[1].evidence_id, detail="x")
    assert await store.record_receipts(RECIPIENT, [other]) == ([], 0, [letter.shams])
    assert await _events(store, letter.shams) == [
        E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        E.EVIDENCE_EVENT_DELIVERY,
        E.EVIDENCE_EVENT_HANDOVER,
    ]


async def test_a_recipient_cannot_grow_a_letters_record_without_bound(store: HubStore) -> None:
    # 50 HANDOVER receipts of the recipient about one letter, each with a fresh evidence
    # id and just under the 64 KiB limit: all 50 are stored (3 MB on one letter) and 50
    # notices queued for the sender's node. Nothing bounds the count: a recipient can
    # fill the hub's disk and its correspondent's inbox of evidence through one letter.
    letter = _letter()
    await store.accept([letter], _relay)
    await store.record_receipts(RECIPIENT, [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY)])
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


async def _kept(store: HubStore, shams: str) -> list[int]:
    rows = await store.db.fetchall(
        "SELECT event FROM evidence WHERE shams = ? AND event != ? ORDER BY rowid",
        (shams, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE),
    )
    return [int(r[0]) for r in rows]


async def test_a_receipt_signed_again_is_answered_and_dequeues_without_a_second_copy(
    store: HubStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A node restored from a copy signs its answer to a letter pushed again under a new
    # id: not refused (its node would send it for ever), the letter leaves the queue (the
    # DELIVERY stored before stands for it), nothing new is stored or routed, one warning.
    letter = _letter()
    await store.accept([letter], _relay)
    first = _receipt(letter, E.EVIDENCE_EVENT_DELIVERY)
    assert await store.record_receipts(RECIPIENT, [first]) == ([SENDER], 1, [])
    await store.db.write(
        lambda conn: conn.execute(
            "INSERT INTO queue (recipient, shams, enqueued_at) VALUES (?, ?, 0)",
            (RECIPIENT, letter.shams),
        )
    )
    again = [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY) for _ in range(2)]
    with caplog.at_level("WARNING", logger="chapar.hub"):
        assert await store.record_receipts(RECIPIENT, again) == ([], 1, [])
    assert [r.getMessage() for r in caplog.records if "not kept" in r.getMessage()] == [
        f"receipts from {RECIPIENT} not kept: one of the same event from it is held about"
        " each of these letters"
    ]
    assert await store.queue_depth(RECIPIENT) == 0
    assert await _kept(store, letter.shams) == [E.EVIDENCE_EVENT_DELIVERY]
    assert len(await store.notices(SENDER, 0, 10)) == 1


async def test_one_receipt_of_each_event_is_kept_a_recipient(store: HubStore) -> None:
    # DELIVERY after DELIVERY_FAILURE (a letter refused, then delivered again when it
    # checks), HANDOVER: one of each, in one frame or in several; another recipient's are
    # its own.
    letter = IncomingLetter(
        shams=_letter().shams,
        sender=SENDER,
        recipients=[RECIPIENT, OTHER],
        envelope=_letter().envelope,
        envelope_sha256=_letter().envelope_sha256,
        shams_pb=_letter().shams_pb,
    )
    await store.accept([letter], _relay)
    events = [
        E.EVIDENCE_EVENT_DELIVERY_FAILURE,
        E.EVIDENCE_EVENT_DELIVERY,
        E.EVIDENCE_EVENT_HANDOVER,
        E.EVIDENCE_EVENT_HANDOVER,
    ]
    senders, dequeued, strangers = await store.record_receipts(
        RECIPIENT, [_receipt(letter, e) for e in events]
    )
    assert (senders, dequeued, strangers) == ([SENDER] * 3, 1, [])
    assert await store.record_receipts(RECIPIENT, [_receipt(letter, e) for e in events]) == (
        [],
        0,
        [],
    )
    others = [E.EVIDENCE_EVENT_DELIVERY, E.EVIDENCE_EVENT_HANDOVER]
    assert await store.record_receipts(
        OTHER, [_receipt(letter, e, recipient=OTHER) for e in others]
    ) == ([SENDER] * 2, 1, [])
    assert await _kept(store, letter.shams) == [*events[:3], *others]
    state = await store.db.fetchall(
        "SELECT recipient, state FROM recipient_state WHERE shams = ? ORDER BY recipient",
        (letter.shams,),
    )
    assert [(str(r), int(s)) for r, s in state] == [
        (RECIPIENT, lifecycle.FAILED),  # the first word stands
        (OTHER, lifecycle.HANDED_OVER),
    ]
    assert await store.queue_depth(OTHER) == 0


async def test_receipts_stored_before_the_count_are_read_once(store: HubStore) -> None:
    # A letter whose receipts were stored before the hub kept count of them (schema 8):
    # they are read from its evidence when the next receipt comes, the recipient's only
    # (another recipient's DELIVERY does not let this one's HANDOVER in).
    letter = IncomingLetter(
        shams=_letter().shams,
        sender=SENDER,
        recipients=[RECIPIENT, OTHER],
        envelope=_letter().envelope,
        envelope_sha256=_letter().envelope_sha256,
        shams_pb=_letter().shams_pb,
    )
    await store.accept([letter], _relay)
    failure = E.EVIDENCE_EVENT_DELIVERY_FAILURE
    await store.record_receipts(RECIPIENT, [_receipt(letter, failure)])
    await store.record_receipts(
        OTHER, [_receipt(letter, E.EVIDENCE_EVENT_DELIVERY, recipient=OTHER)]
    )
    await store.db.write(lambda conn: conn.execute("UPDATE recipient_state SET receipts = NULL"))
    assert await store.record_receipts(
        RECIPIENT,
        [
            _receipt(letter, failure),
            _receipt(letter, E.EVIDENCE_EVENT_HANDOVER),
            _receipt(letter, E.EVIDENCE_EVENT_DELIVERY),
        ],
    ) == ([SENDER], 0, [letter.shams])
    assert await _kept(store, letter.shams) == [
        failure,
        E.EVIDENCE_EVENT_DELIVERY,
        E.EVIDENCE_EVENT_DELIVERY,
    ]
    row = await store.db.fetchone(
        "SELECT receipts FROM recipient_state WHERE shams = ? AND recipient = ?",
        (letter.shams, RECIPIENT),
    )
    assert row is not None
    assert row[0] == 1 << failure | 1 << E.EVIDENCE_EVENT_DELIVERY


async def _state(store: HubStore, shams: str) -> tuple[int, int]:
    row = await store.db.fetchone(
        "SELECT state, receipts FROM recipient_state WHERE shams = ? AND recipient = ?",
        (shams, RECIPIENT),
    )
    assert row is not None
    return int(row[0]), int(row[1])


async def test_a_handover_without_a_delivery_before_it_is_refused(store: HubStore) -> None:
    # The evidence chain is RELAY_ACCEPTANCE, DELIVERY, HANDOVER: a node hands a letter to
    # its back-end only once it has stored it, and sends its DELIVERY first. A HANDOVER
    # with no DELIVERY from that recipient before it was stored and routed to the sender,
    # moved the state to HANDED_OVER and left the letter queued: an EXPIRY could follow it.
    letter = _letter(8)
    await store.accept([letter], _relay)
    handover = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER)
    assert await store.record_receipts(RECIPIENT, [handover]) == ([], 0, [letter.shams])
    assert await _kept(store, letter.shams) == []
    assert await store.notices(SENDER, 0, 10) == []
    assert await _state(store, letter.shams) == (lifecycle.RELAYED, 0)
    assert await store.queue_depth(RECIPIENT) == 1
    # After a DELIVERY_FAILURE too: the letter did not reach the recipient's node.
    failure = _receipt(letter, E.EVIDENCE_EVENT_DELIVERY_FAILURE)
    later = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER)
    assert await store.record_receipts(RECIPIENT, [failure, later]) == (
        [SENDER],
        1,
        [letter.shams],
    )
    assert await _kept(store, letter.shams) == [E.EVIDENCE_EVENT_DELIVERY_FAILURE]


async def test_a_handover_right_behind_its_delivery_is_kept(store: HubStore) -> None:
    # What an honest node sends, in one frame or two; and what it sends again with the
    # DELIVERY when the letter whose HANDOVER was refused is pushed again.
    x, y = _letter(9), _letter(10)
    await store.accept([x, y], _relay)
    assert await store.record_receipts(
        RECIPIENT, [_receipt(x, E.EVIDENCE_EVENT_DELIVERY), _receipt(x, E.EVIDENCE_EVENT_HANDOVER)]
    ) == ([SENDER, SENDER], 1, [])
    assert await store.record_receipts(RECIPIENT, [_receipt(y, E.EVIDENCE_EVENT_DELIVERY)]) == (
        [SENDER],
        1,
        [],
    )
    assert await store.record_receipts(RECIPIENT, [_receipt(y, E.EVIDENCE_EVENT_HANDOVER)]) == (
        [SENDER],
        0,
        [],
    )
    for letter in (x, y):
        assert await _kept(store, letter.shams) == [
            E.EVIDENCE_EVENT_DELIVERY,
            E.EVIDENCE_EVENT_HANDOVER,
        ]
        assert (await _state(store, letter.shams))[0] == lifecycle.HANDED_OVER


def _hub_verifying(store: HubStore, content: pb.EvidenceContent) -> SimpleNamespace:
    """What ``Hub._receipts`` uses of a hub, its trust store verifying every receipt as
    ``content``; ``_leave_window`` the hub's own."""
    hub = SimpleNamespace(
        trust=SimpleNamespace(verify_evidence_many=lambda items: [content]),
        store=store,
        _unanswered={},
        _wake=lambda agency, notices: None,
        _count=lambda agency, delta: None,
    )
    hub._leave_window = lambda session, shams: Hub._leave_window(hub, session, shams)  # type: ignore[arg-type]
    return hub


async def test_a_refused_handover_leaves_its_letter_unanswered_not_free_to_expire(
    store: HubStore, caplog: pytest.LogCaptureFixture
) -> None:
    # At the hub: the letter, pushed and in the node's window, left the window on the
    # HANDOVER as if answered, still queued, so the expiry loop could take it. Refused, it
    # is left unanswered (pushed again on the next stream, not expiring meanwhile), and
    # the refusal is logged with its reason.
    letter = _letter(11)
    await store.accept([letter], _relay)
    item, content, _ = _receipt(letter, E.EVIDENCE_EVENT_HANDOVER)
    hub = _hub_verifying(store, content)
    session = _Session(RECIPIENT, None)  # type: ignore[arg-type]
    session.inflight.add(letter.shams)
    refused = {"code": "INVALID_ARGUMENT", "reason": "HANDOVER_WITHOUT_DELIVERY"}
    before = REGISTRY.get_sample_value("chapar_rejections_total", refused) or 0.0
    with caplog.at_level("WARNING", logger="chapar.hub"):
        ids = await Hub._receipts(hub, session, [item])  # type: ignore[arg-type]
    assert ids == [content.evidence_id]  # answered: its node need not send it again
    assert letter.shams not in session.inflight
    assert hub._unanswered == {RECIPIENT: {letter.shams}}
    assert [r.__dict__.get("reason") for r in caplog.records] == ["HANDOVER_WITHOUT_DELIVERY"]
    # Counted where operators look (chapar_rejections_total), not only logged.
    assert REGISTRY.get_sample_value("chapar_rejections_total", refused) == before + 1


async def test_a_verified_receipt_naming_no_valid_number_is_acknowledged(
    store: HubStore,
) -> None:
    # Signed by its recipient and verified, but its number does not parse: refused for
    # good (no later key or directory makes it name a letter). It was left unacknowledged,
    # so its node sent it again on every stream, for ever.
    letter = _letter(12)
    await store.accept([letter], _relay)
    item, content, _ = _receipt(letter, E.EVIDENCE_EVENT_DELIVERY)
    content.shams.sequence = -1  # not a number a SHAMS can carry
    hub = _hub_verifying(store, content)
    session = _Session(RECIPIENT, None)  # type: ignore[arg-type]
    ids = await Hub._receipts(hub, session, [item])  # type: ignore[arg-type]
    assert ids == [content.evidence_id]
    assert await _events(store, letter.shams) == [E.EVIDENCE_EVENT_RELAY_ACCEPTANCE]
