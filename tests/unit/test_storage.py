"""Storage: the group-committing Database, the node's store and the hub's store.

Real SQLite files under tmp_path; no signing (envelopes and evidence are plain messages
whose content is a real EvidenceContent, which is all the stores look at).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosqlite
import pytest

from client_sdk import pb
from client_sdk.shams import format_shams, parse_shams
from node.core import lifecycle
from node.core.errors import ChaparError, Code
from node.hub import Hub
from node.storage import db as db_module
from node.storage.db import Database, fits
from node.storage.hub_store import NOTICES_KEPT_S, HubStore, IncomingLetter
from node.storage.node_store import MIGRATIONS, NewLetter, NodeStore, request_key
from node.storage.restore import RESTORED_KEY, RestoreMark

ORIGIN = "000.00.00.G22"
RECIPIENT_B = "10101010101"
RECIPIENT_C = "MOF.IR"
OUT = pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING
YEAR = 2026
E = pb.EvidenceEvent

TABLE_T = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE);"]


# -- helpers ------------------------------------------------------------------------------


def _evidence(
    event: pb.EvidenceEvent.ValueType,
    *,
    shams: pb.Shams | None = None,
    recipient: str = RECIPIENT_B,
    evidence_id: str | None = None,
    issuer: str = "urn:chapar:hub:national-hub",
    envelope_sha256: bytes = b"",
) -> tuple[pb.Evidence, pb.EvidenceContent]:
    content = pb.EvidenceContent(
        evidence_id=evidence_id or str(uuid.uuid4()),
        event=event,
        issuer=issuer,
        recipient=recipient,
        envelope_sha256=envelope_sha256,
    )
    if shams is not None:
        content.shams.CopyFrom(shams)
    blob = content.SerializeToString(deterministic=True)
    return pb.Evidence(content=blob, signature=pb.Signature(value=b"sig:" + blob[:8])), content


def _content(evidence: bytes) -> pb.EvidenceContent:
    return pb.EvidenceContent.FromString(pb.Evidence.FromString(evidence).content)


def _new_letter(shams: pb.Shams, recipients: Sequence[str] = (RECIPIENT_B,)) -> NewLetter:
    text = format_shams(shams)
    header = pb.EnvelopeHeader(
        shams=shams, sender=pb.Address(agency=shams.origin)
    ).SerializeToString()
    digest = hashlib.sha256(header).digest()
    evidence, content = _evidence(E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE, shams=shams)
    receipt = pb.Receipt(shams=shams, shams_text=text, envelope_sha256=digest, evidence=evidence)
    return NewLetter(
        shams_text=text,
        envelope=pb.Envelope(header=header, body=b"body of " + text.encode()),
        envelope_sha256=digest,
        recipients=list(recipients),
        receipt=receipt,
        content=content,
    )


class Builder:
    """A build() for NodeStore.submit that records what it was asked to build."""

    def __init__(self, recipients: Sequence[str] = (RECIPIENT_B,), fail_at: int | None = None):
        self.recipients = recipients
        self.fail_at = fail_at
        self.calls: list[tuple[int, int]] = []

    def __call__(self, i: int, shams: pb.Shams) -> NewLetter:
        self.calls.append((i, shams.sequence))
        if i == self.fail_at:
            raise RuntimeError(f"signer failed on letter {i}")
        return _new_letter(shams, self.recipients)


def _shams(sequence: int, origin: str = ORIGIN) -> pb.Shams:
    return pb.Shams(origin=origin, domain=OUT, year=YEAR, sequence=sequence)


async def _submit_one(
    store: NodeStore, request_id: str, build: Callable[[int, pb.Shams], NewLetter]
) -> pb.Receipt:
    (receipt,) = await store.submit([request_id], origin=ORIGIN, domain=OUT, year=YEAR, build=build)
    return receipt


async def _counter(store: NodeStore) -> int | None:
    row = await store.db.fetchone(
        "SELECT last FROM shams_counter WHERE origin = ? AND domain = 'O' AND year = ?",
        (ORIGIN, YEAR),
    )
    return None if row is None else int(row[0])


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "t.db", TABLE_T, durability="normal")
    yield database
    await database.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[NodeStore]:
    node_store = await NodeStore.open(tmp_path / "node.db", durability="normal")
    yield node_store
    await node_store.close()


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[HubStore]:
    hub_store = await HubStore.open(tmp_path / "hub.db", durability="normal")
    yield hub_store
    await hub_store.close()


def _insert(
    value: str, *, fail: BaseException | None = None
) -> Callable[[sqlite3.Connection], str]:
    def job(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
        if fail is not None:
            raise fail
        return value

    return job


async def _user_version(db: Database) -> int:
    row = await db.fetchone("PRAGMA user_version")
    assert row is not None
    return int(row[0])


async def _values(db: Database) -> list[str]:
    return [str(r[0]) for r in await db.fetchall("SELECT v FROM t ORDER BY v")]


# -- Database -------------------------------------------------------------------------------


async def test_migrations_set_user_version_and_run_only_new_scripts(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    first = ["CREATE TABLE a (x INTEGER);", "CREATE TABLE b (y INTEGER);"]
    database = await Database.open(path, first)
    assert await _user_version(database) == 2
    await database.close()

    # Re-running the first two scripts would fail (CREATE TABLE without IF NOT EXISTS).
    database = await Database.open(path, [*first, "CREATE TABLE c (z INTEGER);"])
    try:
        assert await _user_version(database) == 3
        tables = await database.fetchall(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"
        )
        assert [r[0] for r in tables] == ["a", "b", "c"]
    finally:
        await database.close()


@pytest.fixture
async def opened(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[aiosqlite.Connection]]:
    """Every aiosqlite connection opened during the test; any left open is closed afterwards.

    An unclosed aiosqlite connection (the reader) or writer thread is a non-daemon thread
    left alive (and, with warnings as errors, its __del__ never stops it), which would hang
    the test process.
    """
    connections: list[aiosqlite.Connection] = []
    real_connect = aiosqlite.connect

    def tracking_connect(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
        conn = real_connect(*args, **kwargs)
        connections.append(conn)
        return conn

    monkeypatch.setattr(aiosqlite, "connect", tracking_connect)
    yield connections
    await _close_leaked(connections)


def _still_open(connections: list[aiosqlite.Connection]) -> list[aiosqlite.Connection]:
    return [c for c in connections if c._connection is not None]


async def _close_leaked(connections: list[aiosqlite.Connection]) -> int:
    """Closes leaked reader connections; counts them and any writer thread still alive."""
    leaked = _still_open(connections)
    for conn in leaked:
        await conn.close()
    writers = [t for t in threading.enumerate() if t.name.startswith("db-writer")]
    return len(leaked) + len(writers)


async def test_database_newer_than_the_program_is_refused_without_leaking_a_connection(
    tmp_path: Path, opened: list[aiosqlite.Connection]
) -> None:
    path = tmp_path / "m.db"
    database = await Database.open(path, ["CREATE TABLE a (x);", "CREATE TABLE b (y);"])
    await database.close()
    with pytest.raises(RuntimeError, match="schema version 2 is newer than this program"):
        await Database.open(path, ["CREATE TABLE a (x);"])
    assert await _close_leaked(opened) == 0, "Database.open left its writer connection open"


async def test_failed_migration_is_atomic_and_does_not_leak_a_connection(
    tmp_path: Path, opened: list[aiosqlite.Connection]
) -> None:
    path = tmp_path / "m.db"
    good = "CREATE TABLE a (x);"
    database = await Database.open(path, [good])
    await database.close()
    with pytest.raises(sqlite3.OperationalError):
        await Database.open(path, [good, "CREATE TABLE b (y); THIS IS NOT SQL;"])
    leaked = await _close_leaked(opened)
    database = await Database.open(path, [good])
    try:
        assert await _user_version(database) == 1
        tables = await database.fetchall("SELECT name FROM sqlite_master WHERE type='table'")
        assert [r[0] for r in tables] == ["a"]  # the half-run migration left nothing
    finally:
        await database.close()
    assert leaked == 0, "Database.open left its writer connection open after a failed migration"


async def test_journal_mode_is_wal(db: Database) -> None:
    row = await db.fetchone("PRAGMA journal_mode")
    assert row is not None
    assert row[0] == "wal"


@pytest.mark.parametrize(
    "failure",
    [ValueError("job refused"), None],
    ids=["job-raises", "constraint-violation"],
)
async def test_failing_job_is_rolled_back_alone_and_others_in_its_batch_commit(
    db: Database, failure: ValueError | None
) -> None:
    await db.write(_insert("existing"))
    commits_before = db.commits

    def violating(conn: sqlite3.Connection) -> str:
        # Inserts a row, then violates UNIQUE with a second: the first row must not survive.
        conn.execute("INSERT INTO t (v) VALUES ('bad')")
        conn.execute("INSERT INTO t (v) VALUES ('existing')")
        return "bad"

    bad = violating if failure is None else _insert("bad", fail=failure)
    results = list(
        await asyncio.gather(
            db.write(_insert("a")),
            db.write(_insert("b")),
            db.write(bad),
            db.write(_insert("c")),
            db.write(_insert("d")),
            return_exceptions=True,
        )
    )
    assert db.commits == commits_before + 1  # all five in one transaction
    assert results[:2] == ["a", "b"]
    assert results[3:] == ["c", "d"]
    if failure is None:
        assert isinstance(results[2], sqlite3.IntegrityError)
    else:
        assert results[2] is failure
    assert await _values(db) == ["a", "b", "c", "d", "existing"]


async def test_a_full_disk_fails_the_whole_batch_with_its_own_error_and_keeps_nothing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLITE_FULL rolls the whole transaction back, savepoints and all: every job of the
    # batch must learn the disk is full (not "no such savepoint"), and nothing is kept.
    await db.write(lambda conn: conn.execute("PRAGMA max_page_count = 8").fetchone())
    await db.write(_insert("before"))

    def too_big(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (v) VALUES (?)", ("x" * 200_000,))
        return "big"

    results = await asyncio.gather(
        db.write(_insert("a")), db.write(too_big), db.write(_insert("c")), return_exceptions=True
    )
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    assert all("full" in str(r) for r in results), results
    assert await _values(db) == ["before"]
    assert db.write_failing  # health reads it: the store is not SERVING
    assert await db.write(_insert("after")) == "after"  # the writer goes on
    assert db.write_failing  # held for RECOVERY_S after the last failure: no flapping
    monkeypatch.setattr("node.storage.db.RECOVERY_S", 0.0)
    assert not db.write_failing


async def test_a_health_probe_needs_new_pages_so_a_full_store_stays_failing(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("node.storage.db.RECOVERY_S", 0.0)
    await db.write(lambda conn: conn.execute("PRAGMA max_page_count = 8").fetchone())

    def too_big(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (v) VALUES (?)", ("x" * 200_000,))

    with pytest.raises(sqlite3.OperationalError):
        await db.write(too_big)
    assert db.write_failing
    with pytest.raises(sqlite3.OperationalError):
        await db.probe_write()  # still full: the probe needs new pages, and fails
    assert db.write_failing
    # Room again (this write commits, needing no page, and clears the flag itself); the
    # probe now passes, and leaves nothing behind.
    await db.write(lambda conn: conn.execute("PRAGMA max_page_count = 100000").fetchone())
    await db.probe_write()
    assert not db.write_failing
    assert await _values(db) == []


async def test_concurrent_writes_are_group_committed(db: Database) -> None:
    jobs_before, commits_before = db.jobs, db.commits
    results = await asyncio.gather(*(db.write(_insert(f"v{i:03d}")) for i in range(300)))
    assert results == [f"v{i:03d}" for i in range(300)]
    assert db.jobs - jobs_before == 300
    assert db.commits - commits_before < 300
    assert db.commits < db.jobs
    assert len(await _values(db)) == 300


async def test_on_commit_runs_in_commit_order_once_committed_even_for_a_cancelled_caller(
    db: Database,
) -> None:
    committed: list[str] = []
    commits_before = db.commits

    def record(value: str) -> None:
        committed.append(value)

    async def resumed(value: str) -> None:
        await db.write(_insert(value), on_commit=record)
        assert value in committed  # before the caller resumes

    first = asyncio.ensure_future(resumed("a"))
    cancelled = asyncio.ensure_future(db.write(_insert("b"), on_commit=record))
    refused = asyncio.ensure_future(
        db.write(_insert("bad", fail=ValueError("no")), on_commit=record)
    )
    last = asyncio.ensure_future(resumed("c"))
    await asyncio.sleep(0)  # all four are queued for one transaction
    cancelled.cancel()
    with pytest.raises(ValueError, match="no"):
        await refused
    await asyncio.gather(first, last)
    assert db.commits == commits_before + 1
    assert committed == ["a", "b", "c"]  # "b" committed although its caller left
    assert await _values(db) == ["a", "b", "c"]


async def test_committed_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    database = await Database.open(path, TABLE_T)
    await asyncio.gather(*(database.write(_insert(f"row{i}")) for i in range(10)))
    await database.close()
    reopened = await Database.open(path, TABLE_T)
    try:
        assert await _values(reopened) == sorted(f"row{i}" for i in range(10))
        assert await _user_version(reopened) == 1
    finally:
        await reopened.close()


async def test_close_finishes_jobs_already_queued(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    database = await Database.open(path, TABLE_T)
    tasks = [asyncio.create_task(database.write(_insert(f"q{i}"))) for i in range(5)]
    await asyncio.sleep(0)  # let each task queue its job
    await database.close()
    assert [t.result() for t in tasks] == [f"q{i}" for i in range(5)]
    reopened = await Database.open(path, TABLE_T)
    try:
        assert await _values(reopened) == [f"q{i}" for i in range(5)]
    finally:
        await reopened.close()


async def test_write_after_close_is_refused(tmp_path: Path) -> None:
    database = await Database.open(tmp_path / "c.db", TABLE_T)
    await database.close()
    with pytest.raises(RuntimeError, match="database is closed"):
        await database.write(_insert("late"))


async def test_write_racing_close_is_answered_not_left_hanging(tmp_path: Path) -> None:
    # A servicer may still write while the server shuts down: the caller must get an answer
    # (its result, or an error), never wait forever on a job nobody will run.
    database = await Database.open(tmp_path / "race.db", TABLE_T)
    closing = asyncio.create_task(database.close())
    # Runs right after close() has queued its stop marker, before the writer task sees it.
    writing = asyncio.create_task(database.write(_insert("racing")))
    done, _ = await asyncio.wait({writing}, timeout=2)
    await closing
    if not done:
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        pytest.fail("db.write() issued during close() was never answered")
    exc = writing.exception()
    assert exc is None or isinstance(exc, RuntimeError), exc
    if exc is None:
        assert writing.result() == "racing"


async def test_a_deferred_write_rides_on_the_next_transaction(db: Database) -> None:
    commits = db.commits
    committed: list[str] = []
    db.write_later(_insert("later"), committed.append)
    await asyncio.sleep(0.05)
    assert await _values(db) == []  # nothing written on its own yet
    assert committed == []
    assert await db.write(_insert("now")) == "now"
    assert db.commits == commits + 1  # one transaction for both
    assert committed == ["later"]  # its callback ran once it had committed
    assert await _values(db) == ["later", "now"]


async def test_a_deferred_write_goes_alone_when_nothing_else_is_written(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db_module, "DEFERRED_WRITE_S", 0.05)
    db.write_later(_insert("alone"))
    for _ in range(100):
        if await _values(db):
            break
        await asyncio.sleep(0.02)
    assert await _values(db) == ["alone"]


async def test_close_writes_what_was_deferred(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    database = await Database.open(path, TABLE_T)
    database.write_later(_insert("deferred"))
    await database.close()
    reopened = await Database.open(path, TABLE_T)
    try:
        assert await _values(reopened) == ["deferred"]
    finally:
        await reopened.close()


async def test_a_failing_deferred_write_is_logged_and_the_others_commit(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="node.storage.db"):
        db.write_later(_insert("bad", fail=ValueError("refused")))
        db.write_later(_insert("good"))
        await db.write(_insert("now"))
        await asyncio.sleep(0)  # the failure's callback runs
    assert "a deferred write failed" in caplog.text
    assert await _values(db) == ["good", "now"]


# -- NodeStore: submission ---------------------------------------------------------------------


async def test_concurrent_submissions_get_gapless_unique_sequences(store: NodeStore) -> None:
    build = Builder()
    receipts = await asyncio.gather(*(_submit_one(store, f"req-{i}", build) for i in range(1000)))
    sequences = [r.shams.sequence for r in receipts]
    assert sorted(sequences) == list(range(1, 1001))
    assert {r.shams_text for r in receipts} == {format_shams(_shams(n)) for n in range(1, 1001)}
    assert await store.count("outbox") == 1000
    assert await store.count("evidence") == 1000
    assert await _counter(store) == 1000
    assert store.db.commits < store.db.jobs


async def test_batch_is_numbered_in_order(store: NodeStore) -> None:
    receipts = await store.submit(
        ["a", "b", "c"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder()
    )
    assert [r.shams.sequence for r in receipts] == [1, 2, 3]


async def test_counters_are_separate_per_year_and_domain(store: NodeStore) -> None:
    build = Builder()
    (r2026,) = await store.submit(["x1"], origin=ORIGIN, domain=OUT, year=2026, build=build)
    (r2027,) = await store.submit(["x2"], origin=ORIGIN, domain=OUT, year=2027, build=build)
    (internal,) = await store.submit(
        ["x3"], origin=ORIGIN, domain=pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL, year=2026, build=build
    )
    assert [r.shams.sequence for r in (r2026, r2027, internal)] == [1, 1, 1]
    assert internal.shams_text == f"{ORIGIN}/I/2026/0000001"


async def test_repeated_request_id_returns_the_original_receipt(store: NodeStore) -> None:
    build = Builder()
    first = await _submit_one(store, "req-1", build)
    again = await _submit_one(store, "req-1", build)
    assert again.SerializeToString() == first.SerializeToString()
    assert build.calls == [(0, 1)]  # nothing was built (signed) the second time
    assert await store.count("outbox") == 1
    assert await store.count("evidence") == 1
    assert await _counter(store) == 1
    nxt = await _submit_one(store, "req-2", build)
    assert nxt.shams.sequence == 2


async def test_same_request_id_twice_in_one_batch_is_one_letter(store: NodeStore) -> None:
    build = Builder()
    receipts = await store.submit(
        ["dup", "other", "dup"], origin=ORIGIN, domain=OUT, year=YEAR, build=build
    )
    assert [r.shams.sequence for r in receipts] == [1, 2, 1]
    assert receipts[0].SerializeToString() == receipts[2].SerializeToString()
    assert build.calls == [(0, 1), (1, 2)]
    assert await store.count("outbox") == 2
    assert await _counter(store) == 2


async def test_request_id_used_again_for_another_letter_is_refused(store: NodeStore) -> None:
    build = Builder()
    (first,) = await store.submit(
        ["r"], origin=ORIGIN, domain=OUT, year=YEAR, build=build, digests=[b"letter one"]
    )
    (same,) = await store.submit(
        ["r"], origin=ORIGIN, domain=OUT, year=YEAR, build=build, digests=[b"letter one"]
    )
    (other,) = await store.submit(
        ["r"], origin=ORIGIN, domain=OUT, year=YEAR, build=build, digests=[b"letter two"]
    )
    assert isinstance(first, pb.Receipt)
    assert isinstance(same, pb.Receipt)
    assert same.SerializeToString() == first.SerializeToString()
    assert isinstance(other, ChaparError)
    assert (other.code, other.reason) == (Code.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert other.metadata == {"request_id": "r"}
    assert build.calls == [(0, 1)]  # nothing built (numbered, signed) for the refused one
    assert await store.count("outbox") == 1
    assert await _counter(store) == 1


async def test_request_id_for_two_letters_in_one_batch_refuses_the_second(
    store: NodeStore,
) -> None:
    outcomes = await store.submit(
        ["dup", "dup", "x", "dup"],
        origin=ORIGIN,
        domain=OUT,
        year=YEAR,
        build=Builder(),
        digests=[b"a", b"b", b"c", b"a"],
    )
    first, refused, other, retry = outcomes
    assert isinstance(first, pb.Receipt)
    assert isinstance(other, pb.Receipt)
    assert [first.shams.sequence, other.shams.sequence] == [1, 2]
    assert isinstance(refused, ChaparError)
    assert refused.reason == "REQUEST_ID_REUSED"
    assert isinstance(retry, pb.Receipt)
    assert retry.SerializeToString() == first.SerializeToString()
    assert await store.count("outbox") == 2
    assert await _counter(store) == 2


async def test_request_ids_are_each_clients_own(store: NodeStore) -> None:
    """Two back-ends of one agency may both use "r": each gets its own letter, and its
    retries its own receipt; a refusal names the id as the client gave it."""
    one, two = request_key("urn:c:one", "r"), request_key("urn:c:two", "r")
    build = Builder()
    (first,) = await store.submit(
        [one], origin=ORIGIN, domain=OUT, year=YEAR, build=build, digests=[b"a"]
    )
    (second,) = await store.submit(
        [two], origin=ORIGIN, domain=OUT, year=YEAR, build=build, digests=[b"b"]
    )
    assert isinstance(first, pb.Receipt)
    assert isinstance(second, pb.Receipt)
    assert [first.shams.sequence, second.shams.sequence] == [1, 2]
    retries = await store.submit(
        [two, one, two],
        origin=ORIGIN,
        domain=OUT,
        year=YEAR,
        build=build,
        digests=[b"b", b"a", b"a"],
    )
    assert retries[0] == second
    assert retries[1] == first
    refused = retries[2]
    assert isinstance(refused, ChaparError)
    assert (refused.reason, refused.metadata) == ("REQUEST_ID_REUSED", {"request_id": "r"})
    assert await store.count("outbox") == 2


async def test_a_request_id_stored_before_ids_were_scoped_answers_its_retry(
    store: NodeStore,
) -> None:
    """A row from before request ids were kept per client holds the bare id: a retry
    after the upgrade finds it instead of storing the letter twice. Another back-end's
    letter under that id since is its own letter: neither refused nor given the old one's
    receipt (which would leave it unsent)."""
    (old,) = await store.submit(
        ["old"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(), digests=[b"a"]
    )
    scoped = request_key("urn:c:one", "old")
    again, other = await store.submit(
        [scoped, request_key("urn:c:two", "old")],
        origin=ORIGIN,
        domain=OUT,
        year=YEAR,
        build=Builder(),
        digests=[b"a", b"b"],
    )
    assert again == old
    assert isinstance(other, pb.Receipt)
    assert other.shams.sequence == 2
    assert await store.count("outbox") == 2
    # The other back-end's retry gets its own letter's receipt, not the old one's.
    (retry,) = await store.submit(
        [request_key("urn:c:two", "old")],
        origin=ORIGIN,
        domain=OUT,
        year=YEAR,
        build=Builder(),
        digests=[b"b"],
    )
    assert retry == other


async def test_a_retrys_receipt_is_found_as_submit_would_answer_it(store: NodeStore) -> None:
    """``receipts_of`` answers a retry that a check now refuses (node.agency): the same
    client's id with the same draft, or a bare id stored before ids were scoped with the
    same draft; never another client's letter, nor another draft under the id."""
    (old,) = await store.submit(
        ["old"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(), digests=[b"a"]
    )
    mine = request_key("urn:c:one", "new")
    (new,) = await store.submit(
        [mine], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(), digests=[b"n"]
    )
    found = await store.receipts_of(
        [
            (mine, b"n"),  # a retry: its receipt
            (mine, b"other draft"),  # another letter under the id: none
            (request_key("urn:c:two", "new"), b"n"),  # another client's id: none
            (request_key("urn:c:one", "old"), b"a"),  # stored bare, the same draft
            (request_key("urn:c:one", "old"), b"b"),  # stored bare, another draft: none
            (mine, b"n"),  # twice in one batch: both
        ]
    )
    assert found == [new, None, None, old, None, new]


async def test_a_bare_request_id_without_its_digest_answers_no_scoped_request(
    store: NodeStore,
) -> None:
    """A row from before schema version 5 has neither scope nor digest: nothing tells its
    retry from another back-end's letter under the same id, so a scoped request is a new
    letter: a retry of that very letter across the upgrade is stored twice, which its
    sender sees, rather than another back-end's letter never stored, which nobody sees."""
    old = await _submit_one(store, "1", Builder())
    (mine,) = await store.submit(
        [request_key("urn:c:two", "1")],
        origin=ORIGIN,
        domain=OUT,
        year=YEAR,
        build=Builder(),
        digests=[b"b"],
    )
    assert isinstance(mine, pb.Receipt)
    assert mine.shams.sequence == old.shams.sequence + 1
    assert await store.count("outbox") == 2


async def test_a_request_id_stored_without_its_digest_answers_any_retry(store: NodeStore) -> None:
    """Rows from before schema version 5 have no digest: a retry gets their receipt, as
    before (nothing tells a retry from another letter there)."""
    first = await _submit_one(store, "old", Builder())
    (again,) = await store.submit(
        ["old"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(), digests=[b"any"]
    )
    assert isinstance(again, pb.Receipt)
    assert again.SerializeToString() == first.SerializeToString()
    assert await store.count("outbox") == 1


async def test_concurrent_retries_of_one_request_id_store_one_letter(store: NodeStore) -> None:
    build = Builder()
    receipts = await asyncio.gather(*(_submit_one(store, "retry", build) for _ in range(20)))
    assert {r.SerializeToString() for r in receipts} == {receipts[0].SerializeToString()}
    assert receipts[0].shams.sequence == 1
    assert len(build.calls) == 1
    assert await store.count("outbox") == 1


async def test_empty_request_ids_are_distinct_letters(store: NodeStore) -> None:
    receipts = await store.submit(["", ""], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder())
    assert [r.shams.sequence for r in receipts] == [1, 2]
    assert await store.count("outbox") == 2


async def test_failed_build_leaves_the_counter_and_tables_unchanged(store: NodeStore) -> None:
    await _submit_one(store, "before", Builder())
    with pytest.raises(RuntimeError, match="signer failed on letter 1"):
        await store.submit(
            ["f0", "f1", "f2"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(fail_at=1)
        )
    assert await _counter(store) == 1
    assert await store.count("outbox") == 1
    assert await store.count("evidence") == 1
    after = await _submit_one(store, "after", Builder())
    assert after.shams.sequence == 2
    # The failed request ids were not remembered: a retry is a fresh letter.
    retry = await _submit_one(store, "f0", Builder())
    assert retry.shams.sequence == 3


async def test_failed_build_in_a_shared_batch_leaves_no_gap_for_the_others(
    store: NodeStore,
) -> None:
    results = await asyncio.gather(
        _submit_one(store, "ok-1", Builder()),
        _submit_one(store, "bad", Builder(fail_at=0)),
        _submit_one(store, "ok-2", Builder()),
        return_exceptions=True,
    )
    first, failed, second = results
    assert isinstance(failed, RuntimeError)
    assert isinstance(first, pb.Receipt)
    assert isinstance(second, pb.Receipt)
    assert [first.shams.sequence, second.shams.sequence] == [1, 2]
    assert await _counter(store) == 2


async def test_submission_creates_submitted_state_per_distinct_recipient(store: NodeStore) -> None:
    build = Builder(recipients=[RECIPIENT_B, RECIPIENT_C, RECIPIENT_B])
    receipt = await _submit_one(store, "r", build)
    letter = await store.letter(receipt.shams_text)
    assert letter is not None
    assert letter.direction == pb.LetterDirection.LETTER_DIRECTION_OUTGOING
    assert letter.statuses == {RECIPIENT_B: lifecycle.SUBMITTED, RECIPIENT_C: lifecycle.SUBMITTED}
    assert [pb.EvidenceContent.FromString(e.content).event for e in letter.evidence] == [
        E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE
    ]
    to_relay = await store.outbox_to_relay(0, 10, 1 << 20)
    assert [(shams, env, digest) for _, shams, env, digest in to_relay] == [
        (
            receipt.shams_text,
            letter.envelope.SerializeToString(),
            hashlib.sha256(letter.envelope.header).digest(),
        )
    ]


# -- NodeStore: evidence about letters we sent -------------------------------------------------


async def test_sender_evidence_advances_recipient_state_per_lifecycle(store: NodeStore) -> None:
    receipt = await _submit_one(store, "r", Builder(recipients=[RECIPIENT_B, RECIPIENT_C]))
    text, shams, digest = receipt.shams_text, receipt.shams, receipt.envelope_sha256

    async def record(
        event: pb.EvidenceEvent.ValueType, recipient: str, eid: str | None = None
    ) -> None:
        evidence, content = _evidence(
            event, shams=shams, recipient=recipient, evidence_id=eid, envelope_sha256=digest
        )
        await store.record_sender_evidence([(evidence, content, text)])

    async def statuses() -> dict[str, int]:
        letter = await store.letter(text)
        assert letter is not None
        return letter.statuses

    await record(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, RECIPIENT_B)
    assert await statuses() == {RECIPIENT_B: lifecycle.RELAYED, RECIPIENT_C: lifecycle.SUBMITTED}
    assert await store.outbox_to_relay(0, 10, 1 << 20) == []  # relayed: no longer waiting to go up

    await record(E.EVIDENCE_EVENT_DELIVERY, RECIPIENT_C)  # out of order: skips RELAYED
    await record(E.EVIDENCE_EVENT_DELIVERY, RECIPIENT_B)
    assert await statuses() == {RECIPIENT_B: lifecycle.DELIVERED, RECIPIENT_C: lifecycle.DELIVERED}

    await record(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, RECIPIENT_C)  # late: no step back
    await record(E.EVIDENCE_EVENT_HANDOVER, RECIPIENT_B)
    await record(E.EVIDENCE_EVENT_EXPIRY, RECIPIENT_B)  # terminal: stays handed over
    assert await statuses() == {
        RECIPIENT_B: lifecycle.HANDED_OVER,
        RECIPIENT_C: lifecycle.DELIVERED,
    }
    assert await store.count("evidence") == 1 + 6


async def test_sender_evidence_is_idempotent_on_evidence_id(store: NodeStore) -> None:
    receipt = await _submit_one(store, "r", Builder())
    text = receipt.shams_text
    failure = _evidence(
        E.EVIDENCE_EVENT_RELAY_FAILURE,
        shams=receipt.shams,
        evidence_id="ev-1",
        envelope_sha256=receipt.envelope_sha256,
    )
    await store.record_sender_evidence([(*failure, text), (*failure, text)])
    await store.record_sender_evidence([(*failure, text)])
    # The same id again, even claiming another event, is the evidence already recorded.
    relabelled = _evidence(
        E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
        shams=receipt.shams,
        evidence_id="ev-1",
        envelope_sha256=receipt.envelope_sha256,
    )
    await store.record_sender_evidence([(*relabelled, text)])
    letter = await store.letter(text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.FAILED}
    assert await store.count("evidence") == 2
    assert [e.SerializeToString() for e in letter.evidence][1] == failure[0].SerializeToString()


async def test_relay_rejection_marks_the_letter_rejected_and_stops_relaying(
    store: NodeStore,
) -> None:
    receipt = await _submit_one(store, "r", Builder())
    rejection = _evidence(
        E.EVIDENCE_EVENT_RELAY_REJECTION,
        shams=receipt.shams,
        envelope_sha256=receipt.envelope_sha256,
    )
    await store.record_sender_evidence([(*rejection, receipt.shams_text)])
    letter = await store.letter(receipt.shams_text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.REJECTED}
    assert await store.outbox_to_relay(0, 10, 1 << 20) == []


async def test_relay_rejection_of_the_whole_letter_moves_every_recipient(
    store: NodeStore,
) -> None:
    """The hub rejects a letter as a whole (recipient ""): no recipient may stay SUBMITTED."""
    receipt = await _submit_one(store, "whole", Builder())
    rejection = _evidence(
        E.EVIDENCE_EVENT_RELAY_REJECTION,
        shams=receipt.shams,
        recipient="",
        envelope_sha256=receipt.envelope_sha256,
    )
    await store.record_sender_evidence([(*rejection, receipt.shams_text)])
    letter = await store.letter(receipt.shams_text)
    assert letter is not None
    assert set(letter.statuses.values()) == {lifecycle.REJECTED}


async def test_every_evidence_stored_is_handed_to_the_listener_once_after_commit(
    store: NodeStore,
) -> None:
    """The node monitor learns of evidence from the store: each new row once, none twice,
    nothing from a write that failed, and the content as stored (events in order)."""
    seen: list[tuple[str, pb.EvidenceEvent.ValueType]] = []

    def listener(items: Sequence[tuple[str, pb.EvidenceContent]]) -> None:
        seen.extend((shams, content.event) for shams, content in items)

    store.on_evidence_stored = listener
    with pytest.raises(RuntimeError):
        await store.submit(
            ["x", "y"], origin=ORIGIN, domain=OUT, year=YEAR, build=Builder(fail_at=1)
        )
    assert seen == []
    receipt = await _submit_one(store, "r", Builder())
    await _submit_one(store, "r", Builder())  # a retry: the receipt stored before
    text = receipt.shams_text
    relay = (
        *_evidence(
            E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
            shams=receipt.shams,
            envelope_sha256=receipt.envelope_sha256,
        ),
        text,
    )
    await store.record_sender_evidence([relay, relay])
    await store.record_sender_evidence([relay])
    letter = _incoming(1)
    await store.store_incoming([letter, letter], DeliveryMaker())
    await store.store_incoming([letter], DeliveryMaker())
    handover = _evidence(E.EVIDENCE_EVENT_HANDOVER)[0]
    await store.record_handovers([(letter[0], handover)])
    await store.record_handovers([(letter[0], _evidence(E.EVIDENCE_EVENT_HANDOVER)[0])])
    failure = _evidence(E.EVIDENCE_EVENT_DELIVERY_FAILURE)[0]
    await store.store_issued([("", failure), ("", failure)])
    assert seen == [
        (text, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE),
        (text, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE),
        (letter[0], E.EVIDENCE_EVENT_DELIVERY),
        (letter[0], E.EVIDENCE_EVENT_HANDOVER),
        ("", E.EVIDENCE_EVENT_DELIVERY_FAILURE),
    ]
    assert await store.count("evidence") == len(seen)


async def test_routed_evidence_not_about_the_letter_sent_is_refused_and_moves_nothing(
    store: NodeStore,
) -> None:
    """Evidence routed to the sender names the letter it is about by number, digest and
    recipient; a hostile hub (with an agency it colludes with) can route any signed
    evidence. Only what fits the letter this node sent under that number is taken:
    another agency than its recipients, another digest (other content), a number this
    node never sent are refused with the reason the offline verifier would give, not
    stored, and no state or relay state moves; the genuine evidence beside them is taken."""
    receipt = await _submit_one(store, "r", Builder(recipients=[RECIPIENT_B]))
    text, shams, digest = receipt.shams_text, receipt.shams, receipt.envelope_sha256
    other = hashlib.sha256(b"another letter's header").digest()

    def item(
        event: pb.EvidenceEvent.ValueType,
        recipient: str = RECIPIENT_B,
        sha: bytes = digest,
        about: pb.Shams = shams,
    ) -> tuple[pb.Evidence, pb.EvidenceContent, str]:
        evidence, content = _evidence(event, shams=about, recipient=recipient, envelope_sha256=sha)
        return evidence, content, format_shams(about)

    not_a_recipient = [
        item(E.EVIDENCE_EVENT_DELIVERY, RECIPIENT_C),
        item(E.EVIDENCE_EVENT_HANDOVER, RECIPIENT_C),
        item(E.EVIDENCE_EVENT_EXPIRY, RECIPIENT_C),
    ]
    other_content = [
        item(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, sha=other),
        item(E.EVIDENCE_EVENT_DELIVERY, sha=other),
        item(E.EVIDENCE_EVENT_HANDOVER, sha=other),
        item(E.EVIDENCE_EVENT_RELAY_REJECTION, "", sha=other),
    ]
    never_sent = [item(E.EVIDENCE_EVENT_DELIVERY, about=_shams(shams.sequence + 1))]
    refused = await store.record_sender_evidence([*not_a_recipient, *other_content, *never_sent])
    assert [(r.evidence_id, r.reason) for r in refused] == [
        *[(c.evidence_id, "ISSUER_NOT_ALLOWED") for _, c, _ in not_a_recipient],
        *[(c.evidence_id, "EVIDENCE_MISMATCH") for _, c, _ in [*other_content, *never_sent]],
    ]
    assert all(r.detail for r in refused)
    letter = await store.letter(text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.SUBMITTED}
    assert await store.count("evidence") == 1  # its SUBMISSION_ACCEPTANCE only
    assert len(await store.outbox_to_relay(0, 10, 1 << 20)) == 1  # still to relay

    genuine = [item(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE), item(E.EVIDENCE_EVENT_DELIVERY)]
    assert await store.record_sender_evidence([*genuine, not_a_recipient[1]]) == refused[1:2]
    letter = await store.letter(text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.DELIVERED}
    assert [e.content for e in letter.evidence][1:] == [e.content for e, _, _ in genuine]


async def test_a_restored_node_stores_routed_evidence_of_a_letter_its_outbox_lost(
    store: NodeStore,
) -> None:
    """A node restored from an older copy has lost the letters it relayed after the copy;
    the hub holds and delivers them, and their DELIVERY and HANDOVER still come to the
    node (OPERATIONS.md, "What a restore loses"): stored as evidence of a number its outbox
    no longer holds, moving nothing, not refused as about a letter never sent. A node
    never restored still refuses them (the test above)."""
    receipt = await _submit_one(store, "in the copy", Builder(recipients=[RECIPIENT_B]))
    mark = RestoreMark(restore_time=1000.0, snapshot_time=900.0)

    def restored(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (RESTORED_KEY, mark.encode())
        )

    await store.db.write(restored)
    lost = _shams(receipt.shams.sequence + 1)  # relayed after the copy: not in the outbox
    digest = hashlib.sha256(b"the lost letter's header").digest()
    routed = [
        (*_evidence(event, shams=lost, envelope_sha256=digest), format_shams(lost))
        for event in (E.EVIDENCE_EVENT_DELIVERY, E.EVIDENCE_EVENT_HANDOVER)
    ]
    assert await store.record_sender_evidence(routed) == []
    stored = await store.db.fetchall(
        "SELECT evidence_id FROM evidence WHERE shams = ? ORDER BY rowid", (format_shams(lost),)
    )
    assert [str(r[0]) for r in stored] == [c.evidence_id for _, c, _ in routed]
    letter = await store.letter(receipt.shams_text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.SUBMITTED}  # the other letter: unmoved


async def test_a_failing_evidence_listener_does_not_fail_the_write(
    store: NodeStore, caplog: pytest.LogCaptureFixture
) -> None:
    def listener(items: Sequence[tuple[str, pb.EvidenceContent]]) -> None:
        raise ValueError("observer bug")

    store.on_evidence_stored = listener
    receipt = await _submit_one(store, "r", Builder())
    assert await store.letter(receipt.shams_text) is not None
    assert "commit callback failed" in caplog.text


# -- NodeStore: letters we receive -------------------------------------------------------------


def _incoming(sequence: int) -> tuple[str, str, list[str], pb.Envelope]:
    shams = _shams(sequence, origin=RECIPIENT_C)
    header = pb.EnvelopeHeader(shams=shams).SerializeToString()
    return (
        format_shams(shams),
        RECIPIENT_C,
        ["legal", "registry"],
        pb.Envelope(header=header, body=b"hi"),
    )


class DeliveryMaker:
    def __init__(self, event: pb.EvidenceEvent.ValueType = E.EVIDENCE_EVENT_DELIVERY) -> None:
        self.event = event
        self.calls = 0

    def __call__(self, _arg: object) -> pb.Evidence:
        self.calls += 1
        evidence, _ = _evidence(self.event, issuer=f"urn:chapar:agency:{RECIPIENT_B}")
        return evidence


async def test_incoming_letter_is_stored_once_and_redelivery_returns_stored_delivery(
    store: NodeStore,
) -> None:
    letter = _incoming(1)
    first_maker = DeliveryMaker()
    (first,) = await store.store_incoming([letter], first_maker)
    second_maker = DeliveryMaker()
    (again,) = await store.store_incoming([letter], second_maker)
    assert again == first
    assert first.evidence_id == _content(first.blob).evidence_id
    assert (first_maker.calls, second_maker.calls) == (1, 0)
    assert await store.count("inbox") == 1
    assert await store.count("evidence") == 1
    assert [e.SerializeToString() for e in await store.receipts_to_send(10)] == [first.blob]
    rows = await store.unacked_inbox(0, 10, 1 << 20)
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (letter[0], "legal\nregistry", letter[3].SerializeToString(), first.blob)
    ]
    stored = await store.letter(letter[0])
    assert stored is not None
    assert stored.direction == pb.LetterDirection.LETTER_DIRECTION_INCOMING


async def test_same_letter_twice_in_one_delivery_batch_is_stored_once(store: NodeStore) -> None:
    maker = DeliveryMaker()
    first, second, other = await store.store_incoming(
        [_incoming(1), _incoming(1), _incoming(2)], maker
    )
    assert first == second
    assert other.evidence_id != first.evidence_id
    assert [_content(e.blob).evidence_id for e in (first, other)] == [
        first.evidence_id,
        other.evidence_id,
    ]
    assert maker.calls == 2
    assert await store.count("inbox") == 2


async def test_acknowledge_is_idempotent(store: NodeStore) -> None:
    letter = _incoming(1)
    await store.store_incoming([letter], DeliveryMaker())
    (first,) = await store.record_handovers([(letter[0], _evidence(E.EVIDENCE_EVENT_HANDOVER)[0])])
    (again,) = await store.record_handovers([(letter[0], _evidence(E.EVIDENCE_EVENT_HANDOVER)[0])])
    assert again.SerializeToString() == first.SerializeToString()
    assert await store.unacked_inbox(0, 10, 1 << 20) == []
    events = [
        pb.EvidenceContent.FromString(e.content).event for e in await store.receipts_to_send(10)
    ]
    assert events == [E.EVIDENCE_EVENT_DELIVERY, E.EVIDENCE_EVENT_HANDOVER]


async def test_acknowledging_an_unknown_letter_is_not_found(store: NodeStore) -> None:
    unknown = format_shams(_shams(99, origin=RECIPIENT_C))
    with pytest.raises(ChaparError) as info:
        await store.record_handovers([(unknown, _evidence(E.EVIDENCE_EVENT_HANDOVER)[0])])
    assert (info.value.code, info.value.reason) == (Code.NOT_FOUND, "LETTER_NOT_FOUND")
    assert info.value.metadata == {"shams": unknown}


async def test_acknowledged_receipts_are_no_longer_to_send(store: NodeStore) -> None:
    (delivery,) = await store.store_incoming([_incoming(1)], DeliveryMaker())
    store.receipts_acknowledged_later([delivery.evidence_id])
    # not yet written:
    assert [e.SerializeToString() for e in await store.receipts_to_send(10)] == [delivery.blob]
    await store.db.write(lambda conn: None)  # it rides on the next transaction
    assert await store.receipts_to_send(10) == []
    assert await store.count("evidence") == 1


# -- HubStore ---------------------------------------------------------------------------------


def _hub_letter(
    sequence: int = 1, recipients: Sequence[str] = (RECIPIENT_B, RECIPIENT_C)
) -> IncomingLetter:
    shams = _shams(sequence)
    header = pb.EnvelopeHeader(shams=shams).SerializeToString()
    envelope = pb.Envelope(header=header, body=b"letter").SerializeToString()
    return IncomingLetter(
        shams=format_shams(shams),
        sender=ORIGIN,
        recipients=list(recipients),
        envelope=envelope,
        envelope_sha256=hashlib.sha256(header).digest(),
    )


class RelayMaker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, letter: IncomingLetter, recipient: str) -> pb.Evidence:
        self.calls.append((letter.shams, recipient))
        evidence, _ = _evidence(E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, recipient=recipient)
        return evidence


def _receipt(
    event: pb.EvidenceEvent.ValueType, letter: IncomingLetter, recipient: str, **kw: Any
) -> tuple[pb.Evidence, pb.EvidenceContent]:
    """A recipient's receipt about ``letter``: its number and its header's digest."""
    return _evidence(
        event,
        shams=parse_shams(letter.shams),
        recipient=recipient,
        envelope_sha256=letter.envelope_sha256,
        **kw,
    )


def _recipient_of(evidence: pb.Evidence) -> str:
    return pb.EvidenceContent.FromString(evidence.content).recipient


async def _hub_state(hub: HubStore, shams: str, recipient: str) -> int | None:
    row = await hub.db.fetchone(
        "SELECT state FROM recipient_state WHERE shams = ? AND recipient = ?", (shams, recipient)
    )
    return None if row is None else int(row[0])


async def test_hub_accepts_a_letter_once_and_returns_the_original_relay_evidence(
    hub: HubStore,
) -> None:
    letter = _hub_letter(recipients=[RECIPIENT_B, RECIPIENT_C, RECIPIENT_B])
    maker = RelayMaker()
    (relays,) = await hub.accept([letter], maker)
    assert [_recipient_of(e) for e in relays] == [RECIPIENT_B, RECIPIENT_C]
    assert await hub.queue_depth() == 2
    assert await hub.queue_depth(RECIPIENT_B) == 1

    second_maker = RelayMaker()
    (again,) = await hub.accept([letter], second_maker)
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in relays]
    assert second_maker.calls == []
    assert await hub.queue_depth() == 2
    assert await hub.count("letters") == 1
    assert await hub.count("evidence") == 2
    row = await hub.db.fetchone("SELECT sender FROM letters WHERE shams = ?", (letter.shams,))
    assert row is not None
    assert row[0] == ORIGIN
    assert await _hub_state(hub, letter.shams, RECIPIENT_C) is not None  # a recipient
    assert await _hub_state(hub, letter.shams, ORIGIN) is None  # not one
    assert await _hub_state(hub, letter.shams, RECIPIENT_B) == lifecycle.RELAYED
    queued = await hub.queued(RECIPIENT_B, 0, 10, 1 << 20)
    assert [(s, env) for _, s, env, _ in queued] == [(letter.shams, letter.envelope)]


