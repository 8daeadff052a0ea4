"""Backup and restore of running servers (``chapar backup``, ``chapar restore``), with real
hub and node processes over real mTLS on loopback."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from client_sdk import ExchangeClient
from node.backup import RestoreMark, read_restore_mark
from node.cluster import Cluster

pytestmark = pytest.mark.integration

A = "SENDER.A"
B = "RECIPIENT.B"
NODE_SETTINGS = "reconnect_max_s = 1.0\nshutdown_grace_s = 2.0"
CHAPAR = [sys.executable, "-m", "node"]


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


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_restore_refuses_a_running_server_another_identity_and_a_newer_schema(
    tmp_path: Path,
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
