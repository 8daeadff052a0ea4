"""The mark ``chapar restore`` leaves in a database (``meta`` row ``restored``): when the
database was restored from a backup and when that backup's snapshot was taken.

Both stores read it: a restored node waits for the hub's numbers before it numbers letters
again; a restored hub tells its nodes, which send again what it may have lost.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

__all__ = ["RESTORED_KEY", "RestoreMark", "read_restore_mark"]

RESTORED_KEY = "restored"


@dataclass(frozen=True, slots=True)
class RestoreMark:
    """When a database was restored (``restore_time``) from a snapshot taken at
    ``snapshot_time``; Unix seconds, each by the clock of the machine that did it."""

    restore_time: float
    snapshot_time: float
    # A node's counters move this many numbers on at the hub's first word after the
    # restore (``chapar restore --skip-numbers``).
    skip_numbers: int = 0

    def encode(self) -> bytes:
        return json.dumps(
            {
                "restore_time": self.restore_time,
                "snapshot_time": self.snapshot_time,
                "skip_numbers": self.skip_numbers,
            }
        ).encode()

    @classmethod
    def decode(cls, blob: bytes) -> RestoreMark:
        data = json.loads(bytes(blob))
        return cls(
            float(data["restore_time"]),
            float(data["snapshot_time"]),
            int(data.get("skip_numbers", 0)),
        )


def read_restore_mark(conn: sqlite3.Connection) -> RestoreMark | None:
    """The restore mark of a database (None if it was never restored, or has no meta)."""
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (RESTORED_KEY,)).fetchone()
    except sqlite3.OperationalError:
        return None
    return RestoreMark.decode(row[0]) if row else None