async def test_hub_accepts_a_letter_twice_in_one_batch_once(hub: HubStore) -> None:
    letter = _hub_letter()
    maker = RelayMaker()
    first, second = await hub.accept([letter, letter], maker)
    assert [e.SerializeToString() for e in first] == [e.SerializeToString() for e in second]
    assert len(maker.calls) == 2
    assert await hub.queue_depth() == 2


async def test_delivery_receipt_dequeues_and_notifies_the_sender(hub: HubStore) -> None:
    letter = _hub_letter()
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_B)

    senders, dequeued, strangers = await hub.record_receipts(
        RECIPIENT_B, [(*delivery, letter.shams)]
    )
    assert strangers == []
    assert senders == [ORIGIN]
    assert dequeued == 1
    assert await hub.queue_depth(RECIPIENT_B) == 0
    assert await hub.queue_depth(RECIPIENT_C) == 1  # C's copy is still waiting
    assert await _hub_state(hub, letter.shams, RECIPIENT_B) == lifecycle.DELIVERED
    assert await _hub_state(hub, letter.shams, RECIPIENT_C) == lifecycle.RELAYED
    notices = await hub.notices(ORIGIN, 0, 10)
    assert [blob for _, blob in notices] == [delivery[0].SerializeToString()]
    assert await hub.notices(RECIPIENT_B, 0, 10) == []

    # A redelivered receipt is not a second notice.
    assert await hub.record_receipts(RECIPIENT_B, [(*delivery, letter.shams)]) == ([], 0, [])
    assert len(await hub.notices(ORIGIN, 0, 10)) == 1

    hub.ack_notices_later(ORIGIN, [delivery[1].evidence_id])
    await hub.db.write(lambda conn: None)  # it rides on the next transaction
    assert await hub.notices(ORIGIN, 0, 10) == []
    assert await hub.count("notices") == 1  # kept, for a restore of the sender's node
    assert await hub.count("evidence") == 3  # two relays and the delivery


