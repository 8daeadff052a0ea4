"""The load harness itself: its report is complete and honest, with and without a fault.

These check correctness of the measurement (counts, fields, lost/duplicates), never speed:
speed is measured by `chapar loadtest` and written up in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from loadtest.harness import Params, _Pacer, _Stats, _windows, run
from tests.conftest import run_module, run_module_json

pytestmark = pytest.mark.integration

STAGES = ("submit_accepted", "submit_delivered", "submit_handover")


def test_report_has_every_field_and_accounts_for_every_letter(tmp_path: Path) -> None:
    report = asyncio.run(run(Params(letters=300, senders=2, baseline_s=0.5, batch=32), tmp_path))
    for key in (
        "letters",
        "delivered",
        "lost",
        "duplicates",
        "elapsed_s",
        "throughput_lps",
        "baseline_lps",
        "ratio",
        "latency_ms",
        "windows",
        "processes",
        "params",
        "machine",
    ):
        assert key in report, key
    assert report["letters"] == 300
    assert report["delivered"] == 300
    assert report["handed_over"] == 300
    assert (report["lost"], report["duplicates"], report["verify_failures"]) == (0, 0, 0)
    assert report["baseline_lps"] > 0
    assert report["throughput_lps"] > 0
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    for stage in STAGES:
        q = latency[stage]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"] <= q["max"], (stage, q)
    processes = report["processes"]
    assert isinstance(processes, dict)
    assert set(processes) == {"hub", "node-SENDER.A", "node-RECIPIENT.B", "loadgen"}
    assert all(p["cpu_s"] > 0 and p["peak_rss_mb"] > 10 for p in processes.values())
    for name in ("hub", "node-SENDER.A", "node-RECIPIENT.B"):  # the servers' own threads
        server = processes[name]
        assert 0 < server["db_writer_cpu_s"] < server["cpu_s"], server
        assert 0 < server["event_loop_cpu_s"] <= server["cpu_s"], server


def test_cli_run_with_a_hub_crash_loses_nothing_and_writes_json(tmp_path: Path) -> None:
    result, report = run_module_json(
        "node",
        *("loadtest", "--letters", "900", "--senders", "2", "--rate", "300"),
        *("--fault", "kill-hub@1.5s", "--baseline-seconds", "0"),
        out=tmp_path / "report.json",
        timeout=240,
    )
    assert report["letters"] == 900
    assert (report["lost"], report["duplicates"]) == (0, 0)
    assert report["params"]["faults"] == ["kill-hub@1.5s"]
    assert "throughput" in result.stdout
    assert "lost 0" in result.stdout


def test_cli_refuses_a_malformed_fault_spec() -> None:
    result = run_module("node", "loadtest", "--fault", "explode-hub@1s", timeout=60)
    assert result.returncode == 2
    assert "bad fault" in result.stderr


def test_windows_show_the_delivery_rate_of_the_sending_period_and_its_drift() -> None:
    stats = _Stats()
    # 40 s of sending: 100 letters/s in the first 10 s window falling to 50/s in the last,
    # then a drain after sending stopped, which no full window covers.
    times = [i / 100 for i in range(1000)] + [30 + i / 50 for i in range(500)] + [41.0, 42.0]
    stats.delivered = {f"L{i}": 1000.0 + t for i, t in enumerate(times)}
    windows = _windows(stats, set(stats.delivered), start=1000.0, sent_done=1040.0)
    assert windows == {
        "window_s": 10.0,
        "delivered_lps": [100.0, 0.0, 0.0, 50.0],
        "last_over_first": 0.5,
    }
    long = _windows(stats, set(stats.delivered), start=1000.0, sent_done=1130.0)
    assert long["window_s"] == 60.0
    assert long["delivered_lps"] == [25.0, 0.0]


async def test_a_late_sender_keeps_the_schedule_so_its_lateness_counts_in_latency() -> None:
    pacer = _Pacer(100.0)  # a slot every 10 ms
    first = await pacer.wait()
    await asyncio.sleep(0.05)  # the exchange held the sender back for five slots
    late = [await pacer.wait() for _ in range(5)]
    # No slot skipped: the late letters keep their due times (in the past), and go at once.
    assert late == pytest.approx([first + 0.01 * k for k in range(1, 6)])
    assert all(slot < time.perf_counter() for slot in late)
    flat_out = _Pacer(0.0)
    before = time.perf_counter()
    assert before <= await flat_out.wait() <= time.perf_counter()
