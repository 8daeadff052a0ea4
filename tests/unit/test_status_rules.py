"""Business status updates: the one rule of who reports what about which letter, the
node's checks of a draft, and how the node's store links updates to their letters.

Pure rules run without I/O; the store runs on real SQLite files under tmp_path, with plain
(unsigned) envelopes, which is all the store looks at (the node verifies before it stores).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams
from client_sdk.statuses import StatusFault, latest_statuses, status_name, status_update_fault
from node.agency import Access, Agency
from node.core.directory import DirectoryView
from node.core.errors import ChaparError, Code
from node.core.letters import LetterLimits, build_header, fit_status_update, validate_draft
from node.storage.db import Database
from node.storage.node_store import MIGRATIONS, LinkedUpdate, NewLetter, NodeStore
from tests.unit.conftest import RECIPIENT, SENDER

A = "000.00.00.G22"  # sends the letter
B = "10861234567"  # receives it
D = "MOF.IR"  # receives it too
C = "MOFA.IR"  # a third party
NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
S = pb.BusinessStatus
ACCEPTED = S.BUSINESS_STATUS_ACCEPTED
COMPLETED = S.BUSINESS_STATUS_COMPLETED
RECALL = S.BUSINESS_STATUS_RECALL_REQUESTED
STATUS_UPDATE = pb.LetterKind.LETTER_KIND_STATUS_UPDATE
OUT = pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING


def _shams(origin: str, sequence: int) -> pb.Shams:
    return pb.Shams(origin=origin, domain=OUT, year=2026, sequence=sequence)


def _header(
    shams: pb.Shams,
    *,
    to: Sequence[str | pb.Address],
    about: pb.Shams | None = None,
    status: int = 0,
    created: dt.datetime = NOW,
    sender_mailbox: str = "",
) -> pb.EnvelopeHeader:
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=shams.origin, mailbox=sender_mailbox),
        recipients=[pb.Address(agency=r) if isinstance(r, str) else r for r in to],
        subject="s",
        kind=STATUS_UPDATE if about is not None else pb.LetterKind.LETTER_KIND_LETTER,
        status=status,  # type: ignore[arg-type]
    )
    header.create_time.FromDatetime(created)
    if about is not None:
        header.in_reply_to.CopyFrom(about)
    return header


LETTER = _header(_shams(A, 1), to=[B, pb.Address(agency=D, mailbox="legal")])


# -- the rule: who may report what ------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "to", "status", "fault"),
    [
        (B, [A], ACCEPTED, None),
        (D, [A], COMPLETED, None),
        (A, [B, D], RECALL, None),
        (A, [D], RECALL, None),  # some of its recipients
        (C, [A], COMPLETED, "NOT_A_PARTY"),  # a third party about someone else's letter
        (C, [B], COMPLETED, "NOT_A_PARTY"),
        (B, [D], ACCEPTED, "NOT_A_PARTY"),  # a recipient to another recipient
        (B, [A, C], ACCEPTED, "NOT_A_PARTY"),  # ... or to the sender and an outsider
        (A, [B, C], RECALL, "NOT_A_PARTY"),  # the sender to someone it did not write to
        (A, [], RECALL, "NOT_A_PARTY"),
        (B, [A], RECALL, "STATUS_WRONG_DIRECTION"),  # a recall is the sender's to ask
        (A, [B], COMPLETED, "STATUS_WRONG_DIRECTION"),  # handling is the recipient's to report
        (B, [A], S.BUSINESS_STATUS_UNSPECIFIED, "MISSING_STATUS"),
    ],
    ids=lambda v: str(v) if isinstance(v, (str, type(None))) else None,
)
def test_an_update_fits_its_letter_only_between_its_two_sides(
    sender: str, to: list[str], status: int, fault: str | None
) -> None:
    found = status_update_fault(LETTER, sender, to, status)
    assert (found.reason if found else None) == fault
    if found is not None:
        assert format_shams(LETTER.shams) in found.message or sender in found.message


UPDATE = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=ACCEPTED)


@pytest.mark.parametrize(
    ("sender", "to", "status"),
    [
        (A, [B], S.BUSINESS_STATUS_RECEIVED),  # its recipient reporting on it
        (B, [A], RECALL),  # its sender recalling it
    ],
    ids=["received", "recall"],
)
def test_no_update_is_about_another_status_update(sender: str, to: list[str], status: int) -> None:
    # Back-ends that answer every letter of their inbox with a status (the README's loop)
    # would otherwise answer each other's updates for ever.
    fault = status_update_fault(UPDATE, sender, to, status)
    assert fault is not None
    assert fault.reason == "STATUS_ABOUT_STATUS_UPDATE"
    assert format_shams(UPDATE.shams) in fault.message


def test_the_latest_status_is_the_one_numbered_last_whatever_the_clocks_said() -> None:
    # An agency numbers all its letters from one counter a year, in the order it signs
    # them; its clock may step back meanwhile (NTP), and create_time with it.
    minute_earlier = NOW - dt.timedelta(minutes=1)
    first = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=ACCEPTED)
    after_a_step_back = _header(
        _shams(B, 2), to=[A], about=LETTER.shams, status=COMPLETED, created=minute_earlier
    )
    assert latest_statuses([first, after_a_step_back]) == {B: COMPLETED}
    next_year = _header(
        pb.Shams(origin=B, domain=OUT, year=2027, sequence=1),
        to=[A],
        about=LETTER.shams,
        status=S.BUSINESS_STATUS_REJECTED,
    )
    assert latest_statuses([next_year, after_a_step_back]) == {B: S.BUSINESS_STATUS_REJECTED}


def test_the_latest_status_is_not_the_one_stored_last() -> None:
    minute_later = NOW + dt.timedelta(minutes=1)
    later = _header(
        _shams(B, 2), to=[A], about=LETTER.shams, status=COMPLETED, created=minute_later
    )
    earlier = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=ACCEPTED)
    same_time = _header(_shams(D, 8), to=[A], about=LETTER.shams, status=ACCEPTED)
    same_time_next = _header(_shams(D, 9), to=[A], about=LETTER.shams, status=COMPLETED)
    assert latest_statuses([later, earlier, same_time_next, same_time]) == {
        B: COMPLETED,
        D: COMPLETED,  # same time: the higher number
    }
    assert latest_statuses([]) == {}
    # On a letter to itself, an agency's recall request (the sender's) is not its status
    # as a recipient.
    to_itself = _header(_shams(A, 8), to=[A, B])
    mine = _header(_shams(A, 9), to=[A], about=to_itself.shams, status=ACCEPTED)
    recall = _header(_shams(A, 10), to=[A, B], about=to_itself.shams, status=RECALL)
    assert latest_statuses([mine, recall]) == {A: ACCEPTED}
    assert status_name(RECALL) == "RECALL_REQUESTED"
    assert status_name(99) == "99"


# -- the submitting node: the draft on its own ---------------------------------------------


def _directory() -> DirectoryView:
    agencies = [pb.Agency(code=c, state=pb.AGENCY_STATE_ACTIVE) for c in (A, B, C, D)]
    return DirectoryView(pb.Directory(version=1, agencies=agencies))


def _validate(draft: pb.LetterDraft, sender: str = B) -> pb.LetterDraft:
    return validate_draft(
        draft, sender=sender, directory=_directory(), limits=LetterLimits(), now=NOW
    )


def _status_draft(**fields: object) -> pb.LetterDraft:
    base: dict[str, object] = {
        "recipients": [pb.Address(agency=A)],
        "subject": "Accepted",
        "kind": STATUS_UPDATE,
        "status": ACCEPTED,
        "in_reply_to": LETTER.shams,
    }
    base.update(fields)
    return pb.LetterDraft(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("draft", "reason"),
    [
        (_status_draft(kind=pb.LetterKind.LETTER_KIND_LETTER), "UNEXPECTED_STATUS"),
        (_status_draft(kind=pb.LetterKind.LETTER_KIND_UNSPECIFIED), "UNEXPECTED_STATUS"),
        (_status_draft(kind=pb.LetterKind.LETTER_KIND_REPLY), "UNEXPECTED_STATUS"),
        (_status_draft(status=S.BUSINESS_STATUS_UNSPECIFIED), "MISSING_STATUS"),
        (_status_draft(status=7), "INVALID_STATUS"),
        (_status_draft(in_reply_to=None), "MISSING_IN_REPLY_TO"),
    ],
    ids=[
        "status-on-a-letter",
        "status-on-unspecified",
        "status-on-a-reply",
        "no-status",
        "unknown-status",
        "no-in-reply-to",
    ],
)
def test_status_is_set_if_and_only_if_the_kind_is_status_update(
    draft: pb.LetterDraft, reason: str
) -> None:
    with pytest.raises(ChaparError) as refused:
        _validate(draft)
    assert (refused.value.code, refused.value.reason) == (Code.INVALID_ARGUMENT, reason)
    field = "draft.in_reply_to" if reason == "MISSING_IN_REPLY_TO" else "draft.status"
    assert [f for f, _ in refused.value.field_violations] == [field]


def test_a_status_update_may_leave_its_recipients_out_and_a_letter_may_not() -> None:
    out = _validate(_status_draft(recipients=[]))
    assert list(out.recipients) == []
    with pytest.raises(ChaparError) as refused:
        _validate(_status_draft(recipients=[], kind=pb.LetterKind.LETTER_KIND_LETTER, status=0))
    assert refused.value.reason == "NO_RECIPIENTS"


def test_the_status_is_signed_in_the_header_of_a_status_update_only() -> None:
    update = _validate(_status_draft())
    header = pb.EnvelopeHeader.FromString(
        build_header(update, sender=B, shams=_shams(B, 3), now=NOW)
    )
    assert (header.kind, header.status, header.in_reply_to) == (
        STATUS_UPDATE,
        ACCEPTED,
        LETTER.shams,
    )
    letter = _validate(_status_draft(kind=pb.LetterKind.LETTER_KIND_LETTER, status=0))
    plain = pb.EnvelopeHeader.FromString(
        build_header(letter, sender=B, shams=_shams(B, 4), now=NOW)
    )
    assert plain.status == S.BUSINESS_STATUS_UNSPECIFIED


# -- the submitting node: the draft against the letter it names ----------------------------


def test_without_recipients_a_received_letters_update_goes_to_its_senders_mailbox() -> None:
    letter = _header(_shams(A, 1), to=[B, D], sender_mailbox="registry")
    draft = _status_draft(recipients=[])
    fit_status_update(draft, letter, sender=B, received=True)
    assert [(r.agency, r.mailbox) for r in draft.recipients] == [(A, "registry")]


def test_without_recipients_a_sent_letters_recall_goes_to_every_recipient() -> None:
    draft = _status_draft(recipients=[], status=RECALL)
    fit_status_update(draft, LETTER, sender=A, received=False)
    assert [(r.agency, r.mailbox) for r in draft.recipients] == [(B, ""), (D, "legal")]


@pytest.mark.parametrize(
    ("sender", "to", "status", "received", "code", "reason", "field"),
    [
        (B, [C], ACCEPTED, True, Code.PERMISSION_DENIED, "NOT_A_PARTY", "draft.recipients"),
        (B, [A, D], ACCEPTED, True, Code.PERMISSION_DENIED, "NOT_A_PARTY", "draft.recipients"),
        (A, [C], RECALL, False, Code.PERMISSION_DENIED, "NOT_A_PARTY", "draft.recipients"),
        (B, [A], RECALL, True, Code.INVALID_ARGUMENT, "STATUS_WRONG_DIRECTION", "draft.status"),
        (A, [B], ACCEPTED, False, Code.INVALID_ARGUMENT, "STATUS_WRONG_DIRECTION", "draft.status"),
    ],
    ids=[
        "to-a-third-party",
        "to-a-co-recipient",
        "recall-to-a-non-recipient",
        "recall-by-a-recipient",
        "accepted-by-the-sender",
    ],
)
def test_an_update_that_does_not_fit_its_letter_is_refused(
    sender: str,
    to: list[str],
    status: int,
    received: bool,
    code: Code,
    reason: str,
    field: str,
) -> None:
    draft = _status_draft(recipients=[pb.Address(agency=r) for r in to], status=status)
    with pytest.raises(ChaparError) as refused:
        fit_status_update(draft, LETTER, sender=sender, received=received)
    assert (refused.value.code, refused.value.reason) == (code, reason)
    assert refused.value.metadata == {"in_reply_to": format_shams(LETTER.shams)}
    assert [f for f, _ in refused.value.field_violations] == [field]


@pytest.mark.parametrize(
    ("sender", "status", "received"),
    [(A, S.BUSINESS_STATUS_RECEIVED, True), (B, RECALL, False)],
    ids=["its-recipient", "its-sender"],
)
def test_a_draft_about_a_status_update_is_refused_whoever_sends_it(
    sender: str, status: int, received: bool
) -> None:
    draft = _status_draft(recipients=[], status=status, in_reply_to=UPDATE.shams)
    with pytest.raises(ChaparError) as refused:
        fit_status_update(draft, UPDATE, sender=sender, received=received)
    assert (refused.value.code, refused.value.reason) == (
        Code.INVALID_ARGUMENT,
        "STATUS_ABOUT_STATUS_UPDATE",
    )
    assert refused.value.metadata == {"in_reply_to": format_shams(UPDATE.shams)}
    assert [f for f, _ in refused.value.field_violations] == ["draft.in_reply_to"]


# -- the node's store: links -----------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    node_store = await NodeStore.open(tmp_path / "node.db", durability="normal")
    yield node_store
    await node_store.close()


def _envelope(header: pb.EnvelopeHeader, body: bytes = b"") -> pb.Envelope:
    return pb.Envelope(header=header.SerializeToString(deterministic=True), body=body)


def _incoming(
    header: pb.EnvelopeHeader, body: bytes = b""
) -> tuple[str, str, list[str], pb.Envelope]:
    return (format_shams(header.shams), header.sender.agency, [""], _envelope(header, body))


def _delivery(_: object) -> pb.Evidence:
    content = pb.EvidenceContent(evidence_id=str(uuid.uuid4()), event=pb.EVIDENCE_EVENT_DELIVERY)
    return pb.Evidence(content=content.SerializeToString())


def _sent(header: pb.EnvelopeHeader, about: str = "") -> NewLetter:
    envelope = _envelope(header, b"note")
    digest = hashlib.sha256(envelope.header).digest()
    content = pb.EvidenceContent(
        evidence_id=str(uuid.uuid4()), event=pb.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
    )
    text = format_shams(header.shams)
    receipt = pb.Receipt(
        shams=header.shams,
        shams_text=text,
        envelope_sha256=digest,
        evidence=pb.Evidence(content=content.SerializeToString()),
    )
    recipients = [r.agency for r in header.recipients]
    return NewLetter(text, envelope, digest, recipients, receipt, content, about=about)


async def _send(store: NodeStore, header: pb.EnvelopeHeader, about: str = "") -> None:
    await store.submit(
        [""],
        origin=header.shams.origin,
        domain=OUT,
        year=2026,
        build=lambda _i, _shams: _sent(header, about),
    )


async def _receive(store: NodeStore, *headers: pb.EnvelopeHeader) -> None:
    updates = {i: h for i, h in enumerate(headers) if h.kind == STATUS_UPDATE}
    await store.store_incoming([_incoming(h) for h in headers], _delivery, None, (), updates)


def _statuses(letter_updates: list[LinkedUpdate]) -> list[tuple[str, int]]:
    headers = [pb.EnvelopeHeader.FromString(u.envelope.header) for u in letter_updates]
    return [(h.sender.agency, h.status) for h in headers]


async def test_updates_from_the_other_side_are_linked_in_the_order_they_were_stored(
    store: NodeStore,
) -> None:
    about = format_shams(LETTER.shams)
    await _send(store, LETTER)
    accepted = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=ACCEPTED)
    completed = _header(_shams(B, 2), to=[A], about=LETTER.shams, status=COMPLETED)
    from_d = _header(_shams(D, 1), to=[A], about=LETTER.shams, status=ACCEPTED)
    await _receive(store, accepted)
    await _receive(store, completed, from_d)
    await _receive(store, accepted)  # delivered again: linked once
    letter = await store.letter(about)
    assert letter is not None
    assert _statuses(letter.status_updates) == [(B, ACCEPTED), (B, COMPLETED), (D, ACCEPTED)]
    assert await store.count("inbox") == 3  # each is a letter in the inbox as well


async def test_a_recall_that_overtakes_its_letter_is_linked_once_the_letter_comes_if_it_fits(
    store: NodeStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Its sender's recall may reach a recipient before the letter (numbers travel apart):
    # it was delivered and never linked, so the letter's tracking never showed the recall.
    ahead = _header(_shams(B, 5), to=[A], about=_shams(B, 80), status=RECALL)
    letter = _header(_shams(B, 80), to=[A, D])
    # Sent also to C, who is no recipient of the letter: it does not fit once it is known.
    misfit = _header(_shams(B, 6), to=[A, C], about=_shams(B, 81), status=RECALL)
    other = _header(_shams(B, 81), to=[A])
    # A recall of a status update (a status is never about a status update).
    of_update = _header(_shams(B, 7), to=[A], about=_shams(B, 82), status=RECALL)
    update = _header(_shams(B, 82), to=[A], about=LETTER.shams, status=ACCEPTED)
    await _send(store, LETTER)
    await _receive(store, ahead, misfit, of_update)
    with caplog.at_level(logging.WARNING, logger="chapar.node"):
        await _receive(store, letter, other, update)
    held = await store.letter(format_shams(letter.shams))
    assert held is not None
    assert _statuses(held.status_updates) == [(B, RECALL)]
    for unfit in (other, update):
        held = await store.letter(format_shams(unfit.shams))
        assert held is not None
        assert held.status_updates == []
    assert "does not fit it" in caplog.text
    # In one frame, the recall first: judged against the letter of the same frame.
    same_frame = _header(_shams(B, 8), to=[A], about=_shams(B, 83), status=RECALL)
    late = _header(_shams(B, 83), to=[A])
    await _receive(store, same_frame, late)
    held = await store.letter(format_shams(late.shams))
    assert held is not None
    assert _statuses(held.status_updates) == [(B, RECALL)]


async def test_without_a_refusal_an_update_that_does_not_fit_is_delivered_and_never_linked(
    store: NodeStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The store's own default; the node's hub link refuses such an update (below).
    await _send(store, LETTER)
    forged = _header(_shams(C, 1), to=[A], about=LETTER.shams, status=COMPLETED)
    wrong_way = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=RECALL)
    with caplog.at_level(logging.WARNING, logger="chapar.node"):
        await _receive(store, forged, wrong_way)
    letter = await store.letter(format_shams(LETTER.shams))
    assert letter is not None
    assert letter.status_updates == []
    assert await store.count("inbox") == 2  # delivered: the back-end sees both as letters
    reasons = [getattr(r, "reason", None) for r in caplog.records]
    assert reasons == ["NOT_A_PARTY", "STATUS_WRONG_DIRECTION"]


async def test_an_update_about_a_status_update_is_never_linked(store: NodeStore) -> None:
    # A held update (this node sent it, or received it) is never the letter of another.
    mine = _header(_shams(A, 2), to=[B], about=_shams(B, 9), status=RECALL)
    await _send(store, mine, about=format_shams(_shams(B, 9)))
    theirs = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=ACCEPTED)
    await _receive(store, theirs)
    await _receive(
        store,
        _header(_shams(B, 2), to=[A], about=mine.shams, status=S.BUSINESS_STATUS_RECEIVED),
        _header(_shams(B, 3), to=[A], about=theirs.shams, status=RECALL),
    )
    assert await store.count("inbox") == 3
    for update in (mine, theirs):
        held = await store.letter(format_shams(update.shams))
        assert held is not None
        assert held.status_updates == []


ME = "urn:chapar:agency:" + A  # the receiving node's identity, in the tests below


async def _receive_judged(
    store: NodeStore, *headers: pb.EnvelopeHeader
) -> tuple[list[pb.EvidenceContent], list[str]]:
    """Receives letters as the node's hub link does: an update that does not fit a letter
    the store holds is refused. The answer to each, and the reasons of new refusals."""
    reasons: list[str] = []
    incoming = [_incoming(h) for h in headers]

    def refuse(i: int, fault: StatusFault) -> pb.Evidence:
        reasons.append(fault.reason)
        content = pb.EvidenceContent(
            evidence_id=str(uuid.uuid4()),
            event=pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE,
            issuer=ME,
            envelope_sha256=hashlib.sha256(incoming[i][3].header).digest(),
            reason=fault.reason,
        )
        return pb.Evidence(content=content.SerializeToString())

    updates = {i: h for i, h in enumerate(headers) if h.kind == STATUS_UPDATE}
    answers = await store.store_incoming(
        incoming, _delivery, None, (), updates, make_refusal=refuse, issuer=ME
    )
    contents = [
        pb.EvidenceContent.FromString(pb.Evidence.FromString(a.blob).content) for a in answers
    ]
    return contents, reasons


async def test_an_update_that_does_not_fit_a_held_letter_is_refused_once_and_not_delivered(
    store: NodeStore,
) -> None:
    # Delivered unlinked, it reached the back-end looking like a real update; the node
    # now refuses it as it refuses a letter failing its checks (DELIVERY_FAILURE, the
    # rule's reason), and answers a redelivery with the same refusal.
    await _send(store, LETTER)
    forged = _header(_shams(C, 1), to=[A], about=LETTER.shams, status=COMPLETED)
    wrong_way = _header(_shams(B, 1), to=[A], about=LETTER.shams, status=RECALL)
    genuine = _header(_shams(B, 2), to=[A], about=LETTER.shams, status=ACCEPTED)
    # About letters not held here: a third party naming one (a number still to come, say)
    # fits no letter this node could hold, nor does a sender reporting a recipient's
    # status; only the letter's own sender recalling it may come before it.
    not_held = _header(_shams(C, 2), to=[A], about=_shams(B, 77), status=COMPLETED)
    not_yet = _header(_shams(B, 3), to=[A], about=_shams(B, 78), status=COMPLETED)
    recall_ahead = _header(_shams(B, 4), to=[A], about=_shams(B, 79), status=RECALL)
    answers, reasons = await _receive_judged(
        store, forged, wrong_way, genuine, not_held, not_yet, recall_ahead
    )
    failure, delivery = pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE, pb.EVIDENCE_EVENT_DELIVERY
    assert [(a.event, a.reason) for a in answers] == [
        (failure, "NOT_A_PARTY"),
        (failure, "STATUS_WRONG_DIRECTION"),
        (delivery, ""),
        (failure, "NOT_A_PARTY"),
        (failure, "STATUS_WRONG_DIRECTION"),
        (delivery, ""),
    ]
    assert reasons == [
        "NOT_A_PARTY",
        "STATUS_WRONG_DIRECTION",
        "NOT_A_PARTY",
        "STATUS_WRONG_DIRECTION",
    ]
    inbox = {r[0] for r in await store.db.fetchall("SELECT shams FROM inbox")}
    assert inbox == {format_shams(genuine.shams), format_shams(recall_ahead.shams)}
    queued = await store.db.fetchall(
        "SELECT shams, event FROM evidence WHERE to_send = 1 AND event = ?", (failure,)
    )
    refused = (forged, wrong_way, not_held, not_yet)
    assert sorted(queued) == sorted((format_shams(h.shams), failure) for h in refused)
    letter = await store.letter(format_shams(LETTER.shams))
    assert letter is not None
    assert _statuses(letter.status_updates) == [(B, ACCEPTED)]

    again, reasons = await _receive_judged(store, forged, genuine)
    assert [a.evidence_id for a in again] == [answers[0].evidence_id, answers[2].evidence_id]
    assert reasons == []  # no second refusal
    assert await store.count("evidence") == 7  # LETTER's acceptance, 4 refusals, 2 deliveries


async def test_an_update_about_a_letter_never_held_is_never_linked(store: NodeStore) -> None:
    # B's ACCEPTED about a number of A's that A's node never issued: without a refusal
    # (the store's default) delivered, never linked; the node's hub link refuses it.
    unknown = _header(_shams(B, 1), to=[A], about=_shams(A, 999), status=ACCEPTED)
    await _receive(store, unknown)
    assert await store.count("inbox") == 1
    assert await store.db.fetchall("SELECT * FROM status_links") == []
    again = _header(_shams(B, 2), to=[A], about=_shams(A, 998), status=ACCEPTED)
    answers, reasons = await _receive_judged(store, again)
    assert [a.event for a in answers] == [pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE]
    assert reasons == ["NOT_A_PARTY"]
    assert await store.count("inbox") == 1


async def test_an_update_naming_no_valid_letter_number_is_delivered_with_the_rest_of_its_frame(
    store: NodeStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A signed update whose in_reply_to is no SHAMS number (a hostile or broken node; the
    # hub checks in_reply_to now, the node does not rely on it) used to make the writer
    # job raise: the whole frame rolled back, honest letters with it, and the hub pushed
    # the same frame again for ever. Now it is delivered unlinked, as the others are.
    await _send(store, LETTER)
    honest = _header(_shams(B, 1), to=[A])
    no_number = _header(_shams(B, 2), to=[A], about=pb.Shams(origin="X"), status=ACCEPTED)
    no_domain = _header(
        _shams(B, 3), to=[A], about=pb.Shams(origin=A, year=2026, sequence=1), status=ACCEPTED
    )
    genuine = _header(_shams(B, 4), to=[A], about=LETTER.shams, status=ACCEPTED)
    with caplog.at_level(logging.WARNING, logger="chapar.node"):
        await _receive(store, honest, no_number, no_domain, genuine)
    assert await store.count("inbox") == 4
    letter = await store.letter(format_shams(LETTER.shams))
    assert letter is not None
    assert _statuses(letter.status_updates) == [(B, ACCEPTED)]
    assert [getattr(r, "reason", None) for r in caplog.records] == ["INVALID_SHAMS"] * 2


async def test_a_recall_request_right_behind_its_letter_is_linked(store: NodeStore) -> None:
    # B holds A's letter once it arrives; A's recall may come in the very same frame.
    letter = _header(_shams(A, 5), to=[B])
    recall = _header(_shams(A, 6), to=[B], about=letter.shams, status=RECALL)
    await _receive(store, letter, recall)
    held = await store.letter(format_shams(letter.shams))
    assert held is not None
    assert held.direction == pb.LetterDirection.LETTER_DIRECTION_INCOMING
    assert _statuses(held.status_updates) == [(A, RECALL)]


async def test_linked_updates_are_read_without_their_notes(store: NodeStore) -> None:
    # A note may be as large as a letter and the other side may send any number of
    # updates: read with the letter, they could make its GetEnvelope answer too large
    # for any client, and each read of it slow. The update's own GetEnvelope has its note.
    letter = _header(_shams(A, 5), to=[B])
    await _receive(store, letter)
    mine = _header(_shams(B, 1), to=[A], about=letter.shams, status=ACCEPTED)
    await _send(store, mine, about=format_shams(letter.shams))
    recall = _header(_shams(A, 6), to=[B], about=letter.shams, status=RECALL)
    await store.store_incoming(
        [_incoming(recall, b"x" * 100_000)], _delivery, None, (), {0: recall}
    )
    held = await store.letter(format_shams(letter.shams))
    assert held is not None
    assert _statuses(held.status_updates) == [(B, ACCEPTED), (A, RECALL)]
    assert held.status_updates == [  # without bodies; and where each is, for access rules
        LinkedUpdate(pb.LetterDirection.LETTER_DIRECTION_OUTGOING, _envelope(mine)),
        LinkedUpdate(pb.LetterDirection.LETTER_DIRECTION_INCOMING, _envelope(recall)),
    ]
    own = await store.letter(format_shams(mine.shams))
    theirs = await store.letter(format_shams(recall.shams))
    assert own is not None
    assert theirs is not None
    assert (own.envelope.body, theirs.envelope.body) == (b"note", b"x" * 100_000)


async def test_a_held_letter_is_found_in_the_outbox_or_the_inbox(store: NodeStore) -> None:
    received = _header(_shams(B, 7), to=[A])
    await _send(store, LETTER)
    await _receive(store, received)
    sent = await store.held_letter(format_shams(LETTER.shams))
    got = await store.held_letter(format_shams(received.shams))
    assert sent is not None
    assert got is not None
    assert (sent.direction, sent.header) == (pb.LetterDirection.LETTER_DIRECTION_OUTGOING, LETTER)
    assert (got.direction, got.header) == (pb.LetterDirection.LETTER_DIRECTION_INCOMING, received)
    assert await store.held_letter(format_shams(_shams(C, 1))) is None
    # A letter to this agency itself is in both boxes: the caller says which side it is.
    to_itself = _header(_shams(A, 8), to=[A, B])
    await _send(store, to_itself)
    await _receive(store, to_itself)
    text = format_shams(to_itself.shams)
    as_sender = await store.held_letter(text)
    as_recipient = await store.held_letter(text, received_first=True)
    assert as_sender is not None
    assert as_recipient is not None
    assert (as_sender.direction, as_recipient.direction) == (
        pb.LetterDirection.LETTER_DIRECTION_OUTGOING,
        pb.LetterDirection.LETTER_DIRECTION_INCOMING,
    )
    received_only = await store.held_letter(format_shams(received.shams), received_first=True)
    assert received_only is not None
    assert received_only.direction == pb.LetterDirection.LETTER_DIRECTION_INCOMING


async def test_a_database_of_schema_5_gains_the_link_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = await Database.open(path, MIGRATIONS[:5])
    await old.close()
    store = await NodeStore.open(path)
    try:
        assert await store.db.fetchone("PRAGMA user_version") == (len(MIGRATIONS),)
        assert await store.db.fetchall("SELECT * FROM status_links") == []
    finally:
        await store.close()


async def test_on_a_letter_to_itself_the_status_picks_the_side_before_its_own_copy_arrives(
    agency: Agency,
) -> None:
    # A letter from SENDER to itself and RECIPIENT is in SENDER's outbox at once, in its
    # inbox only once the hub brings it back. The side of an update was read from the copy
    # found: before the inbox copy came, ACCEPTED was taken for the sender's and refused
    # (STATUS_WRONG_DIRECTION), after it, accepted.
    access = Access(Identity.for_agency(SENDER), None)
    to_self = pb.LetterDraft(
        recipients=[pb.Address(agency=SENDER), pb.Address(agency=RECIPIENT)],
        subject="to itself and another",
        body=b"x",
    )
    (letter,) = await agency._submit(
        [pb.SubmitEnvelopeRequest(request_id="self-1", draft=to_self)], access
    )
    assert isinstance(letter, pb.Receipt)

    def update(status: pb.BusinessStatus.ValueType, request_id: str) -> pb.SubmitEnvelopeRequest:
        draft = pb.LetterDraft(
            subject="status", kind=STATUS_UPDATE, status=status, body=b"", in_reply_to=letter.shams
        )
        return pb.SubmitEnvelopeRequest(request_id=request_id, draft=draft)

    accepted, recall = await agency._submit(
        [update(ACCEPTED, "self-2"), update(RECALL, "self-3")], access
    )
    assert isinstance(accepted, pb.Receipt), accepted  # a recipient's, to the sender: itself
    assert isinstance(recall, pb.Receipt), recall  # the sender's, to the recipients
    sent = {
        r[0]: pb.EnvelopeHeader.FromString(pb.Envelope.FromString(r[1]).header)
        for r in await agency.store.db.fetchall("SELECT shams, envelope FROM outbox")
    }
    headers = [sent[format_shams(r.shams)] for r in (accepted, recall)]
    assert [[a.agency for a in h.recipients] for h in headers] == [[SENDER], [SENDER, RECIPIENT]]
