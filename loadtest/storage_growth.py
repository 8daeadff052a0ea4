"""Storage growth under steady traffic, with and without retention.

Runs rounds of letters A -> B through a real hub and nodes (B's back-end acknowledges
every letter), and after each round records the on-disk size of every database. With
``retention_s = 0`` bodies and envelopes are dropped as soon as letters are finished, so
what remains per letter is its number, header, signature and evidence (the legal record).

    python -m loadtest.storage_growth --rounds 5 --letters 2000 --json storage.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from client_sdk import Draft, ExchangeClient, Receipt
from loadtest.machine import machine
from node.cluster import Cluster

__all__ = ["measure"]

A, B = "SENDER.A", "RECIPIENT.B"


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.db*"))


def _count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def _acknowledge(cluster: Cluster) -> None:
    async with ExchangeClient(cluster.nodes[B].address, cluster.credentials(B)) as b:
        async for letter in b.inbox():
            await letter.ack()


async def _round(cluster: Cluster, letters: int, body: str, expect_purged: bool, sent: int) -> None:
    async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
        drafts = [Draft(to=[B], subject=f"steady {i}", body=body) for i in range(letters)]
        for start in range(0, letters, 200):
            results = await a.send_many(drafts[start : start + 200])
            assert all(isinstance(r, Receipt) for r in results)
    total = sent + letters
    node_a = cluster.root / f"node-{A}" / "node.db"
    deadline = time.monotonic() + 300
    while True:
        done = _count(node_a, "SELECT count(*) FROM evidence WHERE event = 8") == total
        if done and expect_purged:
            done = (
                _count(node_a, "SELECT count(*) FROM outbox WHERE purged = 0") == 0
                and _count(
                    cluster.root / "hub" / "hub.db", "SELECT count(*) FROM letters WHERE purged = 0"
                )
                == 0
            )
        if done:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("round did not finish")
        await asyncio.sleep(0.5)


async def measure(rounds: int, letters: int, body_bytes: int, retention: bool) -> dict[str, object]:
    settings = "retention_s = 0\npurge_interval_s = 0.5" if retention else ""
    body = "x" * body_bytes
    with tempfile.TemporaryDirectory() as tmp:
        cluster = await Cluster.start(
            Path(tmp), [A, B], hub_settings=settings, node_settings=settings
        )
        backend = asyncio.create_task(_acknowledge(cluster))
        samples = []
        try:
            for r in range(rounds):
                await _round(cluster, letters, body, retention, r * letters)
                samples.append(
                    {
                        "letters": (r + 1) * letters,
                        "hub_bytes": _size(cluster.root / "hub"),
                        "sender_bytes": _size(cluster.root / f"node-{A}"),
                        "recipient_bytes": _size(cluster.root / f"node-{B}"),
                    }
                )
        finally:
            backend.cancel()
            cluster.stop()
    first, last = samples[0], samples[-1]
    added = (
        int(last["letters"]) - int(first["letters"]) if len(samples) > 1 else int(first["letters"])
    )
    per_letter = (
        {
            role: round((int(last[f"{role}_bytes"]) - int(first[f"{role}_bytes"])) / added, 1)
            for role in ("hub", "sender", "recipient")
        }
        if len(samples) > 1
        else {}
    )
    return {
        "retention": retention,
        "body_bytes": body_bytes,
        "samples": samples,
        "bytes_per_letter_after_first_round": per_letter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--letters", type=int, default=2000)
    parser.add_argument("--body-bytes", type=int, default=1500)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    result = {
        "machine": machine(),
        "with_retention": asyncio.run(measure(ns.rounds, ns.letters, ns.body_bytes, True)),
        "without_retention": asyncio.run(measure(ns.rounds, ns.letters, ns.body_bytes, False)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if ns.json:
        ns.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
