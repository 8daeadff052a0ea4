"""``chapar loadtest``: how much the exchange carries, checked letter by letter.

Starts a hub and agency nodes as real processes (fresh PKI, mTLS on loopback) and drives
them only through the public client_sdk: S concurrent senders stream letters from agency A
to agency B, flat out or at a fixed offered rate, for a number of letters or a duration,
optionally with faults (``--fault kill-hub@10s``). B's back-end reads its inbox, verifies
each letter's signature and DELIVERY evidence, and acknowledges it (HANDOVER). The report:
throughput, latency percentiles per stage, lost and duplicated letters, CPU seconds and
peak RSS of every process, and a same-run raw gRPC streaming baseline for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client_sdk import ChaparError, Draft, ExchangeClient, Receipt
from loadtest.baseline import measure_baseline
from node import faults
from node.cluster import Cluster, ServerProcess
from node.status import fetch

__all__ = ["Params", "proc_stats", "register", "run"]

A, B = "SENDER.A", "RECIPIENT.B"
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class Params:
    letters: int = 10_000
    duration_s: float = 0.0  # when set, send for this long instead of a fixed count
    senders: int = 4
    rate: float = 0.0  # offered letters per second in total; 0 = flat out
    body_bytes: int = 1500
    batch: int = 64
    faults: tuple[str, ...] = ()
    verify: bool = True
    baseline_s: float = 3.0
    drain_timeout_s: float = 120.0
    durability: str = "full"


@dataclass
class _Stats:
    submitted: dict[str, float] = field(default_factory=dict)  # request id -> time queued
    accepted: dict[str, float] = field(default_factory=dict)  # shams -> time of receipt
    sent_at: dict[str, float] = field(default_factory=dict)  # shams -> time queued
    delivered: dict[str, float] = field(default_factory=dict)  # shams -> time in B's inbox
    handed_over: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    verify_failures: int = 0
    refused: int = 0


class _Pacer:
    """Spreads an offered rate over all senders: one fixed schedule of slots.

    ``wait`` returns the letter's slot, the time it was due, and latencies count from it. A
    sender that falls behind (the exchange pushes back) sends its late letters at once and
    never skips a slot, so the time they waited counts in their latency: no coordinated
    omission. Flat out, the slot is now.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.perf_counter()

    async def wait(self) -> float:
        if not self.interval:
            return time.perf_counter()
        slot = self.next
        self.next += self.interval
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return slot


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1] * 1000, 2)}


def proc_stats(proc: ServerProcess) -> dict[str, float]:
    """CPU seconds and peak RSS in MB of a running server process (tests use it too)."""
    return _proc_stats(proc)


def _proc_stats(proc: ServerProcess) -> dict[str, float]:
    """CPU seconds (utime + stime) and peak RSS (VmHWM) of a running server process."""
    if proc.proc is None or proc.proc.poll() is not None:
        return {"cpu_s": 0.0, "peak_rss_mb": 0.0}
    pid = proc.proc.pid
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    stats = {"cpu_s": round(cpu, 2), "peak_rss_mb": round(peak, 1)}
    stats.update(_thread_cpu(proc))
    return stats


def _thread_cpu(proc: ServerProcess) -> dict[str, float]:
    """The server's own account of its event loop's and database writer's CPU seconds
    (``chapar_thread_cpu_seconds_total``), when its metrics can be read."""
    if not proc.metrics:
        return {}
    try:
        snap = fetch(proc.metrics, timeout=5.0)
    except OSError:  # urllib's errors are OSErrors: the figures are a bonus, not the run
        return {}
    out = {}
    for thread in ("event_loop", "db_writer"):
        value = snap.value("chapar_thread_cpu_seconds_total", thread=thread)
        if value is not None:
            out[f"{thread}_cpu_s"] = round(value, 2)
    return out


