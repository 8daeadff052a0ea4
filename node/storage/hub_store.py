"""The hub's tables: letters, one durable queue per recipient, evidence and notices.

A *notice* is evidence waiting to be routed back to a letter's sender (DELIVERY,
HANDOVER ...); it stays until the sender's node acknowledges it. A queue row stays until the
recipient's node answers with DELIVERY or DELIVERY_FAILURE evidence. Both survive restarts.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.shams import format_shams, parse_shams
from node.core import lifecycle
from node.storage.db import Page, Store, advance_state, advance_states, fits, rows_in
from node.storage.restore import RESTORED_KEY, RestoreMark

__all__ = ["MIGRATIONS", "TREE_LIMIT", "HubStore", "IncomingLetter", "Tree", "TreeLetter"]

_DEQUEUING = (
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY,
    pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE,
)

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
    CREATE INDEX letters_by_reply ON letters (in_reply_to) WHERE in_reply_to IS NOT NULL;
    """,
]
# ``meta`` key set once the letters accepted before schema 8 have been linked.
_LINKED = "letters_linked"
# A tree read stops at this many letters, and at this many bytes of envelopes and evidence
# (a reply well under the 64 MiB a message may have): ``Tree.truncated`` says so.
TREE_LIMIT = 1000
TREE_MAX_BYTES = 32 * 1024 * 1024
# Envelopes read at a time, by size, when their bodies are dropped for a tree.
_ENVELOPE_READ_BYTES = 8 * 1024 * 1024
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
    evidence: list[pb.Evidence]  # all the hub recorded about the letter, in recorded order
    envelope: pb.Envelope | None  # without its body; None once retention removed it


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
                "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, ?)",
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

    async def tree(
        self, shams: str, limit: int = TREE_LIMIT, max_bytes: int = TREE_MAX_BYTES
    ) -> Tree | None:
        """The correspondence tree around letter ``shams`` (see ``Tree``); None if the hub
        never accepted it.

        Links are the ``in_reply_to`` of signed headers, which a hostile node may point at
        a number still to come, so a walk may meet a letter twice: each is taken once.
        At most ``limit`` letters, and (but always the letter asked for) ``max_bytes`` of
        envelopes and evidence; ``truncated`` says the tree was cut.
        """
        links = await self._links([shams])
        if shams not in links:
            return None
        order = [shams]
        seen = {shams}
        truncated = False
        parent = links[shams]
        while parent is not None and parent not in seen:
            if len(order) >= limit:
                truncated = True
                break
            found = await self._links([parent])
            if parent not in found:  # a number the hub never accepted
                break
            order.append(parent)
            seen.add(parent)
            parent = found[parent]
        frontier = list(order)
        while frontier and not truncated:
            rows = sorted(
                (int(rowid), str(child))
                for rowid, child in await self.db.fetchall_in(
                    "SELECT rowid, shams FROM letters WHERE in_reply_to IN ({marks})", frontier
                )
            )
            frontier = []
            for _, child in rows:
                if child in seen:
                    continue
                if len(order) >= limit:
                    truncated = True
                    break
                order.append(child)
                seen.add(child)
                frontier.append(child)
        letters, cut = await self._tree_letters(order, max_bytes)
        return Tree(letters, truncated or cut)

    async def _links(self, numbers: Sequence[str]) -> dict[str, str | None]:
        """The ``in_reply_to`` of those of ``numbers`` the hub accepted."""
        return {
            str(shams): None if reply is None else str(reply)
            for shams, reply in await self.db.fetchall_in(
                "SELECT shams, in_reply_to FROM letters WHERE shams IN ({marks})", numbers
            )
        }

    async def _tree_letters(
        self, order: Sequence[str], max_bytes: int
    ) -> tuple[list[TreeLetter], bool]:
        """The letters ``order`` names, in that order, up to ``max_bytes`` (but one
        always); whether some were left out."""
        rows = {
            str(r[0]): r
            for r in await self.db.fetchall_in(
                "SELECT shams, sender, kind, in_reply_to, status, accepted_at, relay_evidence"
                " FROM letters WHERE shams IN ({marks})",
                order,
            )
        }
        recipients: dict[str, list[str]] = {}
        for shams, recipient in await self.db.fetchall_in(
            "SELECT shams, recipient FROM recipient_state WHERE shams IN ({marks}) ORDER BY rowid",
            order,
        ):
            recipients.setdefault(str(shams), []).append(str(recipient))
        evidence: dict[str, list[bytes]] = {}
        for shams, blob in await self.db.fetchall_in(
            "SELECT shams, evidence FROM evidence WHERE shams IN ({marks}) ORDER BY rowid", order
        ):
            evidence.setdefault(str(shams), []).append(bytes(blob))
        sizes = {
            str(shams): int(size)
            for shams, size in await self.db.fetchall_in(
                "SELECT shams, length(envelope) FROM envelopes WHERE shams IN ({marks})", order
            )
        }
        out: list[TreeLetter] = []
        used = 0
        at = 0
        while at < len(order):
            # The next envelopes, as many as fit in one read (but one always).
            group = order[
                at : at + max(1, fits([sizes.get(s, 0) for s in order[at:]], _ENVELOPE_READ_BYTES))
            ]
            at += len(group)
            envelopes = {
                str(shams): _bodiless(bytes(blob))
                for shams, blob in await self.db.fetchall_in(
                    "SELECT shams, envelope FROM envelopes WHERE shams IN ({marks})",
                    [s for s in group if s in sizes],
                )
            }
            for shams in group:
                row = rows[shams]
                items = [pb.Evidence.FromString(b) for b in evidence.get(shams, [])]
                if row[6]:  # a copy kept inline by earlier versions: those not also stored
                    stored = {pb.EvidenceContent.FromString(e.content).evidence_id for e in items}
                    kept = [
                        e
                        for e in pb.EvidenceBatch.FromString(bytes(row[6])).evidence
                        if pb.EvidenceContent.FromString(e.content).evidence_id not in stored
                    ]
                    items = [*kept, *items]
                envelope = envelopes.get(shams)
                used += sum(e.ByteSize() for e in items)
                used += envelope.ByteSize() if envelope is not None else 0
                if out and used > max_bytes:
                    return out, True
                out.append(
                    TreeLetter(
                        shams=shams,
                        sender=str(row[1]),
                        recipients=recipients.get(shams, []),
                        kind=None if row[2] is None else int(row[2]),
                        in_reply_to=None if row[3] is None else str(row[3]),
                        status=int(row[4]),
                        accepted_at=float(row[5]),
                        evidence=items,
                        envelope=envelope,
                    )
                )
        return out, False

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
    ) -> tuple[list[str], int, list[str]]:
        """Stores evidence a recipient node issued, routes it to the sender, dequeues.

        ``items`` are (evidence, content, shams) already verified as issued by ``recipient``.
        Returns the senders who have new notices, how many letters left ``recipient``'s
        queue, and the numbers of letters refused: not addressed to ``recipient``, or
        naming another letter's digest than the one queued under that number, or under an
        evidence id already stored about another letter. ``on_commit`` gets the same, once
        committed (even if the caller was cancelled meanwhile).
        """

        def job(conn: sqlite3.Connection) -> tuple[list[str], int, list[str]]:
            now = time.time()
            letter_of = {
                str(shams): (str(sender), bytes(digest))
                for shams, sender, digest in rows_in(
                    conn,
                    "SELECT s.shams, l.sender, l.envelope_sha256 FROM recipient_state s"
                    " JOIN letters l ON l.shams = s.shams"
                    " WHERE s.recipient = ? AND s.shams IN ({marks})",
                    [shams for _, _, shams in items],
                    (recipient,),
                )
            }
            stored_about = {
                str(evidence_id): str(shams)
                for evidence_id, shams in rows_in(
                    conn,
                    "SELECT evidence_id, shams FROM evidence WHERE evidence_id IN ({marks})",
                    [c.evidence_id for _, c, _ in items],
                )
            }
            # A receipt stands for the letter queued under its number only if it names that
            # letter's digest; an evidence id already stored stands only for its own letter
            # (a resent receipt), so that no receipt dequeues a letter without its evidence.
            ours: list[tuple[pb.Evidence, pb.EvidenceContent, str]] = []
            strangers: list[str] = []
            for evidence, content, shams in items:
                if (
                    shams in letter_of
                    and content.envelope_sha256 == letter_of[shams][1]
                    and stored_about.get(content.evidence_id, shams) == shams
                ):
                    ours.append((evidence, content, shams))
                else:
                    strangers.append(shams)
            sender_of = {shams: letter_of[shams][0] for _, _, shams in ours}
            known = set(stored_about)
            new: list[tuple[str, pb.EvidenceContent, str, bytes]] = []
            for evidence, content, shams in ours:
                if content.evidence_id not in known:
                    known.add(content.evidence_id)
                    new.append((shams, content, sender_of[shams], evidence.SerializeToString()))
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
            advance_states(conn, [(shams, recipient, c.event) for shams, c, _, _ in new])
            return [sender for _, _, sender, _ in new], max(dequeued, 0), strangers

        return await self.db.write(job, on_commit)

    async def notices(self, agency: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self.db.fetchall(
            "SELECT id, evidence FROM notices WHERE agency = ? AND id > ? ORDER BY id LIMIT ?",
            (agency, after, limit),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def ack_notices_later(self, agency: str, evidence_ids: Sequence[str]) -> None:
        """Forgets notices their sender's node acknowledged, in the next transaction
        (``Database.write_later``): a notice whose deletion a crash lost is sent again, and
        the sender's node stores it once."""

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "DELETE FROM notices WHERE agency = ? AND evidence_id = ?",
                [(agency, e) for e in evidence_ids],
            )

        self.db.write_later(job)

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

    async def restore_mark(self) -> RestoreMark | None:
        """When this database was restored from a backup (``node.backup``), if it was."""
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = ?", (RESTORED_KEY,))
        return RestoreMark.decode(row[0]) if row else None

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
