"""Fault injection on a running cluster: the same hooks for tests and the load harness.

A fault is written ``ACTION-TARGET@START[:DURATION]``, times in seconds with an ``s``:

* ``kill-hub@10s``            SIGKILL the hub at 10 s and start it again at once
* ``kill-node@10s``           the same for the sending node (``node`` = the sender)
* ``stop-recipient@5s:30s``   SIGTERM the recipient's node at 5 s, start it 30 s later
* ``pause-hub@5s:3s``         SIGSTOP the hub for 3 s (a hung process, connections open)
* ``term-hub@3s``             SIGTERM and restart (a clean restart)

Targets: ``hub``, ``node`` or ``sender``, ``recipient``, or an agency code.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from node.cluster import Cluster, ServerProcess

__all__ = ["Fault", "crash", "hang", "inject", "outage", "parse_fault", "resolve"]

Action = Literal["kill", "term", "stop", "pause"]
_SPEC = re.compile(
    r"(?P<action>kill|term|stop|pause)-(?P<target>[A-Za-z0-9.\-]+)"
    r"@(?P<at>\d+(?:\.\d+)?)s(?::(?P<duration>\d+(?:\.\d+)?)s)?"
)


@dataclass(frozen=True, slots=True)
class Fault:
    action: Action
    target: str
    at_s: float
    duration_s: float = 0.0

    def __str__(self) -> str:
        tail = f":{self.duration_s:g}s" if self.duration_s else ""
        return f"{self.action}-{self.target}@{self.at_s:g}s{tail}"


def parse_fault(spec: str) -> Fault:
    """Parses ``kill-hub@10s`` and friends; raises ValueError with the expected form."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise ValueError(f"bad fault {spec!r}: expected ACTION-TARGET@Ns[:Ms], e.g. kill-hub@10s")
    action: Action = match["action"]  # type: ignore[assignment]
    duration = float(match["duration"] or 0)
    if action in ("stop", "pause") and duration <= 0:
        raise ValueError(f"bad fault {spec!r}: {action} needs a duration, e.g. {action}-hub@5s:10s")
    return Fault(action, match["target"], float(match["at"]), duration)


def resolve(cluster: Cluster, target: str, *, sender: str, recipient: str) -> ServerProcess:
    """The process a fault target names."""
    if target == "hub":
        return cluster.hub
    code = {"node": sender, "sender": sender, "recipient": recipient}.get(target, target)
    try:
        return cluster.nodes[code]
    except KeyError:
        raise ValueError(f"no node {code!r} in this cluster") from None


async def crash(proc: ServerProcess, downtime_s: float = 0.0) -> None:
    """SIGKILL (no chance to clean up), then start again after ``downtime_s``."""
    proc.kill()
    await asyncio.sleep(downtime_s)
    proc.start()
    await proc.wait_ready()


async def outage(proc: ServerProcess, downtime_s: float) -> None:
    """SIGTERM (a clean stop), then start again after ``downtime_s``."""
    await asyncio.to_thread(proc.terminate)
    await asyncio.sleep(downtime_s)
    proc.start()
    await proc.wait_ready()


async def hang(proc: ServerProcess, seconds: float) -> None:
    """SIGSTOP for ``seconds``, then SIGCONT: a process that hangs with its sockets open."""
    proc.pause()
    try:
        await asyncio.sleep(seconds)
    finally:
        proc.resume()


async def inject(
    cluster: Cluster,
    fault: Fault,
    *,
    sender: str,
    recipient: str,
    before_end: Callable[[ServerProcess], Awaitable[None]] | None = None,
) -> None:
    """Waits until ``fault.at_s`` (from now), then applies it. ``before_end`` is awaited
    with the process just before a fault ends it (kill, term, stop; not pause), so that a
    caller can read what only a running process tells (its metrics). What the life used
    in all, its stop after SIGTERM included, is known once the fault has reaped it: the
    ended ``ReapedPopen``'s ``rusage``."""
    proc = resolve(cluster, fault.target, sender=sender, recipient=recipient)
    await asyncio.sleep(fault.at_s)
    if before_end is not None and fault.action != "pause":
        await before_end(proc)
    if fault.action == "kill":
        await crash(proc, fault.duration_s)
    elif fault.action in ("stop", "term"):
        await outage(proc, fault.duration_s)
    else:
        await hang(proc, fault.duration_s)