async def test_an_acknowledged_notice_is_routed_again_to_a_sender_restored_from_an_older_copy(
    hub: HubStore,
) -> None:
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_B)
    await hub.record_receipts(RECIPIENT_B, [(*delivery, letter.shams)])
    before = time.time()
    hub.ack_notices_later(ORIGIN, [delivery[1].evidence_id])
    await hub.db.write(lambda conn: None)  # it rides on the next transaction
    assert await hub.notices(ORIGIN, 0, 10) == []
    # A copy taken after the acknowledgement holds the evidence; another agency has none.
    assert await hub.route_again(ORIGIN, time.time() + 1) == 0
    assert await hub.route_again(RECIPIENT_B, before) == 0
    assert await hub.notices(ORIGIN, 0, 10) == []
    # A copy taken before it lacks it: routed again, until acknowledged again.
    assert await hub.route_again(ORIGIN, before) == 1
    notices = await hub.notices(ORIGIN, 0, 10)
    assert [blob for _, blob in notices] == [delivery[0].SerializeToString()]
    hub.ack_notices_later(ORIGIN, [delivery[1].evidence_id])
    await hub.db.write(lambda conn: None)
    assert await hub.notices(ORIGIN, 0, 10) == []
    # Kept NOTICES_KEPT_S after its acknowledgement, then deleted by the retention loop.
    retention = SimpleNamespace(store=hub, config=SimpleNamespace(retention_s=3600.0))
    await Hub.purge(retention)  # type: ignore[arg-type]
    assert await hub.count("notices") == 1
    await hub.db.write(
        lambda conn: conn.execute("UPDATE notices SET acked_at = acked_at - ?", (NOTICES_KEPT_S,))
    )
    await Hub.purge(retention)  # type: ignore[arg-type]
    assert await hub.count("notices") == 0
    assert await hub.route_again(ORIGIN, before) == 0


