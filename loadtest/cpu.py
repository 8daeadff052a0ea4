"""CPU seconds of a process: another one by pid (from /proc), or this one (getrusage); and
what a process has written to storage."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["disk_write_mb", "own_cpu_s", "process_cpu_s"]


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_write_mb(pid: int | str = "self") -> float:
    """MB process ``pid`` has written to storage so far (``write_bytes`` of /proc/PID/io:
    counted when the page is dirtied, so a WAL page written twice counts twice)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def own_cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
