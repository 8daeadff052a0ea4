"""Two versions of Chapar on one machine, in alternating load tests: which costs less CPU.

A shared machine changes speed from one minute to the next (docs/BENCHMARKS.md, thirteenth
round), so two load tests an hour apart compare the hours, not the versions. This runs
``chapar loadtest`` with the same arguments from two source trees in turn, each run from its
own tree (``PYTHONPATH``): A then B in the first pair, B then A in the second, and so on, so
that a machine speeding up or slowing down over the session favours neither. It reports
each run's CPU a letter, per process and in all, and B over A per pair.

With ``--relative-to PROCESS`` it also divides each process's CPU a letter by that
process's in the same run. A process the change does not touch then stands for the
machine's speed during the run, and the ratios survive what the machine did (the
fourteenth round measured acknowledgements on a stream this way, relative to the hub:
5 % less at the recipient node, which the raw figures hid).

    python -m loadtest.compare --a ../chapar-old --b . --pairs 3 --relative-to hub \\
        --json /tmp/compare.json -- --duration 60 --rate 1000 --shared --baseline-seconds 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loadtest.machine import machine

__all__ = ["compare", "order", "summary_of"]


def order(pairs: int) -> list[str]:
    """The sides in running order: A B, B A, A B, ..."""
    out: list[str] = []
    for i in range(pairs):
        out.extend(("A", "B") if i % 2 == 0 else ("B", "A"))
    return out


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a comparison needs of one ``chapar loadtest`` report."""
    delivered = int(report["delivered"])
    latency = report["latency_ms"]["submit_delivered"]
    return {
        "delivered": delivered,
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "handed_over": report.get("handed_over"),
        "throughput_lps": report["throughput_lps"],
        "cpu_ms_per_letter": report["cpu_ms_per_letter"],
        "cpu_us_per_letter": {
            name: round(p["cpu_s"] / delivered * 1e6, 1) if delivered else None
            for name, p in report["processes"].items()
        },
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "reference_cpu_ms": report.get("reference_cpu_ms"),
    }


def compare(
    runs: Sequence[tuple[str, Mapping[str, Any]]], relative_to: str | None = None
) -> dict[str, Any]:
    """B over A, per pair and over the pairs (mean, min, max), from run summaries in
    running order (each pair one A and one B, in either order).

    ``ratios``: all processes' CPU a letter and each process's; ``relative``, with
    ``relative_to``: each process's CPU a letter divided by that process's, B over A.
    """
    if len(runs) % 2:
        raise ValueError("runs come in pairs")
    ratios: dict[str, list[float]] = {}
    relative: dict[str, list[float]] = {}
    for i in range(0, len(runs), 2):
        pair = dict(runs[i : i + 2])
        if set(pair) != {"A", "B"}:
            raise ValueError(f"pair {i // 2 + 1} is not one A and one B")
        a, b = pair["A"], pair["B"]
        ratios.setdefault("all processes", []).append(
            b["cpu_ms_per_letter"] / a["cpu_ms_per_letter"]
        )
        for name, a_us in a["cpu_us_per_letter"].items():
            b_us = b["cpu_us_per_letter"].get(name)
            if a_us and b_us:
                ratios.setdefault(name, []).append(b_us / a_us)
        if relative_to is None:
            continue
        a_ref = a["cpu_us_per_letter"].get(relative_to)
        b_ref = b["cpu_us_per_letter"].get(relative_to)
        if not a_ref or not b_ref:
            raise ValueError(f"no process {relative_to!r} in pair {i // 2 + 1}")
        for name, a_us in a["cpu_us_per_letter"].items():
            b_us = b["cpu_us_per_letter"].get(name)
            if name != relative_to and a_us and b_us:
                relative.setdefault(name, []).append((b_us / b_ref) / (a_us / a_ref))
    out: dict[str, Any] = {"ratios": _spread(ratios)}
    if relative_to is not None:
        out["relative_to"] = relative_to
        out["relative"] = _spread(relative)
    return out


def _spread(values: Mapping[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "mean": round(statistics.fmean(v), 4),
            "min": round(min(v), 4),
            "max": round(max(v), 4),
            "pairs": [round(x, 4) for x in v],
        }
        for name, v in values.items()
    }


def _run(tree: Path, args: Sequence[str], out: Path, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run(
        [sys.executable, "-m", "node", "loadtest", *args, "--json", str(out)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if not out.exists():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"the load test from {tree} exited {result.returncode}:\n{tail}")
    report: dict[str, Any] = json.loads(out.read_text())
    report["exit_code"] = result.returncode
    return report


def _line(side: str, s: Mapping[str, Any]) -> str:
    per = "  ".join(f"{name} {us:.0f}" for name, us in s["cpu_us_per_letter"].items())
    return (
        f"  {side}  cpu {s['cpu_ms_per_letter']:.3f} ms a letter  p50 {s['p50_ms']:.1f}"
        f"  p99 {s['p99_ms']:.1f} ms  lost {s['lost']}  us a letter: {per}"
    )


def _print_spread(title: str, spread: Mapping[str, Mapping[str, Any]]) -> None:
    print(title)
    for name, v in spread.items():
        pairs = ", ".join(f"{x:.3f}" for x in v["pairs"])
        print(f"  {name:<20} {v['mean']:.3f}  ({pairs})")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--a", type=Path, required=True, help="source tree of version A")
    ap.add_argument("--b", type=Path, required=True, help="source tree of version B")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--relative-to", help="a process of the report, e.g. hub")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a run may take")
    ap.add_argument("--json", type=Path)
    ap.epilog = "After --: the options of chapar loadtest, the same for both trees."
    given = list(sys.argv[1:] if argv is None else argv)
    split = given.index("--") if "--" in given else len(given)
    ns = ap.parse_args(given[:split])
    args = given[split + 1 :]
    if not 1 <= ns.pairs <= 50:
        ap.error("pairs must be 1 to 50")
    trees = {"A": ns.a.resolve(), "B": ns.b.resolve()}
    for side, tree in trees.items():
        if not (tree / "node" / "__main__.py").is_file():
            ap.error(f"--{side.lower()} {tree} is not a Chapar source tree (no node/__main__.py)")
    if "--json" in args:
        ap.error("give --json before --: each run's report is kept in the comparison's")
    runs: list[tuple[str, dict[str, Any]]] = []
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chapar-compare-") as tmp:
        for n, side in enumerate(order(ns.pairs)):
            if n % 2 == 0:
                print(f"pair {n // 2 + 1}", flush=True)
            try:
                report = _run(trees[side], args, Path(tmp) / f"{n}.json", ns.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            summary = summary_of(report)
            names = summary["cpu_us_per_letter"]
            if ns.relative_to and ns.relative_to not in names:  # known after the first run
                print(
                    f"error: no process {ns.relative_to!r} in the report: {', '.join(names)}",
                    file=sys.stderr,
                )
                return 2
            runs.append((side, summary))
            reports.append({"side": side, "summary": summary, "report": report})
            print(_line(side, summary), flush=True)
    try:
        result = compare(runs, ns.relative_to)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_spread(f"B over A, mean of {ns.pairs} pair(s) (each pair):", result["ratios"])
    if ns.relative_to:
        _print_spread(f"relative to {ns.relative_to}, B over A:", result["relative"])
    if ns.json:
        full = {
            "a": str(trees["A"]),
            "b": str(trees["B"]),
            "loadtest_args": args,
            **result,
            "runs": reports,
            "machine": machine(),
        }
        ns.json.write_text(json.dumps(full, indent=2) + "\n")
    failed = [r for r in reports if r["report"]["exit_code"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