@pytest.mark.parametrize(("clock_skew_s", "node_ahead_s"), [(300.0, 240.0), (900.0, 840.0)])
async def test_a_restored_node_ahead_of_the_hubs_clock_by_up_to_clock_skew_s_gets_its_notices(
    hub: HubStore, clock_skew_s: float, node_ahead_s: float
) -> None:
    # The copy's time is by the node's clock, acked_at by the hub's. The hub takes letters
    # from a node up to clock_skew_s ahead of it; with clock_skew_s raised to 15 minutes, a
    # node 14 minutes ahead whose copy was taken a minute before the hub's acknowledgement
    # says a time 13 minutes after it, and 5 minutes of margin left the notice out.
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_B)
    await hub.record_receipts(RECIPIENT_B, [(*delivery, letter.shams)])
    hub.ack_notices_later(ORIGIN, [delivery[1].evidence_id])
    await hub.db.write(lambda conn: None)  # it rides on the next transaction
    (acked_at,) = await hub.db.fetchone("SELECT acked_at FROM notices")
    restored = pb.NodeRestore()
    restored.snapshot_time.FromNanoseconds(round((acked_at - 60.0 + node_ahead_s) * 1e9))
    routing = SimpleNamespace(store=hub, config=SimpleNamespace(clock_skew_s=clock_skew_s))
    await Hub._route_again(routing, ORIGIN, restored)  # type: ignore[arg-type]
    notices = await hub.notices(ORIGIN, 0, 10)
    assert [blob for _, blob in notices] == [delivery[0].SerializeToString()]


