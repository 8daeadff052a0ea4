"""A backlog at the hub: N letters queued for an offline recipient, then drained.

Issue 5's target: hub RSS at most 200 MB with 1,000,000 letters queued for an offline
recipient, which then drains at full rate when it returns. Sending 1M letters through the
whole path takes over half an hour, so this tool writes them straight into the hub's
database while the hub is down, exactly as the hub would have stored them: each envelope is
built with ``build_header`` and signed by sender A's signing key, each RELAY_ACCEPTANCE
evidence is sealed in batches by the hub's key, and ``HubStore.accept`` stores them (512
letters a call; durability "normal" while filling, the hub itself then runs in its default
"full" mode). Then:

1. the hub starts alone (recipient B's node down): RSS after start-up and after an idle
   period with the backlog (its expiry, retention, reload and metrics loops running);
2. B's node starts; the hub pushes the queue, B verifies and stores each letter and answers
   with DELIVERY evidence. Progress is read from B's database (``max(rowid)`` of its inbox,
   once a second): drain time and rate overall and per 10 s window;
3. checks: B's inbox holds exactly the N numbers filled, once each, with N DELIVERY
   evidence, and the hub's queue is empty. Peak RSS (VmHWM) and CPU of hub and node.

A's node never runs: the hub keeps the DELIVERY notices for A (as it would for any
sender that is offline), so the drain measures the hub -> recipient path alone.

    python -m loadtest.backlog --letters 100000 --json docs/bench/backlog_100k.json

``--drain-limit-seconds S`` stops watching the drain after S seconds (a partial run: rates
and RSS so far; the check is then that what arrived arrived once and the rest is queued).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

from client_sdk import pb
from client_sdk.shams import format_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer, sha256
from loadtest.cpu import own_cpu_s
from loadtest.harness import _proc_stats
from loadtest.machine import machine
from node.cluster import Cluster, ServerProcess
from node.config import load_hub_config
from node.core.evidence import evidence_content
from node.core.letters import DEFAULT_CONTENT_TYPE, build_header
from node.storage.db import Durability
from node.storage.hub_store import HubStore, IncomingLetter

__all__ = ["Params", "fill_hub", "run"]

A, B = "SENDER.A", "RECIPIENT.B"
E = pb.EvidenceEvent
_IN_FLIGHT = 3  # accept() calls queued at the writer while the next batch is built


@dataclass(frozen=True)
class Params:
    letters: int = 100_000
    body_bytes: int = 1500
    batch: int = 512
    idle_s: float = 20.0
    window_s: float = 10.0
    fill_durability: str = "normal"
    stall_timeout_s: float = 120.0
    drain_limit_s: float = 0.0  # stop watching the drain after this long (0: until done)


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _rss_mb(proc: ServerProcess) -> float:
    assert proc.proc is not None
    return round(_status_kb(proc.proc.pid, "VmRSS") / 1024, 1)


def _count(db: Path, sql: str, params: Sequence[object] = ()) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql, params).fetchone()[0] or 0)
    finally:
        conn.close()


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def shams_of(sequence: int, year: int) -> pb.Shams:
    return pb.Shams(
        origin=A, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=year, sequence=sequence
    )


async def fill_hub(cluster: Cluster, p: Params) -> dict[str, float]:
    """Queues ``p.letters`` letters A -> B in the (stopped) hub's database."""
    config = load_hub_config(cluster.hub.config)
    hub_signer = Signer.from_files(config.signing.key, config.signing.cert)
    a_dir = cluster.pki.agency_dir(A)
    a_signer = Signer.from_files(a_dir / "signing.key", a_dir / "signing.crt")
    hub_uri = config.identity.uri
    body = bytes(i % 251 for i in range(p.body_bytes))
    year = dt.datetime.now(dt.UTC).year
    draft = pb.LetterDraft(
        recipients=[pb.Address(agency=B)],
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type=DEFAULT_CONTENT_TYPE,
        body=body,
    )

    def letters(first: int, count: int) -> tuple[list[IncomingLetter], dt.datetime]:
        now = dt.datetime.now(dt.UTC)
        out = []
        for seq in range(first, first + count):
            shams = shams_of(seq, year)
            draft.subject = f"backlog {seq}"
            header = build_header(draft, sender=A, shams=shams, now=now)
            envelope = pb.Envelope(
                header=header, signature=a_signer.sign(ENVELOPE_PAYLOAD_TYPE, header), body=body
            )
            out.append(
                IncomingLetter(
                    shams=format_shams(shams),
                    sender=A,
                    recipients=[B],
                    envelope=envelope.SerializeToString(),
                    envelope_sha256=sha256(header),
                    shams_pb=shams,
                )
            )
        return out, now

    def make_relay_at(now: dt.datetime) -> Callable[[IncomingLetter, str], pb.Evidence]:
        def make_relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:  # as Hub._relay
            content = evidence_content(
                E.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
                issuer=hub_uri,
                shams=letter.shams_pb,
                envelope_sha256=letter.envelope_sha256,
                recipient=recipient,
                now=now,
            )
            return pb.Evidence(content=content)

        return make_relay

    db_path = config.database
    store = await HubStore.open(db_path, cast(Durability, p.fill_durability))
    start = time.perf_counter()
    last_report = start
    pending: set[asyncio.Task[list[list[pb.Evidence]]]] = set()
    stored = 0
    try:
        for first in range(1, p.letters + 1, p.batch):
            batch, now = letters(first, min(p.batch, p.letters + 1 - first))
            make_relay = make_relay_at(now)
            pending.add(
                asyncio.create_task(store.accept(batch, make_relay, hub_signer.seal_evidence))
            )
            if len(pending) >= _IN_FLIGHT:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                stored += sum(len(t.result()) for t in done)
            if time.perf_counter() - last_report >= 5.0:
                last_report = time.perf_counter()
                elapsed = last_report - start
                _progress(
                    f"fill {elapsed:7.1f}s  {stored:9d}/{p.letters} letters"
                    f"  ({stored / elapsed:6.0f}/s)"
                )
        for task in pending:
            stored += len(await task)
    finally:
        await store.close()
    fill_s = time.perf_counter() - start
    if stored != p.letters:
        raise RuntimeError(f"filled {stored} letters, expected {p.letters}")
    size = sum(f.stat().st_size for f in db_path.parent.glob(db_path.name + "*"))
    _progress(f"fill done: {p.letters} letters in {fill_s:.1f}s, hub database {size / 1e6:.0f} MB")
    return {
        "fill_s": round(fill_s, 1),
        "fill_lps": round(p.letters / fill_s, 1),
        "hub_db_mb": round(size / 1e6, 1),
    }


