"""Backing up a running server and restoring it: ``chapar backup`` and ``chapar restore``.

A backup is a directory: the database as one consistent snapshot, taken with SQLite's
online backup API in a single step while the server keeps running (a file copy of a live
WAL database can be torn between the database file and its WAL), a node's stored
documents (content-addressed, so a backup into the same directory again copies only the
new ones; each one copied is checked against its SHA-256 name, and one damaged in the
server's store is left out and set aside there), and ``manifest.json`` saying whose
database it is and when it was taken.

A restore refuses while a server has the database open, refuses another role's or
identity's backup, a schema newer than this program, a damaged database and a damaged
document (each one copied is checked against its SHA-256 name), moves the current files aside
(never deletes them), puts the copy in place, and records in it (``meta`` row
``restored``) that it was restored and from which snapshot: a restored node then waits for
the hub's numbers before it numbers letters again, and a restored hub tells its nodes
what it lost (docs/OPERATIONS.md, "Backup and restore").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from node.config import ConfigError, HubConfig, NodeConfig, load_hub_config, load_node_config
from node.config import read_table as _read_table
from node.core.documents import DocumentLimits
from node.document_store import DOCUMENT_NAME, NO_HARD_LINKS, DocumentStore, FileId, fsync_path
from node.storage.db import Store
from node.storage.node_store import fetched_only
from node.storage.restore import RESTORED_KEY, RestoreMark, read_restore_mark

__all__ = [
    "MANIFEST",
    "RESTORED_KEY",
    "BackupError",
    "Manifest",
    "RestoreFailed",
    "RestoreMark",
    "backup",
    "check_manifest",
    "describe",
    "place_staged",
    "read_restore_mark",
    "restore",
]

MANIFEST = "manifest.json"
_FORMAT = 1
# The Unix seconds a google.protobuf.Timestamp (and a datetime) holds: 0001-01-01T00:00:00Z
# to 9999-12-31T23:59:59Z.
_FIRST_TIME, _LAST_TIME = -62_135_596_800.0, 253_402_300_799.0
_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600  # a backup's directories and files
_COPY_CHUNK = 1 << 20
_LOCK_TIMEOUT_S = 0.5  # how long restore waits for the database lock before it refuses
_RESTORING = "restoring"  # in a node's document store: the documents a restore checked
Role = Literal["hub", "node"]


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why."""