async def test_notices_are_routed_again_a_bounded_number_a_transaction(
    hub: HubStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy agency's node restored from a copy days old has acknowledged hundreds of
    # thousands of notices since: marked again in one UPDATE, they held the hub's one
    # writer (every other agency's relays and receipts) for seconds (12 s for 500,000).
    now = time.time()
    rows = [
        (agency, f"ev-{agency}-{i:05d}", b"e", acked)
        for agency in (ORIGIN, RECIPIENT_B)
        for i, acked in enumerate([None] * 300 + [now - 100.0] * 200 + [now] * 2300)
    ]
    await hub.db.write(
        lambda conn: conn.executemany(
            "INSERT INTO notices (agency, evidence_id, evidence, acked_at) VALUES (?, ?, ?, ?)",
            rows,
        )
    )
    changed: list[int] = []
    write = hub.db.write

    async def counted(job: Any, on_commit: Any = None) -> Any:
        def counting(conn: sqlite3.Connection) -> Any:
            start = conn.total_changes
            try:
                return job(conn)
            finally:
                changed.append(conn.total_changes - start)

        return await write(counting, on_commit)

    monkeypatch.setattr(hub.db, "write", counted)
    assert await hub.route_again(ORIGIN, now - 10.0) == 2300
    assert sum(changed) == 2300
    assert max(changed) <= 1000, changed
    monkeypatch.undo()
    assert len(await hub.notices(ORIGIN, 0, 5000)) == 2600
    assert len(await hub.notices(RECIPIENT_B, 0, 5000)) == 300


async def test_handover_receipt_notifies_after_its_delivery_without_touching_the_queue(
    hub: HubStore,
) -> None:
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_B)
    handover = _receipt(E.EVIDENCE_EVENT_HANDOVER, letter, RECIPIENT_B)
    # Before its DELIVERY, refused (the chain is DELIVERY, then HANDOVER): nothing routed.
    assert await hub.record_receipts(RECIPIENT_B, [(*handover, letter.shams)]) == (
        [],
        0,
        [letter.shams],
    )
    assert await hub.queue_depth(RECIPIENT_B) == 1  # not yet confirmed stored
    assert await _hub_state(hub, letter.shams, RECIPIENT_B) == lifecycle.RELAYED
    assert await hub.record_receipts(RECIPIENT_B, [(*delivery, letter.shams)]) == ([ORIGIN], 1, [])
    assert await hub.queue_depth(RECIPIENT_B) == 0
    assert await hub.record_receipts(RECIPIENT_B, [(*handover, letter.shams)]) == ([ORIGIN], 0, [])
    assert await _hub_state(hub, letter.shams, RECIPIENT_B) == lifecycle.HANDED_OVER
    ids = [pb.EvidenceContent.FromString(pb.Evidence.FromString(b).content).evidence_id
           for _, b in await hub.notices(ORIGIN, 0, 10)]  # fmt: skip
    assert ids == [delivery[1].evidence_id, handover[1].evidence_id]