def _windows(samples: list[tuple[float, int]], width: float) -> list[float]:
    """Letters/s per ``width`` seconds, from the first letter stored to the last."""
    started = next((i for i, (_, n) in enumerate(samples) if n > 0), None)
    if started is None:
        return []
    origin = samples[max(started - 1, 0)]
    out: list[float] = []
    for t, n in samples[started:]:
        if t - origin[0] >= width or n == samples[-1][1]:
            out.append(round((n - origin[1]) / (t - origin[0]), 1))
            origin = (t, n)
            if n == samples[-1][1]:
                break
    return out


async def _drain(cluster: Cluster, p: Params) -> dict[str, object]:
    inbox_db = cluster.root / f"node-{B}" / "node.db"
    node = cluster.add_node(B)
    started = time.perf_counter()
    node.start()
    await node.wait_ready(120.0)
    ready_s = time.perf_counter() - started
    samples: list[tuple[float, int]] = [(0.0, 0)]
    last_change = time.perf_counter()
    while samples[-1][1] < p.letters:
        if p.drain_limit_s and samples[-1][0] >= p.drain_limit_s:
            break  # a partial run: rates and RSS so far, no end-to-end check
        await asyncio.sleep(1.0)
        n = _count(inbox_db, "SELECT max(rowid) FROM inbox")
        now = time.perf_counter()
        if n != samples[-1][1]:
            last_change = now
        elif now - last_change > p.stall_timeout_s:
            raise TimeoutError(f"drain stalled at {n}/{p.letters} letters")
        samples.append((now - started, n))
        if len(samples) % 10 == 0:
            _progress(
                f"drain {now - started:7.1f}s  {n:9d}/{p.letters} letters in B's inbox"
                f"  hub RSS {_rss_mb(cluster.hub)} MB  B RSS {_rss_mb(node)} MB"
            )
    drain_s = samples[-1][0]
    drained = samples[-1][1]
    hub_db = cluster.root / "hub" / "hub.db"
    while drained == p.letters and (depth := _count(hub_db, "SELECT count(*) FROM queue")) > 0:
        if time.perf_counter() - started - drain_s > p.stall_timeout_s:
            raise TimeoutError(f"hub queue still holds {depth} letters")
        await asyncio.sleep(0.5)
    empty_s = time.perf_counter() - started if drained == p.letters else None
    windows = _windows(samples, p.window_s)
    return {
        "recipient_ready_s": round(ready_s, 2),
        "drained": drained,
        "partial": drained < p.letters,
        "drain_s": round(drain_s, 1),
        "drain_lps": round(drained / drain_s, 1),
        "drain_lps_windows": windows,
        "hub_queue_empty_s": round(empty_s, 1) if empty_s is not None else None,
        "samples": len(samples),
    }


