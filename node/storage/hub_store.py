"""The hub's tables: letters, one durable queue per recipient, evidence and notices.

A *notice* is evidence waiting to be routed back to a letter's sender (DELIVERY,
HANDOVER ...); it is routed until the sender's node acknowledges it, and kept for
NOTICES_KEPT_S after, for a sender's node restored from a copy older than its
acknowledgement (``route_again``). A queue row stays until the recipient's node answers
with DELIVERY or DELIVERY_FAILURE evidence. Both survive restarts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.shams import format_shams, parse_shams
from node.core import lifecycle
from node.storage.db import Page, Store, advance_state, fits, rows_in

__all__ = [
    "MIGRATIONS",
    "TREE_LIMIT",
    "HubStore",
    "IncomingLetter",
    "Parties",
    "Tree",
    "TreeLetter",
]

log = logging.getLogger("chapar.hub")

_DEQUEUING = (
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE,
)
# The events of a recipient's receipts, each kept once a letter: recipient_state.receipts
# holds the bit 1 << event of each stored from that recipient.
_RECEIPT_EVENTS = (*_DEQUEUING, pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER)
_HANDOVER = pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER
_DELIVERED_BIT = 1 << pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY

MIGRATIONS = [
    """
    CREATE TABLE letters (
        shams TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        envelope BLOB NOT NULL,
        envelope_sha256 BLOB NOT NULL,
        relay_evidence BLOB NOT NULL,  -- EvidenceBatch: one RELAY_ACCEPTANCE per recipient
        accepted_at REAL NOT NULL
    );
    CREATE TABLE queue (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        recipient TEXT NOT NULL,
        shams TEXT NOT NULL REFERENCES letters (shams),
        enqueued_at REAL NOT NULL,
        UNIQUE (recipient, shams)
    );
    CREATE INDEX queue_by_recipient ON queue (recipient, id);
    CREATE TABLE evidence (
        evidence_id TEXT PRIMARY KEY,
        shams TEXT NOT NULL,
        event INTEGER NOT NULL,
        evidence BLOB NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE INDEX evidence_by_shams ON evidence (shams);
    CREATE TABLE notices (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agency TEXT NOT NULL,
        evidence_id TEXT NOT NULL,
        evidence BLOB NOT NULL,
        UNIQUE (agency, evidence_id)
    );
    CREATE INDEX notices_by_agency ON notices (agency, id);
    CREATE TABLE recipient_state (
        shams TEXT NOT NULL, recipient TEXT NOT NULL, state INTEGER NOT NULL,
        PRIMARY KEY (shams, recipient)
    );
    """,
    # 2: expiry and retention.
    """
    ALTER TABLE queue ADD COLUMN expire_at REAL;
    CREATE INDEX queue_expiry ON queue (expire_at) WHERE expire_at IS NOT NULL;
    CREATE INDEX queue_by_shams ON queue (shams);
    ALTER TABLE letters ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX letters_to_purge ON letters (accepted_at) WHERE purged = 0;
    """,
    # 3: envelopes in their own table. Retention deletes whole rows, so whole pages return
    # to SQLite's free list and are reused; emptying a blob inside a row freed nothing.
    """
    CREATE TABLE envelopes (shams TEXT PRIMARY KEY, envelope BLOB NOT NULL);
    INSERT INTO envelopes (shams, envelope)
        SELECT shams, envelope FROM letters WHERE purged = 0 ORDER BY rowid;
    ALTER TABLE letters DROP COLUMN envelope;
    """,
    # 4: which agencies may fetch which documents: the recipients of letters referencing
    # a digest of the letter's sender (the owner). Written from verified, signed headers.
    """
    CREATE TABLE document_grants (
        sha256 BLOB NOT NULL,
        owner TEXT NOT NULL,
        recipient TEXT NOT NULL,
        PRIMARY KEY (sha256, owner, recipient)
    ) WITHOUT ROWID;
    """,
    # 5: letters with an expire_time pushed to their recipient's node, not answered yet:
    # after a restart they wait for its answer instead of expiring (node.hub._unanswered).
    """
    ALTER TABLE queue ADD COLUMN pushed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX queue_pushed ON queue (recipient) WHERE pushed = 1;
    """,
    # 6: facts about the database itself, as the node has: a restore from a backup leaves
    # its mark here (node.backup), which the hub tells its nodes in every welcome.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    """,
    # 7: the highest sequence accepted per (origin, domain, year), told to the origin's node
    # in every welcome (a node restored from an older copy moves its counters up to it).
    # A table of its own: kept by ``accept`` as it goes, so a welcome reads a few rows
    # instead of scanning the sender's letters. Filled once from the letters held; a
    # number's origin is its sender (the hub refuses any other), so the text after
    # "<sender>/" is "<O|I>/<4-digit year>/<sequence>".
    """
    CREATE TABLE sender_sequences (
        origin TEXT NOT NULL, domain TEXT NOT NULL, year INTEGER NOT NULL,
        last INTEGER NOT NULL, PRIMARY KEY (origin, domain, year)
    ) WITHOUT ROWID;
    INSERT INTO sender_sequences (origin, domain, year, last)
        SELECT sender, substr(shams, length(sender) + 2, 1),
            CAST(substr(shams, length(sender) + 4, 4) AS INTEGER),
            max(CAST(substr(shams, length(sender) + 9) AS INTEGER))
        FROM letters GROUP BY 1, 2, 3;
    """,
    # 8: the correspondence tree. Each letter's kind, the letter it answers (canonical
    # text) and its business status, copied from its verified header as it is accepted, so
    # that the tree outlives the envelopes retention removes. Rows accepted before this
    # version have kind NULL until ``HubStore.link_held_letters`` fills them from the
    # envelopes still held; those whose envelope was gone stay NULL (links unknown).
    """
    ALTER TABLE letters ADD COLUMN kind INTEGER;
    ALTER TABLE letters ADD COLUMN in_reply_to TEXT;
    ALTER TABLE letters ADD COLUMN status INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX letters_by_reply ON letters (in_reply_to, sender) WHERE in_reply_to IS NOT NULL;
    """,
    # 9: the receipt events stored from each recipient about each letter (bit 1 << event):
    # one receipt a (letter, recipient, event) is kept; a later one under another id is
    # answered, neither stored nor routed (HubStore.record_receipts). Read with the state,
    # in the look-up a receipt already costs. NULL for rows from before: their letter's
    # receipts are read once, when the next receipt about it comes, and it is filled.
    """
    ALTER TABLE recipient_state ADD COLUMN receipts INTEGER;
    """,
    # 10: when the sender's node acknowledged each notice (NULL: not yet). An acknowledged
    # notice is kept for NOTICES_KEPT_S instead of deleted, so that a node restored from an
    # older copy, which lost the evidence it acknowledged since, gets it again
    # (HubStore.route_again). Only those waiting are routed: the index of the pusher's
    # pages holds them alone.
    """
    ALTER TABLE notices ADD COLUMN acked_at REAL;
    DROP INDEX notices_by_agency;
    CREATE INDEX notices_waiting ON notices (agency, id) WHERE acked_at IS NULL;
    CREATE INDEX notices_acked ON notices (acked_at) WHERE acked_at IS NOT NULL;
    """,
]
# How long the hub keeps a notice after its sender's node acknowledged it (HubStore.
# route_again): as long as a node sends again after a restore of the hub (node_store.
# HUB_RESTORE_WINDOW_S).
NOTICES_KEPT_S = 8 * 24 * 3600.0
# ``meta`` key set once the letters accepted before schema 8 have been linked.
_LINKED = "letters_linked"
# The revoked serials of the directory in force (one hexadecimal serial a line): what a
# restart keeps in force while the configured revocation file is missing (Hub.start).
_REVOKED = "revoked_serials"
# Of those, the ones revoked from a time on, "SERIAL TIME" a line (RFC 3339): a key of its
# own, so that a hub older than it, restored or downgraded, reads the serials alone (each
# revoked for all time, the safe direction).
_REVOKED_SINCE = "revocation_times"
# The DER signing certificates the hub has signed with (hexadecimal, one a line, oldest
# first): a renewed key's predecessor stays in the directory, so what it signed verifies.
_SIGNERS = "hub_signing_certificates"
# A tree read stops at this many letters, and at this many bytes of envelopes and evidence
# (a reply well under the 64 MiB a message may have): ``Tree.truncated`` says so.
TREE_LIMIT = 1000
TREE_MAX_BYTES = 32 * 1024 * 1024
# Envelopes read at a time, by size, when their bodies are dropped for a tree; evidence
# read at a time, by size and by rows; and how much a tree may read in all (evidence the
# caller is not shown is read, not counted: past this the tree is cut all the same).
_ENVELOPE_READ_BYTES = 8 * 1024 * 1024
_EVIDENCE_READ_BYTES = 8 * 1024 * 1024
_EVIDENCE_PAGE_ROWS = 512
_TREE_READ_FACTOR = 2
# The letters answering one letter and sent by one of its parties, in acceptance order:
# a term of a UNION ALL, (in_reply_to, sender) pairs per query.
_ANSWERING = (
    "SELECT * FROM (SELECT rowid, shams, sender, in_reply_to FROM letters"
    " WHERE in_reply_to = ? AND sender = ? ORDER BY rowid LIMIT ?)"
)
_PAIRS_A_QUERY = 100
_DOMAIN_LETTER = {
    pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING: "O",
    pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL: "I",
}
_LETTER_DOMAIN = {letter: domain for domain, letter in _DOMAIN_LETTER.items()}