async def test_a_receipt_naming_another_letters_digest_is_refused_and_dequeues_nothing(
    hub: HubStore,
) -> None:
    # A DELIVERY is proof of this letter only if it names this letter's header digest.
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    wrong = _evidence(
        E.EVIDENCE_EVENT_DELIVERY,
        shams=parse_shams(letter.shams),
        recipient=RECIPIENT_B,
        envelope_sha256=hashlib.sha256(b"another header").digest(),
    )
    assert await hub.record_receipts(RECIPIENT_B, [(*wrong, letter.shams)]) == (
        [],
        0,
        [letter.shams],
    )
    assert await hub.queue_depth(RECIPIENT_B) == 1
    assert await _hub_state(hub, letter.shams, RECIPIENT_B) == lifecycle.RELAYED
    assert await hub.notices(ORIGIN, 0, 10) == []


async def test_a_receipt_reusing_another_letters_evidence_id_dequeues_nothing(
    hub: HubStore,
) -> None:
    # A resent receipt (same id, same letter) dequeues, as its first copy's answer may have
    # been lost; an id already stored about another letter would dequeue this one with no
    # evidence of its delivery stored anywhere.
    first, second = _hub_letter(1, [RECIPIENT_B]), _hub_letter(2, [RECIPIENT_B])
    await hub.accept([first, second], RelayMaker())
    delivered = _receipt(E.EVIDENCE_EVENT_DELIVERY, first, RECIPIENT_B)
    assert await hub.record_receipts(RECIPIENT_B, [(*delivered, first.shams)]) == (
        [ORIGIN],
        1,
        [],
    )
    reused = _receipt(
        E.EVIDENCE_EVENT_DELIVERY, second, RECIPIENT_B, evidence_id=delivered[1].evidence_id
    )
    assert await hub.record_receipts(RECIPIENT_B, [(*reused, second.shams)]) == (
        [],
        0,
        [second.shams],
    )
    assert await hub.queue_depth(RECIPIENT_B) == 1
    assert await hub.record_receipts(RECIPIENT_B, [(*delivered, first.shams)]) == ([], 0, [])


async def test_a_receipt_is_counted_at_its_commit_even_if_its_caller_stopped_waiting(
    hub: HubStore,
) -> None:
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_B)
    seen: list[tuple[list[str], int, list[str]]] = []
    call = asyncio.ensure_future(
        hub.record_receipts(RECIPIENT_B, [(*delivery, letter.shams)], seen.append)
    )
    await asyncio.sleep(0)  # its job is queued
    call.cancel()
    await hub.db.write(lambda conn: None)  # committed behind it
    assert seen == [([ORIGIN], 1, [])]
    assert await hub.queue_depth(RECIPIENT_B) == 0


async def test_receipt_for_an_unknown_letter_is_ignored(hub: HubStore) -> None:
    delivery = _evidence(E.EVIDENCE_EVENT_DELIVERY)
    assert await hub.record_receipts(RECIPIENT_B, [(*delivery, "NOBODY/O/2026/0000001")]) == (
        [],
        0,
        ["NOBODY/O/2026/0000001"],
    )
    assert await hub.count("evidence") == 0
    assert await hub.count("notices") == 0


async def test_hub_queue_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "hub-restart.db"
    first = await HubStore.open(path)
    letter = _hub_letter()
    await first.accept([letter], RelayMaker())
    await first.close()
    second = await HubStore.open(path)
    try:
        assert await second.queue_depth() == 2
        assert [s for _, s, _, _ in await second.queued(RECIPIENT_C, 0, 10, 1 << 20)] == [
            letter.shams
        ]
    finally:
        await second.close()


