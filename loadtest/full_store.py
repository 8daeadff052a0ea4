"""Does a run cost more once the databases are full? The same paced run on fresh servers
and on the same servers after a flat-out fill.

Each round starts a hub and two nodes (real processes, mTLS on loopback), drives them as
running targets (``chapar loadtest --targets``): a paced run on the fresh databases, a
flat-out fill, then the same paced run again. A round's two paced runs share servers,
settings and hour; only what the databases hold differs. Prints one line a run and
writes every report.

    python -m loadtest.full_store --rounds 2 --seconds 60 --fill-seconds 150 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from loadtest.harness import Params, run
from loadtest.targets import Endpoint, Targets
from node.cluster import Cluster

__all__ = ["round_of_runs"]

A, B = "SENDER.A", "RECIPIENT.B"


async def round_of_runs(
    workdir: Path, *, seconds: float, fill_seconds: float, rate: float, shared: bool
) -> dict[str, dict[str, object]]:
    """One round on one cluster: ``fresh``, ``fill`` and ``full``, their reports."""
    cluster = await Cluster.start(workdir / "servers", [A, B])
    try:
        targets = Targets(
            tuple(
                Endpoint(
                    c, cluster.nodes[c].address, cluster.credentials(c), cluster.nodes[c].metrics
                )
                for c in (A, B)
            ),
            hub_metrics=cluster.hub.metrics,
        )
        paced = Params(duration_s=seconds, rate=rate, shared=shared, baseline_s=0.0)
        fill = Params(duration_s=fill_seconds, shared=shared, baseline_s=0.0)
        reports: dict[str, dict[str, object]] = {}
        for name, params in (("fresh", paced), ("fill", fill), ("full", paced)):
            reports[name] = await run(params, workdir, targets)
            _line(name, reports[name])
        return reports
    finally:
        cluster.stop()


def _line(name: str, report: dict[str, object]) -> None:
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    delivered = latency["submit_delivered"]
    print(
        f"{name:6s} letters {report['letters']:>7}  lost {report['lost']}"
        f"  {report['throughput_lps']:>7} letters/s  {report['cpu_ms_per_letter']} ms CPU a letter"
        f"  p50 {delivered['p50']} ms  p99 {delivered['p99']} ms",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60.0, help="each paced run")
    ap.add_argument("--fill-seconds", type=float, default=150.0, help="the flat-out fill")
    ap.add_argument("--rate", type=float, default=1000.0, help="the paced runs' letters/s")
    ap.add_argument("--four-streams", action="store_true", help="instead of --shared")
    ap.add_argument("--out", type=Path, required=True, help="a folder for the reports")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    for i in range(ns.rounds):
        with tempfile.TemporaryDirectory(prefix="chapar-full-") as tmp:
            reports = asyncio.run(
                round_of_runs(
                    Path(tmp),
                    seconds=ns.seconds,
                    fill_seconds=ns.fill_seconds,
                    rate=ns.rate,
                    shared=not ns.four_streams,
                )
            )
        for name, report in reports.items():
            (ns.out / f"round{i + 1}_{name}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