@dataclass(frozen=True, slots=True)
class IncomingLetter:
    """A verified letter the hub is about to accept."""

    shams: str
    sender: str
    recipients: Sequence[str]
    envelope: bytes
    envelope_sha256: bytes
    expire_at: float | None = None
    shams_pb: pb.Shams | None = None  # the parsed number, when the caller has it
    grants: Sequence[tuple[bytes, str, str]] = ()  # (digest, owner, recipient) document fetches
    # From the verified header, for the correspondence tree: LetterKind, the number it
    # answers in canonical text (None if unset), BusinessStatus.
    kind: int = 0
    in_reply_to: str | None = None
    status: int = 0


@dataclass(frozen=True, slots=True)
class TreeLetter:
    """One letter of a correspondence tree as the hub recorded it."""

    shams: str
    sender: str
    recipients: list[str]  # agency codes, in the header's order
    kind: int | None  # LetterKind; None: accepted before schema 8 and never linked
    in_reply_to: str | None
    status: int  # BusinessStatus
    accepted_at: float
    evidence: list[pb.Evidence]  # what the viewer may see of it, in recorded order
    envelope: pb.Envelope | None  # without its body; None once retention removed it
    # No party of the viewer's: only shams, and in_reply_to if that link was followed.
    redacted: bool = False


@dataclass(frozen=True, slots=True)
class Parties:
    """Who a letter is between, and the letter it answers (``HubStore.parties``)."""

    sender: str
    recipients: list[str]  # agency codes, in the header's order
    in_reply_to: str | None


@dataclass(slots=True)
class _Node:
    """A letter met by a tree walk: what the walk and the redaction need of it."""

    sender: str
    in_reply_to: str | None
    followed: bool  # its link to in_reply_to was followed (that letter is in the tree)
    recipients: list[str] | None = None  # read once per level


@dataclass(slots=True)
class _Budget:
    """The bytes a tree may show (``max_shown``) and read (a few times more)."""

    max_shown: int
    shown: int = 0
    read_bytes: int = 0

    def take(self, size: int, asked: bool) -> bool:
        """Counts ``size`` bytes shown if they fit (or ``asked``: always)."""
        if not asked and self.shown + size > self.max_shown:
            return False
        self.shown += size
        return True

    def read(self, size: int) -> bool:
        """Counts ``size`` bytes about to be read; False past the read limit."""
        self.read_bytes += size
        return self.read_bytes <= _TREE_READ_FACTOR * self.max_shown + _EVIDENCE_READ_BYTES


@dataclass(frozen=True, slots=True)
class Tree:
    """The letters around one: the letter asked for first, then its ancestors (its parent
    first, up to the first letter), then every other letter answering one of them, breadth
    first, each level in the order the hub accepted them."""

    letters: list[TreeLetter]
    truncated: bool  # cut at the letter or byte limit


