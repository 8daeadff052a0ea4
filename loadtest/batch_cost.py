"""What one batch of letters costs in CPU, process by process, at a gentle pace.

The exchange's work has a part per letter and a part per frame: every hop of a batch is a
gRPC message at each end, a store transaction, a signature made or checked. Flat out,
frames carry hundreds of letters and the second part vanishes; at a few letters a second
each letter travels alone and pays it all. This tool separates the two: it starts a hub
and two nodes (fresh PKI, mTLS on loopback), submits ``--batches`` batches of each size
with ``send_many`` a pause apart (so each travels alone), lets the recipient's back-end
read and acknowledge every letter, and reports the CPU seconds each process spent per
batch. Fitting ``cost = fixed + size * per_letter`` over two sizes gives both parts.

    python -m loadtest.batch_cost --sizes 1 50 --batches 20 --json docs/bench/batch_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from client_sdk import Draft, ExchangeClient, Letter
from loadtest.cpu import own_cpu_s
from loadtest.harness import proc_stats
from loadtest.machine import machine
from node.cluster import Cluster

__all__ = ["measure"]

A, B = "SENDER.A", "RECIPIENT.B"


async def measure(
    sizes: Sequence[int], batches: int, pause_s: float, workdir: Path
) -> dict[str, object]:
    """CPU ms per batch of each size, per process (``back-ends``: this process's SDK
    clients: the sender's calls and the recipient's reading and acknowledging)."""
    cluster = await Cluster.start(workdir, [A, B])
    handed_over = 0
    try:
        async with (
            ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a,
            ExchangeClient(cluster.nodes[B].address, cluster.credentials(B)) as b,
        ):
            acks: set[asyncio.Task[None]] = set()

            async def ack(letter: Letter) -> None:
                nonlocal handed_over
                await letter.ack()
                handed_over += 1

            async def read_and_ack() -> None:
                # Acknowledged concurrently, as a back-end keeping up would: the SDK gathers
                # the acknowledgements of a frame into one call.
                async for letter in b.inbox():
                    task = asyncio.create_task(ack(letter))
                    acks.add(task)
                    task.add_done_callback(acks.discard)

            reader = asyncio.create_task(read_and_ack())
            await a.send(to=[B], subject="warm-up", body="x" * 1500)
            while handed_over < 1:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)
            servers = [cluster.hub, *cluster.nodes.values()]
            rows: list[dict[str, object]] = []
            for size in sizes:
                before = {s.name: proc_stats(s)["cpu_s"] for s in servers}
                mine = own_cpu_s()
                expected = handed_over + batches * size
                for i in range(batches):
                    drafts = [
                        Draft(to=[B], subject=f"batch {i}", body="x" * 1500) for _ in range(size)
                    ]
                    await a.send_many(drafts)
                    await asyncio.sleep(pause_s)
                deadline = time.monotonic() + 60
                while handed_over < expected and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)  # the evidence's way back to the sender
                after = {s.name: proc_stats(s)["cpu_s"] for s in servers}
                per_batch = {
                    name: round((after[name] - before[name]) / batches * 1000, 2) for name in after
                }
                per_batch["back-ends"] = round((own_cpu_s() - mine) / batches * 1000, 2)
                rows.append(
                    {
                        "size": size,
                        "batches": batches,
                        "handed_over": handed_over - (expected - batches * size),
                        "cpu_ms_per_batch": per_batch,
                        "cpu_ms_per_batch_total": round(sum(per_batch.values()), 2),
                    }
                )
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        cluster.stop()
    report: dict[str, object] = {"pause_s": pause_s, "rows": rows, "machine": machine()}
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        t0, t1 = float(first["cpu_ms_per_batch_total"]), float(last["cpu_ms_per_batch_total"])  # type: ignore[arg-type]
        s0, s1 = int(first["size"]), int(last["size"])  # type: ignore[call-overload]
        if s1 != s0:
            per_letter = (t1 - t0) / (s1 - s0)
            report["fit"] = {
                "per_letter_ms": round(per_letter, 3),
                "fixed_per_batch_ms": round(t0 - s0 * per_letter, 2),
            }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.batch_cost", description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 50])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--pause-seconds", type=float, default=0.4)
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args(argv)
    if any(s < 1 or s > 256 for s in ns.sizes) or ns.batches < 1:
        ap.error("sizes must be 1 to 256 letters and batches at least 1")
    with tempfile.TemporaryDirectory(prefix="chapar-batch-cost-") as tmp:
        report = asyncio.run(measure(ns.sizes, ns.batches, ns.pause_seconds, Path(tmp)))
    for row in report["rows"]:  # type: ignore[attr-defined]
        print(
            f"{row['size']:>4} letters a batch: {row['cpu_ms_per_batch_total']} ms of CPU a batch"
            f"  {row['cpu_ms_per_batch']}"
        )
    if "fit" in report:
        fit = report["fit"]
        print(
            f"fit: {fit['fixed_per_batch_ms']} ms a batch + {fit['per_letter_ms']} ms a letter"  # type: ignore[index]
        )
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