async def test_receipt_from_an_agency_the_letter_is_not_addressed_to_is_refused(
    hub: HubStore,
) -> None:
    letter = _hub_letter(recipients=[RECIPIENT_B])
    await hub.accept([letter], RelayMaker())
    delivery = _receipt(E.EVIDENCE_EVENT_DELIVERY, letter, RECIPIENT_C)
    assert await hub.record_receipts(RECIPIENT_C, [(*delivery, letter.shams)]) == (
        [],
        0,
        [letter.shams],
    )
    assert await hub.queue_depth(RECIPIENT_B) == 1
    assert await hub.count("notices") == 0


async def test_one_batch_of_sender_evidence_moves_states_in_its_order(store: NodeStore) -> None:
    receipt = await _submit_one(store, "batch", Builder(recipients=[RECIPIENT_B, RECIPIENT_C]))
    text, shams, digest = receipt.shams_text, receipt.shams, receipt.envelope_sha256
    batch = [
        _evidence(event, shams=shams, recipient=recipient, envelope_sha256=digest)
        for event, recipient in [
            (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, RECIPIENT_B),
            (E.EVIDENCE_EVENT_HANDOVER, RECIPIENT_B),
            (E.EVIDENCE_EVENT_DELIVERY, RECIPIENT_B),  # late
            (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, RECIPIENT_C),
        ]
    ]
    await store.record_sender_evidence([(*item, text) for item in [*batch, batch[0]]])
    letter = await store.letter(text)
    assert letter is not None
    assert letter.statuses == {RECIPIENT_B: lifecycle.HANDED_OVER, RECIPIENT_C: lifecycle.RELAYED}
    assert await store.count("evidence") == 1 + 4
    assert await store.outbox_to_relay(0, 10, 1 << 20) == []


async def test_earlier_answers_are_a_delivered_letters_delivery_or_the_first_refusal(
    store: NodeStore,
) -> None:
    me = "urn:chapar:agency:000.00.00.G02"
    delivered, refused = _shams(1), _shams(2)
    header = pb.EnvelopeHeader(shams=delivered).SerializeToString()
    digest = hashlib.sha256(header).digest()
    delivery, _ = _evidence(E.EVIDENCE_EVENT_DELIVERY, shams=delivered)
    await store.store_incoming(
        [(format_shams(delivered), ORIGIN, [""], pb.Envelope(header=header, body=b"x"))],
        lambda i: delivery,
    )
    refused_digest = hashlib.sha256(b"refused header").digest()
    failure, failure_content = _evidence(
        E.EVIDENCE_EVENT_DELIVERY_FAILURE,
        shams=refused,
        issuer=me,
        envelope_sha256=refused_digest,
    )
    await store.store_issued([(format_shams(refused), failure)])
    answers = await store.earlier_answers(
        [
            (format_shams(delivered), digest),
            (format_shams(refused), refused_digest),
            (format_shams(delivered), hashlib.sha256(b"another header").digest()),  # not it
            ("", refused_digest),  # no number: never answered
        ],
        me,
    )
    assert set(answers) == {digest, refused_digest}
    assert answers[digest].blob == delivery.SerializeToString()
    assert answers[refused_digest].evidence_id == failure_content.evidence_id
    # Another node's refusal (an issuer not this node) is not this node's answer.
    assert (
        await store.earlier_answers(
            [(format_shams(refused), refused_digest)], "urn:chapar:agency:000.00.00.G03"
        )
        == {}
    )


async def test_handovers_are_announced_at_their_commit_even_if_their_caller_stopped_waiting(
    store: NodeStore,
) -> None:
    # The node wakes its hub link from here: a caller cancelled meanwhile (an acknowledgement
    # past its deadline) must not take the signal with it, since the handover is stored.
    shams = _shams(1)
    text = format_shams(shams)
    envelope = pb.Envelope(header=pb.EnvelopeHeader(shams=shams).SerializeToString())
    await store.store_incoming(
        [(text, ORIGIN, [""], envelope)],
        lambda i: _evidence(E.EVIDENCE_EVENT_DELIVERY, shams=shams)[0],
    )
    handover, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, shams=shams)
    seen: list[list[pb.Evidence]] = []
    call = asyncio.ensure_future(store.record_handovers([(text, handover)], seen.append))
    await asyncio.sleep(0)  # its job is queued
    call.cancel()
    await store.db.write(lambda conn: None)  # committed behind it
    assert len(seen) == 1
    assert [e.SerializeToString() for e in seen[0]] == [handover.SerializeToString()]


async def test_handovers_recorded_in_a_batch_stand_once_each(store: NodeStore) -> None:
    first, second = _incoming(1), _incoming(2)
    await store.store_incoming([first, second], DeliveryMaker())
    entries = await store.inbox_entries([first[0], second[0], "NOBODY/O/2026/0000001"])
    assert set(entries) == {first[0], second[0]}
    assert entries[first[0]] == (
        ["legal", "registry"],
        first[3].header,
        None,
        ["legal", "registry"],
    )

    h1, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, recipient=RECIPIENT_B)
    h2, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, recipient=RECIPIENT_B)
    late, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, recipient=RECIPIENT_B)
    stored = await store.record_handovers([(first[0], h1), (second[0], h2), (first[0], late)])
    assert stored == [h1, h2, h1]  # the later one for the same letter does not replace it
    assert (await store.inbox_entries([first[0]]))[first[0]][2] == h1
    assert await store.count("evidence") == 2 + 2  # two deliveries, two handovers
    with pytest.raises(ChaparError) as info:
        await store.record_handovers([("NOBODY/O/2026/0000001", late)])
    assert info.value.reason == "LETTER_NOT_FOUND"


async def test_a_letter_acknowledged_for_one_mailbox_waits_for_the_other(
    store: NodeStore,
) -> None:
    """A letter to legal and registry, acknowledged by registry's limited client: handed
    over (the evidence stands for later acknowledgements), still pending for legal, its
    body kept from retention; then legal's acknowledgement ends it."""
    letter = _incoming(1)
    await store.store_incoming([letter], DeliveryMaker())
    h1, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, recipient=RECIPIENT_B)
    late, _ = _evidence(E.EVIDENCE_EVENT_HANDOVER, recipient=RECIPIENT_B)
    assert await store.record_handovers([(letter[0], h1)], mailboxes=[{"registry"}]) == [h1]
    (row,) = await store.unacked_inbox(0, 10, 1 << 20)
    assert (row[1], row[2]) == (letter[0], "legal")
    assert (await store.inbox_entries([letter[0]]))[letter[0]][2:] == (h1, ["legal"])
    assert await store.purge(time.time() + 10) == 0  # legal has not read it
    assert await store.record_handovers([(letter[0], late)], mailboxes=[{"legal"}]) == [h1]
    assert await store.unacked_inbox(0, 10, 1 << 20) == []
    assert (await store.inbox_entries([letter[0]]))[letter[0]][2:] == (h1, [])
    assert await store.count("evidence") == 1 + 1  # its delivery, one handover
    assert await store.purge(time.time() + 10) == 1


def test_fits_takes_at_least_one_then_what_stays_within_the_limit() -> None:
    assert fits([], 10) == 0
    assert fits([50], 10) == 1  # one always goes, however large
    assert fits([4, 6, 1], 10) == 2
    assert fits([4, 6], 10) == 2
    assert fits([11, 1], 10) == 1


async def test_hub_queue_reads_stop_at_the_byte_limit_and_go_on_from_there(
    hub: HubStore,
) -> None:
    letters = [_hub_letter(sequence=i, recipients=[RECIPIENT_B]) for i in range(1, 6)]
    await hub.accept(letters, RelayMaker())
    size = len(letters[0].envelope)
    first = await hub.queued(RECIPIENT_B, 0, 10, 2 * size)
    assert [s for _, s, _, _ in first] == [lt.shams for lt in letters[:2]]
    assert first.more  # cut by size: the pusher reads on at once
    rest = await hub.queued(RECIPIENT_B, first[-1][0], 10, 1)  # below one letter: one
    assert [s for _, s, _, _ in rest] == [letters[2].shams]
    assert rest.more
    tail = await hub.queued(RECIPIENT_B, rest[-1][0], 10, 100 * size)
    assert [env for _, _, env, _ in tail] == [lt.envelope for lt in letters[3:]]
    assert not tail.more  # all there was: the pusher waits for a signal
    cut = await hub.queued(RECIPIENT_B, 0, 5, 100 * size)
    assert len(cut) == 5
    assert cut.more  # cut by the count: there may be more


async def test_inbox_reads_stop_at_the_byte_limit_counting_bodies(store: NodeStore) -> None:
    letters = [_incoming(i) for i in range(1, 5)]
    await store.store_incoming(letters, DeliveryMaker())
    one = len(letters[0][3].SerializeToString())
    rows = await store.unacked_inbox(0, 10, 3 * one)
    assert [r[1] for r in rows] == [lt[0] for lt in letters[:3]]
    assert [r[3] for r in rows] == [lt[3].SerializeToString() for lt in letters[:3]]
    assert rows.more
    rest = await store.unacked_inbox(rows[-1][0], 10, 0)
    assert [r[1] for r in rest] == [letters[3][0]]
    assert not rest.more
    assert (await store.unacked_inbox(0, 4, 100 * one)).more  # cut by the count


# -- who may use a document --------------------------------------------------------------


def _with_attachments(
    header: pb.EnvelopeHeader, digests: Sequence[bytes], mailbox: str = ""
) -> pb.Envelope:
    header.sender.mailbox = mailbox or header.sender.mailbox
    for d in digests:
        header.attachments.add(
            uri=f"chapar://{header.sender.agency}/documents/sha256/{d.hex()}", sha256=d, size=1
        )
    return pb.Envelope(header=header.SerializeToString(), body=b"b")


