"""Reading a server's configuration file again while it runs: what the hub and the node share.

Each role checks its file's modification time every ``reload_interval_s`` (a repeating
task, node.tasks.every) and reads it again when it changed. A file that does not load (a
ConfigError, a certificate that does not parse, an unreadable file) is refused whole: one
error logged, and the configuration running stays. Of a file that loads, the keys only a
restart can apply (what the server read once at start: its addresses, database, TLS and
signing files, ...) keep their running values (``RestartOnly.kept``), and one warning names
each of them that the file changed (``RestartOnly.warn``); every other key is the role's to
apply, at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from node.config import ConfigError

__all__ = ["NOT_LOADED", "RestartOnly", "modification_times"]

C = TypeVar("C")

# What reading a configuration again may raise for a file that does not load: ConfigError
# (a ValueError) names the key; an OSError is a file that cannot be read.
NOT_LOADED = (ConfigError, OSError, ValueError)


def modification_times(*paths: Path | None) -> tuple[float, ...]:
    """The files' modification times (0 for no file, -1 for one missing): a reload reads
    the configuration again when they differ from the last reload's."""
    stamps = []
    for path in paths:
        try:
            stamps.append(path.stat().st_mtime if path is not None else 0.0)
        except FileNotFoundError:
            stamps.append(-1.0)
    return tuple(stamps)


class RestartOnly:
    """The keys of a role's configuration that take effect at a restart, not a reload:
    the configuration's field -> the key's name in the file (``hub.listen``; a field that
    is a table of its own, ``tls``, stands for each of its keys: ``tls.cert``)."""

    def __init__(self, keys: Mapping[str, str], log: logging.Logger) -> None:
        self.keys = dict(keys)
        self._log = log

    def named(self, config: Any) -> dict[str, object]:
        """The restart-only keys of ``config`` by their names in the file, in order."""
        named: dict[str, object] = {}
        for name, key in self.keys.items():
            value = getattr(config, name)
            if dataclasses.is_dataclass(value):  # [tls], [signing]: each file key by itself
                for f in dataclasses.fields(value):
                    named[f"{key}.{f.name}"] = getattr(value, f.name)
            else:
                named[key] = value
        return named

    def kept(self, read: C, running: C) -> C:
        """``read`` (the file as reloaded) with the restart-only keys at their running
        values: what is in force after the reload."""
        kept = {f: getattr(running, f) for f in self.keys}
        return dataclasses.replace(read, **kept)  # type: ignore[type-var]

    def warn(self, read: object, running: object) -> None:
        """One warning naming each restart-only key of ``read`` that differs from the value
        running; said at every reload until the restart, so an edit is never taken in
        silence."""
        now = self.named(running)
        changed = [key for key, value in self.named(read).items() if value != now[key]]
        if changed:
            self._log.warning(
                "configuration reloaded, but %s changed and %s effect only at a restart;"
                " the running %s until then",
                ", ".join(changed),
                "takes" if len(changed) == 1 else "take",
                "value stays" if len(changed) == 1 else "values stay",
            )
