"""The hub's correspondence tree (``HubStore.tree``): links recorded as letters are accepted,
the walk up and down them, its guards against cycles and size, and what outlives retention."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from client_sdk import pb
from client_sdk.shams import format_shams
from client_sdk.signing import sha256
from node.core.evidence import evidence_content
from node.storage.db import Database
from node.storage.hub_store import MIGRATIONS, HubStore, IncomingLetter

A = "000.00.00.G22"
B = "10861234567"
C = "MOFA.IR"
E = pb.EvidenceEvent


def _number(origin: str, sequence: int) -> pb.Shams:
    return pb.Shams(origin=origin, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence)


def _letter(
    origin: str,
    sequence: int,
    to: Sequence[str],
    reply_to: pb.Shams | None = None,
    kind: pb.LetterKind.ValueType = pb.LetterKind.LETTER_KIND_LETTER,
    status: pb.BusinessStatus.ValueType = pb.BusinessStatus.BUSINESS_STATUS_UNSPECIFIED,
) -> IncomingLetter:
    shams = _number(origin, sequence)
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=origin),
        recipients=[pb.Address(agency=r) for r in to],
        kind=kind,
        status=status,
        subject=f"letter {sequence}",
    )
    if reply_to is not None:
        header.in_reply_to.CopyFrom(reply_to)
    data = header.SerializeToString()
    return IncomingLetter(
        shams=format_shams(shams),
        sender=origin,
        recipients=list(to),
        envelope=pb.Envelope(header=data, body=b"the body " * 100).SerializeToString(),
        envelope_sha256=sha256(data),
        shams_pb=shams,
        kind=kind,
        in_reply_to=format_shams(reply_to) if reply_to is not None else None,
        status=status,
    )


def _relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:
    return pb.Evidence(
        content=evidence_content(
            E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
            issuer="urn:chapar:hub:national",
            shams=letter.shams_pb or _number(A, 1),
            envelope_sha256=letter.envelope_sha256,
            recipient=recipient,
            now=dt.datetime.now(dt.UTC),
        )
    )


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[HubStore]:
    store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    try:
        yield store
    finally:
        await store.close()


async def _accept(hub: HubStore, *letters: IncomingLetter) -> None:
    for letter in letters:  # one by one: acceptance order is the order given
        assert await hub.accept([letter], _relay)


def _numbers(tree: object) -> list[str]:
    return [t.shams for t in tree.letters]  # type: ignore[attr-defined]


async def test_the_tree_holds_the_ancestors_then_every_descendant_breadth_first(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B])
    y = _letter(B, 1, [A], reply_to=x.shams_pb, kind=pb.LetterKind.LETTER_KIND_REPLY)
    update = _letter(
        B,
        2,
        [A],
        reply_to=x.shams_pb,
        kind=pb.LetterKind.LETTER_KIND_STATUS_UPDATE,
        status=pb.BusinessStatus.BUSINESS_STATUS_ACCEPTED,
    )
    z = _letter(B, 3, [C], reply_to=y.shams_pb)
    zz = _letter(C, 1, [B], reply_to=z.shams_pb)
    stranger = _letter(C, 2, [A])
    await _accept(hub, x, y, update, z, zz, stranger)

    tree = await hub.tree(z.shams)
    assert tree is not None
    assert not tree.truncated
    # The letter asked for, its parent, the first letter; then the rest by level.
    assert _numbers(tree) == [z.shams, y.shams, x.shams, update.shams, zz.shams]
    by = {t.shams: t for t in tree.letters}
    assert (by[update.shams].kind, by[update.shams].status) == (
        pb.LetterKind.LETTER_KIND_STATUS_UPDATE,
        pb.BusinessStatus.BUSINESS_STATUS_ACCEPTED,
    )
    assert by[z.shams].in_reply_to == y.shams
    assert by[x.shams].in_reply_to is None
    assert (by[z.shams].sender, by[z.shams].recipients) == (B, [C])
    # From any letter of the thread, the same letters.
    around_x = await hub.tree(x.shams)
    assert around_x is not None
    assert sorted(_numbers(around_x)) == sorted(_numbers(tree))
    assert _numbers(around_x)[0] == x.shams


async def test_each_letter_comes_with_its_evidence_recipients_and_envelope_without_body(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B, C])
    await _accept(hub, x)
    tree = await hub.tree(x.shams)
    assert tree is not None
    (letter,) = tree.letters
    assert letter.recipients == [B, C]
    contents = [pb.EvidenceContent.FromString(e.content) for e in letter.evidence]
    assert [(c.event, c.recipient) for c in contents] == [
        (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, B),
        (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, C),
    ]
    assert letter.envelope is not None
    assert letter.envelope.body == b""
    assert letter.envelope.header == pb.Envelope.FromString(x.envelope).header
    assert letter.accepted_at <= time.time()


async def test_an_unknown_letter_has_no_tree_and_an_unknown_parent_ends_the_walk_up(
    hub: HubStore,
) -> None:
    assert await hub.tree(format_shams(_number(A, 99))) is None
    orphan = _letter(B, 1, [A], reply_to=_number(A, 42))  # A's 42 never came to the hub
    await _accept(hub, orphan)
    tree = await hub.tree(orphan.shams)
    assert tree is not None
    assert _numbers(tree) == [orphan.shams]
    assert tree.letters[0].in_reply_to == format_shams(_number(A, 42))


async def test_a_cycle_of_links_is_walked_once(hub: HubStore) -> None:
    # A hostile node numbers a letter in reply to one of its numbers still to come, which
    # then answers the first; another answers itself.
    p = _letter(C, 1, [A], reply_to=_number(C, 2))
    q = _letter(C, 2, [A], reply_to=_number(C, 1))
    r = _letter(C, 3, [A], reply_to=p.shams_pb)
    selfish = _letter(C, 4, [A], reply_to=_number(C, 4))
    await _accept(hub, p, q, r, selfish)
    tree = await hub.tree(p.shams)
    assert tree is not None
    assert not tree.truncated
    assert _numbers(tree) == [p.shams, q.shams, r.shams]
    alone = await hub.tree(selfish.shams)
    assert alone is not None
    assert _numbers(alone) == [selfish.shams]


async def test_a_tree_is_cut_at_its_limit_up_and_down(hub: HubStore) -> None:
    chain = [_letter(A, 1, [B])]
    for i in range(2, 11):
        chain.append(_letter(A, i, [B], reply_to=chain[-1].shams_pb))
    await _accept(hub, *chain)
    up = await hub.tree(chain[-1].shams, limit=4)
    assert up is not None
    assert up.truncated
    assert _numbers(up) == [c.shams for c in reversed(chain[-4:])]
    down = await hub.tree(chain[0].shams, limit=4)
    assert down is not None
    assert down.truncated
    assert _numbers(down) == [c.shams for c in chain[:4]]
    whole = await hub.tree(chain[0].shams, limit=10)
    assert whole is not None
    assert not whole.truncated
    assert len(whole.letters) == 10


async def test_a_tree_is_cut_at_its_bytes_but_keeps_the_letter_asked_for(hub: HubStore) -> None:
    x = _letter(A, 1, [B])
    replies = [_letter(B, i, [A], reply_to=x.shams_pb) for i in range(1, 4)]
    await _accept(hub, x, *replies)
    tree = await hub.tree(x.shams, max_bytes=1)
    assert tree is not None
    assert tree.truncated
    assert _numbers(tree) == [x.shams]


async def test_the_tree_outlives_retention_envelopes_gone_links_and_evidence_kept(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B])
    y = _letter(B, 1, [A], reply_to=x.shams_pb)
    await _accept(hub, x, y)
    # Delivered: out of the queues, so retention may take the envelopes.
    await hub.db.write(lambda conn: conn.execute("DELETE FROM queue"))
    assert await hub.purge(time.time() + 1) == 2
    tree = await hub.tree(y.shams)
    assert tree is not None
    assert _numbers(tree) == [y.shams, x.shams]
    assert all(t.envelope is None for t in tree.letters)
    assert all(len(t.evidence) == 1 for t in tree.letters)
    assert tree.letters[0].in_reply_to == x.shams


async def test_letters_accepted_before_the_tree_are_linked_from_the_envelopes_held(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.db"
    x = _letter(A, 1, [B])
    y = _letter(B, 1, [A], reply_to=x.shams_pb, kind=pb.LetterKind.LETTER_KIND_REPLY)
    gone = _letter(B, 2, [A], reply_to=x.shams_pb)
    old = await Database.open(path, MIGRATIONS[:7])  # the schema before the tree
    try:

        def insert(conn: object) -> None:
            for i, letter in enumerate((x, y, gone)):
                conn.execute(  # type: ignore[attr-defined]
                    "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence,"
                    " accepted_at, purged) VALUES (?, ?, ?, x'', ?, ?)",
                    (letter.shams, letter.sender, letter.envelope_sha256, time.time(), i == 2),
                )
                conn.executemany(  # type: ignore[attr-defined]
                    "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, 1)",
                    [(letter.shams, r) for r in letter.recipients],
                )
                if i < 2:  # retention took the third one's envelope
                    conn.execute(  # type: ignore[attr-defined]
                        "INSERT INTO envelopes (shams, envelope) VALUES (?, ?)",
                        (letter.shams, letter.envelope),
                    )

        await old.write(insert)
    finally:
        await old.close()
    store = await HubStore.open(path, durability="normal")
    try:
        assert await store.link_held_letters(chunk=1) == 2
        assert await store.link_held_letters() == 0  # once
        tree = await store.tree(x.shams)
        assert tree is not None
        assert _numbers(tree) == [x.shams, y.shams]  # the third one's link is not known
        by = {t.shams: t for t in tree.letters}
        assert (by[y.shams].kind, by[y.shams].in_reply_to) == (
            pb.LetterKind.LETTER_KIND_REPLY,
            x.shams,
        )
        assert by[x.shams].kind == pb.LetterKind.LETTER_KIND_LETTER
        unlinked = await store.tree(gone.shams)
        assert unlinked is not None
        assert (unlinked.letters[0].kind, unlinked.letters[0].in_reply_to) == (None, None)
    finally:
        await store.close()


def _receipt(
    letter: IncomingLetter,
    recipient: str,
    event: pb.EvidenceEvent.ValueType = E.EVIDENCE_EVENT_HANDOVER,
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
    )
    return pb.Evidence(content=data), pb.EvidenceContent.FromString(data), letter.shams


async def test_letters_of_no_party_are_not_linked_up_or_down_even_to_numbers_to_come(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B])
    # C is no party of X: it numbers letters in reply to X before X exists and after.
    early = _letter(C, 1, [C], reply_to=x.shams_pb)
    await _accept(hub, early)
    late = _letter(C, 2, [B], reply_to=x.shams_pb)
    reply = _letter(B, 1, [A], reply_to=x.shams_pb, kind=pb.LetterKind.LETTER_KIND_REPLY)
    await _accept(hub, x, late, reply)
    around_x = await hub.tree(x.shams, A)
    assert around_x is not None
    assert _numbers(around_x) == [x.shams, reply.shams]
    # C's own letter: in full, with the link its header states, and nothing of X's thread
    # (the same whether X's number is taken or not: no oracle).
    around_late = await hub.tree(late.shams, C)
    assert around_late is not None
    assert _numbers(around_late) == [late.shams]
    assert around_late.letters[0].in_reply_to == x.shams
    assert not around_late.letters[0].redacted
    free = _letter(C, 3, [B], reply_to=_number(A, 99))
    await _accept(hub, free)
    around_free = await hub.tree(free.shams, C)
    assert around_free is not None
    assert _numbers(around_free) == [free.shams]


async def test_a_redacted_letter_shows_its_link_only_if_the_walk_followed_it(
    hub: HubStore,
) -> None:
    w = _letter(C, 1, [C])  # between C and itself: A is no party of it
    x = _letter(A, 1, [B], reply_to=w.shams_pb)
    y = _letter(B, 1, [C], reply_to=x.shams_pb)  # B, a recipient of X, answers it
    await _accept(hub, w, x, y)
    seen_by_c = await hub.tree(y.shams, C)
    assert seen_by_c is not None
    assert _numbers(seen_by_c) == [y.shams, x.shams]
    shown = {t.shams: t for t in seen_by_c.letters}
    assert shown[y.shams].in_reply_to == x.shams
    redacted = shown[x.shams]
    assert redacted.redacted
    assert (redacted.in_reply_to, redacted.sender, redacted.recipients, redacted.evidence) == (
        None,  # X's link to W was not followed: C does not learn it
        "",
        [],
        [],
    )
    assert redacted.envelope is None


async def test_a_flood_of_replies_from_no_party_neither_fills_the_tree_nor_hides_the_reply(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B])
    await _accept(hub, x)
    await hub.db.write(
        lambda conn: conn.executemany(
            "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence, accepted_at,"
            " kind, in_reply_to, status) VALUES (?, ?, x'00', x'', 0, 1, ?, 0)",
            [(format_shams(_number(C, i)), C, x.shams) for i in range(1, 5001)],
        )
    )
    reply = _letter(B, 1, [A], reply_to=x.shams_pb)
    await _accept(hub, reply)
    tree = await hub.tree(x.shams, limit=10)
    assert tree is not None
    assert not tree.truncated
    assert _numbers(tree) == [x.shams, reply.shams]


async def test_the_letters_answering_one_are_read_in_index_order_a_bounded_number(
    hub: HubStore,
) -> None:
    # A party's flood of replies is not sorted whole for each Track: each (letter, party)
    # pair is read in the order of the (in_reply_to, sender) index, up to the room left.
    from node.storage.hub_store import _ANSWERING

    plan = await hub.db.fetchall(f"EXPLAIN QUERY PLAN {_ANSWERING}", ("x", "y", 5))
    steps = " ".join(str(row[3]) for row in plan)
    assert "USING INDEX letters_by_reply (in_reply_to=? AND sender=?)" in steps
    assert "TEMP B-TREE" not in steps
    x = _letter(A, 1, [B])
    replies = [_letter(B, i, [A], reply_to=x.shams_pb) for i in range(1, 8)]
    await _accept(hub, x, *replies)
    tree = await hub.tree(x.shams, limit=4)
    assert tree is not None
    assert tree.truncated
    assert _numbers(tree) == [x.shams, *(r.shams for r in replies[:3])]


async def test_the_letter_asked_for_has_its_evidence_cut_at_the_byte_limit(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B, C])
    await _accept(hub, x)
    for recipient in (B, C):  # the recipients' receipts (one of each), with a large detail
        for event in (
            E.EVIDENCE_EVENT_DELIVERY_FAILURE,
            E.EVIDENCE_EVENT_DELIVERY,
            E.EVIDENCE_EVENT_HANDOVER,
        ):
            await hub.record_receipts(
                recipient, [_receipt(x, recipient, event, detail="d" * 100_000)]
            )
    whole = await hub.tree(x.shams)
    assert whole is not None
    assert not whole.truncated
    assert len(whole.letters[0].evidence) == 8
    cut = await hub.tree(x.shams, max_bytes=350_000)
    assert cut is not None
    assert cut.truncated
    (letter,) = cut.letters
    assert len(letter.evidence) == 5  # the two relay acceptances and three receipts
    assert letter.envelope is not None
    envelope = letter.envelope.ByteSize()
    assert envelope + sum(e.ByteSize() for e in letter.evidence) <= 350_000


async def test_a_recipient_sees_only_the_evidence_about_itself_and_counts_only_that(
    hub: HubStore,
) -> None:
    x = _letter(A, 1, [B, C])
    await _accept(hub, x)
    await hub.record_receipts(B, [_receipt(x, B, E.EVIDENCE_EVENT_DELIVERY)])
    await hub.record_receipts(C, [_receipt(x, C, E.EVIDENCE_EVENT_DELIVERY, "c" * 200_000)])

    def about(tree: object, viewer: str | None = None) -> list[tuple[int, str]]:
        letter = tree.letters[0]  # type: ignore[attr-defined]
        contents = [pb.EvidenceContent.FromString(e.content) for e in letter.evidence]
        return [(c.event, c.recipient) for c in contents]

    for viewer in (A, None):  # the sender and an auditor: all of it
        everything = await hub.tree(x.shams, viewer)
        assert about(everything) == [
            (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, B),
            (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, C),
            (E.EVIDENCE_EVENT_DELIVERY, B),
            (E.EVIDENCE_EVENT_DELIVERY, C),
        ]
    # B: its own, within a limit C's large receipt alone would pass.
    at_b = await hub.tree(x.shams, B, max_bytes=100_000)
    assert at_b is not None
    assert not at_b.truncated
    assert about(at_b) == [(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, B), (E.EVIDENCE_EVENT_DELIVERY, B)]


async def test_a_level_with_more_letters_than_room_says_the_tree_was_cut(hub: HubStore) -> None:
    # P and Q answer each other, so both come back among the letters answering the level
    # [P, Q], before the replies: those taken are skipped, and the read still sees past
    # the room left.
    p = _letter(C, 1, [A], reply_to=_number(C, 2))
    q = _letter(C, 2, [A], reply_to=_number(C, 1))
    replies = [_letter(C, i, [A], reply_to=p.shams_pb) for i in (3, 4)]
    await _accept(hub, p, q, *replies)
    tree = await hub.tree(p.shams, limit=3)
    assert tree is not None
    assert _numbers(tree) == [p.shams, q.shams, replies[0].shams]
    assert tree.truncated
