"""The node's tables: SHAMS counters, outbox, inbox, evidence, per-recipient state.

Every method that changes state is one job of the group-committing writer, so what it
writes lands whole or not at all. Signing happens inside the submission job, after the
SHAMS number is allocated and before the rows are written, so a number is never used
without its row and never skipped (the counter update rolls back with the rows).

Every evidence row written is handed, once committed, to ``NodeStore.on_evidence_stored``
(the node monitor's stage latencies) as the (SHAMS text, parsed content) pair the writer
already had, so nobody reads and parses the rows again.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from client_sdk import pb
from client_sdk.shams import format_shams
from client_sdk.signing import sha256
from client_sdk.statuses import StatusFault, status_name, status_update_fault
from node.core import lifecycle
from node.core.documents import parse_document_uri, senders_documents
from node.core.errors import ChaparError, letter_not_found, request_id_reused
from node.core.splice import Field
from node.storage.db import Database, Job, Page, Store, advance_states, existing, rows_in
from node.storage.restore import RESTORED_KEY, RestoreMark, read_restore_mark

__all__ = [
    "MIGRATIONS",
    "EvidenceListener",
    "HeldLetter",
    "LinkedUpdate",
    "NewLetter",
    "NodeStore",
    "RefusedEvidence",
    "StoredEvidence",
    "StoredLetter",
    "fetched_only",
    "request_key",
]

T = TypeVar("T")
log = logging.getLogger("chapar.node")
# (SHAMS text, parsed content) of the evidence rows one job wrote, in their order.
_Stored = list[tuple[str, pb.EvidenceContent]]


class RefusedEvidence(NamedTuple):
    """Evidence routed to this node as a letter's sender that is not about the letter it
    sent under that number (``NodeStore.record_sender_evidence``): its id, the number it
    names, and why, as an UPPER_SNAKE reason and a detail."""

    evidence_id: str
    shams: str
    reason: str
    detail: str


class StoredEvidence(NamedTuple):
    """An evidence as stored and sent: its id and its serialised ``pb.Evidence``."""

    evidence_id: str
    blob: bytes

    @classmethod
    def of(cls, blob: bytes) -> StoredEvidence:
        evidence = pb.Evidence.FromString(blob)
        return cls(pb.EvidenceContent.FromString(evidence.content).evidence_id, blob)


EvidenceListener = Callable[[Sequence[tuple[str, pb.EvidenceContent]]], None]

MIGRATIONS = [
    """
    CREATE TABLE shams_counter (
        origin TEXT NOT NULL, domain TEXT NOT NULL, year INTEGER NOT NULL,
        last INTEGER NOT NULL, PRIMARY KEY (origin, domain, year)
    );
    CREATE TABLE outbox (
        shams TEXT PRIMARY KEY,
        request_id TEXT UNIQUE,
        envelope BLOB NOT NULL,
        envelope_sha256 BLOB NOT NULL,
        receipt BLOB NOT NULL,
        relay_state INTEGER NOT NULL DEFAULT 0,  -- 0 to relay, 1 relayed, 2 rejected
        created_at REAL NOT NULL
    );
    CREATE INDEX outbox_to_relay ON outbox (relay_state) WHERE relay_state = 0;
    CREATE TABLE inbox (
        shams TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        mailboxes TEXT NOT NULL,
        envelope BLOB NOT NULL,
        delivery BLOB NOT NULL,
        handover BLOB,
        received_at REAL NOT NULL
    );
    CREATE INDEX inbox_unacked ON inbox (handover) WHERE handover IS NULL;
    CREATE TABLE evidence (
        evidence_id TEXT PRIMARY KEY,
        shams TEXT NOT NULL,
        event INTEGER NOT NULL,
        evidence BLOB NOT NULL,
        to_send INTEGER NOT NULL DEFAULT 0,  -- 1: a receipt the hub has not acknowledged
        recorded_at REAL NOT NULL
    );
    CREATE INDEX evidence_by_shams ON evidence (shams);
    CREATE INDEX evidence_to_send ON evidence (to_send) WHERE to_send = 1;
    CREATE TABLE recipient_state (
        shams TEXT NOT NULL, recipient TEXT NOT NULL, state INTEGER NOT NULL,
        PRIMARY KEY (shams, recipient)
    );
    CREATE TABLE certificates (key_id BLOB PRIMARY KEY, der BLOB NOT NULL);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
    # 2: retention keeps header and signature of old letters but drops their bodies.
    """
    ALTER TABLE outbox ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE inbox ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX outbox_to_purge ON outbox (created_at) WHERE purged = 0;
    CREATE INDEX inbox_to_purge ON inbox (received_at) WHERE purged = 0;
    """,
    # 3: bodies in their own table (box 'O' outbox, 'I' inbox). Retention deletes whole
    # rows, so whole pages return to the free list; emptying a blob in place freed nothing.
    # outbox/inbox keep the envelope without its body; rows from before keep theirs inline.
    """
    CREATE TABLE bodies (
        box TEXT NOT NULL, shams TEXT NOT NULL, body BLOB NOT NULL, PRIMARY KEY (box, shams)
    );
    """,
    # 4: who may use a stored document. A client limited to some mailboxes ([[clients]])
    # may download, stat or attach a document only when it uploaded it or when it is
    # attached to a letter sent from or delivered to one of those mailboxes. Letters stored
    # before this version are indexed once at start (NodeStore.index_documents).
    # document_uploads also records, under the owner's identity URI as its client
    # (urn:chapar:agency:<CODE>, never a client's name), that the node fetched the document
    # from its owner through the hub (NodeStore.record_fetch): a received letter's right
    # counts for the node's copy only then (NodeStore.may_use_document).
    """
    CREATE TABLE letter_documents (
        sha256 BLOB NOT NULL, mailbox TEXT NOT NULL, shams TEXT NOT NULL,
        PRIMARY KEY (sha256, mailbox, shams)
    ) WITHOUT ROWID;
    CREATE TABLE document_uploads (
        sha256 BLOB NOT NULL, client TEXT NOT NULL, PRIMARY KEY (sha256, client)
    ) WITHOUT ROWID;
    """,
    # 5: what each request_id asked for (SHA-256 of its draft as sent), so that a
    # request_id used again for a different letter is refused instead of answered with
    # the first letter's receipt. Rows from before have none and are answered as before.
    """
    ALTER TABLE outbox ADD COLUMN request_digest BLOB;
    """,
    # 6: business status updates linked to the letter they are about (``about``): those
    # this agency sent (box 'O') and those it received (box 'I') from the other side of
    # that letter (client_sdk.statuses). The rowid is the order they were stored in.
    """
    CREATE TABLE status_links (
        shams TEXT PRIMARY KEY, about TEXT NOT NULL, box TEXT NOT NULL
    );
    CREATE INDEX status_links_about ON status_links (about);
    """,
    # 7: when the hub accepted each sent letter, so that after a restore of the hub the node
    # sends again what the hub accepted after its backup (NodeStore.handle_hub_restore).
    # Rows from before have none; their created_at stands in.
    """
    ALTER TABLE outbox ADD COLUMN relayed_at REAL;
    """,
    # 8: when the hub last acknowledged each receipt this node issued, so that after a
    # restore of the hub the node sends again what the hub stored after its backup, however
    # long before the node recorded it (its link down across the backup). Rows from before
    # have none; their recorded_at stands in.
    """
    ALTER TABLE evidence ADD COLUMN acked_at REAL;
    """,
    # 9: acknowledgement by mailbox. A letter to several mailboxes of this agency is stored
    # once; a client limited to some of them ([[clients]]) acknowledges it for those only,
    # and it stays in the inbox streams that read any other until that one's back-end has
    # it too. ``acked``: the mailboxes acknowledged ('\n'-joined; NULL: none, or all once
    # ``pending`` is NULL); ``pending``: 1 while a mailbox is not, NULL once every one is
    # (what the streams, the unacknowledged count and retention read). The HANDOVER
    # evidence is still issued once, at the first acknowledgement. Rows from before are
    # pending while not handed over, as they were.
    """
    ALTER TABLE inbox ADD COLUMN acked TEXT;
    ALTER TABLE inbox ADD COLUMN pending INTEGER;
    UPDATE inbox SET pending = 1 WHERE handover IS NULL;
    DROP INDEX inbox_unacked;
    CREATE INDEX inbox_pending ON inbox (pending) WHERE pending = 1;
    """,
]
_DOCUMENTS_INDEXED = "letter_documents_indexed"
# Set once documents fetched before fetches were recorded have been marked as fetched from
# their owner where that is certain (NodeStore.mark_documents_fetched_before).
_FETCHES_MARKED = "document_fetches_marked"
# How document_uploads names an owner the node fetched a document from (an agency's
# identity URI; a client's name has no ':', client_sdk.identity).
_FETCHED_FROM = "urn:chapar:agency:"
# The restore time (node.backup's mark) whose numbers the hub's welcome has confirmed.
_NUMBERS_CONFIRMED = "numbers_confirmed"
# The restore of the hub (its restore_time) this node last sent its letters and receipts
# again for.
_HUB_RESTORE_HANDLED = "hub_restore_handled"
# The max_frame_bytes the hub's last welcome announced (decimal text): what a node
# restarted while the hub is down measures submissions against.
_HUB_FRAME_BYTES = "hub_max_frame_bytes"
# What this node issues as a recipient and sends to the hub.
_RECEIPT_EVENTS = (
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE,
    pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER,
)
# How far back a node sends again its letters and receipts after a restore of the hub at
# most (handle_hub_restore): a day more than the hub's max_letter_age_s by default (7 days),
# past which the hub refuses a letter as too old.
HUB_RESTORE_WINDOW_S = 8 * 24 * 3600.0
# A recipient in one of these never got the letter: a letter all of whose recipients are in
# them is not sent again after a restore of the hub (handle_hub_restore).
_ENDED_IN_FAILURE = (lifecycle.REJECTED, lifecycle.FAILED, lifecycle.EXPIRED)
# Where a letter is held: 1 sent, 2 received (a letter to this agency itself is in both).
_HELD_SENT_FIRST = (
    "SELECT 1, envelope FROM outbox WHERE shams = ?"
    " UNION ALL SELECT 2, envelope FROM inbox WHERE shams = ? ORDER BY 1 LIMIT 1"
)
_HELD_RECEIVED_FIRST = (
    "SELECT 1, envelope FROM outbox WHERE shams = ?"
    " UNION ALL SELECT 2, envelope FROM inbox WHERE shams = ? ORDER BY 1 DESC LIMIT 1"
)
# Between a client's identity and its request_id in the stored key (ids may not hold it).
_REQUEST_SCOPE = "\n"


