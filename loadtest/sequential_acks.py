"""How long a back-end that acknowledges one letter at a time waits for each acknowledgement.

Starts a hub and two nodes (fresh PKI, mTLS on loopback), sends ``--letters`` letters,
lets the recipient's back-end read them all, then acknowledges them one after another,
each ``await letter.ack()`` finished before the next starts, as a simple back-end does.
Reports the time each acknowledgement took (the HANDOVER evidence signed, stored and
returned by the node).

    python -m loadtest.sequential_acks --letters 300 --json docs/bench/sequential_acks.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from client_sdk import Draft, ExchangeClient, Letter, pb
from loadtest.harness import nearest_rank
from loadtest.machine import machine
from node.cluster import Cluster

__all__ = ["measure"]

A, B = "SENDER.A", "RECIPIENT.B"


async def measure(letters: int, workdir: Path) -> dict[str, object]:
    cluster = await Cluster.start(workdir, [A, B])
    try:
        async with (
            ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a,
            ExchangeClient(cluster.nodes[B].address, cluster.credentials(B)) as b,
        ):
            drafts = [Draft(to=[B], subject=f"ack {i}", body="x") for i in range(letters)]
            async for _ in a.send_stream(drafts):
                pass
            received: list[Letter] = []
            async for letter in b.inbox():
                received.append(letter)
                if len(received) == letters:
                    break
            took = []
            handed_over = 0
            for letter in received:
                start = time.perf_counter()
                evidence = await letter.ack()
                took.append(time.perf_counter() - start)
                event = pb.EvidenceContent.FromString(evidence.content).event
                handed_over += event == pb.EvidenceEvent.EVIDENCE_EVENT_HANDOVER
    finally:
        cluster.stop()
    took.sort()
    return {
        "letters": letters,
        "handed_over": handed_over,  # acknowledgements answered with HANDOVER evidence
        "ack_ms": {
            "mean": round(sum(took) / len(took) * 1000, 3),
            "p50": round(nearest_rank(took, 0.50) * 1000, 3),
            "p99": round(nearest_rank(took, 0.99) * 1000, 3),
        },
        "acks_per_s": round(len(took) / sum(took), 1),
        "machine": machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.sequential_acks", description=__doc__)
    ap.add_argument("--letters", type=int, default=300)
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args(argv)
    if not 1 <= ns.letters <= 100_000:
        ap.error("letters must be 1 to 100000")
    with tempfile.TemporaryDirectory(prefix="chapar-acks-") as tmp:
        report = asyncio.run(measure(ns.letters, Path(tmp)))
    ack = report["ack_ms"]
    assert isinstance(ack, dict)
    print(
        f"{ns.letters} acknowledgements one at a time: mean {ack['mean']} ms, p50 {ack['p50']} ms,"
        f" p99 {ack['p99']} ms ({report['acks_per_s']}/s)"
    )
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
