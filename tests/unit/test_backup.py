"""The pure parts of backup and restore: which backups a server takes back."""

from __future__ import annotations

import sqlite3

import pytest

from node.backup import BackupError, Manifest, RestoreMark, check_manifest, read_restore_mark

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


def test_the_restore_mark_is_read_back_and_absent_without_a_restore() -> None:
    conn = sqlite3.connect(":memory:")
    assert read_restore_mark(conn) is None  # no meta table at all (a hub before schema 6)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
    assert read_restore_mark(conn) is None
    mark = RestoreMark(restore_time=1_700_000_600.5, snapshot_time=1_700_000_000.25)
    conn.execute("INSERT INTO meta VALUES ('restored', ?)", (mark.encode(),))
    assert read_restore_mark(conn) == mark