async def _sender(
    i: int,
    client: ExchangeClient,
    p: Params,
    stats: _Stats,
    pacer: _Pacer,
    quota: int | None,
    deadline: float | None,
    body: str,
) -> None:
    """Streams letters; after a failure resubmits the unanswered ones (same request ids)."""
    made = 0
    unanswered: dict[str, Draft] = {}

    def more() -> bool:
        if quota is not None:
            return made < quota
        return deadline is not None and time.perf_counter() < deadline

    async def drafts(retry: list[Draft]) -> AsyncIterator[Draft]:
        nonlocal made
        for draft in retry:
            yield draft
        while more():
            slot = await pacer.wait()
            draft = Draft(to=[B], subject=f"load {i}-{made}", body=body, request_id=f"{i}-{made}")
            made += 1
            stats.submitted[draft.request_id or ""] = slot
            unanswered[draft.request_id or ""] = draft
            yield draft

    retry: list[Draft] = []
    while True:
        try:
            async for result in client.send_stream(drafts(retry), batch_size=p.batch):
                if isinstance(result, Receipt):
                    now = time.perf_counter()
                    unanswered.pop(result.request_id, None)
                    stats.accepted[result.shams] = now
                    stats.sent_at[result.shams] = stats.submitted[result.request_id]
                else:
                    stats.refused += 1
        except ChaparError:
            await asyncio.sleep(0.3)
            retry = list(unanswered.values())
            continue
        if not unanswered:
            return
        retry = list(unanswered.values())


async def _consumer(cluster: Cluster, p: Params, stats: _Stats) -> None:
    """B's back-end: reads, verifies, acknowledges; reconnects after a fault."""
    creds = cluster.credentials(B)
    acks = asyncio.Semaphore(256)
    pending: set[asyncio.Task[None]] = set()

    async def ack(letter: object) -> None:
        async with acks:
            for _ in range(50):
                try:
                    await letter.ack()  # type: ignore[attr-defined]
                    stats.handed_over.setdefault(letter.shams, time.perf_counter())  # type: ignore[attr-defined]
                    return
                except ChaparError:
                    await asyncio.sleep(0.2)

    while True:
        try:
            async with ExchangeClient(
                cluster.nodes[B].address, creds, options=_FAST_RECONNECT
            ) as b:
                trust = creds.trust_store()
                for agency in await b.agencies():
                    trust.add_certificates(agency.signing_certificates)
                async for letter in b.inbox():
                    now = time.perf_counter()
                    if letter.shams in stats.delivered:
                        if letter.shams in stats.handed_over:
                            stats.duplicates += 1
                        continue
                    stats.delivered[letter.shams] = now
                    if p.verify:
                        try:
                            letter.verify(trust)
                        except Exception:
                            stats.verify_failures += 1
                    task = asyncio.create_task(ack(letter))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
        except ChaparError:
            await asyncio.sleep(0.3)


async def _progress(stats: _Stats, start: float, stop: asyncio.Event) -> None:
    tty = sys.stderr.isatty()
    while not stop.is_set():
        await asyncio.sleep(1.0 if tty else 5.0)
        elapsed = time.perf_counter() - start
        line = (
            f"{elapsed:6.1f}s  accepted {len(stats.accepted):8d}  delivered {len(stats.delivered):8d}"
            f"  handed over {len(stats.handed_over):8d}  ({len(stats.delivered) / elapsed:7.0f}/s)"
        )
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)


