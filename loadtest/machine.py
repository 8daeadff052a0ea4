"""What a report was measured on: the machine, and the versions of what does the work.

Figures from two rounds compare only when these match: a new grpcio, protobuf or
cryptography release can move the cost of a letter as much as any change of ours.
"""

from __future__ import annotations

import os
import platform
import sqlite3
from importlib import metadata

__all__ = ["machine"]

_PACKAGES = ("grpcio", "protobuf", "cryptography", "aiosqlite", "prometheus-client")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def machine() -> dict[str, object]:
    """CPU count, Python, platform, SQLite and the letter path's package versions."""
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "packages": {p: _version(p) for p in _PACKAGES},
    }