async def test_documents_of_letters_sent_received_or_uploaded_are_usable_by_their_mailboxes(
    store: NodeStore,
) -> None:
    sent, received, uploaded, other = (hashlib.sha256(n).digest() for n in (b"1", b"2", b"3", b"4"))
    legal, registry = frozenset({"legal"}), frozenset({"registry"})

    def build(_i: int, shams: pb.Shams) -> NewLetter:
        letter = _new_letter(shams)
        envelope = _with_attachments(
            pb.EnvelopeHeader.FromString(letter.envelope.header), [sent], "legal"
        )
        return dataclasses.replace(letter, envelope=envelope, mailbox="legal", documents=[sent])

    await _submit_one(store, "with-attachment", build)
    shams, sender, _, _ = _incoming(1)
    envelope = _with_attachments(pb.EnvelopeHeader(shams=_shams(1, RECIPIENT_C)), [received])
    await store.store_incoming(
        [(shams, sender, ["registry"], envelope)], DeliveryMaker(), documents=[[received]]
    )
    await store.record_upload(uploaded, "clerk")

    assert await store.may_use_document(sent, "clerk", legal)
    assert not await store.may_use_document(sent, "clerk", registry)
    # Received: to be fetched from its sender, whose document it is; the node's copy is
    # the mailbox's only once the node has it from that sender.
    assert not await store.may_use_document(received, "clerk", registry)
    assert await store.document_senders(received, registry) == {RECIPIENT_C}
    assert await store.document_senders(received, legal) == set()
    assert await store.document_senders(sent, legal) == set()  # sent: never fetched
    await store.record_fetch(received, RECIPIENT_B)  # from another agency: no matter
    assert not await store.may_use_document(received, "clerk", registry)
    await store.record_fetch(received, RECIPIENT_C)
    assert await store.may_use_document(received, "clerk", registry)
    assert not await store.may_use_document(received, "clerk", legal)
    assert await store.may_use_document(uploaded, "clerk", frozenset())
    assert not await store.may_use_document(uploaded, "someone-else", legal | registry)
    assert not await store.may_use_document(other, "clerk", legal | registry)


@pytest.mark.parametrize("chunk", [1, 1000])  # a transaction a letter, or all in one
async def test_letters_stored_before_the_document_index_are_indexed_once(
    tmp_path: Path, chunk: int
) -> None:
    path = tmp_path / "old.db"
    sent, received = hashlib.sha256(b"sent").digest(), hashlib.sha256(b"received").digest()
    old = await Database.open(path, MIGRATIONS[:3])  # the schema before letter_documents
    outgoing = _with_attachments(
        pb.EnvelopeHeader(shams=_shams(7), sender=pb.Address(agency=ORIGIN)), [sent], "legal"
    )
    later = _with_attachments(
        pb.EnvelopeHeader(shams=_shams(9), sender=pb.Address(agency=ORIGIN)), [sent], "registry"
    )
    incoming = _with_attachments(
        pb.EnvelopeHeader(shams=_shams(8, RECIPIENT_C), sender=pb.Address(agency=RECIPIENT_C)),
        [received],
    )
    # A reference to a document of this node's own store (not its sender's): received
    # letters never index those (store_incoming), nor may the index of old letters.
    held = hashlib.sha256(b"held for another mailbox").digest()
    incoming_header = pb.EnvelopeHeader.FromString(incoming.header)
    incoming_header.attachments.add(
        uri=f"chapar://{ORIGIN}/documents/sha256/{held.hex()}", sha256=held, size=1
    )
    incoming = pb.Envelope(header=incoming_header.SerializeToString(), body=b"b")

    def job(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "INSERT INTO outbox (shams, envelope, envelope_sha256, receipt, created_at)"
            " VALUES (?, ?, x'00', x'00', 0)",
            [
                (format_shams(_shams(7)), outgoing.SerializeToString()),
                (format_shams(_shams(9)), later.SerializeToString()),
            ],
        )
        conn.execute(
            "INSERT INTO inbox (shams, sender, mailboxes, envelope, delivery, received_at)"
            " VALUES (?, ?, ?, ?, x'00', 0)",
            (
                format_shams(_shams(8, RECIPIENT_C)),
                RECIPIENT_C,
                "legal\nregistry",
                incoming.SerializeToString(),
            ),
        )

    await old.write(job)
    await old.close()

    store = await NodeStore.open(path)
    try:
        assert not await store.may_use_document(sent, "clerk", frozenset({"legal"}))
        assert await store.index_documents(chunk=chunk) == 3
        assert await store.may_use_document(sent, "clerk", frozenset({"legal"}))
        assert await store.may_use_document(sent, "clerk", frozenset({"registry"}))  # the 2nd
        assert not await store.may_use_document(sent, "clerk", frozenset({"archive"}))
        assert await store.document_senders(received, frozenset({"registry"})) == {RECIPIENT_C}
        assert not await store.document_senders(held, frozenset({"registry"}))
        assert not await store.may_use_document(held, "clerk", frozenset({"registry"}))
        assert await store.index_documents() == 0  # once
    finally:
        await store.close()


async def test_a_document_is_in_use_while_a_letter_referencing_it_keeps_its_body(
    store: NodeStore,
) -> None:
    sent, received, loose = (hashlib.sha256(n).digest() for n in (b"s", b"r", b"l"))

    def build(_i: int, shams: pb.Shams) -> NewLetter:
        return dataclasses.replace(_new_letter(shams), documents=[sent])

    await _submit_one(store, "attaching", build)
    shams, sender, boxes, envelope = _incoming(2)
    await store.store_incoming(
        [(shams, sender, boxes, envelope)], DeliveryMaker(), documents=[[received]]
    )
    assert await store.documents_in_use([sent, received, loose]) == {sent, received}

    def purged(table: str) -> Callable[[sqlite3.Connection], None]:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(f"UPDATE {table} SET purged = 1")

        return job

    await store.db.write(purged("outbox"))
    assert await store.documents_in_use([sent, received, loose]) == {received}
    await store.db.write(purged("inbox"))
    assert await store.documents_in_use([sent, received, loose]) == set()


async def test_the_hub_frame_limit_last_announced_survives_a_reopen_without_a_schema_change(
    tmp_path: Path,
) -> None:
    path = tmp_path / "frame.db"
    node_store = await NodeStore.open(path, durability="normal")
    try:
        assert await node_store.load_hub_frame_bytes() is None  # no hub has said yet
        await node_store.save_hub_frame_bytes(1_048_576)
        await node_store.save_hub_frame_bytes(65_536)  # the last word counts
        assert await _user_version(node_store.db) == len(MIGRATIONS)
    finally:
        await node_store.close()
    reopened = await NodeStore.open(path, durability="normal")
    try:
        assert await reopened.load_hub_frame_bytes() == 65_536
        await reopened.save_hub_frame_bytes(0)  # a hub that names no limit
        assert await reopened.load_hub_frame_bytes() == 0
    finally:
        await reopened.close()


async def test_documents_fetched_before_fetches_were_recorded_are_marked_once_where_certain(
    store: NodeStore,
) -> None:
    # A node upgraded from a version that did not record fetches: a mailbox-limited
    # client's download of a document a letter gave it went back to the owner (and failed
    # for good once the owner could not give it), though the node held a checked copy.
    only_c, named_by_two, uploaded, sent = (
        hashlib.sha256(n).digest() for n in (b"c", b"two", b"up", b"sent")
    )
    registry = frozenset({"registry"})
    letters = []
    for i, (sender, digests) in enumerate(
        [
            (RECIPIENT_C, [only_c, named_by_two, uploaded, sent]),
            (RECIPIENT_B, [named_by_two]),  # another sender naming the same digest
        ],
        start=1,
    ):
        shams, _, _, _ = _incoming(i)
        header = pb.EnvelopeHeader(shams=_shams(i, sender))
        header.sender.agency = sender
        letters.append((shams, sender, ["registry"], _with_attachments(header, digests)))
    await store.store_incoming(
        letters, DeliveryMaker(), documents=[[only_c, named_by_two, uploaded, sent], [named_by_two]]
    )
    await store.record_upload(uploaded, "clerk")

    def build(_i: int, shams: pb.Shams) -> NewLetter:
        letter = _new_letter(shams)
        envelope = _with_attachments(
            pb.EnvelopeHeader.FromString(letter.envelope.header), [sent], "legal"
        )
        return dataclasses.replace(letter, envelope=envelope, mailbox="legal", documents=[sent])

    await _submit_one(store, "sent-with-attachment", build)
    assert not await store.may_use_document(only_c, "clerk2", registry)

    assert await store.mark_documents_fetched_before() == 1
    assert await store.may_use_document(only_c, "clerk2", registry)
    # Letters of two senders name it: the node may hold it for one only; neither is told.
    assert not await store.may_use_document(named_by_two, "clerk2", registry)
    # Held for a client's upload, or attached to a letter sent: not the received letter's.
    assert not await store.may_use_document(uploaded, "clerk2", registry)
    assert not await store.may_use_document(sent, "clerk2", registry)
    # Once: documents received later are marked only when fetched (record_fetch).
    shams, _, _, _ = _incoming(9)
    later = hashlib.sha256(b"later").digest()
    header = pb.EnvelopeHeader(shams=_shams(9, RECIPIENT_C))
    header.sender.agency = RECIPIENT_C
    await store.store_incoming(
        [(shams, RECIPIENT_C, ["registry"], _with_attachments(header, [later]))],
        DeliveryMaker(),
        documents=[[later]],
    )
    assert await store.mark_documents_fetched_before() == 0
    assert not await store.may_use_document(later, "clerk2", registry)