def _verify(cluster: Cluster, p: Params) -> dict[str, int]:
    inbox_db = cluster.root / f"node-{B}" / "node.db"
    conn = sqlite3.connect(f"file:{inbox_db}?mode=ro", uri=True)
    try:
        numbers = [
            str(r[0]) for r in conn.execute("SELECT shams FROM inbox WHERE sender = ?", (A,))
        ]
        rows = int(conn.execute("SELECT count(*) FROM inbox").fetchone()[0])
        deliveries = int(
            conn.execute(
                "SELECT count(*) FROM evidence WHERE event = ?", (E.EVIDENCE_EVENT_DELIVERY,)
            ).fetchone()[0]
        )
    finally:
        conn.close()
    year = int(numbers[0].split("/")[2]) if numbers else 0
    expected = {format_shams(shams_of(s, year)) for s in range(1, p.letters + 1)}
    got = set(numbers)
    hub_db = cluster.root / "hub" / "hub.db"
    return {
        "inbox_rows": rows,
        "distinct_numbers": len(got),
        "missing": len(expected - got),
        "unexpected": len(got - expected),
        "duplicates": len(numbers) - len(got),
        "delivery_evidence": deliveries,
        "hub_queue": _count(hub_db, "SELECT count(*) FROM queue"),
        "hub_delivery_evidence": _count(
            hub_db, "SELECT count(*) FROM evidence WHERE event = ?", (E.EVIDENCE_EVENT_DELIVERY,)
        ),
        "notices_for_sender": _count(
            hub_db, "SELECT count(*) FROM notices WHERE agency = ? AND acked_at IS NULL", (A,)
        ),
    }


async def run(p: Params, workdir: Path) -> dict[str, object]:
    cluster = Cluster.prepare(workdir, [A, B])
    report: dict[str, object] = {"letters": p.letters}
    report.update(await fill_hub(cluster, p))
    fill_cpu_s = own_cpu_s()
    hub = cluster.hub
    try:
        started = time.perf_counter()
        hub.start()
        await hub.wait_ready(120.0)
        report["hub_start_s"] = round(time.perf_counter() - started, 2)
        report["hub_rss_mb_after_start"] = _rss_mb(hub)
        _progress(f"hub up in {report['hub_start_s']}s, RSS {report['hub_rss_mb_after_start']} MB")
        await asyncio.sleep(p.idle_s)
        report["hub_rss_mb_idle_with_backlog"] = _rss_mb(hub)
        idle = _proc_stats(hub)
        report["hub_peak_rss_mb_idle"] = idle["peak_rss_mb"]
        _progress(f"hub idle {p.idle_s}s with the backlog: RSS {_rss_mb(hub)} MB")
        report.update(await _drain(cluster, p))
        stats = {"hub": _proc_stats(hub), "recipient": _proc_stats(cluster.nodes[B])}
    finally:
        codes = cluster.stop()
    report["verified"] = _verify(cluster, p)
    report["hub_peak_rss_mb"] = stats["hub"]["peak_rss_mb"]
    report["recipient_peak_rss_mb"] = stats["recipient"]["peak_rss_mb"]
    report["cpu_s"] = {
        "fill": round(fill_cpu_s, 1),
        "hub_idle": idle["cpu_s"],
        "hub": stats["hub"]["cpu_s"],
        "recipient": stats["recipient"]["cpu_s"],
    }
    report["exit_codes"] = codes
    report["params"] = asdict(p)
    report["machine"] = machine()
    return report


