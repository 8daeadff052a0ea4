"""One SQLite database: WAL mode, versioned migrations, one writer thread with group commit.

Every write is a *job*: a plain (synchronous) function of the writer's ``sqlite3``
connection. The writer task takes all jobs waiting and hands them to the writer thread in
one go, which runs them in one transaction, each inside its own SAVEPOINT, and commits once:
durability costs one fsync per batch, not per letter, and the event loop pays one thread
hand-off per batch, not one per statement. A job that raises is rolled back to its
savepoint alone (never a half-written row) and its caller gets the exception; the others
commit. Reads go through a second connection (aiosqlite), which in WAL mode sees committed
data only.

Jobs run outside the event loop, so they must not touch asyncio objects; they may sign
(cryptography releases the GIL) and build protobuf messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from node.core import lifecycle
from node.storage.restore import RESTORED_KEY, RestoreMark

__all__ = [
    "Database",
    "Durability",
    "Job",
    "Page",
    "Store",
    "advance_state",
    "advance_states",
    "existing",
    "rows_in",
]

RECOVERY_S = 5.0
"""After a failed transaction, how long a store counts as failing even once commits pass."""
_ROOM_BYTES = 64 * 1024 * 1024  # free space a full disk must have again to be probed

T = TypeVar("T")
Job = Callable[[sqlite3.Connection], T]
Durability = Literal["full", "normal"]
log = logging.getLogger(__name__)

# Most jobs one transaction takes; bounds latency of the first job of a batch.
MAX_BATCH = 512
# A job handed to ``write_later`` waits at most this long for a transaction to join.
DEFERRED_WRITE_S = 1.0

_Outcome = tuple[Any, BaseException | None]


@dataclass
class _Pending:
    job: Job[Any]
    on_commit: Callable[[Any], None] | None = None
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _pragmas(durability: Durability) -> list[str]:
    # FULL fsyncs the WAL at every commit (survives power loss); NORMAL only at
    # checkpoints (survives a process crash, may lose the last commits on power loss).
    return [
        # Only takes effect on a new database (before its first table and before WAL).
        # Envelopes with their batch proofs are just over 2 KB: at 4 KB a page holds
        # one, at 8 KB three, so 8 KB pages cut the hub's envelope table by about 40 %.
        "PRAGMA page_size=8192",
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=10000",
        # Statement journals and sorts in memory, not in files SQLite creates and unlinks
        # in /var/tmp (three a letter at the hub, seen with strace). They are per
        # statement and small; the database and its WAL are unchanged.
        "PRAGMA temp_store=MEMORY",
    ]


class Database:
    """An open SQLite database with a writer thread. Use ``await Database.open(...)``."""

    def __init__(self, path: Path, durability: Durability = "full") -> None:
        self.path = path
        self.durability = durability
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"db-writer-{path.name}")
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._deferred: list[tuple[Job[Any], Callable[[Any], None] | None]] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self.commits = 0
        self.jobs = 0
        self.writer_thread: int | None = None  # its thread id, once the writer has run
        # When a transaction last failed (a full disk, an I/O error, a lock held too long),
        # and whether one has committed since: health reads ``write_failing``.
        self._failed_at = float("-inf")
        self._failing = False
        self._full = False  # the last failure was "database or disk is full"
        self._traceback_at = float("-inf")

    @classmethod
    async def open(
        cls, path: Path, migrations: Sequence[str], durability: Durability = "full"
    ) -> Database:
        db = cls(path, durability)
        await db._open(migrations)
        return db

    @property
    def is_open(self) -> bool:
        """Connected with a live writer and not closing (gRPC health reads this)."""
        return (
            self._writer is not None
            and not self._closing
            and self._task is not None
            and not self._task.done()
        )

    @property
    def write_failing(self) -> bool:
        """A transaction failed and none has committed since, or one failed within the last
        ``RECOVERY_S`` (so health holds while some commits fail and others pass)."""
        return self._failing or time.monotonic() - self._failed_at < RECOVERY_S

    async def probe_write(self) -> None:
        """A write that needs new pages (a 64 KiB row, written and deleted in one
        transaction), so a store that failed and then went quiet learns whether it can
        write again; after "disk is full", the filesystem must also have room again."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("CREATE TABLE IF NOT EXISTS health_probe (b BLOB)")
            conn.execute("INSERT INTO health_probe (b) VALUES (zeroblob(65536))")
            conn.execute("DELETE FROM health_probe")

        if self._full and shutil.disk_usage(self.path.parent).free < _ROOM_BYTES:
            raise sqlite3.OperationalError("database or disk is full (no room yet)")
        await self.write(job)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect_writer(self, migrations: Sequence[str]) -> None:
        self.writer_thread = threading.get_ident()  # runs in the writer thread
        conn = sqlite3.connect(self.path, isolation_level=None)
        self._writer = conn
        for pragma in _pragmas(self.durability):
            conn.execute(pragma)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(migrations):
            raise RuntimeError(
                f"{self.path}: schema version {version} is newer than this program ({len(migrations)})"
            )
        for number, script in enumerate(migrations[version:], start=version + 1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
            log.info("migrated %s to schema version %d", self.path.name, number)

    async def _open(self, migrations: Sequence[str]) -> None:
        try:
            await self._in_thread(self._connect_writer, migrations)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in _pragmas(self.durability):
                await self._reader.execute(pragma)
        except BaseException:
            # A refused or half-applied migration must neither hold the write lock nor leak
            # a connection or a thread (either would keep the process alive).
            await self._close_connections(rollback=True)
            raise
        self._task = asyncio.create_task(self._run(), name=f"db-writer:{self.path.name}")

    async def write(self, job: Job[T], on_commit: Callable[[T], None] | None = None) -> T:
        """Runs ``job`` in the next group-committed transaction and returns its result.

        ``on_commit(result)``, if given, runs in the event loop once the job has committed,
        before its caller resumes, in commit order, and even if the caller was cancelled
        meanwhile; never for a job rolled back. Its exceptions are logged, not raised.
        """
        if self._closing or self._task is None or self._task.done():
            raise RuntimeError("database is closed")
        pending = _Pending(job, on_commit)
        self._queue.put_nowait(pending)
        result: T = await pending.future
        return result

    def write_later(self, job: Job[T], on_commit: Callable[[T], None] | None = None) -> None:
        """Runs ``job`` in the next transaction, whenever that is, or in one of its own
        after ``DEFERRED_WRITE_S``; nobody waits for it, and a failure is logged.
        ``on_commit`` as for ``write``.

        For bookkeeping whose loss in a crash costs only a resend that the other end
        de-duplicates (forgetting what a peer has acknowledged): riding on another
        transaction saves its own commit, fsync and thread hand-off, which is most of what
        such a write costs. ``close`` writes what is still waiting.
        """
        if self._closing or self._task is None or self._task.done():
            log.warning("%s is closing: a deferred write is dropped", self.path.name)
            return
        self._deferred.append((job, on_commit))
        if self._deferred_timer is None:
            self._deferred_timer = asyncio.get_running_loop().call_later(
                DEFERRED_WRITE_S, self._queue_deferred
            )

    def _take_deferred(self) -> list[_Pending]:
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        jobs, self._deferred = self._deferred, []
        pending = [_Pending(job, on_commit) for job, on_commit in jobs]
        for item in pending:
            item.future.add_done_callback(_log_deferred_failure)
        return pending

    def _queue_deferred(self) -> None:
        self._deferred_timer = None
        for item in self._take_deferred():
            self._queue.put_nowait(item)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """All rows of a query, in one trip to the reader's thread (executing, fetching and
        closing a cursor as three awaits cost three, each a thread wake-up and an event-loop
        turn, which is what a letter travelling alone mostly costs)."""
        assert self._reader is not None
        return list(await self._reader.execute_fetchall(sql, params))

    async def fetchall_in(
        self, sql: str, keys: Sequence[object], params: Sequence[object] = ()
    ) -> list[aiosqlite.Row]:
        """``fetchall`` for every key, as ``rows_in`` does in a job."""
        rows: list[aiosqlite.Row] = []
        for marks, chunk in _in_lists(keys):
            rows.extend(await self.fetchall(sql.format(marks=marks), (*params, *chunk)))
        return rows

    async def fetch_page(
        self, sizes_sql: str, rows_sql: str, params: Sequence[Any], limit: int, max_bytes: int
    ) -> Page[aiosqlite.Row]:
        """Rows read in two steps so that large rows are never all loaded at once:
        ``sizes_sql`` (params, then ``limit``) gives (key, size) in key order; as many as
        fit in ``max_bytes`` (at least one) are then read with ``rows_sql`` (params, then
        the last key taken and the count). ``more`` if the read stopped at either limit."""
        sizes = await self.fetchall(sizes_sql, (*params, limit))
        count = fits([int(r[1]) for r in sizes], max_bytes)
        if not count:
            return Page([], more=False)
        rows = await self.fetchall(rows_sql, (*params, int(sizes[count - 1][0]), count))
        return Page(rows, more=len(sizes) == limit or count < len(sizes))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        assert self._reader is not None
        async with self._reader.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            batch.extend(self._take_deferred())  # bookkeeping rides along
            await self._commit_batch(batch)
            if stop:
                return

    def _run_jobs(self, jobs: list[Job[Any]]) -> list[_Outcome]:
        """In the writer thread: one transaction, one savepoint per job, one commit."""
        conn = self._writer
        assert conn is not None
        outcomes: list[_Outcome] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in jobs:
                conn.execute("SAVEPOINT job")
                try:
                    value = job(conn)
                except Exception as exc:  # the job's own failure: undo it alone
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back (SQLITE_FULL, an I/O
                        # error), savepoints and all: every job of the batch fails with
                        # this error, not with "no such savepoint".
                        raise
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((value, None))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        return outcomes

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            outcomes = await self._in_thread(self._run_jobs, [p.job for p in batch])
        except Exception as exc:
            now = time.monotonic()
            self._failing, self._failed_at = True, now
            self._full = "full" in str(exc)
            # A store that cannot write fails every write (and every health probe) until
            # it can: one traceback a minute, a line for the others.
            if now - self._traceback_at >= 60.0:
                self._traceback_at = now
                log.exception("transaction failed; %d jobs not committed", len(batch))
            else:
                log.error("transaction failed; %d jobs not committed: %s", len(batch), exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self._failing = False
        self.commits += 1
        self.jobs += len(batch)
        for pending, (value, error) in zip(batch, outcomes, strict=True):
            if error is None and pending.on_commit is not None:
                try:
                    pending.on_commit(value)
                except Exception:
                    log.exception("commit callback failed")
            if pending.future.done():
                continue
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(value)

    async def close(self) -> None:
        """Lets queued jobs finish, refuses new ones, then closes both connections."""
        self._closing = True
        if self._task is not None and not self._task.done():
            for deferred in self._take_deferred():
                self._queue.put_nowait(deferred)
            self._queue.put_nowait(None)
            await self._task
        # Anything still queued (behind the stop marker) is answered, never left waiting.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(RuntimeError("database is closed"))
        await self._close_connections(rollback=False)

    def _close_writer(self, rollback: bool) -> None:
        conn, self._writer = self._writer, None
        if conn is None:
            return
        if rollback and conn.in_transaction:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
        conn.close()

    async def _close_connections(self, *, rollback: bool) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.close()
        if self._writer is not None:
            await self._in_thread(self._close_writer, rollback)
        self._thread.shutdown(wait=True)


def _log_deferred_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error("a deferred write failed", exc_info=error)


class Store:
    """Base of the node and hub stores: one database with its own list of migrations."""

    MIGRATIONS: Sequence[str] = ()

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls: type[S], path: Path, durability: Durability = "full") -> S:
        return cls(await Database.open(path, cls.MIGRATIONS, durability))

    async def close(self) -> None:
        await self.db.close()

    # -- the ``meta`` table both stores have: one value a key ------------------------------

    async def meta_value(self, key: str) -> bytes | None:
        """The value kept under ``key`` in ``meta``; None if none is."""
        row = await self.db.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(row[0]) if row else None

    async def set_meta_value(self, key: str, value: bytes) -> None:
        """Keeps ``value`` under ``key`` in ``meta``, replacing what was there."""

        def job(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

        await self.db.write(job)

    async def restore_mark(self) -> RestoreMark | None:
        """When this database was restored from a backup (``node.backup``), if it was."""
        blob = await self.meta_value(RESTORED_KEY)
        return RestoreMark.decode(blob) if blob is not None else None


S = TypeVar("S", bound=Store)


def advance_state(conn: sqlite3.Connection, shams: str, recipient: str, event: int) -> None:
    """Moves one recipient's lifecycle state forward for ``event`` (never backwards)."""
    row = conn.execute(
        "SELECT state FROM recipient_state WHERE shams = ? AND recipient = ?", (shams, recipient)
    ).fetchone()
    if row is None:
        return
    step = lifecycle.advance(int(row[0]), event)
    if step.changed:
        conn.execute(
            "UPDATE recipient_state SET state = ? WHERE shams = ? AND recipient = ?",
            (step.state, shams, recipient),
        )


_IN_CHUNK = 500  # keys per IN list, well under SQLite's limit on bound parameters


def _in_lists(keys: Sequence[object]) -> list[tuple[str, list[object]]]:
    """(placeholders, keys) per ``_IN_CHUNK`` distinct keys, for ``... IN ({marks})``."""
    unique = list(dict.fromkeys(keys))
    chunks = [unique[i : i + _IN_CHUNK] for i in range(0, len(unique), _IN_CHUNK)]
    return [(",".join("?" * len(chunk)), chunk) for chunk in chunks]


def rows_in(
    conn: sqlite3.Connection, sql: str, keys: Sequence[object], params: Sequence[object] = ()
) -> list[Any]:
    """Rows of ``sql`` for every key, ``_IN_CHUNK`` keys per query.

    ``sql`` is a constant of the caller's holding ``{marks}`` where the IN list goes, after
    ``params``; only placeholders are put in it, never values.
    """
    rows: list[Any] = []
    for marks, chunk in _in_lists(keys):
        rows.extend(conn.execute(sql.format(marks=marks), (*params, *chunk)))
    return rows


class Page(list[T]):
    """The rows of one read, and whether more may follow them: the read stopped at its row
    or byte limit. A reader that got ``more == False`` waits for a change signal instead of
    reading again."""

    def __init__(self, rows: Iterable[T], more: bool) -> None:
        super().__init__(rows)
        self.more = more


def fits(sizes: Sequence[int], max_bytes: int) -> int:
    """How many of ``sizes``, from the first, fit in ``max_bytes``: at least one (a frame
    always carries something), then as many as stay within the limit."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if count and total > max_bytes:
            return count
    return len(sizes)


def existing(conn: sqlite3.Connection, sql: str, keys: Sequence[str]) -> set[str]:
    """The keys ``sql`` (see ``rows_in``) finds: the first column of its rows."""
    return {str(r[0]) for r in rows_in(conn, sql, keys)}


def advance_states(
    conn: sqlite3.Connection,
    moves: Sequence[tuple[str, str | None, int]],
    states: dict[tuple[str, str], int] | None = None,
) -> None:
    """Applies (shams, recipient, event) moves in order; recipient None moves every
    recipient of the letter. States only move forward (the lifecycle table decides).
    Reads the states concerned in one query (unless the caller read them, every recipient
    of every letter concerned, in its own: ``states``, updated here) and writes the changed
    ones in one batch."""
    if not moves:
        return
    if states is None:
        states = {
            (str(shams), str(recipient)): int(state)
            for shams, recipient, state in rows_in(
                conn,
                "SELECT shams, recipient, state FROM recipient_state WHERE shams IN ({marks})",
                [m[0] for m in moves],
            )
        }
    by_letter: dict[str, list[str]] = {}
    for letter, who in states:
        by_letter.setdefault(letter, []).append(who)
    changed: dict[tuple[str, str], int] = {}
    for shams, recipient, event in moves:
        for key in (
            [(shams, r) for r in by_letter.get(shams, [])]
            if recipient is None
            else [(shams, recipient)]
        ):
            if key not in states:
                continue
            step = lifecycle.advance(states[key], event)
            if step.changed:
                states[key] = changed[key] = step.state
    conn.executemany(
        "UPDATE recipient_state SET state = ? WHERE shams = ? AND recipient = ?",
        [(state, shams, recipient) for (shams, recipient), state in changed.items()],
    )
