"""What one raw gRPC stream message costs in CPU at each pace, with nothing of ours in it.

The exchange's CPU a letter doubles from flat out to an offered 1,000 letters a second.
This tool shows how much of that is gRPC's own: it runs the harness's raw baseline (a
``grpc.aio`` mTLS stream between two processes, one envelope-sized message a write, no
signing, no storage) paced at each ``--rates`` (0: flat out) and reports the CPU of both
processes a message. A message that comes alone wakes every thread on its way; one in a
busy stream shares those wake-ups with its neighbours.

    python -m loadtest.message_cost --rates 40 160 640 2560 0 --json docs/bench/message_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from certs.pki import init_pki
from loadtest.baseline import measure_between
from loadtest.machine import machine

__all__ = ["measure"]

_PAIR = ("SENDER.A", "RECIPIENT.B")


async def measure(
    rates: Sequence[float], seconds: float, payload_bytes: int, workdir: Path
) -> dict[str, object]:
    """A row a rate: messages, lps, cpu_us_per_message (both processes)."""
    pki = await asyncio.to_thread(init_pki, workdir / "pki", hub="national", agencies=list(_PAIR))
    rows = []
    for rate in rates:
        got = await measure_between(
            pki, _PAIR, b"x" * payload_bytes, seconds=seconds, workdir=workdir, rate=rate
        )
        rows.append(
            {
                "rate": rate,
                "messages": int(got["messages"]),
                "lps": round(got["lps"], 1),
                "cpu_us_per_message": round(got["cpu_ms_per_message"] * 1000, 1),
            }
        )
    return {"payload_bytes": payload_bytes, "seconds": seconds, "rows": rows, "machine": machine()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.message_cost", description=__doc__)
    ap.add_argument("--rates", type=float, nargs="+", default=[40, 160, 640, 2560, 0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bytes", type=int, default=2000, help="message size (an envelope: 2000)")
    ap.add_argument("--json", type=Path)
    ns = ap.parse_args(argv)
    if any(r < 0 for r in ns.rates) or ns.seconds <= 0 or ns.bytes < 1:
        ap.error("rates must be 0 (flat out) or more, seconds and bytes positive")
    with tempfile.TemporaryDirectory(prefix="chapar-message-cost-") as tmp:
        report = asyncio.run(measure(ns.rates, ns.seconds, ns.bytes, Path(tmp)))
    for row in report["rows"]:  # type: ignore[attr-defined]
        pace = f"{row['rate']:.0f}/s" if row["rate"] else "flat out"
        print(
            f"{pace:>9}: {row['lps']:>9} messages/s  {row['cpu_us_per_message']:>7} us of CPU"
            " a message (both processes)"
        )
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