def passed(report: dict[str, object]) -> bool:
    """Every letter delivered exactly once, queue empty, clean exits.

    For a run cut short (``--drain-limit-seconds``): what arrived arrived once, with its
    evidence, and every other letter is still queued at the hub.
    """
    v = report["verified"]
    assert isinstance(v, dict)
    n = report["letters"]
    assert isinstance(n, int)
    codes = report["exit_codes"]
    assert isinstance(codes, dict)
    once = (
        v["inbox_rows"] == v["distinct_numbers"] == v["delivery_evidence"]
        and v["unexpected"] == v["duplicates"] == 0
        and all(c == 0 for c in codes.values())
    )
    if report["partial"]:
        return once and v["hub_queue"] >= v["missing"] == n - v["inbox_rows"]
    return once and v["inbox_rows"] == n and v["missing"] == v["hub_queue"] == 0


def summary(report: dict[str, object]) -> str:
    cpu = report["cpu_s"]
    assert isinstance(cpu, dict)
    return "\n".join(
        [
            f"letters queued       {report['letters']}  (fill {report['fill_s']} s,"
            f" {report['fill_lps']}/s, hub db {report['hub_db_mb']} MB)",
            f"hub RSS              after start {report['hub_rss_mb_after_start']} MB, idle with"
            f" backlog {report['hub_rss_mb_idle_with_backlog']} MB, peak {report['hub_peak_rss_mb']} MB",
            f"drain                {report['drained']} letters in {report['drain_s']} s, {report['drain_lps']} letters/s"
            f" (queue empty at {report['hub_queue_empty_s']} s)",
            f"per {report['params']['window_s']:.0f} s window     {report['drain_lps_windows']}",  # type: ignore[index]
            f"recipient peak RSS   {report['recipient_peak_rss_mb']} MB",
            f"cpu s                {cpu}",
            f"verified             {report['verified']}  -> {'PASS' if passed(report) else 'FAIL'}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--letters", type=int, default=Params.letters)
    parser.add_argument("--body-bytes", type=int, default=Params.body_bytes)
    parser.add_argument("--batch", type=int, default=Params.batch, help="letters per accept()")
    parser.add_argument(
        "--idle-seconds", type=float, default=Params.idle_s, help="hub alone with the backlog"
    )
    parser.add_argument("--window-seconds", type=float, default=Params.window_s)
    parser.add_argument("--fill-durability", choices=["full", "normal"], default="normal")
    parser.add_argument(
        "--drain-limit-seconds",
        type=float,
        default=0.0,
        help="stop after watching the drain this long (a partial run; 0: until drained)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the cluster here (default: temporary)")
    parser.add_argument("--json", type=Path, help="write the report here")
    ns = parser.parse_args(argv)
    if ns.letters < 1 or ns.batch < 1:
        parser.error("--letters and --batch must be positive")
    p = Params(
        letters=ns.letters,
        body_bytes=ns.body_bytes,
        batch=ns.batch,
        idle_s=ns.idle_seconds,
        window_s=ns.window_seconds,
        fill_durability=ns.fill_durability,
        drain_limit_s=ns.drain_limit_seconds,
    )
    with contextlib.ExitStack() as stack:
        workdir = ns.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="chapar-backlog-"))
        )
        report = asyncio.run(run(p, workdir))
    print(summary(report))
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