def request_key(client: str, request_id: str) -> str:
    """How a client's request_id is kept: each client's ids are its own, so two back-ends
    of one agency that both count from 1 do not refuse each other's letters. "" stays ""."""
    return f"{client}{_REQUEST_SCOPE}{request_id}" if request_id else ""


def _bare_request_id(key: str) -> str:
    return key.split(_REQUEST_SCOPE, 1)[-1]


_BODY = Field(pb.Envelope, "body")

_FINAL = (lifecycle.DELIVERED, *lifecycle.TERMINAL)
# A sent letter is done when no recipient is still short of DELIVERED (or a terminal state).
_OUTBOX_DONE = (
    "relay_state != 0 AND created_at < ? AND NOT EXISTS (SELECT 1 FROM recipient_state s "
    "WHERE s.shams = outbox.shams AND s.state NOT IN (?, ?, ?, ?, ?))"
)
assert len(_FINAL) == _OUTBOX_DONE.count("?") - 1

_DOMAIN_LETTER = {
    pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING: "O",
    pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL: "I",
}
_Move = tuple[str, int, int, int]  # a SHAMS counter moved: domain, year, old, new


@dataclass(frozen=True, slots=True)
class NewLetter:
    """A signed letter ready to store: built by the node once its number is known."""

    shams_text: str
    envelope: pb.Envelope
    envelope_sha256: bytes
    recipients: Sequence[str]
    receipt: pb.Receipt
    content: pb.EvidenceContent  # of the receipt's SUBMISSION_ACCEPTANCE evidence, parsed
    mailbox: str = ""  # the sender's mailbox
    documents: Sequence[bytes] = ()  # SHA-256 of each attachment
    about: str = ""  # for a status update: the SHAMS text of the letter it is about


class LinkedUpdate(NamedTuple):
    """A status update linked to a letter: sent by this node (OUTGOING) or received, and
    its envelope without its body."""

    direction: pb.LetterDirection.ValueType
    envelope: pb.Envelope


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """A letter as GetEnvelope returns it."""

    direction: pb.LetterDirection.ValueType
    envelope: pb.Envelope
    evidence: list[pb.Evidence]
    statuses: dict[str, int]
    body_purged: bool = False
    # Linked, in stored order, each without its body (its note).
    status_updates: list[LinkedUpdate] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HeldLetter:
    """A letter this node holds, as a new letter that names it needs it: where it is and
    its (verified when stored) header."""

    direction: pb.LetterDirection.ValueType
    header: pb.EnvelopeHeader


