"""Backup and restore of running servers (``chapar backup``, ``chapar restore``), with real
hub and node processes over real mTLS on loopback."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from client_sdk import ChaparError, ExchangeClient, Unavailable, pb
from node import backup as backup_module
from node.backup import BackupError, RestoreFailed, RestoreMark, read_restore_mark, restore
from node.cluster import Cluster, ServerProcess
from node.core import lifecycle

pytestmark = pytest.mark.integration

A = "SENDER.A"
B = "RECIPIENT.B"
NODE_SETTINGS = "reconnect_max_s = 1.0\nshutdown_grace_s = 2.0"
CHAPAR = [sys.executable, "-m", "node"]
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def chapar(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAPAR, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def mark_of(db: Path) -> RestoreMark | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return read_restore_mark(conn)
    finally:
        conn.close()


def rows(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(db: Path, sql: str, params: tuple[object, ...] = ()) -> int:
    return int(rows(db, sql, params)[0][0])  # type: ignore[call-overload]


def database(server: ServerProcess) -> Path:
    return server.config.parent / f"{server.role}.db"


def evidence_count(server: ServerProcess, shams: str, event: int) -> int:
    """How many evidence rows of ``event`` about ``shams`` ``server`` holds."""
    return count(
        database(server),
        "SELECT count(*) FROM evidence WHERE shams = ? AND event = ?",
        (shams, event),
    )


async def eventually(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def client(server: ServerProcess, cluster: Cluster, code: str) -> ExchangeClient:
    return ExchangeClient(server.address, cluster.credentials(code), options=FAST_RECONNECT)


async def send_retrying(c: ExchangeClient, subject: str, timeout: float = 60.0) -> str:
    """Sends a letter to B, again while the node answers with a retryable refusal."""
    deadline = time.monotonic() + timeout
    request_id = f"retry-{subject}"
    while True:
        try:
            return (await c.send(to=[B], subject=subject, body="x", request_id=request_id)).shams
        except ChaparError as exc:
            if not exc.retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_restore_refuses_a_running_server_another_identity_and_a_newer_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    try:
        async with ExchangeClient(node_a.address, cluster.credentials(A)) as client:
            await client.send(to=[B], subject="before the backup", body="one")
        backups = tmp_path / "backups"
        for name, server in (("hub", hub), ("a", node_a)):
            made = chapar("backup", "--config", server.config, "--to", backups / name)
            assert made.returncode == 0, made.stdout + made.stderr
        manifest = json.loads((backups / "a" / "manifest.json").read_text())
        assert manifest["role"] == "node"
        assert manifest["identity"] == f"urn:chapar:agency:{A}"
        assert manifest["counts"]["outbox"] == 1
        assert json.loads((backups / "hub" / "manifest.json").read_text())["role"] == "hub"

        refused = chapar("restore", "--config", hub.config, "--from", backups / "hub")
        assert refused.returncode == 1
        assert "in use" in refused.stderr, refused.stderr
        refused = chapar(
            "restore", "--config", hub.config, "--from", backups / "hub", "--skip-numbers", 5
        )
        assert "only a node numbers letters" in refused.stderr, refused.stderr
        refused = chapar("restore", "--config", node_b.config, "--from", backups / "a")
        assert refused.returncode == 1
        assert f"the backup is of urn:chapar:agency:{A}" in refused.stderr, refused.stderr
        refused = chapar("restore", "--config", node_a.config, "--from", backups / "hub")
        assert refused.returncode == 1
        assert "the backup is of a hub" in refused.stderr, refused.stderr

        # A newer schema: said by the manifest, or only by the file itself.
        newer = tmp_path / "newer"
        shutil.copytree(backups / "a", newer)
        conn = sqlite3.connect(newer / "node.db")
        conn.execute("PRAGMA user_version = 99")
        conn.close()
        refused = chapar("restore", "--config", node_a.config, "--from", newer)
        assert refused.returncode == 1
        assert "schema version 99 is newer" in refused.stderr, refused.stderr
        (newer / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
        refused = chapar("restore", "--config", node_a.config, "--from", newer)
        assert "schema version 99 is newer" in refused.stderr, refused.stderr
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    # Nothing refused touched a database.
    for server in (hub, node_a, node_b):
        db = server.config.parent / ("hub.db" if server is hub else "node.db")
        assert mark_of(db) is None
        assert not list(db.parent.glob("*.before-restore-*"))

    # Stopped, the hub takes its backup back; the replaced files are kept aside.
    done = chapar("restore", "--config", hub.config, "--from", backups / "hub")
    assert done.returncode == 0, done.stdout + done.stderr
    hub_db = hub.config.parent / "hub.db"
    mark = mark_of(hub_db)
    assert mark is not None
    assert (
        mark.snapshot_time
        == json.loads((backups / "hub" / "manifest.json").read_text())["snapshot_time"]
    )
    (aside,) = hub_db.parent.glob("hub.db.before-restore-*")
    assert (aside / "hub.db").is_file()
    assert rows(hub_db, "SELECT count(*) FROM letters") == [(1,)]

    # A restore that fails (a full disk while copying, a rename refused while swapping)
    # leaves the database as it was: it used to move the live files aside first, and a
    # failed copy left no database at all, so the server started an empty one.
    def full_disk(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(backup_module.shutil, "copyfile", full_disk)
        with pytest.raises(RestoreFailed, match="is unchanged"):
            await asyncio.to_thread(restore, hub.config, backups / "hub", now=time.time() + 5)
    real_replace = os.replace

    def no_swap(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == "hub.db.restoring":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(backup_module.os, "replace", no_swap)
        with pytest.raises(RestoreFailed, match="is unchanged"):
            await asyncio.to_thread(restore, hub.config, backups / "hub", now=time.time() + 10)
    assert mark_of(hub_db) == mark
    assert rows(hub_db, "SELECT count(*) FROM letters") == [(1,)]
    assert not list(hub_db.parent.glob("hub.db.restoring*"))

    # Cut short at the rename itself (a kill, a power cut): the server still finds its
    # database, the old one (the swap used to move it aside first, leaving none).
    def cut(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == "hub.db.restoring":
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(backup_module.os, "replace", cut)
        with pytest.raises(KeyboardInterrupt):
            await asyncio.to_thread(restore, hub.config, backups / "hub", now=time.time() + 15)
    assert mark_of(hub_db) == mark
    # Twice in the same second (or after one cut short): the replaced files go to a
    # directory of their own, not refused as "File exists".
    twice = time.time() + 20
    for _ in range(2):
        _, aside = await asyncio.to_thread(restore, hub.config, backups / "hub", now=twice)
        assert (aside / "hub.db").is_file()

    # On a file system without hard links (some SMB and FUSE mounts) the database is
    # copied aside instead of linked; the restore used to fail ("could not put the copy
    # in place ([Errno 1] ...)").
    def no_links(*_: object, **__: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    replaced = hub_db.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(backup_module.os, "link", no_links)
        _, aside = await asyncio.to_thread(
            restore, hub.config, backups / "hub", now=time.time() + 25
        )
    assert (aside / "hub.db").read_bytes() == replaced
    assert mark_of(hub_db) != mark_of(aside / "hub.db")

    # A database SQLite cannot read any more (what a restore is most often for) is put
    # aside and replaced; it used to be refused as "not a database".
    hub_db.write_bytes(b"not a database " * 1000)
    done = chapar("restore", "--config", hub.config, "--from", backups / "hub")
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(hub_db, "SELECT count(*) FROM letters") == [(1,)]

    # The documents are copied (and checked) before the database is swapped: a full disk
    # then leaves the database as it was. Put in place after it, a document that cannot
    # be is said as a failure, with where things are, not as a refusal.
    node_db = node_a.config.parent / "node.db"
    (backups / "a" / "documents").mkdir(exist_ok=True)

    def no_room(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(backup_module, "_stage_documents", no_room)
        with pytest.raises(RestoreFailed, match="is unchanged"):
            await asyncio.to_thread(restore, node_a.config, backups / "a")
    assert mark_of(node_db) is None
    restoring = node_a.config.parent / "documents" / "restoring"
    assert not restoring.exists()
    # Failing after the documents were staged (the swap refused, or a server started
    # meanwhile) also leaves no copy of them in the store: they stayed in restoring/
    # (which the node's next start would place in the store).
    content = b"a document of the backup"
    name = hashlib.sha256(content).hexdigest()
    (backups / "a" / "documents" / "sha256" / name[:2]).mkdir(parents=True)
    (backups / "a" / "documents" / "sha256" / name[:2] / name).write_bytes(content)

    def no_node_swap(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == "node.db.restoring":
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    def opened_meanwhile(db: Path) -> None:
        if (db.parent / "node.db.restoring").exists():  # the check after the staging
            raise backup_module.BackupError(f"{db} is in use (a server has it open)")

    for patch, value, refusal in (
        (backup_module.os, "replace", (no_node_swap, RestoreFailed, "is unchanged")),
        (backup_module, "_refuse_if_open", (opened_meanwhile, BackupError, "in use")),
    ):
        stand_in, error, message = refusal
        with monkeypatch.context() as m:
            m.setattr(patch, value, stand_in)
            with pytest.raises(error, match=message):
                await asyncio.to_thread(restore, node_a.config, backups / "a")
        assert mark_of(node_db) is None
        assert not restoring.exists(), sorted(restoring.rglob("*"))
        assert not (node_a.config.parent / "documents" / "sha256" / name[:2] / name).exists()
    with monkeypatch.context() as m:
        m.setattr(backup_module, "_place_documents", no_room)
        with pytest.raises(RestoreFailed, match="the database is restored"):
            await asyncio.to_thread(restore, node_a.config, backups / "a")
    assert mark_of(node_db) is not None


def overwrite_a_middle_page(db: Path, page: int = 8192) -> None:
    """Damages ``db`` as a bad disk would: one page in its middle overwritten."""
    with open(db, "r+b") as f:
        pages = f.seek(0, os.SEEK_END) // page
        f.seek(pages // 2 * page)
        f.write(bytes(range(256)) * (page // 256))


async def test_a_restore_refuses_a_corrupt_copy_or_one_its_manifest_does_not_describe(
    tmp_path: Path,
) -> None:
    """A backup damaged after it was taken (a bad disk, a copy cut short off the machine)
    or put together from two backups is refused before the server's database is touched:
    a page overwritten in the middle of the copy used to be restored (exit 0) in place of a
    sound database, which the node could then no longer read."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], without_node=[B])
    node_a = cluster.nodes[A]
    backups = tmp_path / "backups"
    try:
        async with client(node_a, cluster, A) as a:
            for i in range(200):
                await a.send(to=[B], subject=f"s{i}", body="x" * 2000)
            made = chapar("backup", "--config", node_a.config, "--to", backups / "first")
            assert made.returncode == 0, made.stdout + made.stderr
            await a.send(to=[B], subject="after the first backup", body="x")
            made = chapar("backup", "--config", node_a.config, "--to", backups / "second")
            assert made.returncode == 0, made.stdout + made.stderr
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    node_db = database(node_a)
    live = node_db.read_bytes()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(backups / "first", corrupt)
    overwrite_a_middle_page(corrupt / "node.db")
    refused = chapar("restore", "--config", node_a.config, "--from", corrupt)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "is damaged" in refused.stderr, refused.stderr

    # The second backup's database under the first one's manifest.
    mixed = tmp_path / "mixed"
    shutil.copytree(backups / "first", mixed)
    shutil.copyfile(backups / "second" / "node.db", mixed / "node.db")
    refused = chapar("restore", "--config", node_a.config, "--from", mixed)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "outbox 201 rows, the manifest says 200" in refused.stderr, refused.stderr

    assert node_db.read_bytes() == live
    assert not list(node_db.parent.glob("node.db.before-restore-*"))
    assert not list(node_db.parent.glob("node.db.restoring*"))
    # The sound backups are taken.
    for name in ("first", "second"):
        done = chapar("restore", "--config", node_a.config, "--from", backups / name)
        assert done.returncode == 0, done.stdout + done.stderr


