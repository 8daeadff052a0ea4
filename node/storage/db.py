"""One SQLite database: WAL mode, versioned migrations, one writer task with group commit.

Every write is a *job* (an async function of the connection). The writer task takes all
jobs waiting, runs them in one transaction, each inside its own SAVEPOINT, and commits once:
durability costs one fsync per batch, not per letter. A job that raises is rolled back to its
savepoint alone (never a half-written row) and its caller gets the exception; the others
commit. Reads go through a second connection, which in WAL mode sees committed data only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

__all__ = ["Database", "Durability", "Job", "Store"]

T = TypeVar("T")
Job = Callable[[aiosqlite.Connection], Awaitable[T]]
Durability = Literal["full", "normal"]
log = logging.getLogger(__name__)

# Most jobs one transaction takes; bounds latency of the first job of a batch.
MAX_BATCH = 512


@dataclass
class _Pending:
    job: Job[Any]
    future: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Database:
    """An open SQLite database with a writer task. Use ``await Database.open(...)``."""

    def __init__(self, path: Path, durability: Durability = "full") -> None:
        self.path = path
        self.durability = durability
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.jobs = 0

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

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL at every commit (survives power loss); NORMAL only at
        # checkpoints (survives a process crash, may lose the last commits on power loss).
        await conn.execute(
            f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}"
        )
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=10000")
        return conn

    async def _open(self, migrations: Sequence[str]) -> None:
        try:
            self._writer = await self._connect()
            async with self._writer.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(migrations):
                raise RuntimeError(
                    f"{self.path}: schema version {version} is newer than this program ({len(migrations)})"
                )
            for number, script in enumerate(migrations[version:], start=version + 1):
                await self._writer.executescript(
                    f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;"
                )
                log.info("migrated %s to schema version %d", self.path.name, number)
            self._reader = await self._connect()
        except BaseException:
            # A refused or half-applied migration must neither hold the write lock nor leak
            # a connection (aiosqlite's thread would keep the process alive).
            await self._close_connections(rollback=True)
            raise
        self._task = asyncio.create_task(self._run(), name=f"db-writer:{self.path.name}")

    async def write(self, job: Job[T]) -> T:
        """Runs ``job`` in the next group-committed transaction and returns its result."""
        if self._closing or self._task is None or self._task.done():
            raise RuntimeError("database is closed")
        pending = _Pending(job)
        self._queue.put_nowait(pending)
        result: T = await pending.future
        return result

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        assert self._reader is not None
        async with self._reader.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        assert self._reader is not None
        async with self._reader.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _run(self) -> None:
        assert self._writer is not None
        conn = self._writer
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
            await self._commit_batch(conn, batch)
            if stop:
                return

    async def _commit_batch(self, conn: aiosqlite.Connection, batch: list[_Pending]) -> None:
        results: list[tuple[_Pending, Any, BaseException | None]] = []
        try:
            await conn.execute("BEGIN IMMEDIATE")
            for pending in batch:
                await conn.execute("SAVEPOINT job")
                try:
                    value = await pending.job(conn)
                except Exception as exc:  # the job's own failure: undo it alone
                    await conn.execute("ROLLBACK TO job")
                    await conn.execute("RELEASE job")
                    results.append((pending, None, exc))
                else:
                    await conn.execute("RELEASE job")
                    results.append((pending, value, None))
            await conn.execute("COMMIT")
        except Exception as exc:
            log.exception("transaction failed; %d jobs not committed", len(batch))
            try:
                await conn.execute("ROLLBACK")
            except Exception:
                log.debug("rollback after failed commit", exc_info=True)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.commits += 1
        self.jobs += len(batch)
        for pending, value, error in results:
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
            self._queue.put_nowait(None)
            await self._task
        # Anything still queued (behind the stop marker) is answered, never left waiting.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(RuntimeError("database is closed"))
        await self._close_connections(rollback=False)

    async def _close_connections(self, *, rollback: bool) -> None:
        for conn in (self._reader, self._writer):
            if conn is None:
                continue
            if rollback and conn.in_transaction:
                with contextlib.suppress(Exception):
                    await conn.execute("ROLLBACK")
            await conn.close()
        self._reader = self._writer = None


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


S = TypeVar("S", bound=Store)