class NodeStore(Store):
    MIGRATIONS = MIGRATIONS

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.on_evidence_stored: EvidenceListener | None = None

    async def _write(
        self, job: Job[tuple[T, _Stored]], on_commit: Callable[[T], None] | None = None
    ) -> T:
        """Runs a job that returns (result, evidence it stored); the evidence goes to
        ``on_evidence_stored`` at commit, in commit order, even if our caller is cancelled
        meanwhile, and so does the result to ``on_commit``. The listener's failure is
        logged and never fails the write."""

        def committed(value: tuple[T, _Stored]) -> None:
            if value[1] and self.on_evidence_stored is not None:
                self.on_evidence_stored(value[1])
            if on_commit is not None:
                on_commit(value[0])

        result, _ = await self.db.write(job, on_commit=committed)
        return result

    # -- submission ---------------------------------------------------------------------

    async def submit(
        self,
        request_ids: Sequence[str],
        *,
        origin: str,
        domain: pb.ShamsDomain.ValueType,
        year: int,
        build: Callable[[int, pb.Shams], NewLetter],
        seal: Callable[[Sequence[NewLetter]], None] | None = None,
        digests: Sequence[bytes] = (),
    ) -> list[pb.Receipt | ChaparError]:
        """Numbers, builds (signs) and stores letters; a known request_id returns its receipt.

        ``build(i, shams)`` makes letter ``i`` of the batch under ``shams``. Letters are
        numbered in batch order. ``seal``, if given, then signs the built letters (their
        envelopes and their receipts' evidence) all at once, in place, before anything is
        stored. ``digests`` (aligned with ``request_ids``, b"" for none) says what each
        request asked for: a request_id known with another digest, here or earlier in the
        batch, gets ``REQUEST_ID_REUSED`` in its place instead of a receipt. Request ids
        are stored as given; the node gives them as ``request_key(client, request_id)``.
        """
        wanted = digests or [b""] * len(request_ids)
        keys = [r for r in request_ids if r]
        # A row stored before request ids were scoped holds the bare id (schema 5 and
        # before): a retry across the upgrade still finds it. Every client's ids were one
        # namespace then, so the bare row answers only the same draft (same digest): another
        # back-end counting from 1 since is not refused, nor given that letter's receipt
        # (which would leave its own letter unsent). A row without a digest (before schema
        # 5) answers no scoped retry: a letter stored twice beats one never stored.
        bare = {k: _bare_request_id(k) for k in keys if _REQUEST_SCOPE in k}
        asked: dict[str, bytes] = {}  # each id's digest as first given in this batch
        for rid, digest in zip(request_ids, wanted, strict=True):
            if rid:
                asked.setdefault(rid, digest)

        def job(conn: sqlite3.Connection) -> tuple[list[pb.Receipt | ChaparError], _Stored]:
            rows: dict[str, tuple[bytes, bytes]] = {
                str(rid): (blob, digest or b"")
                for rid, blob, digest in rows_in(
                    conn,
                    "SELECT request_id, receipt, request_digest FROM outbox"
                    " WHERE request_id IN ({marks})",
                    list(dict.fromkeys([*keys, *bare.values()])),
                )
            }
            known: dict[str, tuple[bytes, bytes]] = {}
            for key in keys:
                row = rows.get(key)
                if row is None and key in bare:
                    old = rows.get(bare[key])
                    if old is not None and old[1] and old[1] == asked[key]:
                        row = old
                if row is not None:
                    known[key] = row
            # The same request_id twice in one batch is one letter.
            firsts: dict[str, int] = {}
            fresh: list[int] = []
            for i, rid in enumerate(request_ids):
                if not rid:
                    fresh.append(i)
                elif rid not in known and rid not in firsts:
                    firsts[rid] = i
                    fresh.append(i)
            letter = _DOMAIN_LETTER[domain]
            conn.execute(
                "INSERT OR IGNORE INTO shams_counter (origin, domain, year, last) VALUES (?, ?, ?, 0)",
                (origin, letter, year),
            )
            row = conn.execute(
                "UPDATE shams_counter SET last = last + ? WHERE origin = ? AND domain = ? AND year = ? "
                "RETURNING last",
                (len(fresh), origin, letter, year),
            ).fetchone()
            assert row is not None
            first_seq = int(row[0]) - len(fresh) + 1
            now = time.time()
            built: dict[int, NewLetter] = {}
            for offset, i in enumerate(fresh):
                shams = pb.Shams(
                    origin=origin, domain=domain, year=year, sequence=first_seq + offset
                )
                built[i] = build(i, shams)
            if seal is not None:
                seal(list(built.values()))
            conn.executemany(
                "INSERT INTO outbox"
                " (shams, request_id, request_digest, envelope, envelope_sha256, receipt, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        b.shams_text,
                        request_ids[i] or None,
                        wanted[i] or None,
                        _without_body(b.envelope),
                        b.envelope_sha256,
                        b.receipt.SerializeToString(),
                        now,
                    )
                    for i, b in built.items()
                ],
            )
            conn.executemany(
                "INSERT INTO bodies (box, shams, body) VALUES ('O', ?, ?)",
                [(b.shams_text, b.envelope.body) for b in built.values()],
            )
            conn.executemany(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        b.content.evidence_id,
                        b.shams_text,
                        pb.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
                        b.receipt.evidence.SerializeToString(),
                        now,
                    )
                    for b in built.values()
                ],
            )
            conn.executemany(
                "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, ?)",
                [
                    (b.shams_text, r, lifecycle.SUBMITTED)
                    for b in built.values()
                    for r in dict.fromkeys(b.recipients)
                ],
            )
            _index_documents(
                conn,
                [(b.shams_text, [b.mailbox], b.documents) for b in built.values() if b.documents],
            )
            links = [(b.shams_text, b.about) for b in built.values() if b.about]
            if links:  # status updates (the node checked them against their letters)
                conn.executemany(
                    "INSERT OR IGNORE INTO status_links (shams, about, box) VALUES (?, ?, 'O')",
                    links,
                )
            out: list[pb.Receipt | ChaparError] = []
            for i, rid in enumerate(request_ids):
                if i in built:
                    out.append(built[i].receipt)
                    continue
                if rid in known:
                    blob, digest = known[rid]
                    receipt = pb.Receipt.FromString(blob)
                else:
                    digest = wanted[firsts[rid]]
                    receipt = built[firsts[rid]].receipt
                # A row from before digests were kept, or a caller that gave none: as before.
                same = not digest or not wanted[i] or digest == wanted[i]
                out.append(receipt if same else request_id_reused(_bare_request_id(rid)))
            return out, [(b.shams_text, b.content) for b in built.values()]

        return await self._write(job)

    async def receipts_of(self, asked: Sequence[tuple[str, bytes]]) -> list[pb.Receipt | None]:
        """For each (request key, digest), the receipt of the letter stored under it, as
        ``submit`` would answer it (the same draft, or a side without a digest; an id
        stored bare, before ids were scoped, only for the same draft), else None: a
        retry's answer."""
        keys = [key for key, _ in asked if key]
        bare = {k: _bare_request_id(k) for k in keys if _REQUEST_SCOPE in k}
        rows: dict[str, tuple[bytes, bytes]] = {
            str(rid): (bytes(blob), bytes(digest or b""))
            for rid, blob, digest in await self.db.fetchall_in(
                "SELECT request_id, receipt, request_digest FROM outbox"
                " WHERE request_id IN ({marks})",
                list(dict.fromkeys([*keys, *bare.values()])),
            )
        }
        out: list[pb.Receipt | None] = []
        for key, digest in asked:
            row = rows.get(key) if key else None
            if row is None and key in bare:
                old = rows.get(bare[key])
                if old is not None and old[1] and old[1] == digest:
                    row = old
            same = row is not None and (not row[1] or not digest or row[1] == digest)
            out.append(pb.Receipt.FromString(row[0]) if row is not None and same else None)
        return out

    async def outbox_to_relay(
        self, after: int, limit: int, max_bytes: int
    ) -> Page[tuple[int, str, bytes, bytes]]:
        """(rowid, shams, envelope bytes, header digest) of letters not yet relayed, oldest
        first: at most ``limit``, and ``max_bytes`` of envelopes (but one always). Sizes are
        read first, so that a backlog of large letters is not loaded to send a frame of
        them (``Database.fetch_page``)."""
        waiting = (
            "FROM outbox o LEFT JOIN bodies b ON b.box = 'O' AND b.shams = o.shams "
            "WHERE o.relay_state = 0 AND o.rowid > ? "
        )
        page = await self.db.fetch_page(
            "SELECT o.rowid, length(o.envelope) + coalesce(length(b.body), 0) "
            f"{waiting} ORDER BY o.rowid LIMIT ?",
            "SELECT o.rowid, o.shams, o.envelope, b.body, o.envelope_sha256 "
            f"{waiting} AND o.rowid <= ? ORDER BY o.rowid LIMIT ?",
            (after,),
            limit,
            max_bytes,
        )
        return Page(
            [(int(r[0]), str(r[1]), _with_body(r[2], r[3]), bytes(r[4])) for r in page],
            more=page.more,
        )

    # -- evidence about letters we sent -------------------------------------------------

    async def record_sender_evidence(
        self, items: Sequence[tuple[pb.Evidence, pb.EvidenceContent, str]]
    ) -> list[RefusedEvidence]:
        """Stores relay results and routed evidence (evidence, content, shams text).

        Idempotent on evidence id; moves each recipient's state along the lifecycle table.
        Returns the evidence refused, neither stored nor moving anything: not about the
        letter this node sent under its number (``_misfit``). The caller logs it; it is
        refused again if it comes again.
        """

        def job(conn: sqlite3.Connection) -> tuple[list[RefusedEvidence], _Stored]:
            now = time.time()
            # Each letter's digest, whether it was relayed before and its recipients'
            # states, read once for the check below and for the moves (advance_states
            # reads nothing more).
            digests: dict[str, bytes] = {}
            relayed: set[str] = set()
            states: dict[tuple[str, str], int] = {}
            for shams, digest, relayed_at, recipient, state in rows_in(
                conn,
                "SELECT o.shams, o.envelope_sha256, o.relayed_at, s.recipient, s.state"
                " FROM outbox o JOIN recipient_state s ON s.shams = o.shams"
                " WHERE o.shams IN ({marks})",
                list(dict.fromkeys(s for _, _, s in items)),
            ):
                digests[str(shams)] = bytes(digest)
                if relayed_at is not None:
                    relayed.add(str(shams))
                states[(str(shams), str(recipient))] = int(state)
            # A node restored from an older copy has lost the letters it relayed after
            # the copy; their DELIVERY and HANDOVER still come (OPERATIONS.md, "What a
            # restore loses"), stored about a number its outbox no longer holds. Only a
            # node never restored knows every number it sent.
            restored = any(s not in digests for _, _, s in items) and (
                read_restore_mark(conn) is not None
            )
            refused: list[RefusedEvidence] = []
            taken: list[tuple[pb.Evidence, pb.EvidenceContent, str]] = []
            for item in items:
                misfit = _misfit(item[1], item[2], digests, states, restored=restored)
                if misfit is None:
                    taken.append(item)
                else:
                    refused.append(misfit)
            known = existing(
                conn,
                "SELECT evidence_id FROM evidence WHERE evidence_id IN ({marks})",
                [c.evidence_id for _, c, _ in taken],
            )
            new: list[tuple[pb.Evidence, pb.EvidenceContent, str]] = []
            for item in taken:
                if item[1].evidence_id not in known:
                    known.add(item[1].evidence_id)
                    new.append(item)
            conn.executemany(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(c.evidence_id, s, c.event, e.SerializeToString(), now) for e, c, s in new],
            )
            # Evidence already stored moves the letter on too: a letter to this node's own
            # agency has its DELIVERY and HANDOVER stored first as the recipient's, and they
            # come back here as its sender's. A repeat moves nothing (states only go
            # forward, the relay state is set once).
            conn.executemany(
                "UPDATE outbox SET relay_state = 1, relayed_at = ? WHERE shams = ? AND relay_state = 0",
                [(now, s) for _, c, s in taken if c.event == pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE],
            )
            # A rejection of a letter relayed before (relayed_at set), sent again after a
            # restore of the hub (handle_hub_restore), is kept as evidence (the hub did
            # refuse it: too old now, its signer's certificate rotated, its recipient
            # suspended) but changes nothing: the letter was accepted and went on, its
            # DELIVERY and HANDOVER stand. It is relayed again, not sent in a loop.
            again = {
                s for _, c, s in taken if c.event == pb.EVIDENCE_EVENT_RELAY_REJECTION
            } & relayed
            conn.executemany(
                "UPDATE outbox SET relay_state = ? WHERE shams = ?",
                [
                    (1 if s in again else 2, s)
                    for _, c, s in taken
                    if c.event == pb.EVIDENCE_EVENT_RELAY_REJECTION
                ],
            )
            # Evidence without a recipient is about the whole letter (a relay rejection).
            advance_states(
                conn,
                [
                    (s, c.recipient or None, c.event)
                    for _, c, s in taken
                    if not (c.event == pb.EVIDENCE_EVENT_RELAY_REJECTION and s in again)
                ],
                states,
            )
            return refused, [(s, c) for _, c, s in new]

        return await self._write(job)

    async def mark_relay_rejected(self, shams: str) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE outbox SET relay_state = 2 WHERE shams = ?", (shams,))

        await self.db.write(job)

    # -- letters we receive ---------------------------------------------------------------

    async def store_incoming(
        self,
        letters: Sequence[tuple[str, str, Sequence[str], pb.Envelope]],
        make_delivery: Callable[[int], pb.Evidence],
        seal: Callable[[Sequence[pb.Evidence]], None] | None = None,
        documents: Sequence[Sequence[bytes]] = (),
        updates: Mapping[int, pb.EnvelopeHeader] | None = None,
        make_refusal: Callable[[int, StatusFault], pb.Evidence] | None = None,
        issuer: str = "",
    ) -> list[StoredEvidence]:
        """Stores received letters (shams, sender, mailboxes, envelope) once each.

        Returns the DELIVERY evidence of each, serialised with its id: the stored one for a
        letter already in the inbox (a redelivery), else a new one from ``make_delivery(i)``,
        queued for the hub. ``seal``, if given, signs the new evidence at once, in place,
        before it is stored. ``documents[i]``, if given, are the SHA-256 digests of letter
        ``i``'s attachments.

        ``updates[i]``, if given, is the verified header of letter ``i``, a status update,
        judged in the same transaction against the letter it is about
        (``client_sdk.statuses``): linked to it when this node holds that letter (stored
        before, or earlier in this frame) and the update fits it; refused when this node
        holds it and the update does not fit, with the DELIVERY_FAILURE evidence
        ``make_refusal(i, fault)`` (stored and queued for the hub instead of the letter, and
        returned as its answer; a refusal ``issuer`` made of the same letter before is
        returned again instead); otherwise only delivered. Without ``make_refusal`` an
        update that does not fit is delivered, unlinked.
        """

        def job(conn: sqlite3.Connection) -> tuple[list[StoredEvidence], _Stored]:
            now = time.time()
            found: dict[str, StoredEvidence] = {}  # by number: stored before, or new below
            new: dict[str, tuple[int, pb.Evidence]] = {}
            refused: dict[str, tuple[int, pb.Evidence]] = {}
            links: list[tuple[str, str]] = []

            def in_frame(about: str) -> pb.EnvelopeHeader | None:
                # A letter delivered earlier in this frame: a recall right behind its letter.
                if about not in new:
                    return None
                return pb.EnvelopeHeader.FromString(letters[new[about][0]][3].header)

            for i, (shams, _, _, envelope) in enumerate(letters):
                if shams in found or shams in new or shams in refused:
                    continue
                row = conn.execute(
                    "SELECT delivery, envelope FROM inbox WHERE shams = ?", (shams,)
                ).fetchone()
                if row is not None:
                    digest = sha256(envelope.header)
                    if make_refusal is None or _header_digest(row[1]) == digest:
                        found[shams] = StoredEvidence.of(row[0])  # delivered again
                        continue
                    # Another letter under a number this node holds (its sender's node and
                    # the hub both restored from copies numbered it again): refused, never
                    # answered with the held letter's DELIVERY, which the hub refuses as
                    # another letter's (the new one was pushed again for ever).
                    earlier = _earlier_refusal(conn, shams, digest, issuer)
                    if earlier is not None:
                        found[shams] = earlier
                    else:
                        refused[shams] = (i, make_refusal(i, _number_held(shams)))
                    continue
                if updates and i in updates:
                    about, fault = _judge_received(conn, shams, updates[i], in_frame)
                    if fault is not None and make_refusal is not None:
                        earlier = _earlier_refusal(conn, shams, sha256(envelope.header), issuer)
                        if earlier is not None:
                            found[shams] = earlier
                        else:
                            refused[shams] = (i, make_refusal(i, fault))
                        continue
                    if about and fault is None:
                        links.append((shams, about))
                new[shams] = (i, make_delivery(i))
            issued = [*new.values(), *refused.values()]
            if seal is not None and issued:
                seal([e for _, e in issued])
            rows = []
            for shams, (i, evidence) in new.items():
                _, sender, mailboxes, envelope = letters[i]
                content = pb.EvidenceContent.FromString(evidence.content)
                blob = evidence.SerializeToString()
                found[shams] = StoredEvidence(content.evidence_id, blob)
                rows.append((shams, sender, mailboxes, envelope, content, blob))
            evidence_rows = [(s, c, blob) for s, _, _, _, c, blob in rows]
            for shams, (_, evidence) in refused.items():
                content = pb.EvidenceContent.FromString(evidence.content)
                blob = evidence.SerializeToString()
                found[shams] = StoredEvidence(content.evidence_id, blob)
                evidence_rows.append((shams, content, blob))
            out = [found[shams] for shams, _, _, _ in letters]
            if not evidence_rows:
                return out, []
            conn.executemany(
                "INSERT INTO inbox (shams, sender, mailboxes, envelope, delivery, received_at,"
                " pending) VALUES (?, ?, ?, ?, ?, ?, 1)",
                [
                    (s, snd, "\n".join(m), _without_body(env), blob, now)
                    for s, snd, m, env, _, blob in rows
                ],
            )
            conn.executemany(
                "INSERT INTO bodies (box, shams, body) VALUES ('I', ?, ?)",
                [(s, env.body) for s, _, _, env, _, _ in rows],
            )
            conn.executemany(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
                " VALUES (?, ?, ?, ?, 1, ?)",
                [(c.evidence_id, s, c.event, blob, now) for s, c, blob in evidence_rows],
            )
            if documents:
                _index_documents(
                    conn,
                    [
                        (shams, letters[i][2], documents[i])
                        for shams, (i, _) in new.items()
                        if documents[i]
                    ],
                )
            conn.executemany(
                "INSERT OR IGNORE INTO status_links (shams, about, box) VALUES (?, ?, 'I')", links
            )
            _judge_early_links(
                conn,
                {shams: letters[i][3].header for shams, (i, _) in new.items()},
            )
            return out, [(s, c) for s, c, _ in evidence_rows]

        return await self._write(job)

    async def unacked_inbox(
        self, after: int, limit: int, max_bytes: int
    ) -> Page[tuple[int, str, str, bytes, bytes, float]]:
        """(rowid, shams, mailboxes not yet acknowledged ('\n'-joined), envelope, delivery
        evidence, received_at) of letters some mailbox has not acknowledged, oldest first:
        at most ``limit`` letters and ``max_bytes`` of envelopes and bodies (but always one);
        ``more`` if the read stopped at either limit. The sizes are read first, so large
        letters are never all loaded at once."""
        unacked = (
            "FROM inbox i LEFT JOIN bodies b ON b.box = 'I' AND b.shams = i.shams "
            "WHERE i.pending = 1 AND i.rowid > ? "
        )
        page = await self.db.fetch_page(
            "SELECT i.rowid, length(i.envelope) + coalesce(length(b.body), 0) "
            f"{unacked} ORDER BY i.rowid LIMIT ?",
            "SELECT i.rowid, i.shams, i.mailboxes, i.envelope, i.delivery, i.received_at, b.body,"
            f" i.acked {unacked} AND i.rowid <= ? ORDER BY i.rowid LIMIT ?",
            (after,),
            limit,
            max_bytes,
        )
        return Page(
            [
                (
                    int(r[0]),
                    str(r[1]),
                    str(r[2]) if r[7] is None else "\n".join(_unread(str(r[2]), r[7])),
                    _with_body(r[3], r[6]),
                    bytes(r[4]),
                    float(r[5]),
                )
                for r in page
            ],
            page.more,
        )

    async def record_handovers(
        self,
        items: Sequence[tuple[str, pb.Evidence]],
        on_commit: Callable[[list[pb.Evidence]], None] | None = None,
        mailboxes: Sequence[Collection[str] | None] = (),
    ) -> list[pb.Evidence]:
        """Stores HANDOVER evidence (shams, evidence) for received letters, once each, and
        marks them acknowledged for ``mailboxes[i]`` (those of the letter's a limited client
        may use; None, or no ``mailboxes``: every one).

        Returns per item the evidence that stands: this one, or the one stored before (an
        earlier or concurrent acknowledgement). Every number must be in the inbox.
        """

        def job(conn: sqlite3.Connection) -> tuple[list[pb.Evidence], _Stored]:
            now = time.time()
            out: list[pb.Evidence] = []
            stored: _Stored = []
            for i, (shams, evidence) in enumerate(items):
                blob = evidence.SerializeToString()
                boxes = mailboxes[i] if mailboxes else None
                if boxes is None:  # every mailbox: one statement, as before mailboxes
                    handed = conn.execute(
                        "UPDATE inbox SET handover = ?, pending = NULL"
                        " WHERE shams = ? AND handover IS NULL",
                        (blob, shams),
                    ).rowcount
                    if not handed:
                        conn.execute(
                            "UPDATE inbox SET pending = NULL WHERE shams = ? AND pending = 1",
                            (shams,),
                        )
                else:
                    handed = _acknowledge_boxes(conn, shams, blob, boxes)
                if handed:
                    content = pb.EvidenceContent.FromString(evidence.content)
                    conn.execute(
                        "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send,"
                        " recorded_at) VALUES (?, ?, ?, ?, 1, ?)",
                        (content.evidence_id, shams, content.event, blob, now),
                    )
                    out.append(evidence)
                    stored.append((shams, content))
                    continue
                row = conn.execute(
                    "SELECT handover FROM inbox WHERE shams = ?", (shams,)
                ).fetchone()
                if row is None or row[0] is None:
                    raise letter_not_found(shams, "in the inbox")
                out.append(pb.Evidence.FromString(row[0]))
            return out, stored

        return await self._write(job, on_commit)

    async def inbox_entries(
        self, numbers: Sequence[str]
    ) -> dict[str, tuple[list[str], bytes, pb.Evidence | None, list[str]]]:
        """(mailboxes, header bytes, HANDOVER evidence or None, mailboxes not yet
        acknowledged) of many received letters in one read; numbers not received are
        absent."""
        rows = await self.db.fetchall_in(
            "SELECT shams, mailboxes, envelope, handover, acked, pending FROM inbox"
            " WHERE shams IN ({marks})",
            numbers,
        )
        return {
            str(shams): (
                str(boxes).split("\n"),
                pb.Envelope.FromString(envelope).header,
                pb.Evidence.FromString(handover) if handover is not None else None,
                _unread(str(boxes), acked) if pending is not None else [],
            )
            for shams, boxes, envelope, handover, acked, pending in rows
        }

    async def receipts_to_send(self, limit: int, after: int = 0) -> list[pb.Evidence]:
        """Receipts the hub has not acknowledged, oldest first (see ``receipts_after``)."""
        return [pb.Evidence.FromString(e) for _, _, e in await self.receipts_after(after, limit)]

    async def receipts_after(self, after: int, limit: int) -> list[tuple[int, str, bytes]]:
        """(rowid, evidence id, serialised evidence) of unacknowledged receipts after rowid
        ``after``.

        A cursor, not a filter: each call reads only rows it has not seen, so the cost does
        not grow with the number of receipts still waiting for the hub's acknowledgement.
        """
        rows = await self.db.fetchall(
            "SELECT rowid, evidence_id, evidence FROM evidence WHERE to_send = 1 AND rowid > ? "
            "ORDER BY rowid LIMIT ?",
            (after, limit),
        )
        return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def receipts_acknowledged_later(
        self, evidence_ids: Sequence[str], on_commit: Callable[[None], None] | None = None
    ) -> None:
        """Marks receipts the hub acknowledged as sent, and when (now: the hub stored them
        before it acknowledged them; ``handle_hub_restore`` reads it), in the next
        transaction (``Database.write_later``): a receipt whose mark a crash lost is sent
        again, and the hub stores it once. ``on_commit`` runs once the mark is committed."""
        now = time.time()

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE evidence SET to_send = 0, acked_at = ? WHERE evidence_id = ?",
                [(now, e) for e in evidence_ids],
            )

        self.db.write_later(job, on_commit)

    # -- lookups --------------------------------------------------------------------------

    async def letter(self, shams: str) -> StoredLetter | None:
        direction: pb.LetterDirection.ValueType
        row = await self.db.fetchone(
            "SELECT o.envelope, o.purged, b.body FROM outbox o "
            "LEFT JOIN bodies b ON b.box = 'O' AND b.shams = o.shams WHERE o.shams = ?",
            (shams,),
        )
        if row is not None:
            direction = pb.LetterDirection.LETTER_DIRECTION_OUTGOING
        else:
            row = await self.db.fetchone(
                "SELECT i.envelope, i.purged, b.body FROM inbox i "
                "LEFT JOIN bodies b ON b.box = 'I' AND b.shams = i.shams WHERE i.shams = ?",
                (shams,),
            )
            if row is None:
                return None
            direction = pb.LetterDirection.LETTER_DIRECTION_INCOMING
        # States first, evidence second: a state and its evidence commit together, and each
        # read sees at least what the one before saw, so every state shown has its evidence
        # shown too (the evidence may be a step ahead, never behind).
        statuses = {
            str(r[0]): int(r[1])
            for r in await self.db.fetchall(
                "SELECT recipient, state FROM recipient_state WHERE shams = ? ORDER BY recipient",
                (shams,),
            )
        }
        envelope = pb.Envelope.FromString(_with_body(row[0], row[2]))
        # A refusal of another letter under this number (one given again after restores,
        # SHAMS_REUSED) is kept under the number too: not this letter's, not shown here.
        digest = sha256(envelope.header)
        evidence = [
            item
            for r in await self.db.fetchall(
                "SELECT evidence FROM evidence WHERE shams = ? ORDER BY rowid", (shams,)
            )
            if not _of_another_letter(item := pb.Evidence.FromString(r[0]), digest)
        ]
        # Without their bodies (notes of up to a letter's size each, as many as the other
        # side sends): GetEnvelope of the update itself gives its note.
        updates = [
            LinkedUpdate(
                pb.LetterDirection.LETTER_DIRECTION_OUTGOING
                if r[0] == "O"
                else pb.LetterDirection.LETTER_DIRECTION_INCOMING,
                pb.Envelope.FromString(r[1]),
            )
            for r in await self.db.fetchall(
                "SELECT l.box, CASE l.box"
                " WHEN 'O' THEN (SELECT envelope FROM outbox WHERE shams = l.shams)"
                " ELSE (SELECT envelope FROM inbox WHERE shams = l.shams) END "
                "FROM status_links l WHERE l.about = ? ORDER BY l.rowid",
                (shams,),
            )
        ]
        return StoredLetter(direction, envelope, evidence, statuses, bool(row[1]), updates)

    async def held_letter(self, shams: str, *, received_first: bool = False) -> HeldLetter | None:
        """Where this node holds letter ``shams``, with its header; None if it holds no such
        letter. One read, for a reply or status update that names it. A letter this agency
        sent to itself is in both boxes: the sent one is returned, or the received one if
        ``received_first``."""
        row = await self.db.fetchone(
            _HELD_RECEIVED_FIRST if received_first else _HELD_SENT_FIRST, (shams, shams)
        )
        if row is None:
            return None
        direction = (
            pb.LetterDirection.LETTER_DIRECTION_OUTGOING
            if row[0] == 1
            else pb.LetterDirection.LETTER_DIRECTION_INCOMING
        )
        return HeldLetter(
            direction, pb.EnvelopeHeader.FromString(pb.Envelope.FromString(row[1]).header)
        )

    async def purge(self, before: float, limit: int = 500) -> int:
        """Drops the bodies of letters done with before ``before``; returns how many.

        Sent letters qualify once every recipient has at least DELIVERED (or ended
        otherwise); received ones once handed over. Header, signature and every evidence stay.
        """

        def job(conn: sqlite3.Connection) -> int:
            count = 0
            for table, box, clause in (
                ("outbox", "O", _OUTBOX_DONE),
                # Once every mailbox has it: a body its other mailbox has not read stays.
                ("inbox", "I", "pending IS NULL AND handover IS NOT NULL AND received_at < ?"),
            ):
                params = (before, *_FINAL) if table == "outbox" else (before,)
                rows = list(
                    conn.execute(
                        f"SELECT rowid, shams, envelope FROM {table} WHERE purged = 0 AND {clause} LIMIT ?",  # noqa: S608
                        (*params, limit),
                    ).fetchall()
                )
                # Rows from before schema 3 hold their body inline: strip it there too.
                inline = []
                for rowid, _, blob in rows:
                    envelope = pb.Envelope.FromString(blob)
                    if envelope.body:
                        inline.append((_without_body(envelope), rowid))
                conn.executemany(
                    f"UPDATE {table} SET envelope = ? WHERE rowid = ?",  # noqa: S608
                    inline,
                )
                conn.executemany(
                    "DELETE FROM bodies WHERE box = ? AND shams = ?", [(box, r[1]) for r in rows]
                )
                conn.executemany(
                    f"UPDATE {table} SET purged = 1 WHERE rowid = ?",  # noqa: S608
                    [(r[0],) for r in rows],
                )
                count += len(rows)
            return count

        return await self.db.write(job)

    async def count(self, table: str) -> int:
        assert table in {"outbox", "inbox", "evidence"}
        row = await self.db.fetchone(f"SELECT count(*) FROM {table}")  # noqa: S608
        return int(row[0]) if row else 0

    async def remember_certificates(self, certs: Sequence[tuple[bytes, bytes]]) -> None:
        """Keeps (key id, DER) of every signer seen, so old evidence stays verifiable."""

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO certificates (key_id, der) VALUES (?, ?)", certs
            )

        await self.db.write(job)

    async def known_certificates(self) -> list[bytes]:
        """Every signing certificate (DER) a directory has listed here, oldest first."""
        return [bytes(r[0]) for r in await self.db.fetchall("SELECT der FROM certificates")]

    async def record_upload(self, digest: bytes, client: str) -> None:
        """Remembers that back-end client ``client`` uploaded document ``digest``."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO document_uploads (sha256, client) VALUES (?, ?)",
                (digest, client),
            )

        await self.db.write(job)

    async def record_fetch(self, digest: bytes, owner: str) -> None:
        """Remembers that this node fetched document ``digest`` from its owner, agency
        ``owner``, through the hub, and verified it: the owner had it (``may_use_document``).
        Kept in ``document_uploads`` under the owner's identity URI, which no client's name
        can be (``_FETCHED_FROM``)."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO document_uploads (sha256, client) VALUES (?, ?)",
                (digest, _FETCHED_FROM + owner),
            )

        await self.db.write(job)

    async def may_use_document(self, digest: bytes, client: str, mailboxes: frozenset[str]) -> bool:
        """True when ``client`` may be given this node's copy of ``digest``: it uploaded
        it, or it is attached to a letter of one of ``mailboxes`` that this agency sent, or
        that came from an agency this node has fetched it from (``record_fetch``).

        A received letter names its sender's document by its digest alone: until the node
        has that document from the sender, a copy it holds of the same digest is there for
        another reason (another mailbox's upload or letter), which the letter gives no
        right to. ``document_senders`` says whom such a letter lets it be fetched from."""
        if await self.db.fetchone(
            "SELECT 1 FROM document_uploads WHERE sha256 = ? AND client = ?", (digest, client)
        ):
            return True
        return bool(
            await self.db.fetchall_in(
                "SELECT 1 FROM letter_documents d WHERE d.sha256 = ?"
                " AND (EXISTS (SELECT 1 FROM outbox o WHERE o.shams = d.shams)"
                " OR EXISTS (SELECT 1 FROM inbox i JOIN document_uploads u ON u.sha256 = d.sha256"
                " AND u.client = ? || i.sender WHERE i.shams = d.shams))"
                " AND d.mailbox IN ({marks}) LIMIT 1",
                sorted(mailboxes),
                (digest, _FETCHED_FROM),
            )
        )

    async def document_senders(self, digest: bytes, mailboxes: frozenset[str]) -> set[str]:
        """The agencies whose letters received into one of ``mailboxes`` attach ``digest``
        as their own document: those a client of these mailboxes may have it fetched from
        through the hub (whatever copy this node holds; ``may_use_document``)."""
        rows = await self.db.fetchall_in(
            "SELECT DISTINCT i.sender FROM letter_documents d JOIN inbox i ON i.shams = d.shams"
            " WHERE d.sha256 = ? AND d.mailbox IN ({marks})",
            sorted(mailboxes),
            (digest,),
        )
        return {str(r[0]) for r in rows}

    async def signed_sizes(self, uri: str) -> set[int]:
        """The sizes that the letters received from the owner of document ``uri`` sign for
        it (their attachment references to it; one, unless that owner signed several):
        empty when no letter received names it."""
        owner, digest = parse_document_uri(uri)
        rows = await self.db.fetchall(
            "SELECT DISTINCT i.envelope FROM letter_documents d JOIN inbox i ON i.shams = d.shams"
            " WHERE d.sha256 = ? AND i.sender = ?",
            (digest, owner),
        )
        sizes: set[int] = set()
        for (envelope,) in rows:
            header = pb.EnvelopeHeader.FromString(pb.Envelope.FromString(envelope).header)
            sizes.update(
                ref.size for ref in header.attachments if ref.uri == uri and ref.sha256 == digest
            )
        return sizes

    async def documents_in_use(self, digests: Sequence[bytes]) -> set[bytes]:
        """The ``digests`` attached to a letter whose body is still kept (not purged)."""
        rows = await self.db.fetchall_in(
            "SELECT DISTINCT d.sha256 FROM letter_documents d WHERE d.sha256 IN ({marks}) AND ("
            " EXISTS (SELECT 1 FROM outbox o WHERE o.shams = d.shams AND o.purged = 0) OR"
            " EXISTS (SELECT 1 FROM inbox i WHERE i.shams = d.shams AND i.purged = 0))",
            digests,
        )
        return {bytes(r[0]) for r in rows}

    async def mark_documents_fetched_before(self) -> int:
        """Once, at the first start of a version that records fetches (``record_fetch``):
        marks as fetched from its owner each document this node could only have fetched,
        from that owner alone: attached to received letters of one sender only (a
        letter's documents are its sender's, ``senders_documents``), neither uploaded by a
        client nor attached to a letter this agency sent. Without it, a mailbox-limited
        client's download of such a document went back to the owner, and failed for good
        once the owner could not give it, though this node holds a copy. A digest that
        letters of several senders name stays unmarked: the node may hold it for one of
        them only, and another naming it (knowing only the digest) must not get that copy.
        Returns how many were marked."""
        if await self.meta_value(_FETCHES_MARKED) is not None:
            return 0

        def job(conn: sqlite3.Connection) -> int:
            marked = conn.execute(
                "INSERT OR IGNORE INTO document_uploads (sha256, client)"
                " SELECT d.sha256, ? || min(i.sender) FROM letter_documents d"
                " JOIN inbox i ON i.shams = d.shams"
                " WHERE d.sha256 NOT IN (SELECT sha256 FROM document_uploads)"
                " AND NOT EXISTS (SELECT 1 FROM letter_documents s JOIN outbox o"
                " ON o.shams = s.shams WHERE s.sha256 = d.sha256)"
                " GROUP BY d.sha256 HAVING count(DISTINCT i.sender) = 1",
                (_FETCHED_FROM,),
            ).rowcount
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, x'01')", (_FETCHES_MARKED,)
            )
            return max(marked, 0)

        return await self.db.write(job)

    async def index_documents(self, chunk: int = 1000) -> int:
        """Indexes the attachments of letters stored before ``letter_documents`` existed,
        once; returns how many letters had some.

        ``chunk`` letters a transaction, so that neither a transaction nor the memory it
        takes grows with the database. Indexing twice is harmless (INSERT OR IGNORE), so a
        start stopped half-way starts over; letters stored meanwhile index themselves.
        """
        if await self.meta_value(_DOCUMENTS_INDEXED) is not None:
            return 0
        indexed = 0
        # Sent letters belong to the sender's mailbox, received ones to those stored.
        for query in (
            "SELECT rowid, shams, NULL, envelope FROM outbox WHERE rowid > ? ORDER BY rowid LIMIT ?",
            "SELECT rowid, shams, mailboxes, envelope FROM inbox WHERE rowid > ? ORDER BY rowid"
            " LIMIT ?",
        ):
            after, more = 0, True
            while more:
                after, count, more = await self.db.write(
                    functools.partial(_index_stored_documents, query, after, chunk)
                )
                indexed += count

        def done(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, x'01')", (_DOCUMENTS_INDEXED,)
            )

        await self.db.write(done)
        return indexed

    # -- numbers after a restore -----------------------------------------------------------

    async def unconfirmed_restore(self) -> float | None:
        """The time this database was restored from a backup (``node.backup``) if the hub
        has not yet confirmed the numbers since; None otherwise."""
        rows = {
            str(k): bytes(v)
            for k, v in await self.db.fetchall(
                "SELECT key, value FROM meta WHERE key IN (?, ?)",
                (RESTORED_KEY, _NUMBERS_CONFIRMED),
            )
        }
        if RESTORED_KEY not in rows:
            return None
        restored = RestoreMark.decode(rows[RESTORED_KEY]).restore_time
        confirmed = rows.get(_NUMBERS_CONFIRMED)
        return None if confirmed is not None and float(confirmed) == restored else restored

    async def raise_counters(
        self,
        origin: str,
        accepted: Sequence[pb.AcceptedSequence],
        confirms_restore: float | None = None,
    ) -> list[tuple[str, int, int, int]]:
        """Moves ``origin``'s SHAMS counters up to the sequences the hub has accepted (never
        down); with ``confirms_restore``, in the same transaction, records that the numbers
        after that restore are confirmed, and the first time moves them on as far as the
        restore asked (``--skip-numbers``). Returns (domain, year, old, new) of each counter
        moved up: after a restore from an older copy, the numbers it would have reused.
        Both are logged once committed, in that order."""

        def job(conn: sqlite3.Connection) -> tuple[list[_Move], list[_Move]]:
            moved: list[_Move] = []
            skipped: list[_Move] = []
            for item in accepted:
                letter = _DOMAIN_LETTER.get(item.domain)
                if letter is None or item.sequence <= 0:
                    continue
                row = conn.execute(
                    "SELECT last FROM shams_counter WHERE origin = ? AND domain = ? AND year = ?",
                    (origin, letter, item.year),
                ).fetchone()
                old = int(row[0]) if row is not None else 0
                if item.sequence > old:
                    conn.execute(
                        "INSERT INTO shams_counter (origin, domain, year, last) VALUES (?, ?, ?, ?)"
                        " ON CONFLICT (origin, domain, year) DO UPDATE SET last = excluded.last",
                        (origin, letter, item.year, item.sequence),
                    )
                    moved.append((letter, item.year, old, int(item.sequence)))
            if confirms_restore is not None:
                mark = read_restore_mark(conn)
                done = conn.execute(
                    "SELECT value FROM meta WHERE key = ?", (_NUMBERS_CONFIRMED,)
                ).fetchone()
                first = done is None or float(done[0]) != confirms_restore
                if first and mark is not None and mark.restore_time == confirms_restore:
                    skipped = _skip_numbers(conn, origin, mark.skip_numbers)  # once a restore
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    (_NUMBERS_CONFIRMED, repr(confirms_restore).encode()),
                )
            return moved, skipped

        moved, skipped = await self.db.write(job)
        for domain, year, old, new in moved:
            log.warning(
                "SHAMS counter %s/%s/%d moved from %d to %d: the hub holds numbers this node"
                " had not recorded (restored from an older copy?)",
                origin,
                domain,
                year,
                old,
                new,
                extra={"reason": "COUNTER_BEHIND_HUB"},
            )
        for domain, year, old, new in skipped:
            log.warning(
                "SHAMS numbers %s/%s/%d/%d to %d skipped after the restore, as asked: letters"
                " this node may have numbered after its backup keep numbers no other letter gets",
                origin,
                domain,
                year,
                old + 1,
                new,
                extra={"reason": "NUMBERS_SKIPPED"},
            )
        return moved

    async def hub_restore_handled(self, restore_time: str) -> bool:
        """Whether the hub restore named ``restore_time`` was handled here already."""
        row = await self.db.fetchone(
            "SELECT 1 FROM meta WHERE key = ? AND value = ?",
            (_HUB_RESTORE_HANDLED, restore_time.encode()),
        )
        return row is not None

    async def handle_hub_restore(
        self, restore_time: str, since: float, issuer: str, now: float | None = None
    ) -> tuple[int, int]:
        """After the hub was restored from a copy taken around ``since`` (less a margin):
        marks for relaying again the letters relayed since then of which a recipient has
        not ended in failure (any recipient neither REJECTED, FAILED nor EXPIRED: one
        still on its way, or one that got it, whose letter, evidence and document grants
        the hub must hold again), and for sending again the receipts ``issuer`` (this
        node) issued that the hub acknowledged since then (``acked_at``; ``recorded_at``
        for rows from before schema 8): the copy may lack one recorded long before it
        and stored only after (this node's link down across the backup), of a letter the
        copy holds dequeued and so never pushes again. Those never acknowledged are on
        their way already. Remembers, in the same transaction, that the restore named
        ``restore_time`` is handled. Returns how many letters and receipts.

        A one-off that reads the outbox and evidence since ``since`` without an index: a
        hub restore is rare, and these columns are not worth an index on every letter.
        ``since`` is taken no earlier than HUB_RESTORE_WINDOW_S before ``now``: a node that
        first hears of a restore long after it (offline then, or itself restored since)
        does not send again what the hub would refuse as too old anyway.
        """
        since = max(since, (time.time() if now is None else now) - HUB_RESTORE_WINDOW_S)

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            # relayed_at is set on each (created_at for rows from before schema 7): a
            # rejection of the letter sent again then leaves it relayed
            # (record_sender_evidence).
            letters = conn.execute(
                "UPDATE outbox SET relay_state = 0, relayed_at = coalesce(relayed_at, created_at)"
                " WHERE relay_state = 1"
                " AND coalesce(relayed_at, created_at) >= ? AND EXISTS (SELECT 1 FROM"
                " recipient_state s WHERE s.shams = outbox.shams AND s.state NOT IN (?, ?, ?))",
                (since, *_ENDED_IN_FAILURE),
            ).rowcount
            receipts: list[tuple[str]] = []
            for evidence_id, blob in conn.execute(
                "SELECT evidence_id, evidence FROM evidence WHERE to_send = 0"
                " AND coalesce(acked_at, recorded_at) >= ? AND event IN (?, ?, ?)",
                (since, *_RECEIPT_EVENTS),
            ):
                content = pb.EvidenceContent.FromString(pb.Evidence.FromString(blob).content)
                if content.issuer == issuer:
                    receipts.append((str(evidence_id),))
            conn.executemany("UPDATE evidence SET to_send = 1 WHERE evidence_id = ?", receipts)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_HUB_RESTORE_HANDLED, restore_time.encode()),
            )
            return max(letters, 0), len(receipts)

        return await self.db.write(job)

    async def save_directory(self, directory: pb.Directory) -> None:
        """Keeps the last directory so the node can take submissions while the hub is down."""
        await self.set_meta_value("directory", directory.SerializeToString())

    async def load_directory(self) -> pb.Directory | None:
        blob = await self.meta_value("directory")
        return pb.Directory.FromString(blob) if blob is not None else None

    async def save_hub_frame_bytes(self, max_frame_bytes: int) -> None:
        """Keeps the max_frame_bytes the hub's welcome announced (0: it said none), so that
        a node restarted while the hub is down refuses at once what the hub would not take."""
        await self.set_meta_value(_HUB_FRAME_BYTES, str(max_frame_bytes).encode())

    async def load_hub_frame_bytes(self) -> int | None:
        """The max_frame_bytes the hub last announced; None if no hub has welcomed this
        node yet."""
        value = await self.meta_value(_HUB_FRAME_BYTES)
        return int(value) if value is not None else None

    async def earlier_answers(
        self, letters: Sequence[tuple[str, bytes]], issuer: str
    ) -> dict[bytes, StoredEvidence]:
        """This node's answer to letters delivered to it before (number, header digest), by
        digest: the DELIVERY of one in its inbox, else a DELIVERY_FAILURE it issued for it.
        For a letter delivered again that now fails its checks (its signer's certificate
        expired or revoked meanwhile): answered as the first time, not contradicted."""
        out: dict[bytes, StoredEvidence] = {}
        wanted: dict[str, set[bytes]] = {}
        for shams, digest in letters:
            if shams:
                wanted.setdefault(shams, set()).add(digest)
        if not wanted:
            return out
        for shams, envelope, delivery in await self.db.fetchall_in(
            "SELECT shams, envelope, delivery FROM inbox WHERE shams IN ({marks})", list(wanted)
        ):
            digest = sha256(pb.Envelope.FromString(envelope).header)
            if digest in wanted[str(shams)]:
                out[digest] = StoredEvidence.of(bytes(delivery))
        for shams, blob in await self.db.fetchall_in(
            "SELECT shams, evidence FROM evidence WHERE event = ? AND shams IN ({marks})"
            " ORDER BY rowid",
            list(wanted),
            (pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE,),
        ):
            content = pb.EvidenceContent.FromString(pb.Evidence.FromString(blob).content)
            digest = content.envelope_sha256
            if content.issuer == issuer and digest in wanted[str(shams)]:
                out.setdefault(digest, StoredEvidence(content.evidence_id, bytes(blob)))
        return out

    async def store_issued(self, items: Sequence[tuple[str, pb.Evidence]]) -> None:
        """Stores evidence this node issued as a recipient (shams, evidence), to send to the hub."""

        def job(conn: sqlite3.Connection) -> tuple[None, _Stored]:
            now = time.time()
            stored: _Stored = []
            for shams, evidence in items:  # rare (refused letters): one statement each
                content = pb.EvidenceContent.FromString(evidence.content)
                if conn.execute(
                    "INSERT OR IGNORE INTO evidence (evidence_id, shams, event, evidence, to_send,"
                    " recorded_at) VALUES (?, ?, ?, ?, 1, ?)",
                    (content.evidence_id, shams, content.event, evidence.SerializeToString(), now),
                ).rowcount:
                    stored.append((shams, content))
            return None, stored

        await self._write(job)

    async def certificates(self, key_ids: Sequence[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for kid in dict.fromkeys(key_ids):
            row = await self.db.fetchone("SELECT der FROM certificates WHERE key_id = ?", (kid,))
            if row is not None:
                out.append(bytes(row[0]))
        return out


def _without_body(envelope: pb.Envelope) -> bytes:
    """The envelope as stored in outbox/inbox: header and signature; the body is kept apart."""
    stored = pb.Envelope()
    stored.CopyFrom(envelope)
    stored.ClearField("body")
    return stored.SerializeToString()


def _unread(mailboxes: str, acked: str | None) -> list[str]:
    """The mailboxes of a pending inbox letter (its '\n'-joined ``mailboxes``) that no
    acknowledgement has taken yet (``acked``, '\n'-joined or None)."""
    boxes = mailboxes.split("\n")
    if acked is None:
        return boxes
    done = set(acked.split("\n"))
    return [box for box in boxes if box not in done]


def _acknowledge_boxes(
    conn: sqlite3.Connection, shams: str, handover: bytes, boxes: Collection[str]
) -> bool:
    """Marks the inbox letter ``shams`` acknowledged for ``boxes`` (those of its mailboxes
    among them), with ``handover`` as its HANDOVER evidence unless it has one; True if it
    was set now. A letter not in the inbox is left to the caller."""
    row = conn.execute(
        "SELECT mailboxes, acked, pending, handover IS NULL FROM inbox WHERE shams = ?", (shams,)
    ).fetchone()
    if row is None:
        return False
    mailboxes, acked, pending, unhanded = str(row[0]), row[1], row[2], bool(row[3])
    if pending is None and not unhanded:
        return False  # every mailbox has it
    left = [box for box in _unread(mailboxes, acked) if box not in boxes]
    taken = [box for box in mailboxes.split("\n") if box not in left]
    conn.execute(
        "UPDATE inbox SET handover = coalesce(handover, ?), acked = ?, pending = ? WHERE shams = ?",
        (handover, "\n".join(taken) if left else None, 1 if left else None, shams),
    )
    return unhanded


def _with_body(stored: bytes, body: bytes | None) -> bytes:
    """Re-forms the full envelope. Serialised protobuf messages merge when concatenated, so
    appending the body field gives the whole envelope, cheaply."""
    if not body:
        return bytes(stored)
    return bytes(stored) + _BODY.one(body)


def _judge_received(
    conn: sqlite3.Connection,
    shams: str,
    update: pb.EnvelopeHeader,
    in_frame: Callable[[str], pb.EnvelopeHeader | None],
) -> tuple[str, StatusFault | None]:
    """A received status update against the letter it is about: (its number, None) when
    this node holds it and the update fits it; (its number, why not) when it holds it and
    the update does not fit (a third party's "update" about someone else's letter: a
    forgery attempt); ("", None) when it holds no such letter, or the update names no
    valid number. Whatever one update holds, it never fails the job (only a database
    error does): the frame's other letters are stored with it."""
    try:
        return _judged(conn, shams, update, in_frame)
    except sqlite3.Error:
        raise  # the store itself failing: the frame fails, as any write of it would
    except Exception:  # one update's content, whatever it is: logged, delivered unlinked
        log.exception(
            "status update %s not linked",
            shams,
            extra={"shams": [shams], "peer": update.sender.agency},
        )
        return "", None


def _unheld_fault(update: pb.EnvelopeHeader, about: str) -> StatusFault | None:
    """Whether an update about a letter this node does not hold can fit it at all. The hub
    makes a number's origin its sender, and this node is an addressee of the update: a
    recipient's update goes to the letter's sender alone, who would be this node and hold
    its letter, so only the sender's own RECALL_REQUESTED (to recipients the letter may
    not have reached yet) can be about a letter not here. Anything else is refused, not
    delivered looking like a real status (a third party naming a number to come)."""
    origin = update.in_reply_to.origin
    if update.sender.agency != origin:
        return StatusFault(
            "NOT_A_PARTY",
            f"{update.sender.agency} reports on {about}, a letter of {origin} this agency"
            " does not hold",
        )
    if not update.status:
        return StatusFault("MISSING_STATUS", f"a status update about {about} names no status")
    if update.status != pb.BUSINESS_STATUS_RECALL_REQUESTED:
        return StatusFault(
            "STATUS_WRONG_DIRECTION",
            f"{status_name(update.status)} is for a recipient of {about} to report, not for"
            f" its sender {origin}",
        )
    return None


def _judged(
    conn: sqlite3.Connection,
    shams: str,
    update: pb.EnvelopeHeader,
    in_frame: Callable[[str], pb.EnvelopeHeader | None],
) -> tuple[str, StatusFault | None]:
    try:
        about = format_shams(update.in_reply_to)
    except ValueError as exc:
        log.warning(
            "status update %s not linked: its in_reply_to is not a SHAMS number (%s)",
            shams,
            exc,
            extra={"shams": [shams], "peer": update.sender.agency, "reason": "INVALID_SHAMS"},
        )
        return "", None
    # A letter to this agency itself is in both boxes, with the same header.
    row = conn.execute(
        "SELECT envelope FROM outbox WHERE shams = ?"
        " UNION ALL SELECT envelope FROM inbox WHERE shams = ? LIMIT 1",
        (about, about),
    ).fetchone()
    letter = (
        pb.EnvelopeHeader.FromString(pb.Envelope.FromString(row[0]).header)
        if row is not None
        else in_frame(about)
    )
    fault = (
        _unheld_fault(update, about)
        if letter is None
        else status_update_fault(
            letter, update.sender.agency, [r.agency for r in update.recipients], update.status
        )
    )
    # Its sender's recall of a letter not here yet: linked now, judged against the letter
    # when it comes (_judge_early_links), unlinked then if it does not fit.
    if fault is not None:
        log.warning(
            "status update %s about %s does not fit it: %s",
            shams,
            about,
            fault.message,
            extra={"shams": [shams], "peer": update.sender.agency, "reason": fault.reason},
        )
    return about, fault


def _skip_numbers(conn: sqlite3.Connection, origin: str, skip: int) -> list[_Move]:
    """Moves every counter of ``origin`` (and this year's of both domains) ``skip`` numbers
    on, once, as ``chapar restore --skip-numbers`` asked: numbers this node may have given
    letters after its backup and never relayed are then never given again (a gap, which
    the restore explains, instead of one number on two letters). Returns (domain, year,
    old, new) of each counter."""
    if skip <= 0:
        return []
    year = time.gmtime().tm_year
    for letter in _DOMAIN_LETTER.values():
        conn.execute(
            "INSERT OR IGNORE INTO shams_counter (origin, domain, year, last) VALUES (?, ?, ?, 0)",
            (origin, letter, year),
        )
    rows = conn.execute(
        "SELECT domain, year, last FROM shams_counter WHERE origin = ?", (origin,)
    ).fetchall()
    conn.execute("UPDATE shams_counter SET last = last + ? WHERE origin = ?", (skip, origin))
    return [(str(domain), int(year_), int(last), int(last) + skip) for domain, year_, last in rows]


def _judge_early_links(conn: sqlite3.Connection, arrived: Mapping[str, bytes]) -> None:
    """Judges the status updates linked to letters that have just arrived (number: signed
    header) before them: a sender's recall may overtake its letter. One that does not fit
    the letter after all (sent to others than its recipients, say) is unlinked, so that
    the letter's tracking shows only updates that fit it."""
    if not arrived:
        return
    early = rows_in(
        conn,
        "SELECT l.shams, l.about, i.envelope FROM status_links l"
        " JOIN inbox i ON i.shams = l.shams WHERE l.box = 'I' AND l.about IN ({marks})",
        list(arrived),
    )
    for shams, about, envelope in early:
        letter = pb.EnvelopeHeader.FromString(arrived[about])
        update = pb.EnvelopeHeader.FromString(pb.Envelope.FromString(envelope).header)
        fault = status_update_fault(
            letter, update.sender.agency, [r.agency for r in update.recipients], update.status
        )
        if fault is None:
            continue
        log.warning(
            "status update %s, received before the letter %s it is about, does not fit it: %s",
            shams,
            about,
            fault.message,
            extra={"shams": [shams, about], "peer": update.sender.agency, "reason": fault.reason},
        )
        conn.execute("DELETE FROM status_links WHERE shams = ?", (shams,))


def _misfit(
    content: pb.EvidenceContent,
    shams: str,
    digests: Mapping[str, bytes],
    states: Mapping[tuple[str, str], int],
    *,
    restored: bool,
) -> RefusedEvidence | None:
    """Why evidence routed to this node as the letter's sender is not about the letter it
    sent under that number (``digests``: each letter's header digest; ``states``: its
    recipients), else None. A number the outbox does not hold is refused unless the node
    was ``restored`` from a copy (the letter may have been sent after it: nothing to
    compare it with; it is stored and moves nothing). The hub routes what recipients'
    nodes sign, and a hostile hub with an agency it colludes with could have "delivered
    to" an agency the letter was never addressed to, or a DELIVERY of other content, shown
    by ``chapar track``. The reasons are the offline verifier's for the same evidence in a
    bundle (client_sdk.client): EVIDENCE_MISMATCH for another letter (digest or number),
    ISSUER_NOT_ALLOWED for a recipient the letter does not name."""
    digest = digests.get(shams)
    if digest is None:
        if restored:
            return None
        return RefusedEvidence(
            content.evidence_id,
            shams,
            "EVIDENCE_MISMATCH",
            f"evidence {content.evidence_id} is about {shams}, which this node did not send",
        )
    if content.envelope_sha256 != digest:
        return RefusedEvidence(
            content.evidence_id,
            shams,
            "EVIDENCE_MISMATCH",
            f"evidence {content.evidence_id} is about another letter than the one this node"
            f" sent as {shams} (another digest)",
        )
    if content.recipient and (shams, content.recipient) not in states:
        return RefusedEvidence(
            content.evidence_id,
            shams,
            "ISSUER_NOT_ALLOWED",
            f"{content.issuer} may not attest {_event_name(content.event)} for"
            f" {content.recipient}: not a recipient of {shams}",
        )
    return None


def _event_name(event: int) -> str:
    return pb.EvidenceEvent.Name(event) if event in pb.EvidenceEvent.values() else str(event)  # type: ignore[arg-type]


def _of_another_letter(item: pb.Evidence, digest: bytes) -> bool:
    """A SHAMS_REUSED refusal about another letter than the one of ``digest``."""
    content = pb.EvidenceContent.FromString(item.content)
    return content.reason == "SHAMS_REUSED" and content.envelope_sha256 != digest


def _header_digest(stored_envelope: bytes) -> bytes:
    """SHA-256 of the header of an envelope as the inbox stores it (its body apart)."""
    return sha256(pb.Envelope.FromString(stored_envelope).header)


def _number_held(shams: str) -> StatusFault:
    return StatusFault(
        "SHAMS_REUSED",
        f"this node holds another letter numbered {shams} (its sender's node and the hub"
        " restored from copies numbered it again; restore with --skip-numbers)",
    )


def _earlier_refusal(
    conn: sqlite3.Connection, shams: str, digest: bytes, issuer: str
) -> StoredEvidence | None:
    """The DELIVERY_FAILURE ``issuer`` made of this very letter before (delivered again
    after a lost receipt): answered again, not doubled."""
    for (blob,) in conn.execute(
        "SELECT evidence FROM evidence WHERE shams = ? AND event = ? ORDER BY rowid",
        (shams, pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE),
    ):
        content = pb.EvidenceContent.FromString(pb.Evidence.FromString(blob).content)
        if content.issuer == issuer and content.envelope_sha256 == digest:
            return StoredEvidence(content.evidence_id, bytes(blob))
    return None


def fetched_only(conn: sqlite3.Connection, digest: bytes) -> bool:
    """Whether this node holds document ``digest`` only as fetched from other agencies
    (``record_fetch``): none of its clients uploaded it and no letter it sent attaches
    it. A copy of such a document found corrupt is removed (the next download fetches it
    again); any other is, or may be, this agency's own, and is moved aside
    (``DocumentStore.quarantine``)."""
    holders = [
        str(r[0])
        for r in conn.execute("SELECT client FROM document_uploads WHERE sha256 = ?", (digest,))
    ]
    if not holders or not all(h.startswith(_FETCHED_FROM) for h in holders):
        return False
    return not conn.execute(
        "SELECT 1 FROM letter_documents d JOIN outbox o ON o.shams = d.shams"
        " WHERE d.sha256 = ? LIMIT 1",
        (digest,),
    ).fetchone()


def _index_stored_documents(
    query: str, after: int, limit: int, conn: sqlite3.Connection
) -> tuple[int, int, bool]:
    """Indexes the attachments of up to ``limit`` stored letters after rowid ``after``
    (``query``: rowid, shams, mailboxes or NULL for a sent letter, envelope); returns the
    last rowid read, how many letters had attachments, and whether more may follow."""
    rows = conn.execute(query, (after, limit)).fetchall()
    items: list[tuple[str, Sequence[str], Sequence[bytes]]] = []
    for _, shams, boxes, envelope in rows:
        header = pb.EnvelopeHeader.FromString(pb.Envelope.FromString(envelope).header)
        # As store_incoming and submit index them: the sender's own documents only (a
        # reference to another store gives no mailbox a right to what this node holds).
        digests = senders_documents(header, header.sender.agency)
        if digests:
            mailboxes = [header.sender.mailbox] if boxes is None else boxes.split("\n")
            items.append((str(shams), mailboxes, digests))
    _index_documents(conn, items)
    return (int(rows[-1][0]) if rows else after), len(items), len(rows) == limit


def _index_documents(
    conn: sqlite3.Connection, items: Sequence[tuple[str, Sequence[str], Sequence[bytes]]]
) -> None:
    """Rows of ``letter_documents`` for (shams, this agency's mailboxes, digests) items."""
    conn.executemany(
        "INSERT OR IGNORE INTO letter_documents (sha256, mailbox, shams) VALUES (?, ?, ?)",
        [
            (digest, mailbox, shams)
            for shams, mailboxes, digests in items
            for digest in digests
            for mailbox in mailboxes
        ],
    )