async def test_a_backup_into_the_servers_own_directory_is_refused(tmp_path: Path) -> None:
    """``--to`` the directory that holds the server's database (a slip of the operator's)
    used to rename the copy over the live database under the running server."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], without_node=[B])
    node_a = cluster.nodes[A]
    node_db = database(node_a)
    try:
        async with client(node_a, cluster, A) as a:
            await a.send(to=[B], subject="before", body="x")
            live = node_db.stat().st_ino
            link = tmp_path / "link"
            link.symlink_to(node_db.parent)
            for to in (node_db.parent, node_db.parent / "documents" / "..", link):
                refused = chapar("backup", "--config", node_a.config, "--to", to)
                assert refused.returncode == 1, refused.stdout + refused.stderr
                assert "the server's own" in refused.stderr, refused.stderr
            assert node_db.stat().st_ino == live
            assert not (node_db.parent / "manifest.json").exists()
            await a.send(to=[B], subject="after", body="x")
        await node_a.restart()
        assert count(node_db, "SELECT count(*) FROM outbox") == 2
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def test_a_backup_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """A backup holds letter bodies and documents: its directories are 0700 and its files
    0600 from creation, whatever the umask (they used to follow it: 0755 and 0644)."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], without_node=[B])
    node_a = cluster.nodes[A]
    source = tmp_path / "report.txt"
    source.write_bytes(b"attachment " * 1000)
    backup = tmp_path / "backups" / "a"
    umask = os.umask(0o022)
    try:
        async with client(node_a, cluster, A) as a:
            await a.send(to=[B], subject="file", body="x", attachments=[source])
        made = chapar("backup", "--config", node_a.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
        # Into a directory that exists (the operator's, left as it is): its files still 0600.
        again = tmp_path / "again"
        again.mkdir(mode=0o755)
        made = chapar("backup", "--config", node_a.config, "--to", again)
        assert made.returncode == 0, made.stdout + made.stderr
    finally:
        os.umask(umask)
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    found = [backup, *backup.rglob("*"), *again.rglob("*")]
    assert len([p for p in found if p.name == "node.db"]) == 2
    assert len([p for p in found if p.parent.parent.name == "sha256"]) == 2  # the document
    modes = {p: oct(p.stat().st_mode & 0o777) for p in found}
    assert modes == {p: "0o700" if p.is_dir() else "0o600" for p in found}


async def test_a_restore_refuses_a_node_backup_without_the_documents_its_manifest_counts(
    tmp_path: Path,
) -> None:
    """A node's backup copied off the machine without its documents/ (or cut short) used to
    be restored (exit 0) onto a machine that had lost its store: the letters came back,
    their attachments did not, and nothing said so. One whose document is damaged is
    refused too, and a sound one brings the document back."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], without_node=[B])
    node_a = cluster.nodes[A]
    source = tmp_path / "report.txt"
    source.write_bytes(b"attachment " * 1000)
    backup = tmp_path / "backup"
    try:
        async with client(node_a, cluster, A) as a:
            await a.send(to=[B], subject="file", body="x", attachments=[source])
        made = chapar("backup", "--config", node_a.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    assert json.loads((backup / "manifest.json").read_text())["documents"] == 1
    store = node_a.config.parent / "documents"
    shutil.rmtree(store / "sha256")  # the site lost, its store with it
    node_db = database(node_a)
    live = node_db.read_bytes()
    sound = tmp_path / "sound"
    shutil.copytree(backup, sound)
    shutil.rmtree(backup / "documents")
    refused = chapar("restore", "--config", node_a.config, "--from", backup)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "holds 0 of the 1 documents" in refused.stderr, refused.stderr
    assert node_db.read_bytes() == live
    assert not list(node_db.parent.glob("node.db.before-restore-*"))

    # A document damaged in the backup (its bytes rotted, or another file under its
    # name) was copied back unchecked (exit 0) and served later as if sound.
    (document,) = (sound / "documents" / "sha256").glob("*/*")
    held = sorted(store.rglob("*"))
    for damage in (b"attachment " * 999 + b"attachmenT ", b"another file"):
        damaged = tmp_path / f"damaged-{len(damage)}"
        shutil.copytree(sound, damaged)
        bad = damaged / document.relative_to(sound)
        bad.write_bytes(damage)
        refused = chapar("restore", "--config", node_a.config, "--from", damaged)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert f"document {bad} is damaged" in refused.stderr, refused.stderr
        assert node_db.read_bytes() == live
        assert not list(node_db.parent.glob("node.db.before-restore-*"))
        assert not list(node_db.parent.glob("node.db.restoring*"))
        assert sorted(store.rglob("*")) == held
    done = chapar("restore", "--config", node_a.config, "--from", sound)
    assert done.returncode == 0, done.stdout + done.stderr
    back = store / document.relative_to(sound / "documents")
    assert back.read_bytes() == source.read_bytes()


async def test_documents_a_restore_cut_short_after_its_swap_left_are_placed_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore killed after it swapped the database in, before it renamed the documents
    it had checked into the store, left them in restoring/ for good: the node started on
    the restored database, and the attachments of its letters could not be downloaded
    (NOT_FOUND); the next restore deleted them first thing, even one then refused. The
    node's start and a restore's now place them (one whose content is not its name is
    dropped) and say so."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], without_node=[B])
    node_a = cluster.nodes[A]
    source = tmp_path / "report.txt"
    source.write_bytes(b"attachment " * 1000)
    backup = tmp_path / "backup"
    store = node_a.config.parent / "documents"
    staged = store / "restoring"
    rotten = hashlib.sha256(b"rotten").hexdigest()
    rotten_rel = Path("sha256") / rotten[:2] / rotten

    def killed(where: Path) -> None:
        """A kill before the first rename; a file under a name its content is not."""
        (where / rotten_rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rotten_rel).write_bytes(b"rottem")
        raise KeyboardInterrupt

    async def restore_killed() -> None:
        node_a.terminate()
        shutil.rmtree(store / "sha256")  # the site lost, its store with it
        with monkeypatch.context() as m:
            m.setattr(backup_module, "_place_documents", killed)
            with pytest.raises(KeyboardInterrupt):
                await asyncio.to_thread(restore, node_a.config, backup)
        assert mark_of(database(node_a)) is not None  # swapped in
        assert sorted(p.name for p in staged.rglob("*") if p.is_file()) == sorted(
            [document, rotten]
        )

    try:
        async with client(node_a, cluster, A) as a:
            sent = await a.send(to=[B], subject="file", body="x", attachments=[source])
            (ref,) = (await a.track(sent.shams)).header.attachments
        document = ref.sha256.hex()
        made = chapar("backup", "--config", node_a.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
        await restore_killed()
        node_a.start()
        await node_a.wait_ready()
        async with client(node_a, cluster, A) as a:
            assert b"".join([c async for c in a.download(ref.uri)]) == source.read_bytes()
        assert not staged.exists()
        assert not (store / rotten_rel).exists()
        line = (
            f"the documents a restore cut short left in {staged}: 1 placed in the store,"
            " 0 held already, 1 dropped as damaged"
        )
        assert line in node_a.log_tail(), node_a.log_tail()

        # Cut short again, then a restore refused (a manifest of another backup): it
        # used to delete restoring/ first, and the database in place lost the document.
        await restore_killed()
        mixed = tmp_path / "mixed"
        shutil.copytree(backup, mixed)
        manifest = json.loads((mixed / "manifest.json").read_text())
        manifest["counts"]["outbox"] += 1
        (mixed / "manifest.json").write_text(json.dumps(manifest))
        refused = chapar("restore", "--config", node_a.config, "--from", mixed)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert f"warning: {line}" in refused.stderr, refused.stderr
        assert "the manifest says" in refused.stderr, refused.stderr
        assert not staged.exists()
        assert (store / "sha256" / document[:2] / document).read_bytes() == source.read_bytes()
        assert not (store / rotten_rel).exists()
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def test_a_backup_leaves_out_a_damaged_document_and_sets_the_live_copy_aside(
    tmp_path: Path,
) -> None:
    """A document rotted in a node's store was copied into the backup unread (exit 0): the
    operator learnt of it only when a restore of that backup was refused. The backup now
    leaves it out (and uncounted, so the backup restores), sets the live copy aside as the
    node does for one it finds corrupt (the agency's own moved to corrupt/, a copy fetched
    from another agency removed), says so in one line each, and ends with exit status 3."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    node_a, node_b = cluster.nodes[A], cluster.nodes[B]
    sound, rotten = tmp_path / "sound.txt", tmp_path / "rotten.txt"
    sound.write_bytes(b"sound " * 1000)
    rotten.write_bytes(b"rotten " * 1000)
    digest = hashlib.sha256(rotten.read_bytes()).hexdigest()
    stores = {A: node_a.config.parent / "documents", B: node_b.config.parent / "documents"}
    lives = {code: store / "sha256" / digest[:2] / digest for code, store in stores.items()}
    backups = {A: tmp_path / "backup-a", B: tmp_path / "backup-b"}
    try:
        async with client(node_a, cluster, A) as a, client(node_b, cluster, B) as b:
            shams = (
                await a.send(to=[B], subject="files", body="x", attachments=[sound, rotten])
            ).shams
            async with asyncio.timeout(60):
                letter = await anext(x async for x in b.inbox() if x.shams == shams)
            await letter.ack()
            for attachment in letter.attachments:  # B fetches both from A
                await attachment.save(tmp_path / f"b-{attachment.file_name}")
        for live in lives.values():  # the same bytes rot in both stores
            live.write_bytes(b"rotten " * 999 + b"rottem ")
        made = {code: chapar("backup", "--config", node.config, "--to", backups[code])
                for code, node in ((A, node_a), (B, node_b))}  # fmt: skip
        again = chapar("backup", "--config", node_a.config, "--to", backups[A])
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
    for code, done in made.items():
        assert done.returncode == 3, done.stdout + done.stderr
        assert done.stdout.startswith(f"backed up into {backups[code]}"), done.stdout
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"document {lives[code]} is damaged" in done.stderr, done.stderr
        held = sorted(p.name for p in (backups[code] / "documents").rglob("*") if p.is_file())
        assert held == [hashlib.sha256(sound.read_bytes()).hexdigest()]
        assert json.loads((backups[code] / "manifest.json").read_text())["documents"] == 1
    # A's own document: moved aside for inspection; uploading the file again repairs it.
    assert "moved aside" in made[A].stderr, made[A].stderr
    assert not lives[A].exists()
    (kept,) = (stores[A] / "corrupt").iterdir()
    assert kept.name.startswith(f"{digest}.")
    assert kept.read_bytes() == b"rotten " * 999 + b"rottem "
    # B's copy fetched from A: removed, as B's node does; the next download fetches it again.
    assert "removed" in made[B].stderr, made[B].stderr
    assert not lives[B].exists()
    assert not (stores[B] / "corrupt").exists()
    # Set aside, it is no longer found: a backup again is whole, and says so (exit 0).
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stderr == ""
    for code, node in ((A, node_a), (B, node_b)):
        restored = chapar("restore", "--config", node.config, "--from", backups[code])
        assert restored.returncode == 0, restored.stdout + restored.stderr


@pytest.mark.parametrize("skip", [0, 10])
async def test_a_restored_node_waits_for_the_hubs_numbers_then_numbers_above_them(
    tmp_path: Path, skip: int
) -> None:
    # skip: numbers left unused after the hub's highest (`chapar restore --skip-numbers`).
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    backup = tmp_path / "backup-a"
    try:
        async with client(node_a, cluster, A) as a:
            # Letters flow while the backup is taken.
            sending = asyncio.gather(
                *(a.send(to=[B], subject=f"s{i}", body="x") for i in range(20))
            )
            made = await asyncio.to_thread(
                chapar, "backup", "--config", node_a.config, "--to", backup
            )
            assert made.returncode == 0, made.stdout + made.stderr
            await sending
            # More letters after the backup: the hub holds numbers the copy never saw.
            after = [(await a.send(to=[B], subject=f"after {i}", body="x")).shams for i in range(5)]
        highest = max(int(s.rsplit("/", 1)[1]) for s in after)
        assert highest == 25
        await eventually(
            lambda: count(database(hub), "SELECT count(*) FROM letters") == 25, "relay of 25"
        )
        assert count(backup / "node.db", "SELECT count(*) FROM outbox") < 25
        node_a.terminate()
        hub.terminate()
        done = chapar(
            "restore", "--config", node_a.config, "--from", backup, "--skip-numbers", skip
        )
        assert done.returncode == 0, done.stdout + done.stderr

        # The hub is down: the restored node cannot know which numbers the hub holds, and
        # refuses letters (retryable) instead of numbering them.
        node_a.start()
        await node_a.wait_ready()
        async with client(node_a, cluster, A) as a:
            with pytest.raises(Unavailable) as refused:
                await a.send(to=[B], subject="too early", body="x")
            assert refused.value.reason == "NUMBERS_UNCONFIRMED"
            assert refused.value.retryable
            hub.start()
            await hub.wait_ready()
            numbers = [await send_retrying(a, f"restored {i}") for i in range(3)]
        assert [int(n.rsplit("/", 1)[1]) for n in numbers] == [26 + skip, 27 + skip, 28 + skip]
        for shams in numbers:
            await eventually(
                lambda s=shams: (
                    count(  # type: ignore[misc]
                        database(node_b), "SELECT count(*) FROM inbox WHERE shams = ?", (s,)
                    )
                    == 1
                ),
                f"delivery of {shams}",
            )
            await eventually(
                lambda s=shams: evidence_count(node_a, s, pb.EVIDENCE_EVENT_DELIVERY) == 1,  # type: ignore[misc]
                f"DELIVERY evidence of {shams} at the sender",
            )
        assert count(database(node_a), "SELECT count(*) FROM outbox WHERE relay_state = 2") == 0
        assert count(database(hub), "SELECT count(*) FROM letters") == 28
        # The letters relayed after the copy are lost to the restored outbox, not to the
        # exchange: handed over now, their HANDOVER still reaches the sender's node and is
        # stored there (OPERATIONS.md, "What a restore loses"), not refused as evidence of
        # a number it never sent.
        seen: list[str] = []
        reader = asyncio.create_task(acknowledge_all(cluster, B, seen))
        try:
            for shams in after:
                await eventually(
                    lambda s=shams: evidence_count(node_a, s, pb.EVIDENCE_EVENT_HANDOVER) == 1,  # type: ignore[misc]
                    f"HANDOVER of {shams}, relayed after the copy, at the restored sender",
                )
        finally:
            await stop_task(reader)
        assert not set(after) & {
            str(r[0]) for r in rows(database(node_a), "SELECT shams FROM outbox")
        }
        # Once confirmed, a restart takes letters at once, hub or no hub.
        hub.terminate()
        await node_a.restart()
        async with client(node_a, cluster, A) as a:
            sent = await a.send(to=[B], subject="hub down", body="x")
            assert sent.shams.endswith(f"/{29 + skip:07d}")
        hub.start()
        await hub.wait_ready()
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def acknowledge_all(cluster: Cluster, code: str, seen: list[str]) -> None:
    """A back-end that reads its inbox and acknowledges everything, reconnecting as needed."""
    while True:
        try:
            async with client(cluster.nodes[code], cluster, code) as c:
                async for letter in c.inbox():
                    seen.append(letter.shams)
                    await letter.ack()
        except ChaparError:
            await asyncio.sleep(0.2)


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def states(db: Path, numbers: list[str]) -> dict[str, int]:
    marks = ",".join("?" * len(numbers))
    return {
        str(s): int(state)  # type: ignore[call-overload]
        for s, state in rows(
            db, f"SELECT shams, state FROM recipient_state WHERE shams IN ({marks})", tuple(numbers)
        )
    }


async def test_after_a_hub_restore_every_letter_since_its_snapshot_arrives_once_with_its_evidence(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    backup = tmp_path / "backup-hub"
    seen: list[str] = []
    acker = asyncio.create_task(acknowledge_all(cluster, B, seen))
    try:
        async with client(node_a, cluster, A) as a:
            first = [(await a.send(to=[B], subject=f"b{i}", body="x")).shams for i in range(5)]
            await eventually(
                lambda: set(states(database(node_a), first).values()) == {lifecycle.HANDED_OVER},
                "handover of the first letters",
            )
            # Letters flow while the hub's backup is taken.
            sending = asyncio.gather(
                *(a.send(to=[B], subject=f"d{i}", body="x") for i in range(10))
            )
            made = await asyncio.to_thread(chapar, "backup", "--config", hub.config, "--to", backup)
            assert made.returncode == 0, made.stdout + made.stderr
            during = [r.shams for r in await sending]
            await eventually(
                lambda: set(states(database(node_a), during).values()) == {lifecycle.HANDED_OVER},
                "handover of the letters sent during the backup",
            )
            # After the snapshot: delivered to B (its DELIVERY at A), not yet handed over.
            await stop_task(acker)
            after = [(await a.send(to=[B], subject=f"a{i}", body="x")).shams for i in range(10)]
        await eventually(
            lambda: set(states(database(node_a), after).values()) == {lifecycle.DELIVERED},
            "delivery of the letters sent after the backup",
        )
        assert count(backup / "hub.db", "SELECT count(*) FROM letters") < 25
        assert not set(after) & {
            str(r[0]) for r in rows(backup / "hub.db", "SELECT shams FROM letters")
        }
        # Receipts the hub acknowledged: B will not send them again by itself.
        await eventually(
            lambda: count(database(node_b), "SELECT count(*) FROM evidence WHERE to_send = 1") == 0,
            "B's receipts acknowledged",
        )
        cluster.stop()
        done = chapar("restore", "--config", hub.config, "--from", backup)
        assert done.returncode == 0, done.stdout + done.stderr

        hub.start()
        await hub.wait_ready()
        for node in (node_a, node_b):
            node.start()
        for node in (node_a, node_b):
            await node.wait_ready()
        acker = asyncio.create_task(acknowledge_all(cluster, B, seen))
        await eventually(
            lambda: set(states(database(node_a), after).values()) == {lifecycle.HANDED_OVER},
            "handover of the letters sent after the backup",
        )
        await stop_task(acker)

        for shams in after:
            # Stored once at B, though pushed to it again; its receipts stored once at the
            # hub, though sent again; one DELIVERY and one HANDOVER at the sender.
            assert (
                count(database(node_b), "SELECT count(*) FROM inbox WHERE shams = ?", (shams,)) == 1
            )
            for where in (node_b, hub, node_a):
                for event in (pb.EVIDENCE_EVENT_DELIVERY, pb.EVIDENCE_EVENT_HANDOVER):
                    assert evidence_count(where, shams, event) == 1, (where.name, shams, event)
        assert sorted(seen) == sorted([*first, *during, *after])  # each letter read once
        assert count(database(node_a), "SELECT count(*) FROM outbox WHERE relay_state = 2") == 0
        async with client(node_a, cluster, A) as a:
            trust = await a.trust_from_directory(cluster.credentials(A).trust_store())
            for shams in after:
                events = {e.event for e in (await a.track(shams)).verify(trust)}
                assert {"DELIVERY", "HANDOVER", "RELAY_ACCEPTANCE"} <= events, (shams, events)
        # Handled once: a restart of the node sends nothing again.
        await node_a.restart()
        assert "sending again" not in node_a.log_tail(200).split("node " + A + " ready")[-1]
    finally:
        await stop_task(acker)
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def test_after_a_hub_restore_a_letter_finished_since_its_snapshot_is_back_at_the_hub(
    tmp_path: Path,
) -> None:
    """A letter handed over after the hub's snapshot is sent again too: the restored hub
    holds it and its evidence again, and its recipient can still fetch its attachment."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    backup = tmp_path / "backup-hub"
    source = tmp_path / "report.txt"
    source.write_bytes(b"attachment " * 1000)
    try:
        made = await asyncio.to_thread(chapar, "backup", "--config", hub.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
        async with client(node_a, cluster, A) as a:
            shams = (await a.send(to=[B], subject="file", body="x", attachments=[source])).shams
        async with client(node_b, cluster, B) as b:
            async for letter in b.inbox():
                assert letter.shams == shams
                await letter.ack()  # handed over; its back-end fetches the file later
                attachment = letter.attachments[0]
                break
        await eventually(
            lambda: states(database(node_a), [shams]) == {shams: lifecycle.HANDED_OVER},
            "handover",
        )
        cluster.stop()
        done = chapar("restore", "--config", hub.config, "--from", backup)
        assert done.returncode == 0, done.stdout + done.stderr
        assert count(database(hub), "SELECT count(*) FROM letters WHERE shams = ?", (shams,)) == 0

        hub.start()
        await hub.wait_ready()
        for node in (node_a, node_b):
            node.start()
        for node in (node_a, node_b):
            await node.wait_ready()
        await eventually(
            lambda: states(database(hub), [shams]) == {shams: lifecycle.HANDED_OVER},
            "the letter handed over at the hub again",
        )
        async with client(node_b, cluster, B) as b:
            await b.fetch(attachment, tmp_path / "out.txt")
        assert (tmp_path / "out.txt").read_bytes() == source.read_bytes()
        for where in (node_a, hub):
            for event in (pb.EVIDENCE_EVENT_DELIVERY, pb.EVIDENCE_EVENT_HANDOVER):
                assert evidence_count(where, shams, event) == 1, (where.name, event)
        assert states(database(node_a), [shams]) == {shams: lifecycle.HANDED_OVER}
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


async def test_after_a_hub_restore_a_receipt_it_stored_after_its_snapshot_reaches_the_sender(
    tmp_path: Path,
) -> None:
    """A HANDOVER the recipient's node recorded long before the hub's copy but could send
    only after it (its link down across the backup) is lost with the hub's data, and the
    copy holds its letter dequeued (its DELIVERY came before), so the letter is not pushed
    again: the node sends the HANDOVER again, as the hub acknowledged it after the copy,
    and it reaches the sender, which was away when the hub first routed it."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    backup = tmp_path / "backup-hub"
    try:
        async with client(node_a, cluster, A) as a:
            shams = (await a.send(to=[B], subject="late", body="x")).shams
        await eventually(
            lambda: states(database(node_a), [shams]) == {shams: lifecycle.DELIVERED}, "delivery"
        )
        assert hub.terminate() == 0  # B's link down
        async with client(node_b, cluster, B) as b:
            async for letter in b.inbox():
                assert letter.shams == shams
                await letter.ack()
                break
        assert node_b.terminate() == 0  # its link still down across the backup
        assert node_a.terminate() == 0  # the sender away until after the restore
        hub.start()
        await hub.wait_ready()
        made = await asyncio.to_thread(chapar, "backup", "--config", hub.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
        # B recorded its receipts an hour before the copy: far beyond the margin.
        conn = sqlite3.connect(database(node_b))
        with conn:
            conn.execute("UPDATE evidence SET recorded_at = recorded_at - 3600")
        conn.close()
        node_b.start()
        await node_b.wait_ready()
        await eventually(
            lambda: (
                states(database(hub), [shams]) == {shams: lifecycle.HANDED_OVER}
                and count(database(node_b), "SELECT count(*) FROM evidence WHERE to_send = 1") == 0
            ),
            "the HANDOVER stored and acknowledged by the hub",
        )
        cluster.stop()
        done = chapar("restore", "--config", hub.config, "--from", backup)
        assert done.returncode == 0, done.stdout + done.stderr
        assert states(database(hub), [shams]) == {shams: lifecycle.DELIVERED}  # lost with it
        assert states(database(node_a), [shams]) == {shams: lifecycle.DELIVERED}

        hub.start()
        await hub.wait_ready()
        for node in (node_a, node_b):
            node.start()
        for node in (node_a, node_b):
            await node.wait_ready()
        await eventually(
            lambda: states(database(node_a), [shams]) == {shams: lifecycle.HANDED_OVER},
            "the HANDOVER at the sender",
            timeout=30.0,
        )
        assert states(database(hub), [shams]) == {shams: lifecycle.HANDED_OVER}
        for where in (node_b, hub, node_a):
            for event in (pb.EVIDENCE_EVENT_DELIVERY, pb.EVIDENCE_EVENT_HANDOVER):
                assert evidence_count(where, shams, event) == 1, (where.name, event)
    finally:
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes


# Notices the hub holds for a sender's node that it has not acknowledged.
WAITING_NOTICES = "SELECT count(*) FROM notices WHERE acked_at IS NULL"


async def test_a_sender_restored_from_a_copy_gets_again_the_evidence_routed_to_it_since(
    tmp_path: Path,
) -> None:
    """The DELIVERY and HANDOVER the hub routed to a sender's node after its backup, which
    the node stored and acknowledged (the hub then forgot them), are lost with its data:
    restored, it tells the hub when its copy was taken, and the hub routes them again."""
    cluster = await Cluster.start(tmp_path / "c", [A, B], node_settings=NODE_SETTINGS)
    hub, node_a, node_b = cluster.hub, cluster.nodes[A], cluster.nodes[B]
    backup = tmp_path / "backup-a"
    acker: asyncio.Task[None] | None = None
    try:
        async with client(node_a, cluster, A) as a:
            delivered = (await a.send(to=[B], subject="delivered", body="x")).shams
            await eventually(
                lambda: states(database(node_a), [delivered]) == {delivered: lifecycle.DELIVERED},
                "delivery",
            )
            assert node_b.terminate() == 0
            relayed = (await a.send(to=[B], subject="relayed", body="x")).shams
        await eventually(
            lambda: states(database(node_a), [relayed]) == {relayed: lifecycle.RELAYED}, "relay"
        )
        made = await asyncio.to_thread(chapar, "backup", "--config", node_a.config, "--to", backup)
        assert made.returncode == 0, made.stdout + made.stderr
        # After the copy: both delivered and handed over, their notices acknowledged by A.
        node_b.start()
        await node_b.wait_ready()
        seen: list[str] = []
        acker = asyncio.create_task(acknowledge_all(cluster, B, seen))
        both = [delivered, relayed]
        await eventually(
            lambda: set(states(database(node_a), both).values()) == {lifecycle.HANDED_OVER},
            "handover at the sender",
        )
        await eventually(
            lambda: count(database(hub), WAITING_NOTICES) == 0, "the notices acknowledged"
        )
        assert node_a.terminate() == 0
        done = chapar("restore", "--config", node_a.config, "--from", backup)
        assert done.returncode == 0, done.stdout + done.stderr
        assert states(database(node_a), both) == {
            delivered: lifecycle.DELIVERED,
            relayed: lifecycle.RELAYED,
        }

        node_a.start()
        await node_a.wait_ready()
        await eventually(
            lambda: set(states(database(node_a), both).values()) == {lifecycle.HANDED_OVER},
            "the evidence routed since the copy at the restored sender",
            timeout=20.0,
        )
        for shams in both:
            for event in (pb.EVIDENCE_EVENT_DELIVERY, pb.EVIDENCE_EVENT_HANDOVER):
                assert evidence_count(node_a, shams, event) == 1, (shams, event)
        async with client(node_a, cluster, A) as a:
            tracked = await a.track(relayed)
            assert tracked.statuses == {B: "HANDED_OVER"}, tracked.statuses

        # Asked once: the node says it was restored until the hub's welcome, not after.
        def log() -> str:
            return hub.log_tail(100_000)

        connected = log().count(f"node {A} connected")
        await node_a.restart()
        await eventually(lambda: log().count(f"node {A} connected") > connected, "reconnection")
        assert log().count(f"node {A} was restored from a copy") == 1, log()
        assert "routing again 4 notices" in log(), log()
    finally:
        if acker is not None:
            await stop_task(acker)
        codes = cluster.stop()
    assert set(codes.values()) == {0}, codes
