"""Backup and restore without processes: which backups a server takes back, the restore
mark, the hub's highest accepted numbers and a node's counters moving up to them."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from client_sdk import pb
from node import backup as backup_module
from node.agency import Agency
from node.backup import BackupError, Manifest, check_manifest
from node.core import lifecycle
from node.storage import hub_store, node_store
from node.storage.db import Database
from node.storage.hub_store import HubStore
from node.storage.node_store import NodeStore
from node.storage.restore import RestoreMark, read_restore_mark

NODE = "urn:chapar:agency:SENDER.A"


def _manifest(role: str = "node", identity: str = NODE, schema: int = 6) -> Manifest:
    return Manifest(role, identity, schema, 1_700_000_000.0, "node.db", {"outbox": 3})


def test_a_backup_of_this_server_at_this_or_an_older_schema_is_taken() -> None:
    check_manifest(_manifest(schema=6), "node", NODE, 6)
    check_manifest(_manifest(schema=2), "node", NODE, 6)


@pytest.mark.parametrize(
    ("manifest", "words"),
    [
        (_manifest(role="hub", identity="urn:chapar:hub:national"), "is of a hub"),
        (_manifest(identity="urn:chapar:agency:RECIPIENT.B"), "RECIPIENT.B"),
        (_manifest(schema=7), "newer than this program's (6)"),
    ],
)
def test_a_backup_of_another_server_or_a_newer_schema_is_refused(
    manifest: Manifest, words: str
) -> None:
    with pytest.raises(BackupError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_manifest(manifest, "node", NODE, 6)


def test_a_manifest_reads_back_what_it_wrote_and_refuses_another_format() -> None:
    manifest = _manifest()
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(BackupError, match="format"):
        Manifest.from_json({**manifest.to_json(), "format": 2})
    with pytest.raises(BackupError, match="not a Chapar backup manifest"):
        Manifest.from_json({"format": 1, "role": "node"})


@pytest.mark.parametrize(
    "snapshot_time",
    [float("nan"), float("inf"), 1e300, 1e12, 253_402_300_800.0, -62_135_596_801.0],
    ids=["nan", "infinity", "huge", "year-33658", "year-10000", "year-0"],
)
def test_a_manifest_whose_snapshot_time_is_no_time_is_refused(snapshot_time: float) -> None:
    """A snapshot time outside 0001..9999 (or not a number: JSON's NaN and Infinity parse)
    was taken, and the restore swapped the database in: a hub restored so then failed at
    every start (its welcome's hub_restore, a Timestamp, cannot hold it: ValueError or
    OverflowError in Hub.start), a node never had its numbers confirmed (its hello could
    not be built), and chapar restore ended in a traceback printing the time."""
    data = {**_manifest().to_json(), "snapshot_time": snapshot_time}
    with pytest.raises(BackupError, match="snapshot_time"):
        Manifest.from_json(data)
    # The edges of the range are times, and taken.
    for edge in (-62_135_596_800.0, 253_402_300_799.0):
        assert Manifest.from_json({**data, "snapshot_time": edge}).snapshot_time == edge


def test_the_restore_mark_is_read_back_and_absent_without_a_restore() -> None:
    conn = sqlite3.connect(":memory:")
    assert read_restore_mark(conn) is None  # no meta table at all (a hub before schema 6)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    assert read_restore_mark(conn) is None
    mark = RestoreMark(restore_time=1_700_000_600.5, snapshot_time=1_700_000_000.25)
    conn.execute("INSERT INTO meta VALUES ('restored', ?)", (mark.encode(),))
    assert read_restore_mark(conn) == mark


async def test_the_hub_fills_its_highest_sequences_from_the_letters_it_holds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.db"
    old = await Database.open(path, hub_store.MIGRATIONS[:6])

    def letters(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence, accepted_at)"
            " VALUES (?, ?, x'', x'', 0)",
            [
                ("SENDER.A/O/2025/0000041", "SENDER.A"),
                ("SENDER.A/O/2026/0000007", "SENDER.A"),
                ("SENDER.A/O/2026/0000012", "SENDER.A"),
                ("SENDER.A/O/2026/12345678", "SENDER.A"),  # past seven digits
                ("SENDER.A/I/2026/0000003", "SENDER.A"),
                ("RECIPIENT.B/O/2026/0000099", "RECIPIENT.B"),
            ],
        )

    await old.write(letters)
    await old.close()
    store = await HubStore.open(path)
    try:
        assert [
            (s.domain, s.year, s.sequence) for s in await store.accepted_sequences("SENDER.A")
        ] == [
            (pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL, 2026, 3),
            (pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, 2025, 41),
            (pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, 2026, 12345678),
        ]
        assert await store.accepted_sequences("NOBODY") == []
    finally:
        await store.close()


async def test_a_node_moves_its_counters_up_never_down_and_confirms_a_restore_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.db"
    store = await NodeStore.open(path)
    try:
        assert await store.unconfirmed_restore() is None  # never restored
        mark = RestoreMark(restore_time=1_700_000_600.5, snapshot_time=1_700_000_000.0)

        def restored(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta VALUES ('restored', ?)", (mark.encode(),))
            conn.execute("INSERT INTO shams_counter VALUES ('SENDER.A', 'O', 2026, 30)")

        await store.db.write(restored)
        assert await store.unconfirmed_restore() == mark.restore_time
        hub_says = [
            pb.AcceptedSequence(
                domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=25
            ),
            pb.AcceptedSequence(domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=2027, sequence=4),
        ]
        moved = await store.raise_counters("SENDER.A", hub_says, mark.restore_time)
        assert moved == [("O", 2027, 0, 4)]  # 2026 stays at 30: never down
        assert await store.unconfirmed_restore() is None
        counters = await store.db.fetchall("SELECT year, last FROM shams_counter ORDER BY year")
        assert [tuple(r) for r in counters] == [(2026, 30), (2027, 4)]
    finally:
        await store.close()


async def test_after_a_hub_restore_a_node_marks_what_the_hub_may_have_lost_once(
    tmp_path: Path,
) -> None:
    me = "urn:chapar:agency:SENDER.A"
    since = 1_000.0
    store = await NodeStore.open(tmp_path / "node.db")

    def evidence(evidence_id: str, event: int, issuer: str) -> bytes:
        content = pb.EvidenceContent(evidence_id=evidence_id, event=event, issuer=issuer)  # type: ignore[arg-type]
        return pb.Evidence(content=content.SerializeToString()).SerializeToString()

    def fill(conn: sqlite3.Connection) -> None:
        # (shams, relay_state, relayed_at, created_at, recipient states)
        letters = [
            ("old", 1, 900.0, 800.0, [lifecycle.DELIVERED]),  # relayed before: kept
            ("delivered", 1, 1_100.0, 800.0, [lifecycle.DELIVERED]),  # again
            ("half", 1, 1_100.0, 1_050.0, [lifecycle.HANDED_OVER, lifecycle.RELAYED]),  # again
            # Finished, one recipient got it: again (the hub's record, its document grants).
            ("done", 1, 1_100.0, 1_050.0, [lifecycle.HANDED_OVER, lifecycle.FAILED]),
            ("failed", 1, 1_100.0, 1_050.0, [lifecycle.EXPIRED, lifecycle.FAILED]),  # kept
            ("legacy", 1, None, 1_050.0, [lifecycle.RELAYED]),  # no relayed_at: created_at
            ("rejected", 2, None, 1_050.0, [lifecycle.REJECTED]),  # never relayed: kept
        ]
        for shams, relay, relayed, created, recipients in letters:
            conn.execute(
                "INSERT INTO outbox (shams, envelope, envelope_sha256, receipt, relay_state,"
                " relayed_at, created_at) VALUES (?, x'', x'', x'', ?, ?, ?)",
                (shams, relay, relayed, created),
            )
            conn.executemany(
                "INSERT INTO recipient_state VALUES (?, ?, ?)",
                [(shams, f"R{i}", state) for i, state in enumerate(recipients)],
            )
        receipts = [
            ("mine-new", pb.EVIDENCE_EVENT_HANDOVER, me, 1_200.0),  # again
            ("mine-new-d", pb.EVIDENCE_EVENT_DELIVERY, me, 1_200.0),  # again
            ("mine-old", pb.EVIDENCE_EVENT_DELIVERY, me, 900.0),  # before: kept
            ("theirs", pb.EVIDENCE_EVENT_DELIVERY, "urn:chapar:agency:B", 1_200.0),  # not ours
            ("relay", pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "urn:chapar:hub:x", 1_200.0),
        ]
        conn.executemany(
            "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
            " VALUES (?, 'x', ?, ?, 0, ?)",
            [(i, event, evidence(i, event, who), at) for i, event, who, at in receipts],
        )

    await store.db.write(fill)
    try:
        assert not await store.hub_restore_handled("42")
        assert await store.handle_hub_restore("42", since, me, now=1_300.0) == (4, 2)
        assert await store.hub_restore_handled("42")
        assert not await store.hub_restore_handled("43")  # a later restore is handled anew
        again = await store.db.fetchall("SELECT shams FROM outbox WHERE relay_state = 0")
        assert sorted(r[0] for r in again) == ["delivered", "done", "half", "legacy"]
        resend = await store.db.fetchall("SELECT evidence_id FROM evidence WHERE to_send = 1")
        assert sorted(r[0] for r in resend) == ["mine-new", "mine-new-d"]
    finally:
        await store.close()


def test_only_whole_documents_are_copied_never_a_copy_cut_short(tmp_path: Path) -> None:
    # A backup interrupted while copying a document leaves <hex>.partial beside it; a
    # restore from that directory used to copy it into the server's document store.
    source = tmp_path / "documents"
    whole = hashlib.sha256(b"whole").hexdigest()
    folder = source / "sha256" / whole[:2]
    folder.mkdir(parents=True)
    (folder / whole).write_bytes(b"whole")
    (folder / (whole[:2] + "1" * 62 + ".partial")).write_bytes(b"cut")
    target = tmp_path / "restored"
    assert backup_module._copy_documents(source, target) == (1, [])
    assert [p.name for p in (target / "sha256" / whole[:2]).iterdir()] == [whole]


def test_a_backup_whose_documents_would_be_the_servers_own_is_refused(tmp_path: Path) -> None:
    # The database elsewhere, the documents in the backup directory's documents/.
    server = backup_module._Server(
        "node", NODE, tmp_path / "db" / "node.db", tmp_path / "data" / "documents", NodeStore
    )
    with pytest.raises(BackupError, match="is its document store"):
        backup_module._refuse_own_files(server, tmp_path / "data")
    backup_module._refuse_own_files(server, tmp_path / "backup")


async def test_a_node_restored_with_skip_numbers_moves_its_counters_on_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Numbers a node gave letters after its backup and never relayed are unknown to the
    # hub; without a skip they go to new letters, and one number names two letters.
    store = await NodeStore.open(tmp_path / "node.db")
    try:
        mark = RestoreMark(1_700_000_600.5, 1_700_000_000.0, skip_numbers=100)
        assert RestoreMark.decode(mark.encode()) == mark
        assert RestoreMark.decode(b'{"restore_time": 1, "snapshot_time": 0}').skip_numbers == 0

        def restored(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO meta VALUES ('restored', ?)", (mark.encode(),))
            conn.execute("INSERT INTO shams_counter VALUES ('SENDER.A', 'O', 2025, 30)")

        await store.db.write(restored)
        said = [pb.AcceptedSequence(domain=pb.SHAMS_DOMAIN_OUTGOING, year=2025, sequence=42)]
        caplog.set_level(logging.INFO, "chapar")
        await store.raise_counters("SENDER.A", said, mark.restore_time)
        year = dt.datetime.now(dt.UTC).year
        # Logged in the order it happened: up to the hub's 42, then 100 on (the skip was
        # logged in the transaction, and the move after it, by the caller, so it read as if
        # the skip came first: "numbers 43 to 142 skipped" before "moved from 30 to 42").
        reasons = [getattr(r, "reason", None) for r in caplog.records]
        assert reasons == ["COUNTER_BEHIND_HUB"] + ["NUMBERS_SKIPPED"] * 3, caplog.text
        moved, *skipped = [r.getMessage() for r in caplog.records]
        assert "SHAMS counter SENDER.A/O/2025 moved from 30 to 42" in moved
        assert any("SENDER.A/O/2025/43 to 142 skipped" in line for line in skipped), skipped
        counters = {
            (str(d), int(y)): int(last)
            for d, y, last in await store.db.fetchall(
                "SELECT domain, year, last FROM shams_counter WHERE origin = 'SENDER.A'"
            )
        }
        # Up to the hub's 42, then 100 on; this year's counters of both domains too.
        assert counters == {("O", 2025): 142, ("O", year): 100, ("I", year): 100}
        await store.raise_counters("SENDER.A", said, mark.restore_time)  # a later welcome
        await store.raise_counters("SENDER.A", said, None)
        again = await store.db.fetchall("SELECT last FROM shams_counter WHERE year = 2025")
        assert [r[0] for r in again] == [142]  # once
    finally:
        await store.close()


async def test_a_letter_sent_again_after_a_hub_restore_and_refused_stays_relayed(
    tmp_path: Path,
) -> None:
    """The restored hub may refuse a letter sent again (too old now, its signer's
    certificate rotated, its recipient suspended): the rejection is kept as evidence, but
    the letter stays relayed (not sent again in a loop) and its recipients' states stand.
    A letter refused the first time it is relayed is rejected, as always."""
    store = await NodeStore.open(tmp_path / "node.db")

    def fill(conn: sqlite3.Connection) -> None:
        # (shams, relay_state, relayed_at, recipient state)
        for shams, relay, relayed, state in [
            ("resent", 1, 1_100.0, lifecycle.DELIVERED),
            ("legacy", 1, None, lifecycle.HANDED_OVER),  # relayed before schema 7
            ("new", 0, None, lifecycle.SUBMITTED),  # never relayed
        ]:
            conn.execute(
                "INSERT INTO outbox (shams, envelope, envelope_sha256, receipt, relay_state,"
                " relayed_at, created_at) VALUES (?, x'', x'', x'', ?, ?, 1050.0)",
                (shams, relay, relayed),
            )
            conn.execute("INSERT INTO recipient_state VALUES (?, 'R0', ?)", (shams, state))

    def rejection(shams: str) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
        content = pb.EvidenceContent(
            evidence_id=f"rejected-{shams}",
            event=pb.EVIDENCE_EVENT_RELAY_REJECTION,
            reason="CREATE_TIME_OUT_OF_WINDOW",
        )
        return pb.Evidence(content=content.SerializeToString()), content, shams

    await store.db.write(fill)
    try:
        assert await store.handle_hub_restore("42", 1_000.0, NODE, now=1_200.0) == (2, 0)
        await store.record_sender_evidence([rejection(s) for s in ("resent", "legacy", "new")])
        got = await store.db.fetchall(
            "SELECT o.shams, o.relay_state, s.state FROM outbox o"
            " JOIN recipient_state s ON s.shams = o.shams ORDER BY o.shams"
        )
        assert [tuple(r) for r in got] == [
            ("legacy", 1, lifecycle.HANDED_OVER),
            ("new", 2, lifecycle.REJECTED),
            ("resent", 1, lifecycle.DELIVERED),
        ]
        assert await store.count("evidence") == 3  # each rejection kept
    finally:
        await store.close()


@pytest.mark.parametrize(("hub_ahead_s", "again"), [(0.0, 0), (600.0, 1), (-600.0, 1)])
async def test_after_a_hub_restore_a_node_behind_the_hubs_clock_sends_again_by_the_hubs_time(
    tmp_path: Path, hub_ahead_s: float, again: int
) -> None:
    """The copy's time is by the hub's clock, a letter's relayed_at by this node's. A node
    10 minutes behind the hub (which the hub does not refuse: only a create_time ahead of
    its clock, or a week old) recorded a letter the hub accepted a minute after its copy
    as relayed 9 minutes before it, and did not send it again (5 minutes of margin): the
    restored hub never had it, its sender held it relayed for ever. The hub's clock, as
    its welcome's signed attest_time tells it, widens the margin; never narrows it."""
    copy = time.time() - 3600.0  # by the hub's clock
    store = await NodeStore.open(tmp_path / "node.db")

    def fill(conn: sqlite3.Connection) -> None:
        relayed = copy + 60.0 - hub_ahead_s  # a minute after the copy, by this node's clock
        if hub_ahead_s == 0.0:
            relayed = copy - 540.0  # clocks agree: relayed 9 minutes before the copy
        conn.execute(
            "INSERT INTO outbox (shams, envelope, envelope_sha256, receipt, relay_state,"
            " relayed_at, created_at) VALUES ('after', x'', x'', x'', 1, ?, ?)",
            (relayed, relayed),
        )
        conn.execute("INSERT INTO recipient_state VALUES ('after', 'R', ?)", (lifecycle.RELAYED,))

    await store.db.write(fill)
    agency = Agency.__new__(Agency)
    agency.store = store
    agency.identity = SimpleNamespace(uri=NODE)  # type: ignore[assignment]
    agency.outbox_changed, agency.receipts_changed = asyncio.Event(), asyncio.Event()
    restore = pb.HubRestore()
    restore.snapshot_time.FromNanoseconds(round(copy * 1e9))
    restore.restore_time.FromNanoseconds(round((copy + 1800.0) * 1e9))
    try:
        await agency.on_hub_restore(restore, hub_ahead_s=hub_ahead_s)
        again_rows = await store.db.fetchall("SELECT shams FROM outbox WHERE relay_state = 0")
        assert len(again_rows) == again
        assert agency.outbox_changed.is_set() == bool(again)
    finally:
        await store.close()


async def test_a_node_sends_again_at_most_eight_days_back_after_a_hub_restore(
    tmp_path: Path,
) -> None:
    """A node that hears of a hub's restore long after it (offline then, or itself restored
    since) does not go back further than 8 days: the hub refuses older letters anyway."""
    day = 24 * 3600.0
    now = 100 * day
    store = await NodeStore.open(tmp_path / "node.db")

    def evidence(evidence_id: str) -> bytes:
        content = pb.EvidenceContent(
            evidence_id=evidence_id, event=pb.EVIDENCE_EVENT_DELIVERY, issuer=NODE
        )
        return pb.Evidence(content=content.SerializeToString()).SerializeToString()

    def fill(conn: sqlite3.Connection) -> None:
        for shams, at in [("old", now - 9 * day), ("recent", now - 7 * day)]:
            conn.execute(
                "INSERT INTO outbox (shams, envelope, envelope_sha256, receipt, relay_state,"
                " relayed_at, created_at) VALUES (?, x'', x'', x'', 1, ?, ?)",
                (shams, at, at),
            )
            conn.execute(
                "INSERT INTO recipient_state VALUES (?, 'R0', ?)", (shams, lifecycle.RELAYED)
            )
            conn.execute(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
                " VALUES (?, ?, ?, ?, 0, ?)",
                (f"d-{shams}", shams, pb.EVIDENCE_EVENT_DELIVERY, evidence(f"d-{shams}"), at),
            )

    await store.db.write(fill)
    try:
        # The copy is 30 days old: only the last 8 days are sent again.
        assert await store.handle_hub_restore("42", now - 30 * day, NODE, now=now) == (1, 1)
        again = await store.db.fetchall("SELECT shams FROM outbox WHERE relay_state = 0")
        assert [r[0] for r in again] == ["recent"]
        resend = await store.db.fetchall("SELECT evidence_id FROM evidence WHERE to_send = 1")
        assert [r[0] for r in resend] == ["d-recent"]
    finally:
        await store.close()


async def test_after_a_hub_restore_a_node_sends_again_receipts_the_hub_acknowledged_after_the_copy(
    tmp_path: Path,
) -> None:
    """A receipt recorded before the hub's copy but acknowledged by the hub after it (the
    node's link down across the backup, longer than the margin) is lost with the hub's
    data: it is sent again. One the hub acknowledged before the copy is not; one never
    acknowledged is on its way anyway."""
    store = await NodeStore.open(tmp_path / "node.db")
    long_ago = time.time() - 3600.0  # all recorded an hour before the copy

    def evidence(evidence_id: str, event: int) -> bytes:
        content = pb.EvidenceContent(evidence_id=evidence_id, event=event, issuer=NODE)  # type: ignore[arg-type]
        return pb.Evidence(content=content.SerializeToString()).SerializeToString()

    def fill(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
            " VALUES (?, 'x', ?, ?, 1, ?)",
            [
                (i, event, evidence(i, event), long_ago)
                for i, event in [
                    ("acked-before", pb.EVIDENCE_EVENT_DELIVERY),
                    ("acked-after", pb.EVIDENCE_EVENT_HANDOVER),
                    ("acked-after-f", pb.EvidenceEvent.EVIDENCE_EVENT_DELIVERY_FAILURE),
                    ("never-acked", pb.EVIDENCE_EVENT_HANDOVER),
                ]
            ],
        )

    async def acknowledge(ids: list[str]) -> None:
        """The hub's acknowledgement, marked as the node's stream marks it."""
        committed = asyncio.get_running_loop().create_future()
        store.receipts_acknowledged_later(ids, committed.set_result)
        await store.db.write(lambda conn: None)  # it rides on this transaction
        await committed

    await store.db.write(fill)
    try:
        await acknowledge(["acked-before"])
        await asyncio.sleep(0.01)
        copy = time.time()  # the hub's copy (its time, the margin already taken off)
        await asyncio.sleep(0.01)
        # The node's link comes back: the hub stores and acknowledges the others.
        await acknowledge(["acked-after", "acked-after-f"])
        assert await store.handle_hub_restore("42", copy, NODE) == (0, 2)
        resend = await store.db.fetchall("SELECT evidence_id FROM evidence WHERE to_send = 1")
        assert sorted(r[0] for r in resend) == ["acked-after", "acked-after-f", "never-acked"]
    finally:
        await store.close()


async def test_a_node_database_migrates_to_acknowledgement_times_and_older_rows_go_by_recorded_at(
    tmp_path: Path,
) -> None:
    """A node's database from before schema 8 gains ``acked_at``, empty on its rows: after a
    restore of the hub, those receipts are sent again by when they were recorded, as before."""
    path = tmp_path / "node.db"
    old = await Database.open(path, node_store.MIGRATIONS[:7])

    def receipts(conn: sqlite3.Connection) -> None:
        for evidence_id, at in [("before", 900.0), ("since", 1_100.0)]:
            content = pb.EvidenceContent(
                evidence_id=evidence_id, event=pb.EVIDENCE_EVENT_DELIVERY, issuer=NODE
            )
            blob = pb.Evidence(content=content.SerializeToString()).SerializeToString()
            conn.execute(
                "INSERT INTO evidence (evidence_id, shams, event, evidence, to_send, recorded_at)"
                " VALUES (?, 'x', ?, ?, 0, ?)",
                (evidence_id, pb.EVIDENCE_EVENT_DELIVERY, blob, at),
            )

    await old.write(receipts)
    await old.close()
    store = await NodeStore.open(path)
    try:
        assert await store.db.fetchone("PRAGMA user_version") == (len(node_store.MIGRATIONS),)
        assert await store.db.fetchall("SELECT acked_at FROM evidence") == [(None,), (None,)]
        assert await store.handle_hub_restore("42", 1_000.0, NODE, now=1_200.0) == (0, 1)
        resend = await store.db.fetchall("SELECT evidence_id FROM evidence WHERE to_send = 1")
        assert [r[0] for r in resend] == ["since"]
    finally:
        await store.close()


def test_a_backup_again_into_a_directory_cut_short_leaves_no_manifest_of_the_older_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second backup into the same directory whose document copy fails (a full disk)
    # left the new database beside the first backup's manifest.json: a restore from it
    # took the new copy under the old snapshot time. No manifest now until one is whole.
    db = tmp_path / "data" / "node.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    documents = tmp_path / "data" / "documents"
    (documents / "sha256").mkdir(parents=True)
    server = backup_module._Server("node", NODE, db, documents, NodeStore)
    monkeypatch.setattr(backup_module, "_server", lambda _: server)
    monkeypatch.setattr(backup_module, "_counts", lambda _: {})
    to = tmp_path / "backup"
    backup_module.backup(tmp_path / "node.toml", to)
    assert (to / backup_module.MANIFEST).is_file()

    def no_room(*_: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_module, "_copy_documents", no_room)
    with pytest.raises(OSError, match="No space left"):
        backup_module.backup(tmp_path / "node.toml", to)
    assert not (to / backup_module.MANIFEST).exists()


def test_a_damaged_document_the_backup_cannot_set_aside_is_still_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backup run by an account that may read the server's store but not write it: the
    # damaged document cannot be moved aside, yet the backup is made whole without it
    # (an error there would have left it without a manifest), and the line says so.
    db = tmp_path / "data" / "node.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()  # no document_uploads: not known to be fetched
    documents = tmp_path / "data" / "documents"
    sound, rotten = hashlib.sha256(b"sound").hexdigest(), hashlib.sha256(b"rotten").hexdigest()
    for name, content in ((sound, b"sound"), (rotten, b"rottem")):
        (documents / "sha256" / name[:2]).mkdir(parents=True, exist_ok=True)
        (documents / "sha256" / name[:2] / name).write_bytes(content)
    server = backup_module._Server("node", NODE, db, documents, NodeStore)
    monkeypatch.setattr(backup_module, "_server", lambda _: server)

    def refused(*_: object) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(backup_module.DocumentStore, "quarantine", refused)
    to = tmp_path / "backup"
    manifest, damaged = backup_module.backup(tmp_path / "node.toml", to)
    assert manifest.documents == 1
    assert (to / backup_module.MANIFEST).is_file()
    assert [p.name for p in (to / "documents").rglob("*") if p.is_file()] == [sound]
    (line,) = damaged
    live = documents / "sha256" / rotten[:2] / rotten
    assert line.startswith(f"the document {live} is damaged"), line
    assert "could not be moved aside ([Errno 13] Permission denied)" in line, line
    assert live.read_bytes() == b"rottem"