class HubStore(Store):
    MIGRATIONS = MIGRATIONS

    async def accept(
        self,
        letters: Sequence[IncomingLetter],
        make_relay: Callable[[IncomingLetter, str], pb.Evidence],
        seal: Callable[[Sequence[pb.Evidence]], None] | None = None,
        on_commit: Callable[[list[list[pb.Evidence]]], None] | None = None,
    ) -> list[list[pb.Evidence]]:
        """Queues each letter for each recipient once; returns its RELAY_ACCEPTANCE evidence.

        A letter already accepted (same SHAMS number, same header digest) is not stored
        again: its original relay evidence is returned. A *different* letter under a number
        already taken gets an empty list and nothing is stored. ``make_relay`` builds each new
        evidence; ``seal``, if given, then signs all of them at once, in place, before they
        are stored.
        """

        def job(conn: sqlite3.Connection) -> list[list[pb.Evidence]]:
            now = time.time()
            out: list[list[pb.Evidence]] = []
            new: dict[str, tuple[IncomingLetter, list[str], list[pb.Evidence]]] = {}
            taken: dict[str, tuple[bytes, bytes]] = {
                str(shams): (bytes(kept), bytes(digest))
                for shams, kept, digest in rows_in(
                    conn,
                    "SELECT shams, relay_evidence, envelope_sha256 FROM letters"
                    " WHERE shams IN ({marks})",
                    [letter.shams for letter in letters],
                )
            }
            for letter in letters:
                first = new.get(letter.shams)
                if first is not None:  # the same number twice in one batch
                    same = first[0].envelope_sha256 == letter.envelope_sha256
                    out.append(first[2] if same else [])
                    continue
                row = taken.get(letter.shams)
                if row is not None:
                    same = row[1] == letter.envelope_sha256
                    out.append(_relay_evidence(conn, letter.shams, row[0]) if same else [])
                    continue
                recipients = list(dict.fromkeys(letter.recipients))
                relays = [make_relay(letter, r) for r in recipients]
                new[letter.shams] = (letter, recipients, relays)
                out.append(relays)
            if not new:
                return out
            if seal is not None:
                seal([e for _, _, relays in new.values() for e in relays])
            # The relay evidence lives in `evidence` only; `letters.relay_evidence` is left
            # empty (rows written by earlier versions still hold a copy, read first).
            conn.executemany(
                "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence,"
                " accepted_at, kind, in_reply_to, status) VALUES (?, ?, ?, x'', ?, ?, ?, ?)",
                [
                    (s, lt.sender, lt.envelope_sha256, now, lt.kind, lt.in_reply_to, lt.status)
                    for s, (lt, _, _) in new.items()
                ],
            )
            conn.executemany(
                "INSERT INTO envelopes (shams, envelope) VALUES (?, ?)",
                [(s, lt.envelope) for s, (lt, _, _) in new.items()],
            )
            conn.executemany(
                "INSERT INTO queue (recipient, shams, enqueued_at, expire_at) VALUES (?, ?, ?, ?)",
                [(r, s, now, lt.expire_at) for s, (lt, rs, _) in new.items() for r in rs],
            )
            conn.executemany(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        pb.EvidenceContent.FromString(e.content).evidence_id,
                        s,
                        pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
                        e.SerializeToString(),
                        now,
                    )
                    for s, (_, _, relays) in new.items()
                    for e in relays
                ],
            )
            conn.executemany(
                "INSERT INTO recipient_state (shams, recipient, state, receipts) VALUES (?, ?, ?, 0)",
                [(s, r, lifecycle.RELAYED) for s, (_, rs, _) in new.items() for r in rs],
            )
            conn.executemany(
                "INSERT OR IGNORE INTO document_grants (sha256, owner, recipient) VALUES (?, ?, ?)",
                [g for lt, _, _ in new.values() for g in lt.grants],
            )
            conn.executemany(
                "INSERT INTO sender_sequences (origin, domain, year, last) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (origin, domain, year) DO UPDATE SET last = max(last, excluded.last)",
                [(*key, last) for key, last in _highest([lt for lt, _, _ in new.values()]).items()],
            )
            return out

        return await self.db.write(job, on_commit)

    async def parties(self, shams: str) -> Parties | None:
        """The sender and recipients of letter ``shams`` (and the letter it answers); None
        if the hub never accepted it. Two indexed reads: what ``Track`` asks before any
        walk, and gives ``tree`` so that the walk does not read them again."""
        row = await self.db.fetchone(
            "SELECT sender, in_reply_to FROM letters WHERE shams = ?", (shams,)
        )
        if row is None:
            return None
        recipients = await self.db.fetchall(
            "SELECT recipient FROM recipient_state WHERE shams = ? ORDER BY rowid", (shams,)
        )
        return Parties(str(row[0]), [str(r[0]) for r in recipients], _text(row[1]))

    async def tree(
        self,
        shams: str,
        viewer: str | None = None,
        limit: int = TREE_LIMIT,
        max_bytes: int = TREE_MAX_BYTES,
        *,
        parties: Parties | None = None,
    ) -> Tree | None:
        """The correspondence tree around letter ``shams`` (see ``Tree``) as ``viewer`` may
        see it (an agency code; None: an auditor, all of it); None if the hub never
        accepted the letter.

        A link from a letter to the one it answers is followed (up or down) only when the
        answering letter's sender is a party of the one answered (its sender or one of its
        recipients), the rule ``client_sdk/statuses.py`` applies to status updates: anyone
        may number a letter in reply to anything, even to a number still to come, but no
        one joins a thread it is no party of. Decided as the tree is walked, so a link
        made before its letter existed is judged by the letter that came. Each letter is
        taken once (hostile links make cycles). At most ``limit`` letters; at most
        ``max_bytes`` of envelopes and evidence shown (those of the letter asked for too:
        its evidence is cut there). ``truncated`` says the tree was cut. ``parties``: what
        ``parties`` read of letter ``shams`` already (letters are never removed), not read
        again.
        """
        if parties is None:
            parties = await self.parties(shams)
            if parties is None:
                return None
        nodes: dict[str, _Node] = {}
        order = [shams]
        nodes[shams] = _Node(
            parties.sender, parties.in_reply_to, followed=False, recipients=parties.recipients
        )
        truncated = False
        # Up: the letter it answers, while its sender is a party of that letter.
        child = shams
        while (parent := nodes[child].in_reply_to) is not None and parent not in nodes:
            if len(order) >= limit:
                truncated = True
                break
            row = await self.db.fetchone(
                "SELECT l.sender, l.in_reply_to, EXISTS (SELECT 1 FROM recipient_state s"
                " WHERE s.shams = l.shams AND s.recipient = ?) FROM letters l WHERE l.shams = ?",
                (nodes[child].sender, parent),
            )
            if row is None:  # a number the hub never accepted
                break
            if not (row[2] or str(row[0]) == nodes[child].sender):  # no party of it
                break
            nodes[child].followed = True
            nodes[parent] = _Node(str(row[0]), _text(row[1]), followed=False)
            order.append(parent)
            child = parent
        # Down, breadth first: the letters answering a level's, by their parties.
        level = list(order)
        while level and not truncated:
            await self._recipients_of(level, nodes)
            pairs = [
                (parent, party)
                for parent in level
                for party in dict.fromkeys(
                    (nodes[parent].sender, *(nodes[parent].recipients or []))
                )
            ]
            room = limit - len(order)
            # Rows of letters already taken (at most len(order)) are skipped below, so each
            # pair reads at most this many, in its index's order: no sort of a flood. One
            # more than the room, to know when the tree is cut.
            found = await self._answering(pairs, room + len(order) + 1)
            level = []
            for number, sender, reply in found:
                if number in nodes:
                    continue
                if len(order) >= limit:
                    truncated = True
                    break
                nodes[number] = _Node(sender, reply, followed=True)
                order.append(number)
                level.append(number)
        await self._recipients_of(order, nodes)
        letters, cut = await self._tree_letters(order, nodes, viewer, max_bytes)
        return Tree(letters, truncated or cut)

    async def _recipients_of(self, numbers: Sequence[str], nodes: dict[str, _Node]) -> None:
        """Fills the recipients of those of ``numbers`` not read yet."""
        wanted = [n for n in numbers if nodes[n].recipients is None]
        for n in wanted:
            nodes[n].recipients = []
        for number, recipient in await self.db.fetchall_in(
            "SELECT shams, recipient FROM recipient_state WHERE shams IN ({marks}) ORDER BY rowid",
            wanted,
        ):
            nodes[str(number)].recipients.append(str(recipient))  # type: ignore[union-attr]

    async def _answering(
        self, pairs: Sequence[tuple[str, str]], each: int
    ) -> list[tuple[str, str, str]]:
        """(shams, sender, in_reply_to) of letters answering a letter of ``pairs`` sent by
        the party paired with it, in acceptance order: at most ``each`` a pair, each read
        in the order of the index (in_reply_to, sender), so that letters piled on a
        thread cost only as many rows as the tree still has room for."""
        rows: list[tuple[int, str, str, str]] = []
        for at in range(0, len(pairs), _PAIRS_A_QUERY):
            chunk = pairs[at : at + _PAIRS_A_QUERY]
            sql = " UNION ALL ".join([_ANSWERING] * len(chunk)) + " ORDER BY 1 LIMIT ?"
            params: list[object] = []
            for parent, party in chunk:
                params += [parent, party, each]
            rows.extend(
                (int(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in await self.db.fetchall(sql, (*params, each))
            )
        rows.sort()
        return [(number, sender, reply) for _, number, sender, reply in rows[:each]]

    async def _tree_letters(
        self, order: Sequence[str], nodes: dict[str, _Node], viewer: str | None, max_bytes: int
    ) -> tuple[list[TreeLetter], bool]:
        """The letters ``order`` names, in that order, as ``viewer`` may see them, up to
        ``max_bytes`` of envelopes and evidence shown (the first letter always, its
        evidence cut there); whether some were left out or cut."""

        def full(number: str) -> bool:
            node = nodes[number]
            return viewer is None or viewer == node.sender or viewer in (node.recipients or [])

        shown = [s for s in order if full(s)]
        place = {number: at for at, number in enumerate(shown)}
        rows = {
            str(r[0]): r
            for r in await self.db.fetchall_in(
                "SELECT shams, kind, status, accepted_at, relay_evidence"
                " FROM letters WHERE shams IN ({marks})",
                shown,
            )
        }
        sizes = {
            str(number): int(size)
            for number, size in await self.db.fetchall_in(
                "SELECT shams, length(envelope) FROM envelopes WHERE shams IN ({marks})", shown
            )
        }
        budget = _Budget(max_bytes)
        envelopes: dict[str, pb.Envelope] = {}
        out: list[TreeLetter] = []
        for position, number in enumerate(order):
            node = nodes[number]
            if not full(number):
                # Only the number, and the letter it answers if that link was followed.
                out.append(_redacted(number, node.in_reply_to if node.followed else None))
                continue
            if number in sizes and number not in envelopes:
                await self._read_envelopes(shown[place[number] :], sizes, envelopes)
            envelope = envelopes.pop(number, None)
            row = rows[number]
            asked = position == 0
            if not budget.take(envelope.ByteSize() if envelope is not None else 0, asked):
                return out, True
            items, complete = await self._evidence(number, bytes(row[4]), viewer, node, budget)
            if not complete and not asked:
                return out, True
            out.append(
                TreeLetter(
                    shams=number,
                    sender=node.sender,
                    recipients=list(node.recipients or []),
                    kind=None if row[1] is None else int(row[1]),
                    in_reply_to=node.in_reply_to,
                    status=int(row[2]),
                    accepted_at=float(row[3]),
                    evidence=items,
                    envelope=envelope,
                )
            )
            if not complete:
                return out, True
        return out, False

    async def _read_envelopes(
        self, numbers: Sequence[str], sizes: dict[str, int], into: dict[str, pb.Envelope]
    ) -> None:
        """The next envelopes of ``numbers`` held, as many as one read of
        ``_ENVELOPE_READ_BYTES`` takes (one always), without their bodies."""
        held = [n for n in numbers if n in sizes]
        group = held[: max(1, fits([sizes[n] for n in held], _ENVELOPE_READ_BYTES))]
        for number, blob in await self.db.fetchall_in(
            "SELECT shams, envelope FROM envelopes WHERE shams IN ({marks})", group
        ):
            into[str(number)] = _bodiless(bytes(blob))

    async def _evidence(
        self, shams: str, kept: bytes, viewer: str | None, node: _Node, budget: _Budget
    ) -> tuple[list[pb.Evidence], bool]:
        """The evidence about letter ``shams`` ``viewer`` may see, in recorded order, read
        a page at a time by size; whether all of it fitted ``budget``.

        A recipient that is not the sender sees only the evidence about itself and about
        the whole letter (no recipient named), as its own node shows it; the sender and
        auditors see all."""

        def visible(content: pb.EvidenceContent) -> bool:
            return viewer is None or viewer == node.sender or content.recipient in ("", viewer)

        items: list[pb.Evidence] = []
        stored: set[str] = set()
        after = 0
        while True:
            sizes = await self.db.fetchall(
                "SELECT rowid, length(evidence) FROM evidence WHERE shams = ? AND rowid > ?"
                " ORDER BY rowid LIMIT ?",
                (shams, after, _EVIDENCE_PAGE_ROWS),
            )
            if not sizes:
                break
            count = fits([int(r[1]) for r in sizes], _EVIDENCE_READ_BYTES)
            if not budget.read(sum(int(r[1]) for r in sizes[:count])):
                return items, False
            last = int(sizes[count - 1][0])
            for (blob,) in await self.db.fetchall(
                "SELECT evidence FROM evidence WHERE shams = ? AND rowid > ? AND rowid <= ?"
                " ORDER BY rowid",
                (shams, after, last),
            ):
                item = pb.Evidence.FromString(bytes(blob))
                content = pb.EvidenceContent.FromString(item.content)
                stored.add(content.evidence_id)
                if not visible(content):
                    continue
                if not budget.take(len(blob), asked=False):
                    return items, False
                items.append(item)
            after = last
        if kept:  # a copy kept inline by earlier versions: those not also stored, first
            old = [
                e
                for e in pb.EvidenceBatch.FromString(kept).evidence
                if (c := pb.EvidenceContent.FromString(e.content)).evidence_id not in stored
                and visible(c)
            ]
            if not budget.take(sum(e.ByteSize() for e in old), asked=False):
                return items, False
            items = [*old, *items]
        return items, True

    async def link_held_letters(self, chunk: int = 500) -> int:
        """Fills kind, in_reply_to and status of letters accepted before schema 8 from
        their envelopes still held, once; returns how many were linked.

        ``chunk`` rowids a transaction, envelopes read one at a time (they hold their
        bodies), so that neither a transaction nor the memory it takes grows with the
        database. A start stopped half-way fills the rest next time (``kind`` is NULL only
        until a row is filled). Letters whose envelope retention removed first stay
        unlinked (kind NULL): the tree knows them, not what they answer.
        """
        if await self.db.fetchone("SELECT 1 FROM meta WHERE key = ?", (_LINKED,)):
            return 0
        row = await self.db.fetchone("SELECT max(rowid) FROM letters")
        top = int(row[0]) if row is not None and row[0] is not None else 0
        linked = 0
        for after in range(0, top, chunk):
            linked += await self.db.write(
                functools.partial(_link_stored_letters, after, after + chunk)
            )

        def done(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, x'01')", (_LINKED,))

        await self.db.write(done)
        return linked

    async def accepted_relays(
        self, sender: str, letters: Sequence[tuple[pb.Shams | None, bytes]]
    ) -> dict[bytes, list[pb.Evidence]]:
        """The RELAY_ACCEPTANCE evidence of those of ``letters`` (number as claimed, header
        digest) already accepted from ``sender``, by header digest: a letter sent again
        after the answer to it was lost."""
        numbers: set[str] = set()
        for shams, _ in letters:
            if shams is not None:
                with contextlib.suppress(ValueError):  # no valid number: never accepted
                    numbers.add(format_shams(shams))
        # A header digest names one letter, hence one number: several claims of a number
        # with other headers are each looked for by their own digest.
        digests = {digest for _, digest in letters}
        out: dict[bytes, list[pb.Evidence]] = {}
        for shams, kept, digest, who in await self.db.fetchall_in(
            "SELECT shams, relay_evidence, envelope_sha256, sender FROM letters"
            " WHERE shams IN ({marks})",
            list(numbers),
        ):
            if who != sender or bytes(digest) not in digests:
                continue
            if kept:  # a copy kept inline by earlier versions
                out[bytes(digest)] = list(pb.EvidenceBatch.FromString(kept).evidence)
                continue
            rows = await self.db.fetchall(
                "SELECT evidence FROM evidence WHERE shams = ? AND event = ? ORDER BY rowid",
                (str(shams), pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE),
            )
            out[bytes(digest)] = [pb.Evidence.FromString(r[0]) for r in rows]
        return out

    async def queued(
        self, recipient: str, after: int, limit: int, max_bytes: int
    ) -> Page[tuple[int, str, bytes, float | None]]:
        """(queue id, shams, envelope, expire_at) waiting for ``recipient`` and not expired
        when read, in arrival order: at most ``limit`` letters and ``max_bytes`` of
        envelopes (but always one); ``more`` if the read stopped at either limit. The sizes
        are read first, so large letters are never all loaded at once."""
        waiting = (
            "FROM queue q JOIN envelopes e ON e.shams = q.shams "
            "WHERE q.recipient = ? AND q.id > ? AND (q.expire_at IS NULL OR q.expire_at > ?) "
        )
        page = await self.db.fetch_page(
            f"SELECT q.id, length(e.envelope) {waiting} ORDER BY q.id LIMIT ?",
            f"SELECT q.id, q.shams, e.envelope, q.expire_at {waiting} AND q.id <= ?"
            " ORDER BY q.id LIMIT ?",
            (recipient, after, time.time()),
            limit,
            max_bytes,
        )
        return Page([_queued_row(r) for r in page], page.more)

    async def queued_of(
        self, recipient: str, numbers: Sequence[str], max_bytes: int
    ) -> tuple[Page[tuple[int, str, bytes, float | None]], set[str]]:
        """The rows ``queued`` gives for those of ``numbers`` still queued for
        ``recipient``, expired or not, in arrival order, as many as fit in ``max_bytes``
        (but always one; ``more`` if some did not); and those of ``numbers`` no longer
        queued for it."""
        sizes = sorted(
            (int(i), str(shams), int(size))
            for i, shams, size in await self.db.fetchall_in(
                "SELECT q.id, q.shams, length(e.envelope) FROM queue q"
                " JOIN envelopes e ON e.shams = q.shams"
                " WHERE q.recipient = ? AND q.shams IN ({marks})",
                numbers,
                (recipient,),
            )
        )
        gone = set(numbers) - {shams for _, shams, _ in sizes}
        taken = [shams for _, shams, _ in sizes[: fits([n for _, _, n in sizes], max_bytes)]]
        rows = await self.db.fetchall_in(
            "SELECT q.id, q.shams, e.envelope, q.expire_at FROM queue q"
            " JOIN envelopes e ON e.shams = q.shams WHERE q.recipient = ? AND q.shams IN ({marks})",
            taken,
            (recipient,),
        )
        return Page(sorted(_queued_row(r) for r in rows), len(taken) < len(sizes)), gone

    async def mark_pushed(self, queue_ids: Sequence[int]) -> None:
        """Marks queued letters pushed to their recipient's node (see ``pushed``)."""

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE queue SET pushed = 1 WHERE id = ?", [(i,) for i in queue_ids])

        await self.db.write(job)

    async def pushed(self) -> list[tuple[str, str]]:
        """(recipient, shams) of queued letters marked pushed: after a restart, the ones
        that may have been in a delivery window, their node's answer lost."""
        rows = await self.db.fetchall("SELECT recipient, shams FROM queue WHERE pushed = 1")
        return [(str(r[0]), str(r[1])) for r in rows]

    async def depths(self) -> dict[str, int]:
        """Queue depth per recipient (read once at start; the hub counts from there)."""
        rows = await self.db.fetchall("SELECT recipient, count(*) FROM queue GROUP BY recipient")
        return {str(r[0]): int(r[1]) for r in rows}

    async def expired(
        self, now: float, limit: int, after: tuple[float, int] = (float("-inf"), 0)
    ) -> list[tuple[str, str, bytes, str, tuple[float, int]]]:
        """(recipient, shams, envelope digest, sender, place) of queued letters past their
        expire_time, by expire_time; ``after`` a row's place, to read on past it."""
        rows = await self.db.fetchall(
            "SELECT q.recipient, q.shams, l.envelope_sha256, l.sender, q.expire_at, q.id"
            " FROM queue q JOIN letters l ON l.shams = q.shams"
            " WHERE q.expire_at IS NOT NULL AND q.expire_at <= ? AND (q.expire_at, q.id) > (?, ?)"
            " ORDER BY q.expire_at, q.id LIMIT ?",
            (now, after[0], after[1], limit),
        )
        return [
            (str(r[0]), str(r[1]), bytes(r[2]), str(r[3]), (float(r[4]), int(r[5]))) for r in rows
        ]

    async def expire(
        self, items: Sequence[tuple[str, str, str, pb.Evidence, str]]
    ) -> list[tuple[str, str]]:
        """Removes expired letters from queues with their EXPIRY evidence.

        ``items`` are (recipient, shams, sender, evidence, evidence id). Returns the
        (recipient, sender) pairs actually expired (a letter delivered meanwhile is skipped).
        """

        def job(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            now = time.time()
            done: list[tuple[str, str]] = []
            for recipient, shams, sender, evidence, evidence_id in items:
                cur = conn.execute(
                    "DELETE FROM queue WHERE recipient = ? AND shams = ?", (recipient, shams)
                )
                if cur.rowcount == 0:
                    continue
                blob = evidence.SerializeToString()
                conn.execute(
                    "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (evidence_id, shams, pb.EvidenceEvent.EVIDENCE_EVENT_EXPIRY, blob, now),
                )
                conn.execute(
                    "INSERT INTO notices (agency, evidence_id, evidence) VALUES (?, ?, ?)",
                    (sender, evidence_id, blob),
                )
                advance_state(conn, shams, recipient, pb.EvidenceEvent.EVIDENCE_EVENT_EXPIRY)
                done.append((recipient, sender))
            return done

        return await self.db.write(job)

    async def purge(self, before: float, limit: int = 1000) -> int:
        """Drops the envelopes of letters no longer queued and accepted before ``before``.

        The letter row (number, sender, digest, relay evidence) and all evidence stay, so
        a late resubmission is still recognised and every evidence still verifies.
        """

        def job(conn: sqlite3.Connection) -> int:
            done = [
                (r[0],)
                for r in conn.execute(
                    "SELECT l.shams FROM letters l WHERE l.purged = 0 AND l.accepted_at < ?"
                    " AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.shams = l.shams) LIMIT ?",
                    (before, limit),
                ).fetchall()
            ]
            conn.executemany("DELETE FROM envelopes WHERE shams = ?", done)
            conn.executemany("UPDATE letters SET purged = 1 WHERE shams = ?", done)
            return len(done)

        return await self.db.write(job)

    async def queue_depth(self, recipient: str | None = None) -> int:
        if recipient is None:
            row = await self.db.fetchone("SELECT count(*) FROM queue")
        else:
            row = await self.db.fetchone(
                "SELECT count(*) FROM queue WHERE recipient = ?", (recipient,)
            )
        return int(row[0]) if row else 0

    async def record_receipts(
        self,
        recipient: str,
        items: Sequence[tuple[pb.Evidence, pb.EvidenceContent, str]],
        on_commit: Callable[[tuple[list[str], int, list[str]]], None] | None = None,
        on_refused: Callable[[str, int], None] | None = None,
    ) -> tuple[list[str], int, list[str]]:
        """Stores evidence a recipient node issued, routes it to the sender, dequeues.

        ``items`` are (evidence, content, shams) already verified as issued by ``recipient``.
        Returns the senders who have new notices, how many letters left ``recipient``'s
        queue, and the numbers of letters refused: not addressed to ``recipient``, or
        naming another letter's digest than the one queued under that number, or under an
        evidence id that already stands for other evidence (about another letter, or
        another content about this one: only the very same receipt sent again is taken
        for a resend), or a HANDOVER with no DELIVERY from ``recipient`` kept before it
        (stored earlier, or earlier in ``items``). ``on_commit`` gets the same, once
        committed (even if the caller was cancelled meanwhile). Refusals are logged here,
        with why, one warning a batch and cause, and given to ``on_refused`` (reason,
        count) once committed: ``RECEIPT_MISMATCH`` for the first kinds above,
        ``HANDOVER_WITHOUT_DELIVERY`` for the last.

        The evidence chain is RELAY_ACCEPTANCE, DELIVERY, HANDOVER: a node hands a letter
        over to its back-end only once it has stored it, and sends the DELIVERY first (a
        letter pushed again gets both, in that order). A HANDOVER without one would say
        the letter reached the agency while the hub still holds it queued, free to expire.

        One receipt of each event (DELIVERY, DELIVERY_FAILURE, HANDOVER) is kept a letter
        and recipient: a later one under another id (a node restored from a copy signs its
        answer again) is taken as answered, and a DELIVERY or DELIVERY_FAILURE dequeues, as
        the one stored before stands for it; it is neither stored nor routed, and logged
        (one warning a batch). An honest node issues one of each at most.
        """

        def job(
            conn: sqlite3.Connection,
        ) -> tuple[list[str], int, list[str], list[str], list[str]]:
            now = time.time()
            letter_of: dict[str, tuple[str, bytes]] = {}
            state: dict[str, int] = {}
            kept: dict[str, int] = {}  # bits 1 << event of the receipts stored, by letter
            unknown: list[str] = []  # rows from before schema 9
            for shams, sender, digest, at, receipts in rows_in(
                conn,
                "SELECT s.shams, l.sender, l.envelope_sha256, s.state, s.receipts"
                " FROM recipient_state s JOIN letters l ON l.shams = s.shams"
                " WHERE s.recipient = ? AND s.shams IN ({marks})",
                [shams for _, _, shams in items],
                (recipient,),
            ):
                letter_of[str(shams)] = (str(sender), bytes(digest))
                state[str(shams)] = int(at)
                kept[str(shams)] = 0 if receipts is None else int(receipts)
                if receipts is None:
                    unknown.append(str(shams))
            for shams, blob in rows_in(
                conn,
                "SELECT shams, evidence FROM evidence WHERE event IN (?, ?, ?)"
                " AND shams IN ({marks})",
                unknown,
                _RECEIPT_EVENTS,
            ):
                content = pb.EvidenceContent.FromString(pb.Evidence.FromString(blob).content)
                if content.recipient == recipient:
                    kept[str(shams)] |= 1 << content.event
            # What each id already stands for: (letter, signed content). Only resent receipts
            # find a row here, so their stored bytes are read and parsed, no others.
            earlier = {
                str(evidence_id): (str(shams), pb.Evidence.FromString(blob).content)
                for evidence_id, shams, blob in rows_in(
                    conn,
                    "SELECT evidence_id, shams, evidence FROM evidence WHERE evidence_id IN ({marks})",
                    [c.evidence_id for _, c, _ in items],
                )
            }
            # A receipt stands for the letter queued under its number only if it names that
            # letter's digest; an evidence id already stored (or earlier in this batch)
            # stands only for the evidence stored under it: the same letter and the same
            # signed content is a resent receipt, anything else under that id (the hub's
            # RELAY_ACCEPTANCE, another event, another letter) is refused, so that no
            # receipt dequeues a letter without its evidence.
            ours: list[tuple[pb.Evidence, pb.EvidenceContent, str]] = []
            strangers: list[str] = []
            surplus: list[str] = []
            undelivered: list[str] = []  # HANDOVERs with no DELIVERY kept before them
            new: list[tuple[str, pb.EvidenceContent, str, bytes]] = []
            touched = set(unknown)
            for evidence, content, shams in items:
                letter = letter_of.get(shams)
                if letter is None or content.envelope_sha256 != letter[1]:
                    strangers.append(shams)
                    continue
                before = earlier.get(content.evidence_id)
                if before is not None:
                    if before != (shams, evidence.content):
                        strangers.append(shams)
                        continue
                elif content.event in _RECEIPT_EVENTS and kept[shams] & (1 << content.event):
                    surplus.append(shams)  # answered by the one of its event stored before
                elif content.event == _HANDOVER and not kept[shams] & _DELIVERED_BIT:
                    undelivered.append(shams)
                    continue
                else:
                    if content.event in _RECEIPT_EVENTS:
                        kept[shams] |= 1 << content.event
                    state[shams] = lifecycle.advance(state[shams], content.event).state
                    touched.add(shams)
                    earlier[content.evidence_id] = (shams, evidence.content)
                    new.append((shams, content, letter[0], evidence.SerializeToString()))
                ours.append((evidence, content, shams))
            conn.executemany(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, recorded_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(c.evidence_id, shams, c.event, blob, now) for shams, c, _, blob in new],
            )
            # A DELIVERY (or DELIVERY_FAILURE) dequeues, even when resent: its first copy's
            # acknowledgement may have been lost with a stream.
            dequeued = conn.executemany(
                "DELETE FROM queue WHERE recipient = ? AND shams = ?",
                [(recipient, shams) for _, c, shams in ours if c.event in _DEQUEUING],
            ).rowcount
            conn.executemany(
                "INSERT OR IGNORE INTO notices (agency, evidence_id, evidence) VALUES (?, ?, ?)",
                [(sender, c.evidence_id, blob) for _, c, sender, blob in new],
            )
            # States only move forward (the lifecycle table): read with the letters above,
            # written with the receipts kept, one row a letter.
            conn.executemany(
                "UPDATE recipient_state SET state = ?, receipts = ? WHERE shams = ? AND recipient = ?",
                [(state[shams], kept[shams], shams, recipient) for shams in touched],
            )
            senders = [sender for _, _, sender, _ in new]
            return senders, max(dequeued, 0), strangers, surplus, undelivered

        def committed(outcome: tuple[list[str], int, list[str], list[str], list[str]]) -> None:
            senders, dequeued, strangers, surplus, undelivered = outcome
            if strangers:
                log.warning(
                    "receipts from %s refused: the letter is not addressed to it, or the"
                    " receipt names another letter, or its evidence id stands for other"
                    " evidence",
                    recipient,
                    extra={"shams": strangers, "count": len(strangers), "peer": recipient},
                )
            if undelivered:
                log.warning(
                    "HANDOVER receipts from %s refused: no DELIVERY from it is held about"
                    " these letters",
                    recipient,
                    extra={
                        "shams": undelivered,
                        "count": len(undelivered),
                        "peer": recipient,
                        "reason": "HANDOVER_WITHOUT_DELIVERY",
                    },
                )
            if surplus:
                log.warning(
                    "receipts from %s not kept: one of the same event from it is held about"
                    " each of these letters",
                    recipient,
                    extra={"shams": surplus, "count": len(surplus), "peer": recipient},
                )
            if on_refused is not None:
                for reason, refused in (
                    ("RECEIPT_MISMATCH", strangers),
                    ("HANDOVER_WITHOUT_DELIVERY", undelivered),
                ):
                    if refused:
                        on_refused(reason, len(refused))
            if on_commit is not None:
                on_commit((senders, dequeued, strangers + undelivered))

        senders, dequeued, strangers, _, undelivered = await self.db.write(job, committed)
        return senders, dequeued, strangers + undelivered

    async def notices(self, agency: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """The notices waiting for ``agency``'s node (not acknowledged) after id ``after``."""
        rows = await self.db.fetchall(
            "SELECT id, evidence FROM notices WHERE agency = ? AND id > ? AND acked_at IS NULL"
            " ORDER BY id LIMIT ?",
            (agency, after, limit),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def ack_notices_later(self, agency: str, evidence_ids: Sequence[str]) -> None:
        """Marks notices their sender's node acknowledged, and when, in the next transaction
        (``Database.write_later``): no longer routed, kept for ``route_again`` until
        ``purge_notices``. A notice whose mark a crash lost is sent again, and the sender's
        node stores it once."""
        now = time.time()

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE notices SET acked_at = ? WHERE agency = ? AND evidence_id = ?"
                " AND acked_at IS NULL",
                [(now, agency, e) for e in evidence_ids],
            )

        self.db.write_later(job)

    async def route_again(self, agency: str, since: float, limit: int = 1000) -> int:
        """After ``agency``'s node was restored from a copy taken around ``since`` (less a
        margin): marks as waiting again the notices its node acknowledged since then, which
        the copy lacks; how many. Those acknowledged more than NOTICES_KEPT_S ago are gone.

        The agency's notices are read in the order of their unique index, ``limit`` a
        transaction: a busy agency holds hundreds of thousands, and marked in one they held
        the hub's one writer, every other agency's relays and receipts, for seconds."""

        def step(after: str) -> Callable[[sqlite3.Connection], tuple[int, str | None]]:
            def job(conn: sqlite3.Connection) -> tuple[int, str | None]:
                rows = conn.execute(
                    "SELECT id, evidence_id, acked_at FROM notices"
                    " WHERE agency = ? AND evidence_id > ? ORDER BY evidence_id LIMIT ?",
                    (agency, after, limit),
                ).fetchall()
                again = [(r[0],) for r in rows if r[2] is not None and r[2] >= since]
                conn.executemany("UPDATE notices SET acked_at = NULL WHERE id = ?", again)
                return len(again), str(rows[-1][1]) if len(rows) == limit else None

            return job

        total = 0
        after: str | None = ""
        while after is not None:
            count, after = await self.db.write(step(after))
            total += count
        return total

    async def purge_notices(self, before: float, limit: int = 1000) -> int:
        """Deletes up to ``limit`` notices acknowledged before ``before``; how many."""

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM notices WHERE id IN"
                " (SELECT id FROM notices WHERE acked_at < ? LIMIT ?)",
                (before, limit),
            ).rowcount

        return max(await self.db.write(job), 0)

    async def accepted_sequences(self, origin: str) -> list[pb.AcceptedSequence]:
        """The highest sequence accepted from ``origin`` per (domain, year)."""
        return [
            pb.AcceptedSequence(domain=_LETTER_DOMAIN[str(d)], year=int(y), sequence=int(last))
            for d, y, last in await self.db.fetchall(
                "SELECT domain, year, last FROM sender_sequences WHERE origin = ?"
                " ORDER BY domain, year",
                (origin,),
            )
            if str(d) in _LETTER_DOMAIN
        ]

    async def save_revocations(
        self, serials: Sequence[str], since: Mapping[str, dt.datetime] | None = None
    ) -> None:
        """Keeps the revoked serials of the directory in force, and the times of those
        revoked from a time on (``since``), replacing those kept."""
        rows = [
            (_REVOKED, "\n".join(serials).encode()),
            (
                _REVOKED_SINCE,
                "\n".join(f"{s} {t.isoformat()}" for s, t in (since or {}).items()).encode(),
            ),
        ]

        def job(conn: sqlite3.Connection) -> None:  # both or neither
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", rows)

        await self.db.write(job)

    async def saved_revocation_times(self) -> dict[str, dt.datetime]:
        """The times ``save_revocations`` kept last (none if never)."""
        value = await self.meta_value(_REVOKED_SINCE)
        pairs = (line.split() for line in (value or b"").decode().splitlines() if line)
        return {serial: dt.datetime.fromisoformat(when) for serial, when in pairs}

    async def saved_revocations(self) -> list[str]:
        """The revoked serials ``save_revocations`` kept last (none if never)."""
        value = await self.meta_value(_REVOKED)
        return value.decode().split() if value is not None else []

    async def keep_signing_certificate(self, der: bytes) -> list[bytes]:
        """Adds the hub's signing certificate in use (DER) to those kept, once; returns the
        others kept, oldest first: the hub signed evidence with their keys, which stays
        in letters' chains after a renewal (the operator lists an agency's old ones, the
        hub its own)."""
        value = await self.meta_value(_SIGNERS)
        kept = [bytes.fromhex(line) for line in value.decode().split()] if value else []
        if der not in kept:
            kept.append(der)
            await self.set_meta_value(_SIGNERS, "\n".join(d.hex() for d in kept).encode())
        return [d for d in kept if d != der]

    async def may_fetch(self, digest: bytes, owner: str, recipient: str) -> bool:
        row = await self.db.fetchone(
            "SELECT 1 FROM document_grants WHERE sha256 = ? AND owner = ? AND recipient = ?",
            (digest, owner, recipient),
        )
        return row is not None

    async def count(self, table: str) -> int:
        assert table in {"letters", "queue", "evidence", "notices"}
        row = await self.db.fetchone(f"SELECT count(*) FROM {table}")  # noqa: S608
        return int(row[0]) if row else 0


def _highest(letters: Sequence[IncomingLetter]) -> dict[tuple[str, str, int], int]:
    """The highest sequence of ``letters`` per (origin, domain letter, year)."""
    out: dict[tuple[str, str, int], int] = {}
    for letter in letters:
        number = letter.shams_pb if letter.shams_pb is not None else parse_shams(letter.shams)
        key = (number.origin, _DOMAIN_LETTER[number.domain], number.year)
        out[key] = max(out.get(key, 0), number.sequence)
    return out


def _relay_evidence(conn: sqlite3.Connection, shams: str, kept: bytes) -> list[pb.Evidence]:
    """The RELAY_ACCEPTANCE evidence of an accepted letter, in recipient order."""
    if kept:  # a copy kept inline by earlier versions
        return list(pb.EvidenceBatch.FromString(kept).evidence)
    rows = conn.execute(
        "SELECT evidence FROM evidence WHERE shams = ? AND event = ? ORDER BY rowid",
        (shams, pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE),
    ).fetchall()
    return [pb.Evidence.FromString(r[0]) for r in rows]


def _queued_row(row: Sequence[Any]) -> tuple[int, str, bytes, float | None]:
    return int(row[0]), str(row[1]), bytes(row[2]), None if row[3] is None else float(row[3])


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _redacted(shams: str, in_reply_to: str | None) -> TreeLetter:
    return TreeLetter(
        shams=shams,
        sender="",
        recipients=[],
        kind=None,
        in_reply_to=in_reply_to,
        status=0,
        accepted_at=0.0,
        evidence=[],
        envelope=None,
        redacted=True,
    )


def _bodiless(blob: bytes) -> pb.Envelope:
    """A stored envelope without its body (header, signature and proof still verify)."""
    envelope = pb.Envelope.FromString(blob)
    envelope.ClearField("body")
    return envelope


def _link_stored_letters(after: int, upto: int, conn: sqlite3.Connection) -> int:
    """Links the letters of rowids ``after`` (excluded) to ``upto`` not linked yet whose
    envelope is held; returns how many."""
    values = []
    for shams, blob in conn.execute(  # row by row: an envelope holds its body
        "SELECT l.shams, e.envelope FROM letters l JOIN envelopes e ON e.shams = l.shams"
        " WHERE l.rowid > ? AND l.rowid <= ? AND l.kind IS NULL",
        (after, upto),
    ):
        try:
            header = pb.EnvelopeHeader.FromString(pb.Envelope.FromString(blob).header)
            reply = format_shams(header.in_reply_to) if header.HasField("in_reply_to") else None
        except (DecodeError, ValueError):  # verified when accepted: never, but no link then
            continue
        values.append((int(header.kind), reply, int(header.status), shams))
    conn.executemany(
        "UPDATE letters SET kind = ?, in_reply_to = ?, status = ? WHERE shams = ?", values
    )
    return len(values)