class RestoreFailed(BackupError):
    """A restore that started and could not finish; the message says what state the
    server's database files are in."""


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` says about a backup."""

    role: str
    identity: str
    schema_version: int
    snapshot_time: float  # Unix seconds, by the clock of the machine that took the copy
    database: str  # the database's file name inside the backup directory
    counts: Mapping[str, int]
    documents: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "role": self.role,
            "identity": self.identity,
            "schema_version": self.schema_version,
            "snapshot_time": self.snapshot_time,
            "snapshot_time_utc": _utc(self.snapshot_time),
            "database": self.database,
            "counts": dict(self.counts),
            "documents": self.documents,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        try:
            if data.get("format") != _FORMAT:
                raise BackupError(f"manifest format {data.get('format')!r} is not {_FORMAT}")
            manifest = cls(
                role=str(data["role"]),
                identity=str(data["identity"]),
                schema_version=int(data["schema_version"]),
                snapshot_time=float(data["snapshot_time"]),
                database=str(data["database"]),
                counts={str(k): int(v) for k, v in dict(data["counts"]).items()},
                documents=int(data.get("documents", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{MANIFEST} is not a Chapar backup manifest: {exc}") from exc
        # Told to the hub as a Timestamp (a node's hello, a hub's welcome) and shown as a
        # date: a time of 0001..9999, not NaN or Infinity (which JSON parses).
        if not _FIRST_TIME <= manifest.snapshot_time <= _LAST_TIME:
            raise BackupError(
                f"{MANIFEST} is not a Chapar backup manifest: snapshot_time"
                f" {manifest.snapshot_time!r} is not a time between the years 1 and 9999"
            )
        return manifest


def check_manifest(manifest: Manifest, role: str, identity: str, newest_schema: int) -> None:
    """Refuses a backup that is not this server's or that this program cannot open."""
    if manifest.role != role:
        raise BackupError(f"the backup is of a {manifest.role}, this configuration is a {role}")
    if manifest.identity != identity:
        raise BackupError(f"the backup is of {manifest.identity}, this configuration is {identity}")
    if manifest.schema_version > newest_schema:
        raise BackupError(
            f"the backup's schema version {manifest.schema_version} is newer than this"
            f" program's ({newest_schema}): restore it with the version that made it"
        )


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Server:
    role: Role
    identity: str
    database: Path
    documents_dir: Path | None
    store: type[Store]


def _server(config_path: Path) -> _Server:
    from node.storage.hub_store import HubStore
    from node.storage.node_store import NodeStore

    table = _read_table(config_path)
    if table.get("hub") is not None:
        hub: HubConfig = load_hub_config(config_path)
        return _Server("hub", hub.identity.uri, hub.database, None, HubStore)
    if table.get("node") is not None:
        node: NodeConfig = load_node_config(config_path)
        return _Server("node", node.identity.uri, node.database, node.documents_dir, NodeStore)
    raise ConfigError("neither a [hub] nor a [node] table: not a Chapar server configuration")


# -- backup ----------------------------------------------------------------------------------


def backup(config_path: Path, to: Path) -> tuple[Manifest, list[str]]:
    """Copies a (running or stopped) server's database and documents into ``to``; returns
    its manifest and a line for each document found damaged in the server's store, which
    the backup leaves out (the manifest does not count it) and the store sets aside
    (``_set_aside``)."""
    server = _server(config_path)
    if not server.database.is_file():
        raise BackupError(f"no database at {server.database}")
    _refuse_own_files(server, to)
    # Owner only (_PRIVATE_DIR, _PRIVATE_FILE), from creation: a backup holds letter
    # bodies and documents. A directory that exists keeps the mode the operator gave it.
    to.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    name = server.database.name
    partial = to / f"{name}.partial"
    partial.unlink(missing_ok=True)
    # SQLite keeps the mode of a file that exists (and gives its journal the same).
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE))
    # Read-write, though it writes nothing: a read-only connection cannot open a WAL
    # database whose server is stopped and left no -shm file behind.
    source = sqlite3.connect(server.database, timeout=10.0)
    try:
        target = sqlite3.connect(partial)
        try:
            # Before the copy's read transaction starts: the snapshot is at or after this
            # time, so what a restore derives from it (letters to send again) errs on the
            # side of too much, never too little.
            taken = time.time()
            source.backup(target)  # pages=-1: every page in one step, so one snapshot
            version = int(target.execute("PRAGMA user_version").fetchone()[0])
            counts = _counts(target)
        finally:
            target.close()
    finally:
        source.close()
    fsync_path(partial)
    # A backup again into this directory: the older manifest goes first, so a backup cut
    # short from here on (a full disk among the documents) has none, and a restore refuses
    # it, rather than taking the new copy under the older snapshot time.
    (to / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(to)
    os.replace(partial, to / name)
    documents, damaged = 0, []
    if server.documents_dir is not None:
        documents, found = _copy_documents(server.documents_dir, to / "documents", True)
        damaged = [_set_aside(server.documents_dir, to / name, damage) for damage in found]
    manifest = Manifest(server.role, server.identity, version, taken, name, counts, documents)
    _write_json(to / MANIFEST, manifest.to_json())
    _fsync_dir(to)
    return manifest, damaged


def _refuse_own_files(server: _Server, to: Path) -> None:
    """Refuses a backup directory whose database or documents would be the server's own:
    the copy would be renamed over the live database under the running server, which
    goes on writing into the file it has open, now unlinked (what it accepts after is
    lost at its next start)."""
    db = server.database
    if (to / db.name).resolve() == db.resolve() or (
        (to / db.name).exists() and os.path.samefile(to / db.name, db)
    ):
        raise BackupError(
            f"{to} is the server's own directory ({to / db.name} is its database):"
            " back up into another directory"
        )
    docs = server.documents_dir
    if docs is not None and (to / "documents").resolve() == docs.resolve():
        raise BackupError(
            f"{to} is the server's own directory ({to / 'documents'} is its document"
            " store): back up into another directory"
        )


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    tables = [
        str(r[0])
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name"
        )
    ]
    return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}  # noqa: S608


def _document_files(root: Path) -> list[Path]:
    """Stored documents under ``root`` (``sha256/xx/<hex>``), relative to it; never the
    uploads in progress (``tmp/``)."""
    base = root / "sha256"
    if not base.is_dir():
        return []
    return sorted(
        p.relative_to(root)
        for p in base.glob("*/*")
        if p.is_file() and DOCUMENT_NAME.fullmatch(p.name)  # not a copy's .partial
    )


@dataclass(frozen=True, slots=True)
class _Damage:
    """A document whose content is not the SHA-256 its name says."""

    path: Path
    actual: str  # its content's SHA-256, hex
    read: FileId  # the file read (DocumentStore.quarantine, remove)


def _copy_documents(source: Path, target: Path, private: bool = False) -> tuple[int, list[_Damage]]:
    """Copies the documents ``target`` lacks (a document never changes under its name),
    each checked against its name as it is copied; returns how many of ``source``'s
    ``target`` then holds (one retention removed from ``source`` meanwhile is not counted:
    a restore checks the count) and the damaged ones, which are not copied. ``private``:
    into a backup, whose directories and files it makes readable by their owner only."""
    files = _document_files(source)
    dir_mode, file_mode = (_PRIVATE_DIR, _PRIVATE_FILE) if private else (0o777, 0o666)
    made: set[Path] = set()
    damaged: list[_Damage] = []
    for rel in files:
        # Each level made with the mode: mkdir(parents=True) gives parents the umask's.
        for folder in (target, *(target / p for p in reversed(rel.parents[:-1]))):
            if folder not in made:
                folder.mkdir(mode=dir_mode, exist_ok=True)
                made.add(folder)
        damage = _copy_new(source / rel, target / rel, file_mode)
        if damage is not None:
            damaged.append(damage)
    return sum(1 for rel in files if (target / rel).is_file()), damaged


def _copy_new(source: Path, target: Path, mode: int) -> _Damage | None:
    """Copies the document ``source`` to ``target`` unless it exists, hashing it chunk by
    chunk as it is copied (one read, memory flat); one whose content is not the SHA-256
    its name says is not kept, and returned."""
    if target.exists():
        return None
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)  # an earlier copy's cut short (it may have another mode)
    try:
        reader = open(source, "rb")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:  # removed by retention meanwhile: nothing to keep
        return None
    digest = hashlib.sha256()
    with reader, open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as out:
        st = os.fstat(reader.fileno())  # the file read, whatever is stored in its place since
        while chunk := reader.read(_COPY_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != target.name:
        partial.unlink()
        return _Damage(source, digest.hexdigest(), (st.st_dev, st.st_ino))
    fsync_path(partial)
    os.replace(partial, target)
    return None


def _set_aside(root: Path, snapshot: Path, damage: _Damage) -> str:
    """Sets aside a document found damaged in the server's store (``root``) as the node
    does one it reads corrupt (node.documents): a copy fetched from another agency is
    removed (the next download fetches it again), any other moved to ``corrupt/``
    (``DocumentStore.quarantine``), which the database copy (``snapshot``) decides. Only
    the file read goes (a sound copy stored since stays), as the running server's readers
    do. Returns the line that says what was done."""
    digest = bytes.fromhex(damage.path.name)
    said = (
        f"the document {damage.path} is damaged (its content's SHA-256 is {damage.actual},"
        " not its name): left out of the backup"
    )
    try:
        conn = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
        try:
            fetched = fetched_only(conn, digest)
        finally:
            conn.close()
    except sqlite3.Error:
        fetched = False  # not known to be another agency's: moved aside, so kept
    try:
        # Beside the running server: its uploads in progress (tmp/) are left alone.
        store = DocumentStore(root, DocumentLimits(), clean=False)
        done = (store.remove if fetched else store.quarantine)(digest, damage.read)
    except OSError as exc:
        return (
            f"{said}, but could not be {'removed' if fetched else 'moved aside'} ({exc}):"
            f" move it out of {damage.path.parent}"
        )
    if not done:
        return f"{said}; the store's copy was replaced or removed meanwhile, and is left as it is"
    if fetched:
        return (
            f"{said}, and removed from the store (a copy fetched from another agency):"
            " the next download fetches it again"
        )
    return f"{said}, and moved aside into {root / 'corrupt'}: upload the file again to repair it"


# -- restore ---------------------------------------------------------------------------------


MAX_SKIP_NUMBERS = 10_000_000


def restore(
    config_path: Path,
    source: Path,
    *,
    now: float | None = None,
    skip_numbers: int = 0,
    warn: Callable[[str], object] = lambda _: None,
) -> tuple[Manifest, Path]:
    """Puts the backup in ``source`` in place of the server's database; returns its
    manifest and the directory the replaced files were moved to. A node restored with
    ``skip_numbers`` moves its SHAMS counters that many numbers on at the hub's first
    word (past those it may have given letters after the backup and never relayed).
    ``warn`` is given the line saying what it did with the documents an earlier restore,
    cut short, left unplaced (``place_staged``), refused or not after."""
    server = _server(config_path)
    if skip_numbers and server.role != "node":
        raise BackupError("--skip-numbers is for a node: only a node numbers letters")
    if not 0 <= skip_numbers <= MAX_SKIP_NUMBERS:
        raise BackupError(f"--skip-numbers must be between 0 and {MAX_SKIP_NUMBERS}")
    try:
        manifest = Manifest.from_json(json.loads((source / MANIFEST).read_text()))
    except FileNotFoundError as exc:
        raise BackupError(f"no {MANIFEST} in {source}: not a backup directory") from exc
    except json.JSONDecodeError as exc:
        raise BackupError(f"{source / MANIFEST} is not JSON: {exc}") from exc
    newest = len(server.store.MIGRATIONS)
    check_manifest(manifest, server.role, server.identity, newest)
    copy = source / manifest.database
    if not copy.is_file():
        raise BackupError(f"the backup has no database file {copy}")
    # The file itself, not only its manifest, decides whether this program can open it.
    check_manifest(
        Manifest(manifest.role, manifest.identity, _schema_version(copy), 0.0, "", {}),
        server.role,
        server.identity,
        newest,
    )
    if server.documents_dir is not None:
        held = len(_document_files(source / "documents"))
        if held < manifest.documents:
            raise BackupError(
                f"the backup holds {held} of the {manifest.documents} documents its"
                f" {MANIFEST} counts ({source / 'documents'}): copied without them or cut"
                " short; put them back or restore another backup"
            )
    db = server.database
    _refuse_if_open(db)
    restored_at = time.time() if now is None else now
    # The replacement is made whole first (copied, migrated, marked, its WAL folded in)
    # beside the live files, which are touched only then: a restore that fails before
    # leaves the server's database as it was, and one that fails while swapping puts it
    # back. A server never finds no database (it would start an empty one) or an
    # unmarked copy (a restored node would number letters before the hub's word).
    db.parent.mkdir(parents=True, exist_ok=True)
    incoming = db.with_name(f"{db.name}.restoring")
    for path in _database_files(incoming):
        path.unlink(missing_ok=True)  # an earlier restore's that failed
    # A node's documents the store lacks are copied and checked first into a folder of
    # the store (renamed into place after the swap): one damaged refuses the restore
    # before anything the server reads has changed.
    store = server.documents_dir
    if store is not None:
        # An earlier restore's, killed after its swap: the database in place needs them.
        try:
            placed = place_staged(store)
        except OSError as exc:
            raise BackupError(
                f"could not place the documents an earlier restore left in"
                f" {store / _RESTORING} ({exc}), which the database in place may need:"
                " make room or fix the permissions, then restore again"
            ) from exc
        if placed is not None:
            warn(placed)
    made_store = store is not None and not store.exists()
    staged = None
    if store is not None and (source / "documents").is_dir():
        staged = store / _RESTORING

    def discard() -> None:
        """What the restore made, removed when it fails before the swap is done."""
        for path in _database_files(incoming):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
            if made_store:
                with contextlib.suppress(OSError):
                    staged.parent.rmdir()

    try:
        shutil.copyfile(copy, incoming)
        _check_copy(incoming, copy, manifest)
        asyncio.run(
            _mark(
                server.store,
                incoming,
                RestoreMark(restored_at, manifest.snapshot_time, skip_numbers),
            )
        )
        _fold_wal(incoming)
        fsync_path(incoming)
        if staged is not None:
            _stage_documents(source / "documents", staged)
    except (OSError, sqlite3.Error, BackupError) as exc:
        discard()
        if isinstance(exc, BackupError):
            raise
        raise RestoreFailed(f"could not prepare the copy ({exc}); {db} is unchanged") from exc
    try:
        _refuse_if_open(db)  # a server started meanwhile
        aside = _free_name(db.with_name(f"{db.name}.before-restore-{_stamp(restored_at)}"))
        _swap_in(db, incoming, aside)
    except BackupError:
        # The database is as it was: the documents checked for it are not left in the
        # store's restoring/ (the node's start would place them, for a database that
        # does not need them).
        discard()
        raise
    if staged is not None:
        try:
            _place_documents(staged)
        except OSError as exc:
            raise RestoreFailed(
                f"the database is restored (the replaced files are in {aside}), but the"
                f" documents could not all be copied back ({exc}): start the node (it"
                f" places those left in {staged}), or restore again"
            ) from exc
    return manifest, aside


def _stage_documents(source: Path, staged: Path) -> None:
    """Copies into ``staged`` (a folder of the server's document store) the backup's
    documents (``source``) that the store lacks, each checked against its name as it is
    read (BackupError if one is damaged). Those the store holds are not read."""
    store = staged.parent
    staged.mkdir(parents=True)
    folders = {staged}
    for rel in _document_files(source):
        if not (store / rel).exists():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            folders.add((staged / rel).parent)
            damage = _copy_new(source / rel, staged / rel, 0o666)
            if damage is not None:
                raise BackupError(
                    f"the backup's document {damage.path} is damaged (its content's SHA-256"
                    f" is {damage.actual}, not its name): restore another backup"
                )
    # Their names on disk before the swap, as the files are: after a power cut the
    # restored database finds them in restoring/ (placed at the node's start).
    for folder in folders:
        _fsync_dir(folder)
    _fsync_dir(store)


def _place_documents(staged: Path) -> None:
    """Renames the documents a restore checked into ``staged`` into the store, its parent
    (which lacked them, and no server runs), then removes ``staged``."""
    store = staged.parent
    folders: set[Path] = set()
    for rel in _document_files(staged):
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / rel, store / rel)
        folders.add((store / rel).parent)
    for folder in folders:
        _fsync_dir(folder)
    shutil.rmtree(staged)


def place_staged(store: Path) -> str | None:
    """Finishes a restore cut short (killed, the machine stopped) before it renamed into
    the node's document store (``store``) the documents it checked into ``restoring/``:
    each one the store lacks is hashed again (only one whose content is its name is
    placed: it may have rotted since; one cut short in the copy is still a ``.partial``,
    never under its name) and renamed into place, and the folder removed. Returns the line
    that says so, None when there is no such folder. Run where no server uses the store:
    at the node's start, before it opens it, and by a restore (whose swap may have been
    done: the database in place then needs them)."""
    staged = store / _RESTORING
    if not staged.is_dir():
        return None
    placed = held = damaged = 0
    for rel in _document_files(staged):
        if (store / rel).exists():
            held += 1
            (staged / rel).unlink()
            continue
        with open(staged / rel, "rb") as file:
            sound = hashlib.file_digest(file, "sha256").hexdigest() == rel.name
        if sound:
            placed += 1
        else:
            damaged += 1
            (staged / rel).unlink()
    _place_documents(staged)
    line = (
        f"the documents a restore cut short left in {staged}: {placed} placed in the store,"
        f" {held} held already, {damaged} dropped as damaged"
    )
    if damaged:
        line += " (their content is not their SHA-256 name): restore again to bring them back"
    return line


def _check_copy(path: Path, copy: Path, manifest: Manifest) -> None:
    """Refuses a copy (``path``, taken from the backup's ``copy``) that SQLite finds
    damaged, or whose tables do not hold the rows its manifest counted when the backup
    was taken: a file damaged since (a bad disk, a transfer cut short), or a database and
    a manifest from two backups. SQLite reads a damaged page only when a query reaches
    it, so without this a restore put such a copy in place of a sound database."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(5)")]
        if problems != ["ok"]:
            raise BackupError(
                f"the backup's database {copy} is damaged ({'; '.join(problems)}):"
                " restore another backup"
            )
        counts = _counts(conn)
    except sqlite3.DatabaseError as exc:
        raise BackupError(
            f"the backup's database {copy} is damaged ({exc}): restore another backup"
        ) from exc
    finally:
        conn.close()
    if counts != dict(manifest.counts):
        differ = [
            f"{t} {counts.get(t, 'no')} rows, the manifest says {manifest.counts.get(t, 'no')}"
            for t in sorted({*counts, *manifest.counts})
            if counts.get(t) != manifest.counts.get(t)
        ]
        raise BackupError(
            f"the backup's database {copy} is not the one its {MANIFEST} describes"
            f" ({'; '.join(differ)}): a backup cut short, or put together from two;"
            " restore another backup"
        )


def _fold_wal(db: Path) -> None:
    """Checkpoints ``db``'s WAL into the file and ends it: the file alone is the copy."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")  # the server sets WAL again when it opens
    finally:
        conn.close()
    for path in _database_files(db)[1:]:
        path.unlink(missing_ok=True)


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3`` ... the first that does not exist (two restores
    in one second, or one cut short that left its directory)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _swap_in(db: Path, incoming: Path, aside: Path) -> None:
    """Keeps ``db``'s files in ``aside`` and puts ``incoming`` in its place. The database
    file itself is linked into ``aside`` (copied, where the file system has no hard
    links) and then replaced by one rename, so a restore cut short at any point (a kill,
    a power cut) leaves the old file or the new one where the server looks, never none.
    Its ``-wal`` and ``-shm`` (none after ``_refuse_if_open`` closed the last connection,
    normally) are moved aside before. On a failure, puts back what was moved."""
    moved: list[Path] = []
    linked = False
    try:
        if any(p.exists() for p in _database_files(db)):
            aside.mkdir(parents=True)
        if db.exists():
            try:
                os.link(db, aside / db.name)
            except OSError as exc:
                if exc.errno not in NO_HARD_LINKS:
                    raise
                # No hard links here (some SMB and FUSE mounts): a copy, on disk before
                # the rename below replaces the file, which stays in place until then.
                shutil.copyfile(db, aside / db.name)
                fsync_path(aside / db.name)
            linked = True
        for path in _database_files(db)[1:]:
            if path.exists():
                os.replace(path, aside / path.name)
                moved.append(path)
        os.replace(incoming, db)
        _fsync_dir(db.parent)
    except OSError as exc:
        back: list[str] = []
        for path in moved:
            try:
                os.replace(aside / path.name, path)
            except OSError:
                back.append(str(aside / path.name))
        with contextlib.suppress(OSError):
            incoming.unlink(missing_ok=True)
            if linked:
                (aside / db.name).unlink()
            if not back:
                aside.rmdir()
        where = (
            f"the server's files could not all be put back: {', '.join(back)} (move them"
            f" back to {db.parent} before starting the server)"
            if back
            else f"{db} is unchanged"
        )
        raise RestoreFailed(f"could not put the copy in place ({exc}); {where}") from exc


def _database_files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def _schema_version(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not an SQLite database: {exc}") from exc
    finally:
        conn.close()


def _refuse_if_open(db: Path) -> None:
    """Refuses when any process has the database open.

    In WAL mode a server's connections hold a shared lock on the database for as long as
    they are open, even idle; exclusive locking mode needs an exclusive lock on the file
    itself, which SQLite grants only when no other connection has the database open (a
    plain ``BEGIN EXCLUSIVE`` would not do: in WAL mode it waits only for writers, and an
    idle server writes nothing). The lock goes with the process, so a crashed server
    leaves none behind. Closing this last connection also folds the WAL into the file.
    """
    if not db.exists():
        return
    conn = sqlite3.connect(db, timeout=_LOCK_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        raise BackupError(f"{db} is in use (a server has it open: stop it first): {exc}") from exc
    except sqlite3.DatabaseError:
        # Not a database SQLite can read (corrupt: what a restore is most often for). No
        # server can be using it; still, refuse if a process holds SQLite's locks on it.
        if _sqlite_locked(db):
            raise BackupError(
                f"{db} is in use (a process holds its locks): stop it first"
            ) from None
    finally:
        conn.close()


# SQLite's POSIX locks on a database file: the pending, reserved and shared bytes, one
# GiB in (sqlite3 os_unix.c, PENDING_BYTE); an open connection holds a shared lock there.
_LOCK_BYTES_AT, _LOCK_BYTES = 0x40000000, 512


def _sqlite_locked(db: Path) -> bool:
    """Whether another process holds any of SQLite's locks on ``db``."""
    with open(db, "r+b") as file:
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, _LOCK_BYTES, _LOCK_BYTES_AT)
        except OSError:
            return True
        fcntl.lockf(file, fcntl.LOCK_UN, _LOCK_BYTES, _LOCK_BYTES_AT)
    return False


async def _mark(store_class: type[Store], db: Path, mark: RestoreMark) -> None:
    """Opens the restored copy as its server would (migrating an older schema) and records
    the restore in it."""
    store = await store_class.open(db)
    try:
        await store.set_meta_value(RESTORED_KEY, mark.encode())
    finally:
        await store.close()


# -- files -----------------------------------------------------------------------------------


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE), "w") as out:
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    fsync_path(partial)
    os.replace(partial, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fsync_path(path)


def describe(manifest: Manifest) -> Sequence[str]:
    """Lines that tell the operator what a manifest holds."""
    counts = ", ".join(f"{k} {v}" for k, v in manifest.counts.items())
    return [
        f"{manifest.role} {manifest.identity}, schema {manifest.schema_version}",
        f"snapshot taken {_utc(manifest.snapshot_time)}",
        f"rows: {counts}",
        *([f"documents: {manifest.documents}"] if manifest.role == "node" else []),
    ]
