"""What observability costs: a JSON log line, a counter increment, a hub monitor refresh.

``python -m loadtest.observability_cost``; the figures are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from certs.pki import init_pki
from node import metrics as m
from node.monitor import HubMonitor
from node.server import configure_logging
from node.storage.hub_store import HubStore

__all__ = ["main"]


def log_and_counter_cost(n: int = 50_000) -> tuple[float, float]:
    """Microseconds per JSON log line (to /dev/null; one batch line naming 64 letters, as
    the servers write them) and per counter increment."""
    configure_logging("INFO")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    with Path("/dev/null").open("w") as sink:
        handler.setStream(sink)
        log = logging.getLogger("chapar.node")
        start = time.perf_counter()
        for i in range(n):
            log.info(
                "letters accepted",
                extra={
                    "shams": [f"000.00.00.G22/O/2026/{i * 64 + j}" for j in range(64)],
                    "request_ids": [f"r-{i}-{j}" for j in range(64)],
                    "count": 64,
                    "peer": "urn:chapar:client:000.00.00.G22:backend",
                },
            )
        per_log = (time.perf_counter() - start) / n
        handler.setStream(sys.stderr)
        logging.getLogger().setLevel(logging.WARNING)
    start = time.perf_counter()
    for _ in range(n):
        m.SUBMITTED.inc(1)
    per_inc = (time.perf_counter() - start) / n
    return per_log * 1e6, per_inc * 1e6


async def hub_refresh_cost(rows: int, cert: Path, agencies: int = 200) -> tuple[float, float]:
    """Milliseconds per hub monitor refresh with ``rows`` queued: in-memory depths as built,
    and the GROUP BY over the queue it replaced."""
    with tempfile.TemporaryDirectory() as tmp:
        return await _hub_refresh_cost(Path(tmp), rows, cert, agencies)


async def _hub_refresh_cost(
    folder: Path, rows: int, cert: Path, agencies: int
) -> tuple[float, float]:
    store = await HubStore.open(folder / "hub.db", "normal")
    await store.close()
    conn = sqlite3.connect(folder / "hub.db")
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT INTO queue (recipient, shams, enqueued_at) VALUES (?, ?, ?)",
            ((f"AG{i % agencies:04d}", f"S/{i}", now - (rows - i)) for i in range(rows)),
        )
    conn.close()
    store = await HubStore.open(folder / "hub.db", "normal")
    try:
        depths = await store.depths()
        config = SimpleNamespace(
            database=folder / "hub.db",
            tls=SimpleNamespace(cert=cert),
            signing=SimpleNamespace(cert=cert),
            metrics_interval_s=5.0,
            metrics_top_n=10,
        )
        hub = SimpleNamespace(
            config=config, store=store, connected=0, queue_depths=lambda: dict(depths)
        )
        monitor = HubMonitor(hub)  # type: ignore[arg-type]
        await monitor.refresh()
        start = time.perf_counter()
        for _ in range(5):
            await monitor.refresh()
        as_built = (time.perf_counter() - start) / 5
        start = time.perf_counter()
        for _ in range(5):
            await store.depths()
        group_by = (time.perf_counter() - start) / 5
    finally:
        await store.close()
    return as_built * 1e3, group_by * 1e3


def main() -> None:
    per_log, per_inc = log_and_counter_cost()
    print(
        f"JSON log line naming 64 letters {per_log:.1f} us ({per_log / 64:.1f} us a letter); "
        f"counter increment {per_inc:.2f} us"
    )
    with tempfile.TemporaryDirectory() as tmp:
        pki = init_pki(Path(tmp) / "pki", hub="national", agencies=["AA.BB"])
        cert = pki.agency_dir("AA.BB") / "tls.crt"
        for rows in (10_000, 100_000, 1_000_000):
            built, group_by = asyncio.run(hub_refresh_cost(rows, cert))
            print(
                f"hub monitor refresh, {rows} letters queued for 200 agencies: {built:.1f} ms "
                f"(the GROUP BY it replaced: {group_by:.1f} ms)"
            )


if __name__ == "__main__":
    main()