async def run(p: Params, workdir: Path) -> dict[str, object]:
    settings = f'durability = "{p.durability}"\nreconnect_max_s = 1.0'
    cluster = await Cluster.start(
        workdir, [A, B], node_settings=settings, hub_settings=f'durability = "{p.durability}"'
    )
    stats = _Stats()
    body = "x" * p.body_bytes
    try:
        baseline_payload = _sample_envelope(cluster)
        baseline = (
            await measure_baseline(
                baseline_payload,
                ca=cluster.pki.root_cert,
                server_cert=cluster.pki.agency_dir(B) / "tls.crt",
                server_key=cluster.pki.agency_dir(B) / "tls.key",
                client_cert=cluster.pki.agency_dir(A) / "tls.crt",
                client_key=cluster.pki.agency_dir(A) / "tls.key",
                seconds=p.baseline_s,
                workdir=workdir,
            )
            if p.baseline_s > 0
            else {"lps": 0.0}
        )
        consumer = asyncio.create_task(_consumer(cluster, p, stats))
        start = time.perf_counter()
        stop = asyncio.Event()
        progress = asyncio.create_task(_progress(stats, start, stop))
        fault_tasks = [
            asyncio.create_task(
                faults.inject(cluster, faults.parse_fault(f), sender=A, recipient=B)
            )
            for f in p.faults
        ]
        pacer = _Pacer(p.rate)
        deadline = start + p.duration_s if p.duration_s else None
        per = None if p.duration_s else -(-p.letters // p.senders)
        async with ExchangeClient(
            cluster.nodes[A].address, cluster.credentials(A), options=_FAST_RECONNECT
        ) as a:
            await asyncio.gather(
                *(_sender(i, a, p, stats, pacer, per, deadline, body) for i in range(p.senders))
            )
        sent_done = time.perf_counter()
        for task in fault_tasks:
            await task
        drain_until = time.perf_counter() + p.drain_timeout_s
        while time.perf_counter() < drain_until and (
            len(stats.handed_over) < len(stats.accepted)
            or len(stats.delivered) < len(stats.accepted)
        ):
            await asyncio.sleep(0.2)
        stop.set()
        await progress
        processes = {
            "hub": _proc_stats(cluster.hub),
            **{f"node-{c}": _proc_stats(s) for c, s in cluster.nodes.items()},
        }
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    finally:
        cluster.stop()
    return _report(p, stats, start, sent_done, baseline["lps"], processes)


def _sample_envelope(cluster: Cluster) -> bytes:
    """Bytes of the size of one signed 1.5 KB letter, for the baseline."""
    from client_sdk import pb

    header = pb.EnvelopeHeader(subject="load", body_size=1500).SerializeToString()
    return pb.Envelope(header=header + bytes(300), body=b"x" * 1500).SerializeToString()


def _report(
    p: Params,
    stats: _Stats,
    start: float,
    sent_done: float,
    baseline_lps: float,
    processes: dict[str, dict[str, float]],
) -> dict[str, object]:
    accepted = set(stats.accepted)
    delivered = accepted & set(stats.delivered)
    last = max((stats.delivered[s] for s in delivered), default=start)
    elapsed = max(last - start, 1e-9)
    throughput = len(delivered) / elapsed
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    processes["loadgen"] = {
        "cpu_s": round(self_usage.ru_utime + self_usage.ru_stime, 2),
        "peak_rss_mb": round(self_usage.ru_maxrss / 1024, 1),
    }
    return {
        "letters": len(accepted),
        "submitted": len(stats.submitted),
        "refused": stats.refused,
        "delivered": len(delivered),
        "handed_over": len(accepted & set(stats.handed_over)),
        "lost": len(accepted - delivered),
        "duplicates": stats.duplicates,
        "verify_failures": stats.verify_failures,
        "elapsed_s": round(elapsed, 3),
        "send_s": round(sent_done - start, 3),
        # What the senders managed to offer: below params.rate when the exchange pushed back.
        "offered_lps": round(len(stats.submitted) / max(sent_done - start, 1e-9), 1),
        "throughput_lps": round(throughput, 1),
        "baseline_lps": round(baseline_lps, 1),
        "ratio": round(throughput / baseline_lps, 3) if baseline_lps else None,
        "latency_ms": {
            "submit_accepted": _percentiles(
                [stats.accepted[s] - stats.sent_at[s] for s in accepted]
            ),
            "submit_delivered": _percentiles(
                [stats.delivered[s] - stats.sent_at[s] for s in delivered]
            ),
            "submit_handover": _percentiles(
                [
                    stats.handed_over[s] - stats.sent_at[s]
                    for s in accepted
                    if s in stats.handed_over
                ]
            ),
        },
        "windows": _windows(stats, delivered, start, sent_done),
        "processes": processes,
        "params": asdict(p),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def _windows(
    stats: _Stats, delivered: set[str], start: float, sent_done: float
) -> dict[str, object]:
    """Delivered letters per window of the sending period (60 s windows when it lasted two
    minutes or more, else 10 s): the first and last full windows show any degradation."""
    span = sent_done - start
    size = 60.0 if span >= 120 else 10.0
    count = int(span // size)
    bins = [0] * count
    for shams in delivered:
        i = int((stats.delivered[shams] - start) // size)
        if 0 <= i < count:
            bins[i] += 1
    rates = [round(n / size, 1) for n in bins]
    return {
        "window_s": size,
        "delivered_lps": rates,
        "last_over_first": round(rates[-1] / rates[0], 3) if count >= 2 and rates[0] else None,
    }


def _summary(report: dict[str, object]) -> str:
    lat = report["latency_ms"]
    assert isinstance(lat, dict)
    rows = [
        f"letters accepted   {report['letters']}",
        f"delivered          {report['delivered']}   lost {report['lost']}   duplicates {report['duplicates']}"
        f"   verify failures {report['verify_failures']}",
        f"throughput         {report['throughput_lps']} letters/s (baseline {report['baseline_lps']}/s,"
        f" ratio {report['ratio']})",
    ]
    params = report["params"]
    assert isinstance(params, dict)
    if params["rate"]:
        rows.append(
            f"offered            {report['offered_lps']} letters/s of the {params['rate']:g} asked"
            " (latencies count from each letter's slot)"
        )
    for stage in ("submit_accepted", "submit_delivered", "submit_handover"):
        q = lat[stage]
        rows.append(
            f"{stage:<18} p50 {q['p50']} ms  p95 {q['p95']} ms  p99 {q['p99']} ms  max {q['max']} ms"
        )
    windows = report["windows"]
    assert isinstance(windows, dict)
    if windows["delivered_lps"]:
        rows.append(
            f"per {windows['window_s']:.0f} s window  {windows['delivered_lps']} letters/s"
            f"   last/first {windows['last_over_first']}"
        )
    procs = report["processes"]
    assert isinstance(procs, dict)
    for name, s in procs.items():
        threads = (
            f" (event loop {s['event_loop_cpu_s']} s, db writer {s['db_writer_cpu_s']} s)"
            if "db_writer_cpu_s" in s
            else ""
        )
        rows.append(f"{name:<18} cpu {s['cpu_s']} s{threads}  peak RSS {s['peak_rss_mb']} MB")
    return "\n".join(rows)


def _cmd(ns: argparse.Namespace) -> int:
    p = Params(
        letters=ns.letters,
        duration_s=ns.duration,
        senders=ns.senders,
        rate=ns.rate,
        body_bytes=ns.body_bytes,
        batch=ns.batch,
        faults=tuple(ns.fault),
        verify=not ns.no_verify,
        baseline_s=ns.baseline_seconds,
        durability=ns.durability,
    )
    for spec in p.faults:
        try:
            faults.parse_fault(spec)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    random.seed(0)

    async def main(tmp: Path) -> dict[str, object]:
        # SIGTERM (a CI timeout, kill) cancels the run like Ctrl-C: the cluster is stopped
        # by run()'s own clean-up, never left running.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(p, tmp)

    try:
        with tempfile.TemporaryDirectory(prefix="chapar-load-") as tmp:
            report = asyncio.run(main(Path(tmp)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: servers stopped, no report", file=sys.stderr)
        return 130
    print(_summary(report))
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return (
        0
        if report["lost"] == 0 and report["duplicates"] == 0 and report["verify_failures"] == 0
        else 1
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = subparsers.add_parser("loadtest", help="measure throughput and latency on real processes")
    sp.add_argument(
        "--letters", type=int, default=10_000, help="letters to send (unless --duration)"
    )
    sp.add_argument(
        "--duration", type=float, default=0.0, help="send for this many seconds instead"
    )
    sp.add_argument("--senders", type=int, default=4, help="concurrent submission streams")
    sp.add_argument(
        "--rate", type=float, default=0.0, help="offered letters/s in total (0: flat out)"
    )
    sp.add_argument("--body-bytes", type=int, default=1500)
    sp.add_argument("--batch", type=int, default=64, help="letters per stream frame")
    sp.add_argument(
        "--fault", action="append", default=[], help="e.g. kill-hub@10s, stop-recipient@5s:30s"
    )
    sp.add_argument("--no-verify", action="store_true", help="skip verifying each received letter")
    sp.add_argument("--baseline-seconds", type=float, default=3.0, help="0 skips the raw baseline")
    sp.add_argument("--durability", choices=["full", "normal"], default="full")
    sp.add_argument("--json", type=Path, help="write the report here")
    sp.set_defaults(func=_cmd)
