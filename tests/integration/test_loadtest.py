"""The load harness itself: its report is complete and honest, with and without a fault.

These check correctness of the measurement (counts, fields, lost/duplicates), never speed:
speed is measured by `chapar loadtest` and written up in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from certs.pki import load_certs
from client_sdk import ExchangeClient
from loadtest.cpu import process_cpu_s
from loadtest.harness import (
    A,
    B,
    Params,
    _Pacer,
    _Probe,
    _progress_line,
    _Stats,
    _summary,
    _windows,
    run,
)
from node.cluster import Cluster, ServerProcess
from node.status import fetch
from tests.conftest import run_module, run_module_json

pytestmark = pytest.mark.integration

STAGES = ("submit_accepted", "submit_delivered", "submit_handover")


def test_report_has_every_field_and_accounts_for_every_letter(tmp_path: Path) -> None:
    report = asyncio.run(
        run(Params(letters=300, senders=2, rate=1000, baseline_s=0.5, batch=32), tmp_path)
    )
    for key in (
        "letters",
        "delivered",
        "lost",
        "duplicates",
        "numbered_twice",
        "after_drain",
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
    assert report["numbered_twice"] == 0
    assert report["baseline_lps"] > 0
    # The raw stream flat out and paced at the run's rate, where a message costs more CPU;
    # a letter (signed, stored, relayed, evidenced) costs more than one raw message.
    baseline = report["baseline"]
    assert baseline["cpu_ms_per_message"] > 0
    assert baseline["paced_cpu_ms_per_message"] > baseline["cpu_ms_per_message"]
    assert report["letter_in_messages"] > 1
    # What the figures were measured with: a new grpcio or cryptography moves them too.
    packages = report["machine"]["packages"]
    assert all(packages[p] not in ("", "absent") for p in ("grpcio", "protobuf", "cryptography"))
    assert report["throughput_lps"] > 0
    # The machine's speed during the run: the reference loop ran beside it.
    assert 0 < report["reference_cpu_ms"] < 1000
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    for stage in STAGES:
        q = latency[stage]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"] <= q["max"], (stage, q)
    processes = report["processes"]
    assert isinstance(processes, dict)
    assert set(processes) == {"hub", "node-SENDER.A", "node-RECIPIENT.B", "loadgen"}
    assert all(p["cpu_s"] > 0 and p["peak_rss_mb"] > 10 for p in processes.values())
    cpu_ms = sum(p["cpu_s"] for p in processes.values()) / 300 * 1000
    assert report["cpu_ms_per_letter"] == pytest.approx(cpu_ms, abs=0.01)
    for name in ("hub", "node-SENDER.A", "node-RECIPIENT.B"):  # the servers' own threads
        server = processes[name]
        assert 0 < server["db_writer_cpu_s"] < server["cpu_s"], server
        assert 0 < server["event_loop_cpu_s"] <= server["cpu_s"], server
        # Every server stored the letters (the WAL's pages and its checkpoints): at least a
        # body's 1.5 KB a letter, and what they wrote adds up to the report's figure.
        assert server["disk_write_mb"] > 300 * 1.5 / 1024, server
    written = sum(
        processes[n]["disk_write_mb"] for n in ("hub", "node-SENDER.A", "node-RECIPIENT.B")
    )
    assert report["disk_kb_per_letter"] == pytest.approx(written * 1024 / 300, abs=0.1)
    assert "disk writes" in _summary(report)


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


@pytest.mark.parametrize(
    ("fault", "shape", "killed"),
    [
        # Three senders on one SharedStream: the sending node dies under it, every letter on
        # the broken stream is sent again on a new one (same request id), none lost or doubled.
        ("kill-node@1.5s", ("--senders", "3", "--shared"), "node-SENDER.A"),
        # The recipient's node dies under its back-end: letters read but not yet acknowledged
        # come again on the reconnected inbox and are acknowledged there. Before, an ack
        # through the closed client raised grpc's own UsageError and was dropped, the letter
        # streamed again was taken for one already seen, and the run waited out its drain.
        ("kill-recipient@1.5s", ("--senders", "2"), "node-RECIPIENT.B"),
    ],
    ids=["sending-node", "recipient-node"],
)
def test_a_node_killed_under_the_load_loses_nothing_and_every_letter_is_handed_over(
    tmp_path: Path, fault: str, shape: tuple[str, ...], killed: str
) -> None:
    result, report = run_module_json(
        "node",
        *("loadtest", "--letters", "900", *shape, "--rate", "300"),
        *("--fault", fault, "--baseline-seconds", "0"),
        out=tmp_path / "report.json",
        timeout=240,
    )
    assert report["params"]["shared"] is ("--shared" in shape)
    assert report["letters"] == 900
    assert (report["delivered"], report["handed_over"]) == (900, 900)
    assert (report["lost"], report["duplicates"], report["refused"]) == (0, 0, 0)
    assert report["verify_failures"] == 0
    assert "lost 0" in result.stdout
    # Its CPU and memory are of both lives (test_a_probe_counts_every_life_... below).
    assert report["processes"][killed]["restarts"] == 1
    assert "2 lives" in result.stdout


def test_a_probe_counts_every_life_of_a_process_a_fault_restarted() -> None:
    # A fault that restarts a server used to leave only the last life's CPU in the report
    # (a chaos run of 300,000 letters showed 0.52 ms a letter instead of about 1.5).
    burn = (
        "import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\ntime.sleep(60)"
    )
    server = SimpleNamespace(proc=None, metrics="")
    probe = _Probe(cast(ServerProcess, server))
    for life in range(2):
        server.proc = subprocess.Popen([sys.executable, "-c", burn])
        try:
            deadline = time.monotonic() + 30
            while process_cpu_s(server.proc.pid) < 0.3 and time.monotonic() < deadline:
                time.sleep(0.05)
            if life == 0:
                asyncio.run(probe.bank())
            else:
                figures = probe.end()
        finally:
            server.proc.kill()
            server.proc.wait()
    assert figures["restarts"] == 1
    assert figures["cpu_s"] >= 0.6
    assert figures["peak_rss_mb"] > 1


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
    # Each letter took 20 ms, but those sent in the third window took 500 ms.
    stats.sent_at = {
        s: t - (0.5 if 1020.0 <= t - 0.5 < 1030.0 else 0.02) for s, t in stats.delivered.items()
    }
    # The reference loop took 1 ms a second, 2 ms in the third window, and was not heard
    # from in the last; samples before the start and after sending count in no window.
    reference = [(1000.0 + t + 0.5, 2.0 if 20 <= t < 30 else 1.0) for t in range(-5, 30)]
    reference += [(1045.0, 9.0)]
    windows = _windows(stats, set(stats.delivered), 1000.0, 1040.0, reference)
    assert windows == {
        "window_s": 10.0,
        "delivered_lps": [100.0, 0.0, 0.0, 50.0],
        "last_over_first": 0.5,
        "submit_delivered_p99_ms": [20.0, 0.0, 500.0, 20.0],
        "reference_cpu_ms": [1.0, 1.0, 2.0, None],
    }
    long = _windows(stats, set(stats.delivered), 1000.0, 1130.0, [])
    assert long["window_s"] == 60.0
    assert long["delivered_lps"] == [25.0, 0.0]


def test_the_progress_bar_shows_the_run_done_then_the_drain() -> None:
    stats = _Stats()
    stats.accepted = {f"L{i}": 0.0 for i in range(400)}
    stats.delivered = dict.fromkeys(list(stats.accepted)[:300], 0.0)
    stats.handed_over = dict.fromkeys(list(stats.accepted)[:100], 0.0)
    # A 60 s run 15 s in: a quarter of its time; 400 of 1,000 letters: 40 %.
    timed = _progress_line(stats, 15.0, Params(duration_s=60.0), sending=True)
    assert timed.startswith("[#####---------------]  25% sending ")
    counted = _progress_line(stats, 15.0, Params(letters=1000), sending=True)
    assert counted.startswith("[########------------]  40% sending ")
    # Sending over: the bar follows the accepted letters handed over, 100 of 400.
    draining = _progress_line(stats, 61.0, Params(duration_s=60.0), sending=False)
    assert draining.startswith("[#####---------------]  25% draining")
    assert "accepted      400  delivered      300  handed over      100" in draining


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


def test_more_nodes_form_a_chain_and_every_hop_is_checked(tmp_path: Path) -> None:
    params = Params(letters=300, senders=2, nodes=3, baseline_s=0.3, batch=32, signing="ecdsa-p256")
    report = asyncio.run(run(params, tmp_path))
    # The run's PKI signed with P-256 (--signing), and every letter still verified.
    signing = load_certs(tmp_path / "pki" / "agencies" / "AGENCY.A" / "signing.crt")[0]
    assert isinstance(signing.public_key(), ec.EllipticCurvePublicKey)
    assert report["verify_failures"] == 0
    # Two senders over the two sending nodes: A's letters go to B, B's to C.
    assert report["routes"] == [
        {"from": "AGENCY.A", "to": "AGENCY.B", "letters": 150, "delivered": 150},
        {"from": "AGENCY.B", "to": "AGENCY.C", "letters": 150, "delivered": 150},
    ]
    assert (report["lost"], report["duplicates"], report["misrouted"]) == (0, 0, 0)
    assert report["handed_over"] == 300
    assert report["baseline_lps"] > 0
    processes = report["processes"]
    assert isinstance(processes, dict)
    assert set(processes) == {"hub", "node-AGENCY.A", "node-AGENCY.B", "node-AGENCY.C", "loadgen"}


async def _run_on_targets(
    targets: Path, letters: int, baseline_s: float, out: Path
) -> dict[str, Any]:
    """``chapar loadtest --targets`` with two senders, as a user runs it; its report."""
    _, report = await asyncio.to_thread(
        run_module_json,
        "node",
        *("loadtest", "--targets", str(targets), "--letters", str(letters), "--senders", "2"),
        *("--baseline-seconds", str(baseline_s)),
        out=out,
    )
    return report


async def test_targets_drive_running_servers_and_leave_other_agencies_letters_alone(
    tmp_path: Path,
) -> None:
    other = "OTHER.C"
    cluster = await Cluster.start(tmp_path / "servers", [A, B, other])
    try:
        async with ExchangeClient(
            cluster.nodes[other].address, cluster.credentials(other)
        ) as client:
            theirs = await client.send(to=[B], subject="not the harness's", body="keep me")
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as client:
            await client.send(to=[B], subject="left by an earlier run", body="x")
        entries = "".join(
            f'''
[[nodes]]
agency = "{code}"
address = "{cluster.nodes[code].address}"
cert = "agencies/{code}/client.crt"
key = "agencies/{code}/client.key"
metrics = "{cluster.nodes[code].metrics}"
'''
            for code in (A, B)
        )
        targets = cluster.pki.root / "targets.toml"
        targets.write_text(f'ca = "ca/root.crt"\nhub_metrics = "{cluster.hub.metrics}"\n{entries}')
        report = await _run_on_targets(targets, 200, 0.3, tmp_path / "report.json")
        assert report["letters"] == report["delivered"] == report["handed_over"] == 200
        assert (report["lost"], report["duplicates"], report["misrouted"]) == (0, 0, 0)
        assert report["foreign"] == 1
        assert report["baseline_lps"] > 0
        assert report["params"]["targets"] == str(targets)
        # The letters went through these servers, not servers of the harness's own: the
        # hub relayed the harness's 200, the earlier run's and the other agency's one.
        relayed = fetch(cluster.hub.metrics).value(
            "chapar_letters_total", stage="relay", outcome="accepted"
        )
        assert relayed == 202
        # Their CPU over the run and their memory, read from their metrics.
        processes = report["processes"]
        assert set(processes) == {"hub", f"node-{A}", f"node-{B}", "loadgen"}
        for name in ("hub", f"node-{A}", f"node-{B}"):
            server = processes[name]
            assert 0 < server["db_writer_cpu_s"] < server["cpu_s"], server
            assert 10 < server["rss_mb"] <= server["peak_rss_mb"], server
        assert report["disk_kb_per_letter"] is None  # no /proc of their own to read
        # The earlier run's letter was acknowledged (it is A's, a driven agency) but not
        # counted; the other agency's letter was counted and left for B's own back-end.
        async with ExchangeClient(cluster.nodes[B].address, cluster.credentials(B)) as client:
            inbox = aiter(client.inbox())
            first = await asyncio.wait_for(anext(inbox), 10)
            with pytest.raises(TimeoutError):  # nothing else is left unacknowledged
                await asyncio.wait_for(anext(inbox), 1.0)
        assert first.shams == theirs.shams
        # A second run on the same servers sends new letters: its request ids are its own,
        # so the nodes do not answer them with the first run's receipts.
        again = await _run_on_targets(targets, 100, 0, tmp_path / "again.json")
        assert again["letters"] == again["delivered"] == again["handed_over"] == 100
        assert (again["lost"], again["duplicates"], again["refused"]) == (0, 0, 0)
    finally:
        cluster.stop()


def test_cli_refuses_an_unusable_targets_file_with_a_clear_error(tmp_path: Path) -> None:
    single = tmp_path / "one.toml"
    single.write_text('ca = "ca.crt"\n[[nodes]]\nagency = "SENDER.A"\naddress = "127.0.0.1:1"\n')
    for args, message in (
        (("--targets", str(single)), "at least two [[nodes]]"),
        (("--targets", str(tmp_path / "missing.toml")), "no such configuration file"),
        (("--targets", str(single), "--fault", "kill-hub@1s"), "needs the harness's own"),
        (("--nodes", "30"), "2 to 26 nodes"),
        (("--nodes", "4", "--senders", "2"), "at least 3 senders"),
        (("--linger-ms", "-1"), "--linger-ms must be 0 to 1000"),
    ):
        result = run_module("node", "loadtest", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_run_refuses_an_unknown_signing_algorithm_before_starting_servers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="signing must be ed25519 or ecdsa-p256"):
        asyncio.run(run(Params(letters=10, signing="rsa"), tmp_path))
    assert not (tmp_path / "pki").exists()  # refused before any PKI or server


def test_a_closed_standard_output_loses_no_report(tmp_path: Path) -> None:
    # The summary was printed before the report was written: with its reader gone (a run
    # piped into `head`, a terminal closed), the print raised, the run's minutes of figures
    # were not written, and a traceback ended it.
    out = tmp_path / "report.json"
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the summary comes
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "node", "loadtest", "--letters", "40"),
                *("--senders", "1", "--baseline-seconds", "0", "--json", str(out)),
            ],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)
    assert json.loads(out.read_text())["delivered"] == 40
    assert result.returncode == 1, result.stderr
    assert "OUTPUT_FAILED STDOUT_CLOSED" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_report_that_cannot_be_written_into_a_closed_output_ends_in_one_line(
    tmp_path: Path, buffered: bool
) -> None:
    # The report could not be written (--json names a directory), so the summary was
    # printed in its stead, with bare print: into a closed pipe, unbuffered, a
    # BrokenPipeError traceback; buffered, the --json error and then, at exit, a second
    # error line for the summary. One line now says both were lost.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        environ["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "node", "loadtest", "--letters", "40"),
                *("--senders", "1", "--baseline-seconds", "0", "--json", str(tmp_path)),
            ],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=environ,
            check=False,
        )
    finally:
        os.close(write)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: OUTPUT_FAILED STDOUT_CLOSED: "), result.stderr
    assert f"report could not be written to {tmp_path}" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
