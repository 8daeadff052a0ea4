"""``chapar loadtest``: how much the exchange carries, checked letter by letter.

Starts a hub and N agency nodes as real processes (fresh PKI, mTLS on loopback), or
targets running servers by address (``--targets FILE``, see ``loadtest.targets``), and
drives them only through the public client_sdk. The nodes form a chain: S concurrent
senders, spread over every node but the last, stream letters from each node to the next
(two nodes: agency A to agency B), each on a stream of its own or, with ``--shared``, all
of a node's senders on one ``SharedStream`` (one letter a call), flat out or at a fixed
offered rate, for a number of letters or a duration, optionally with faults
(``--fault kill-hub@10s``). Each receiving
node's back-end reads its inbox, verifies each letter's signature and DELIVERY evidence,
and acknowledges it (HANDOVER). The report: throughput, latency percentiles per stage,
lost, duplicated and misrouted letters, CPU seconds and peak RSS of every process, and a
same-run raw gRPC streaming baseline for the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import itertools
import json
import math
import random
import resource
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

from certs.pki import KeyAlgorithm, init_pki
from client_sdk import ChaparError, Draft, ExchangeClient, Letter, Receipt
from client_sdk.client import DEFAULT_MAX_IN_FLIGHT, DEFAULT_STREAM_LINGER_S, SharedStream
from loadtest.baseline import measure_between
from loadtest.cpu import disk_write_mb, own_cpu_s, process_cpu_s
from loadtest.machine import machine
from loadtest.reference import Reference, median_of, per_window
from loadtest.targets import Endpoint, Targets, TargetsError, load_targets
from node import faults
from node.cli_output import emit
from node.cluster import Cluster, ServerProcess
from node.status import Snapshot, fetch

__all__ = ["Params", "node_names", "proc_stats", "register", "run"]

A, B = "SENDER.A", "RECIPIENT.B"
_SIGNING: tuple[str, ...] = get_args(KeyAlgorithm)  # the PKI's signing key types
MAX_NODES = 26


def node_names(n: int) -> list[str]:
    """The agencies of a local run, in chain order: the historic pair for two nodes (so
    reports stay comparable), AGENCY.A, AGENCY.B, ... for more."""
    if not 2 <= n <= MAX_NODES:
        raise ValueError(f"a run needs 2 to {MAX_NODES} nodes, not {n}")
    return [A, B] if n == 2 else [f"AGENCY.{chr(ord('A') + k)}" for k in range(n)]


# After the drain, how long the readers may read on: until the harness's own nodes have
# ended their inbox streams (they stop within their shutdown grace), or a moment on
# running targets, whose streams stay open (a copy already streamed comes within it).
_READ_ON_S = 30.0
_TARGETS_READ_ON_S = 1.0
# A receiving node's back-end has at most this many acknowledgements under way.
_ACKS_UNDER_WAY = 256
_FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class Params:
    letters: int = 10_000
    duration_s: float = 0.0  # when set, send for this long instead of a fixed count
    senders: int = 4
    shared: bool = False  # the senders of a node share one stream (SharedStream)
    rate: float = 0.0  # offered letters per second in total; 0 = flat out
    body_bytes: int = 1500
    batch: int = 64
    linger_ms: float = DEFAULT_STREAM_LINGER_S * 1000  # send_stream's linger_s, in ms
    faults: tuple[str, ...] = ()
    verify: bool = True
    baseline_s: float = 3.0
    drain_timeout_s: float = 120.0
    durability: str = "full"  # of the harness's own servers; running targets keep theirs
    signing: str = "ed25519"  # the signing keys of the harness's own PKI (or ecdsa-p256)
    nodes: int = 2
    targets: str = ""  # the targets file, when the run drove running servers


@dataclass
class Baseline:
    """The raw gRPC stream's figures: flat out, and CPU a message at the run's rate."""

    lps: float = 0.0
    cpu_ms_per_message: float = 0.0
    paced_cpu_ms_per_message: float = 0.0  # 0 for a flat-out run


@dataclass
class _Stats:
    submitted: dict[str, float] = field(default_factory=dict)  # request id -> time queued
    numbered: dict[str, str] = field(default_factory=dict)  # request id -> its number
    accepted: dict[str, float] = field(default_factory=dict)  # shams -> time of receipt
    sent_at: dict[str, float] = field(default_factory=dict)  # shams -> time queued
    delivered: dict[str, float] = field(default_factory=dict)  # shams -> time in its inbox
    handed_over: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0  # copies of one letter: streamed again once handed over, or twice
    # Every subject of this run ends with it: the recipient tells this run's letters from
    # an earlier run's (on running targets), and a submission's letters by their subject.
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    # A submission the node numbered twice, each letter beyond the first: numbers a receipt
    # gave for a request id answered with another before, and (``_numbered_twice``) letters
    # of this run delivered under a number no receipt gave.
    renumbered: set[str] = field(default_factory=set)
    unreceipted: set[str] = field(default_factory=set)  # this run's, delivered before a receipt
    misrouted: set[str] = field(default_factory=set)  # in an inbox it was not addressed to
    foreign: set[str] = field(default_factory=set)  # letters from agencies not driven here
    unverified: set[str] = field(default_factory=set)  # letters whose copy failed to verify
    refused: int = 0
    pacer_lag_s: float = 0.0  # at a fixed rate, how late the latest letter was handed over
    # Read after the drain ended (until the inbox streams closed): for how long, letters
    # delivered then (only if it timed out) and duplicates counted then.
    after_drain: dict[str, float] = field(default_factory=dict)


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
        self.max_lag_s = 0.0  # how late the latest letter was handed over (0: on time)

    async def wait(self) -> float:
        if not self.interval:
            return time.perf_counter()
        slot = self.next
        self.next += self.interval
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            self.max_lag_s = max(self.max_lag_s, -delay)
        return slot


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``ordered`` (sorted, not empty) by nearest rank: the smallest
    value with at least q of them at or below it (the ceil(q*n)-th). ordered[int(q*n)] was
    a rank high whenever q*n was whole: the p99 of 100 latencies was their maximum."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(nearest_rank(ordered, q) * 1000, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1] * 1000, 2)}


def proc_stats(proc: ServerProcess) -> dict[str, float]:
    """CPU seconds and peak RSS in MB of a running server process (tests use it too)."""
    return _proc_stats(proc)


def _proc_stats(proc: ServerProcess) -> dict[str, float]:
    """CPU seconds (utime + stime), peak RSS (VmHWM) and MB written to storage of a running
    server process."""
    figures = _read_proc(proc)
    if figures is None:
        return {"cpu_s": 0.0, "peak_rss_mb": 0.0}
    figures.update(_thread_cpu(proc))
    return figures


def _read_proc(proc: ServerProcess) -> dict[str, float] | None:
    """What /proc says of a server process so far; None once it has ended."""
    if proc.proc is None or proc.proc.poll() is not None:
        return None
    pid = proc.proc.pid
    try:
        cpu = process_cpu_s(pid)
        peak = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
        written = disk_write_mb(pid)
    except OSError:  # it ended while being read
        return None
    return {
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(peak, 1),
        "disk_write_mb": round(written, 1),
    }


def _thread_cpu(proc: ServerProcess) -> dict[str, float]:
    """The server's own account of its event loop's and database writer's CPU seconds
    (``chapar_thread_cpu_seconds_total``), when its metrics can be read."""
    if not proc.metrics:
        return {}
    try:
        snap = fetch(proc.metrics, timeout=5.0)
    except OSError:  # urllib's errors are OSErrors: the figures are a bonus, not the run
        return {}
    figures = _figures(snap)
    return {
        k: round(figures[k], 2) for k in ("event_loop_cpu_s", "db_writer_cpu_s") if k in figures
    }


class _Probe:
    """CPU and memory of one server: from /proc for the harness's own processes (their
    whole life, every life when a fault restarted them), from the server's metrics for
    running targets (the run's span: the counters read at the start are subtracted; other
    traffic on the server counts too).

    A fault calls ``bank`` before it ends a life: its thread clocks can be read only from
    a running server. The life's CPU seconds, peak RSS and writes are then taken, at the
    end, from what its reaping gave (``ReapedPopen.rusage``, node.cluster's processes):
    what it used stopping after SIGTERM counts too. Without it (a process not reaped
    so) the reading ``bank`` made stands for the life.

    A process that ends by itself (a crash, not a fault) leaves nothing in /proc to read:
    its rusage, when it was reaped so, or else the last reading ``sample`` (called every
    second or so) made stands for that life (``exited`` in its figures; its thread clocks,
    read only from its metrics at the end, are left out)."""

    def __init__(
        self,
        proc: ServerProcess | None = None,
        metrics: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.proc, self.metrics, self.tls = proc, metrics, tls
        self.base: dict[str, float] = {}
        # The lives a fault ended: their process, and what was read of it before the end.
        self.ended: list[tuple[subprocess.Popen[bytes] | None, dict[str, float]]] = []
        self.restarts = 0
        self.last: tuple[int, dict[str, float]] | None = None  # (pid, its latest reading)
        self.banked: set[int] = set()  # the pids of the lives in ``earlier``

    def begin(self) -> None:
        if self.proc is None:
            self.base = self._scrape()

    async def bank(self) -> None:
        """Keeps what the process has used so far: a fault is about to end it (``end``
        takes the life's final figures from its reaping, when it was reaped so). Read in a
        thread: the metrics scrape must not stall the load generator's loop (nor wait out
        its timeout on a hung server there)."""
        if self.proc is None:
            return
        life = await asyncio.to_thread(self._life)
        self.ended.append((self.proc.proc, life))
        self.restarts += 1
        if self.proc.proc is not None:
            self.banked.add(self.proc.proc.pid)

    def sample(self) -> None:
        """Keeps a reading of the running process (blocking: /proc reads), for a life that
        ends by itself before ``bank`` or ``end`` can read it."""
        if self.proc is None or self.proc.proc is None:
            return
        pid = self.proc.proc.pid
        if (figures := _read_proc(self.proc)) is not None:
            self.last = (pid, figures)

    def _life(self) -> dict[str, float]:
        """The figures of the process's current life: read now if it runs, else its last
        reading (marked ``exited``)."""
        assert self.proc is not None
        figures = _read_proc(self.proc)
        if figures is not None:
            return figures | _thread_cpu(self.proc)
        pid = self.proc.proc.pid if self.proc.proc is not None else None
        if pid is None or pid in self.banked:  # never started, or a fault ended it: counted
            return {}
        last = self.last[1] if self.last is not None and self.last[0] == pid else {}
        return {"cpu_s": 0.0, "peak_rss_mb": 0.0} | last | _reaped(self.proc.proc) | {"exited": 1}

    def end(self) -> dict[str, float]:
        if self.proc is not None:
            earlier: dict[str, float] = {}
            for proc, before in self.ended:  # the figures of its reaping replace the reading
                earlier = _add_lives(earlier, before | _reaped(proc))
            stats = _add_lives(earlier, self._life())
            if "exited" in stats:  # a life's thread clocks are unknown: no partial sums
                stats = {k: v for k, v in stats.items() if not k.endswith("_cpu_s")}
            return stats | ({"restarts": self.restarts} if self.restarts else {})
        now = self._scrape()
        if "cpu_s" not in now or "cpu_s" not in self.base:
            return {}
        out = {
            k: round(v - self.base.get(k, 0.0), 2)
            for k, v in now.items()
            if k.endswith("_cpu_s") or k == "cpu_s"
        }
        out.update({k: v for k, v in now.items() if k.endswith("_mb")})
        return out

    def _scrape(self) -> dict[str, float]:
        if not self.metrics:
            return {}
        try:
            snap = fetch(self.metrics, timeout=5.0, tls=self.tls)
        except OSError:
            return {}
        return _figures(snap)


def _reaped(proc: subprocess.Popen[bytes] | None) -> dict[str, float]:
    """What an ended process used over its whole life, its stop included, as its reaping
    gave it (``ReapedPopen.rusage``); nothing if it was not reaped so."""
    usage: resource.struct_rusage | None = getattr(proc, "rusage", None)
    if usage is None:
        return {}
    return {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # kB, as VmHWM
        "disk_write_mb": round(usage.ru_oublock * 512 / 2**20, 1),  # write_bytes / 512
    }


async def _sampling(probes: Sequence[_Probe], stop: asyncio.Event) -> None:
    """Reads the servers' /proc every second (in a thread: the load generator's loop must
    not wait on it) until ``stop``, so that a life that ends by itself keeps its figures."""

    def sample_all() -> None:
        for probe in probes:
            probe.sample()

    while not stop.is_set():
        await asyncio.to_thread(sample_all)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


def _add_lives(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two lives of one process: CPU seconds add up, the peak RSS is the higher one."""
    out = dict(a)
    for key, value in b.items():
        if key == "peak_rss_mb":
            out[key] = max(out.get(key, 0.0), value)
        else:
            out[key] = round(out.get(key, 0.0) + value, 2)
    return out


def _figures(snap: Snapshot) -> dict[str, float]:
    """CPU seconds and memory a server exports (prometheus-client's process collector,
    our thread clocks and peak RSS)."""
    out: dict[str, float] = {}
    sources = {
        "cpu_s": ("process_cpu_seconds_total", {}),
        "event_loop_cpu_s": ("chapar_thread_cpu_seconds_total", {"thread": "event_loop"}),
        "db_writer_cpu_s": ("chapar_thread_cpu_seconds_total", {"thread": "db_writer"}),
    }
    for key, (name, labels) in sources.items():
        value = snap.value(name, None, **labels)
        if value is not None:
            out[key] = value
    for key, name in (
        ("rss_mb", "process_resident_memory_bytes"),
        ("peak_rss_mb", "chapar_process_peak_resident_memory_bytes"),
    ):
        value = snap.value(name)
        if value is not None:
            out[key] = round(value / 2**20, 1)
    return out


@dataclass
class _Plan:
    """What a sending node's senders share: where their letters go, the schedule, the
    tallies."""

    to: str
    p: Params
    stats: _Stats
    pacer: _Pacer
    quota: int | None  # letters a sender makes, unless it sends until the deadline
    deadline: float | None
    body: str

    def more(self, made: int) -> bool:
        if self.quota is not None:
            return made < self.quota
        if self.deadline is None:
            return False
        if self.pacer.interval:  # every slot before the deadline, late ones too
            # A slot a rounding error short of the deadline is at it, not before it (the
            # slots are sums of intervals): 1,000/s for 60 s is 60,000 letters, not 60,001.
            return self.pacer.next < self.deadline - self.pacer.interval * 1e-6
        return time.perf_counter() < self.deadline

    async def draft(self, i: int, made: int) -> Draft:
        """Sender ``i``'s next letter, at its slot (latencies count from the slot)."""
        slot = await self.pacer.wait()
        draft = Draft(
            to=[self.to],
            subject=f"load {i}-{made} {self.stats.run}",
            body=self.body,
        )  # its request id the SDK's own (time-ordered): new in every run, also on targets
        self.stats.submitted[draft.request_id or ""] = slot
        return draft

    def accepted(self, receipt: Receipt) -> None:
        # One request id, one letter: a retry answered with another number is a letter
        # stored twice. (A retry goes only when no answer came: the first number is then
        # known only from the inbox, where ``_numbered_twice`` finds it.)
        first = self.stats.numbered.setdefault(receipt.request_id, receipt.shams)
        if first != receipt.shams:
            self.stats.renumbered.add(receipt.shams)
            return
        self.stats.accepted[receipt.shams] = time.perf_counter()
        self.stats.sent_at[receipt.shams] = self.stats.submitted[receipt.request_id]


def _retry_delay(exc: ChaparError) -> float:
    """How long a sender waits before it sends again a letter refused for now."""
    return exc.retry_after if exc.retry_after is not None else 0.3


async def _sender(i: int, client: ExchangeClient, plan: _Plan) -> None:
    """Streams letters; after a failure resubmits the unanswered ones (same request ids).

    ``send_stream`` answers each draft, in order, with its receipt or its refusal: a final
    refusal is counted once and the letter dropped; one refused for now (retryable) is sent
    again after a pause (0.3 s or the node's retry_after), not counted, as
    ``_shared_sender`` does."""
    made = 0
    unanswered: dict[str, Draft] = {}  # given to a stream and not answered
    later: list[tuple[float, Draft]] = []  # refused for now: (when to send it again, draft)

    def due() -> list[Draft]:
        now = time.monotonic()
        ready = [draft for at, draft in later if at <= now]
        later[:] = [(at, draft) for at, draft in later if at > now]
        return ready

    async def drafts(retry: list[Draft], asked: collections.deque[Draft]) -> AsyncIterator[Draft]:
        nonlocal made
        for draft in retry:  # unanswered already
            asked.append(draft)
            yield draft
        while plan.more(made):
            ready = due()
            for draft in ready:  # unanswered before any goes: a stream that fails sends them
                unanswered[draft.request_id or ""] = draft
            for draft in ready:
                asked.append(draft)
                yield draft
            draft = await plan.draft(i, made)
            made += 1
            unanswered[draft.request_id or ""] = draft
            asked.append(draft)
            yield draft

    retry: list[Draft] = []
    while True:
        asked: collections.deque[Draft] = collections.deque()  # this stream's, in order
        try:
            async for result in client.send_stream(
                drafts(retry, asked), batch_size=plan.p.batch, linger_s=plan.p.linger_ms / 1000
            ):
                draft = asked.popleft()
                unanswered.pop(draft.request_id or "", None)
                if isinstance(result, Receipt):
                    plan.accepted(result)
                elif result.retryable:
                    later.append((time.monotonic() + _retry_delay(result), draft))
                else:
                    plan.stats.refused += 1
        except ChaparError:
            await asyncio.sleep(0.3)
            retry = list(unanswered.values())
            continue
        retry = list(unanswered.values())  # none: every draft is answered on a stream
        if not retry and later:
            await asyncio.sleep(max(0.0, min(at for at, _ in later) - time.monotonic()))
            retry = due()
            for draft in retry:
                unanswered[draft.request_id or ""] = draft
        if not retry:
            return


async def _shared_sender(i: int, shared: SharedStream, plan: _Plan) -> None:
    """As ``_sender``, but the senders of a node share its stream: each letter is one
    ``SharedStream.send``, and one whose stream broke is sent again (same request id).
    Flat out, at most as many letters are unanswered as the stream's frames in flight hold."""
    made = 0
    window = asyncio.Semaphore(plan.p.batch * DEFAULT_MAX_IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()

    async def one(draft: Draft) -> None:
        try:
            while True:
                try:
                    plan.accepted(await shared.send(draft))
                except ChaparError as exc:
                    if exc.retryable:
                        await asyncio.sleep(_retry_delay(exc))
                        continue
                    plan.stats.refused += 1
                return
        finally:
            window.release()

    while plan.more(made):
        await window.acquire()
        if not plan.more(made):  # others took the last slots while this one waited
            window.release()
            break
        draft = await plan.draft(i, made)
        made += 1
        task = asyncio.create_task(one(draft))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def _consumer(
    node: Endpoint, routes: dict[str, str], p: Params, stats: _Stats, ending: asyncio.Event
) -> None:
    """A receiving node's back-end: reads, verifies, acknowledges its letters from the
    driven agencies (``routes``: sender -> recipient); reconnects after a fault. Letters
    from other agencies are counted and left for the agency's own reader. Once ``ending``
    is set (the drain is over) it reads on until its inbox stream closes, and returns
    instead of reconnecting: a copy streamed before then is counted. A letter of this run
    (its subject ends with ``stats.run``) under a number no receipt has given yet is noted
    in ``stats.unreceipted``: if no receipt ever gives it, the node numbered its submission
    twice (``_numbered_twice``)."""
    creds = node.credentials
    mark = f" {stats.run}"
    # At most _ACKS_UNDER_WAY acknowledgements under way, one task each; the letters
    # behind them wait in ``queued``, in the order they came. (Not a task a letter waiting
    # on a Semaphore: Python 3.11's scans its waiters at every release, the ones it woke and
    # that have not run yet among them, and thousands wait flat out.)
    queued: collections.deque[Letter] = collections.deque()
    pending: set[asyncio.Task[None]] = set()

    current: ExchangeClient | None = None  # the connection the inbox is read on now
    # Letters streamed and not yet handed over -> the connection (a number) that streamed
    # them last: a node streams an unacknowledged letter again on a new inbox stream, never
    # twice on one, so a repeat on the same connection is a duplicate.
    streamed: dict[str, int] = {}
    connection = 0

    async def on_current(shams: str) -> object:
        assert current is not None  # set before any letter is read
        return await current.ack(shams)

    async def ack(letter: Letter) -> None:
        acknowledge: Callable[[], Awaitable[object]] = letter.ack
        while True:
            try:
                await acknowledge()
                stats.handed_over.setdefault(letter.shams, time.perf_counter())
                streamed.pop(letter.shams, None)
                return
            except ChaparError as exc:
                if exc.reason == "CLIENT_CLOSED":
                    # Its client closed in a reconnect, maybe after the node had taken the
                    # ack (the letter then does not come again): acknowledged again, which
                    # is idempotent, on the connection of the moment.
                    acknowledge = functools.partial(on_current, letter.shams)
                elif not exc.retryable:
                    return
                await asyncio.sleep(0.2)

    def start_ack(letter: Letter) -> None:
        task = asyncio.create_task(ack(letter))
        pending.add(task)
        task.add_done_callback(ack_done)

    def ack_done(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if queued:
            start_ack(queued.popleft())

    try:
        while not ending.is_set():
            try:
                async with ExchangeClient(node.address, creds, options=_FAST_RECONNECT) as b:
                    current = b
                    connection += 1
                    trust = await b.trust_from_directory(creds.trust_store())
                    async for letter in b.inbox():
                        now = time.perf_counter()
                        to = routes.get(letter.shams.partition("/")[0])
                        if to != node.agency:
                            if to is None:
                                stats.foreign.add(letter.shams)
                            else:
                                stats.misrouted.add(letter.shams)
                            continue
                        if (
                            letter.shams in stats.handed_over
                            or streamed.get(letter.shams) == connection
                        ):
                            stats.duplicates += 1
                            continue
                        streamed[letter.shams] = connection
                        if letter.shams not in stats.delivered:
                            if p.verify:
                                try:
                                    delivery = letter.verify(trust)
                                    if delivery.recipient != node.agency:
                                        raise ValueError(f"DELIVERY by {delivery.recipient}")
                                except Exception:
                                    # Neither counted delivered nor acknowledged: it stays lost
                                    # unless a copy that verifies comes.
                                    stats.unverified.add(letter.shams)
                                    continue
                            stats.delivered[letter.shams] = now
                            if letter.shams not in stats.accepted and letter.subject.endswith(mark):
                                stats.unreceipted.add(letter.shams)
                        # else: streamed again after a reconnect, not yet acknowledged (an ack
                        # through the closed client can no longer go): acknowledged on this one
                        if len(pending) < _ACKS_UNDER_WAY:
                            start_ack(letter)
                        else:
                            queued.append(letter)
            except ChaparError:
                if ending.is_set():  # the stream closed after the drain: nothing more comes
                    return
                await asyncio.sleep(0.3)
    finally:
        queued.clear()  # acknowledgements nobody waits for any more
        for task in pending:
            task.cancel()


_BAR_WIDTH = 20


def _progress_line(stats: _Stats, elapsed: float, p: Params, sending: bool) -> str:
    """The live line: a bar of the run done (of its duration or of its letters while
    sending, then of the accepted letters handed over while draining) and the counts."""
    if sending:
        done = elapsed / p.duration_s if p.duration_s else len(stats.accepted) / max(p.letters, 1)
    else:
        done = len(stats.handed_over) / max(len(stats.accepted), 1)
    done = min(max(done, 0.0), 1.0)
    filled = round(done * _BAR_WIDTH)
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    phase = "sending " if sending else "draining"
    return (
        f"[{bar}] {done:4.0%} {phase} {elapsed:6.1f}s  accepted {len(stats.accepted):8d}"
        f"  delivered {len(stats.delivered):8d}  handed over {len(stats.handed_over):8d}"
        f"  ({len(stats.delivered) / max(elapsed, 1e-9):7.0f}/s)"
    )


async def _progress(
    stats: _Stats, start: float, stop: asyncio.Event, p: Params, sent: asyncio.Event
) -> None:
    """A live line on standard error: redrawn every second on a terminal, a line every
    5 s otherwise (a log). Ends as soon as ``stop`` is set, not at its next tick: the run
    waits for it."""
    tty = sys.stderr.isatty()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0 if tty else 5.0)
        line = _progress_line(stats, time.perf_counter() - start, p, not sent.is_set())
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)


async def run(p: Params, workdir: Path, targets: Targets | None = None) -> dict[str, object]:
    """One run: on a cluster of the harness's own, or on the running ``targets``."""
    count = p.nodes if targets is None else len(targets.nodes)
    if p.senders < count - 1:  # checked before any server starts
        raise ValueError(f"{count} nodes need at least {count - 1} senders")
    if targets is None and p.signing not in _SIGNING:
        raise ValueError(f"signing must be {' or '.join(_SIGNING)}, not {p.signing!r}")
    cluster: Cluster | None = None
    if targets is None:
        names = node_names(p.nodes)
        settings = f'durability = "{p.durability}"\nreconnect_max_s = 1.0'
        cluster = await Cluster.start(
            workdir,
            names,
            signing_algorithm=cast(KeyAlgorithm, p.signing),
            node_settings=settings,
            hub_settings=f'durability = "{p.durability}"',
        )
        nodes = [Endpoint(c, cluster.nodes[c].address, cluster.credentials(c)) for c in names]
        probes = {"hub": _Probe(cluster.hub)}
        probes.update({f"node-{c}": _Probe(cluster.nodes[c]) for c in names})
    else:
        if p.faults:
            raise ValueError("faults need the harness's own servers, not --targets")
        nodes = list(targets.nodes)
        probes = {"hub": _Probe(metrics=targets.hub_metrics, tls=targets.hub_metrics_tls)}
        probes.update(
            {f"node-{n.agency}": _Probe(metrics=n.metrics, tls=n.metrics_tls) for n in nodes}
        )
    senders = nodes[:-1]
    routes = {a.agency: b.agency for a, b in itertools.pairwise(nodes)}
    stats = _Stats()
    body = "x" * p.body_bytes
    reference = Reference(workdir / "reference.jsonl")
    samples: list[tuple[float, float]] = []
    try:
        pair = (nodes[0].agency, nodes[1].agency)
        # Flat out for the ratio; at a fixed rate also paced, one message a slot, for what
        # gRPC alone costs at this run's pace (a message costs more CPU the fewer there are).
        baseline = Baseline()
        if p.baseline_s > 0:
            flat = await _baseline(cluster, pair, p.baseline_s, workdir, body_bytes=p.body_bytes)
            baseline = Baseline(flat["lps"], flat["cpu_ms_per_message"])
            if p.rate > 0:
                paced = await _baseline(
                    cluster, pair, p.baseline_s, workdir, rate=p.rate, body_bytes=p.body_bytes
                )
                baseline.paced_cpu_ms_per_message = paced["cpu_ms_per_message"]
        for probe in probes.values():
            probe.begin()
        reference.start()
        own_cpu = own_cpu_s()  # the load generator's CPU counts from here, not the baseline's
        ending = asyncio.Event()  # the drain is over: the readers read on until their streams close
        consumers = [asyncio.create_task(_consumer(n, routes, p, stats, ending)) for n in nodes[1:]]
        start = time.perf_counter()
        stop, sent = asyncio.Event(), asyncio.Event()
        progress = asyncio.create_task(_progress(stats, start, stop, p, sent))
        sampling = asyncio.create_task(_sampling(list(probes.values()), stop))
        fault_tasks = []
        if cluster is not None:  # the sender is the chain's first node, the recipient its last
            ends = {"sender": nodes[0].agency, "recipient": nodes[-1].agency}
            by_proc = {id(probe.proc): probe for probe in probes.values()}
            fault_tasks = [
                asyncio.create_task(
                    faults.inject(
                        cluster,
                        faults.parse_fault(f),
                        **ends,
                        before_end=lambda proc: by_proc[id(proc)].bank(),
                    )
                )
                for f in p.faults
            ]
        pacer = _Pacer(p.rate)
        deadline = start + p.duration_s if p.duration_s else None
        per = None if p.duration_s else -(-p.letters // p.senders)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    ExchangeClient(n.address, n.credentials, options=_FAST_RECONNECT)
                )
                for n in senders
            ]
            streams = (
                [
                    await stack.enter_async_context(
                        c.shared_stream(batch_size=p.batch, linger_s=p.linger_ms / 1000)
                    )
                    for c in clients
                ]
                if p.shared
                else []
            )

            def sender(i: int) -> Coroutine[Any, Any, None]:
                at = i % len(senders)
                plan = _Plan(routes[senders[at].agency], p, stats, pacer, per, deadline, body)
                if p.shared:
                    return _shared_sender(i, streams[at], plan)
                return _sender(i, clients[at], plan)

            await asyncio.gather(*(sender(i) for i in range(p.senders)))
            stats.pacer_lag_s = pacer.max_lag_s
        sent_done = time.perf_counter()
        sent.set()
        for task in fault_tasks:
            await task
        drain_until = time.perf_counter() + p.drain_timeout_s
        while time.perf_counter() < drain_until and not _drained(stats):
            await asyncio.sleep(0.2)
        stop.set()
        await progress
        await sampling
        samples = await asyncio.to_thread(reference.stop)  # may wait for a first sample
        processes = {name: figures for name, probe in probes.items() if (figures := probe.end())}
        # The drain ends once every letter came once; what the nodes streamed meanwhile
        # (a copy: a duplicate) is still read and counted, until the inbox streams close:
        # the harness's own nodes end them as they stop; running targets keep them open,
        # so they are read a moment longer.
        drained, duplicates = time.perf_counter(), _duplicates(stats)
        ending.set()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
            await asyncio.wait(consumers, timeout=_READ_ON_S)
        else:
            await asyncio.wait(consumers, timeout=_TARGETS_READ_ON_S)
        stats.after_drain = {
            "read_s": round(time.perf_counter() - drained, 3),
            "delivered": sum(t > drained for t in stats.delivered.values()),
            "duplicates": _duplicates(stats) - duplicates,
        }
        for consumer in consumers:
            consumer.cancel()
        for consumer in consumers:
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    finally:
        reference.stop()
        if cluster is not None:
            cluster.stop()
    processes["loadgen"] = {
        "cpu_s": round(own_cpu_s() - own_cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    report = _report(p, stats, start, sent_done, baseline, processes, samples)
    report["routes"] = _routes(routes, stats)
    return report


def _numbered_twice(stats: _Stats) -> set[str]:
    """The letters beyond the first of a submission the node numbered twice: the numbers
    a retry's receipt gave after another, and the letters of this run delivered under a
    number no receipt gave (the first number of a submission whose first answer was lost,
    when the retry was numbered anew). Each is a second letter of one submission."""
    return stats.renumbered | (stats.unreceipted - stats.accepted.keys())


def _duplicates(stats: _Stats) -> int:
    """Copies of a letter, and letters beyond the first of one submission."""
    return stats.duplicates + len(_numbered_twice(stats))


def _drained(stats: _Stats) -> bool:
    """Every accepted letter delivered and handed over. The counts answer at once while
    they fall short; letters of an earlier run found in a target's inbox count in them, so
    the sets have the last word."""
    # The counts first, without a set: there are at least this many to wait for.
    least = len(stats.accepted) - len(stats.unverified)
    if len(stats.handed_over) < least or len(stats.delivered) < least:
        return False
    # A letter that came only in copies that did not verify settles at once, as lost.
    accepted = stats.accepted.keys() - (stats.unverified - stats.delivered.keys())
    if len(stats.handed_over) < len(accepted) or len(stats.delivered) < len(accepted):
        return False
    return accepted <= stats.delivered.keys() and accepted <= stats.handed_over.keys()


async def _baseline(
    cluster: Cluster | None,
    pair: tuple[str, str],
    seconds: float,
    workdir: Path,
    rate: float = 0.0,
    body_bytes: int = 1500,
) -> dict[str, float]:
    """The raw gRPC stream on this machine between the TLS certificates of ``pair``
    (client, server) in the cluster's PKI, or, for running targets, in a throwaway PKI:
    the same key types and chain as the exchange's. Flat out, or paced at ``rate``."""
    if cluster is not None:
        pki = cluster.pki
    else:
        pair = (A, B)
        pki = await asyncio.to_thread(
            init_pki, workdir / "baseline-pki", hub="national", agencies=list(pair)
        )
    return await measure_between(
        pki, pair, _sample_envelope(body_bytes), seconds=seconds, workdir=workdir, rate=rate
    )


def _routes(routes: dict[str, str], stats: _Stats) -> list[dict[str, object]]:
    """Letters accepted and delivered on each hop of the chain."""
    accepted: dict[str, int] = dict.fromkeys(routes, 0)
    delivered: dict[str, int] = dict.fromkeys(routes, 0)
    for shams in stats.accepted:
        origin = shams.partition("/")[0]
        if origin in accepted:
            accepted[origin] += 1
            delivered[origin] += shams in stats.delivered
    return [
        {"from": a, "to": b, "letters": accepted[a], "delivered": delivered[a]}
        for a, b in routes.items()
    ]


def _sample_envelope(body_bytes: int = 1500) -> bytes:
    """Bytes of the size of one signed letter of ``body_bytes``, for the baseline."""
    from client_sdk import pb

    header = pb.EnvelopeHeader(subject="load", body_size=body_bytes).SerializeToString()
    return pb.Envelope(header=header + bytes(300), body=b"x" * body_bytes).SerializeToString()


def _report(
    p: Params,
    stats: _Stats,
    start: float,
    sent_done: float,
    baseline: Baseline,
    processes: dict[str, dict[str, float]],
    reference: Sequence[tuple[float, float]] = (),
) -> dict[str, object]:
    accepted = set(stats.accepted)
    delivered = accepted & set(stats.delivered)
    last = max((stats.delivered[s] for s in delivered), default=start)
    elapsed = max(last - start, 1e-9)
    throughput = len(delivered) / elapsed
    baseline_lps = baseline.lps
    # CPU a letter over every process, and that in raw gRPC messages of the same pace: a
    # letter costs this many one-way stream messages (both ends' CPU counted).
    cpu_ms = sum(f["cpu_s"] for f in processes.values()) / max(len(delivered), 1) * 1000
    # What the servers wrote to storage a letter (databases, write-ahead logs, logs); only
    # for servers this run started (/proc), not for running targets.
    written = [f["disk_write_mb"] for f in processes.values() if "disk_write_mb" in f]
    disk_kb = sum(written) * 1024 / max(len(delivered), 1) if written else None
    raw_ms = baseline.paced_cpu_ms_per_message or baseline.cpu_ms_per_message
    return {
        "letters": len(accepted),
        "submitted": len(stats.submitted),
        "refused": stats.refused,
        "delivered": len(delivered),
        "handed_over": len(accepted & set(stats.handed_over)),
        "lost": len(accepted - delivered),
        "duplicates": _duplicates(stats),
        # Of them, letters beyond the first of one submission (the node numbered it twice).
        "numbered_twice": len(_numbered_twice(stats)),
        "after_drain": stats.after_drain,
        "misrouted": len(stats.misrouted),
        "foreign": len(stats.foreign),
        # Letters of this run that came only in copies that did not verify (each one also
        # lost); a letter's repeats, or an earlier run's letters on targets, count once/not.
        "verify_failures": len((stats.unverified - stats.delivered.keys()) & accepted),
        "elapsed_s": round(elapsed, 3),
        "send_s": round(sent_done - start, 3),
        # At a fixed rate: how far the senders fell behind their schedule at worst (letters
        # are never skipped; the wait is in their latency, counted from their slot).
        "pacer_max_lag_ms": round(stats.pacer_lag_s * 1000, 1),
        # What the senders managed to offer: below params.rate when the exchange pushed back.
        "offered_lps": round(len(stats.submitted) / max(sent_done - start, 1e-9), 1),
        "throughput_lps": round(throughput, 1),
        "baseline_lps": round(baseline_lps, 1),
        "ratio": round(throughput / baseline_lps, 3) if baseline_lps else None,
        "baseline": asdict(baseline),
        "cpu_ms_per_letter": round(cpu_ms, 3),
        "disk_kb_per_letter": round(disk_kb, 1) if disk_kb is not None else None,
        "letter_in_messages": round(cpu_ms / raw_ms, 1) if raw_ms else None,
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
        # The machine's own speed during the run: the CPU time of a fixed loop, its median
        # (per window below). Figures of two runs compare only if these are alike.
        "reference_cpu_ms": median_of(reference),
        "windows": _windows(stats, delivered, start, sent_done, reference),
        "processes": processes,
        "params": asdict(p),
        "machine": machine(),
    }


def _windows(
    stats: _Stats,
    delivered: set[str],
    start: float,
    sent_done: float,
    reference: Sequence[tuple[float, float]],
) -> dict[str, object]:
    """Delivered letters per window of the sending period (60 s windows when it lasted two
    minutes or more, else 10 s): the first and last full windows show any degradation.
    Also the p99 from submission to delivery of the letters whose slot fell in each window:
    whether a long run's tail is spread over it or made in a few bad windows; and the
    reference loop's CPU time in each (loadtest.reference): whether the machine itself
    was slower in those windows."""
    span = sent_done - start
    size = 60.0 if span >= 120 else 10.0
    count = int(span // size)
    bins = [0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    for shams in delivered:
        i = int((stats.delivered[shams] - start) // size)
        if 0 <= i < count:
            bins[i] += 1
        sent = stats.sent_at.get(shams)
        if sent is not None and 0 <= (j := int((sent - start) // size)) < count:
            latencies[j].append(stats.delivered[shams] - sent)
    rates = [round(n / size, 1) for n in bins]
    return {
        "window_s": size,
        "delivered_lps": rates,
        "last_over_first": round(rates[-1] / rates[0], 3) if count >= 2 and rates[0] else None,
        "submit_delivered_p99_ms": [_percentiles(v)["p99"] for v in latencies],
        "reference_cpu_ms": per_window(reference, start, size, count),
    }


def _summary(report: dict[str, object]) -> str:
    lat = report["latency_ms"]
    assert isinstance(lat, dict)
    unhanded = cast(int, report["delivered"]) - cast(int, report["handed_over"])
    rows = [
        f"letters accepted   {report['letters']}",
        f"delivered          {report['delivered']}   lost {report['lost']}   duplicates {report['duplicates']}"
        + (f" ({report['numbered_twice']} numbered twice)" if report.get("numbered_twice") else "")
        + f"   misrouted {report['misrouted']}   verify failures {report['verify_failures']}",
        f"handed over        {report['handed_over']}"
        + (f"   NOT HANDED OVER {unhanded}" if unhanded else ""),
        *_after_drain_row(report),
        f"throughput         {report['throughput_lps']} letters/s (baseline {report['baseline_lps']}/s,"
        f" ratio {report['ratio']})",
        f"cpu a letter       {report['cpu_ms_per_letter']} ms, all processes"
        + (
            f" (= {report['letter_in_messages']} raw gRPC messages at this pace)"
            if report["letter_in_messages"]
            else ""
        ),
    ]
    if report.get("disk_kb_per_letter") is not None:
        rows.append(f"disk writes        {report['disk_kb_per_letter']} KB a letter, all servers")
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
    routes = report.get("routes", [])
    assert isinstance(routes, list)
    if len(routes) > 1:
        rows.append(
            "routes             "
            + "   ".join(f"{r['from']}->{r['to']} {r['delivered']}/{r['letters']}" for r in routes)
        )
    if report["foreign"]:
        rows.append(
            f"foreign            {report['foreign']} letters from other agencies, left unread"
        )
    windows = report["windows"]
    assert isinstance(windows, dict)
    if windows["delivered_lps"]:
        rows.append(
            f"per {windows['window_s']:.0f} s window  {windows['delivered_lps']} letters/s"
            f"   last/first {windows['last_over_first']}"
        )
        rows.append(f"  p99 delivered ms {windows['submit_delivered_p99_ms']}")
        rows.append(f"  reference loop ms {windows['reference_cpu_ms']}")
    procs = report["processes"]
    assert isinstance(procs, dict)
    for name, s in procs.items():
        threads = (
            f" (event loop {s['event_loop_cpu_s']} s, db writer {s['db_writer_cpu_s']} s)"
            if "db_writer_cpu_s" in s
            else ""
        )
        memory = f"  peak RSS {s['peak_rss_mb']} MB" if "peak_rss_mb" in s else ""
        if "disk_write_mb" in s:
            memory += f"  wrote {s['disk_write_mb']} MB"
        lives = f"  ({int(s['restarts']) + 1} lives)" if s.get("restarts") else ""
        if s.get("exited"):
            lives += "  EXITED by itself (cpu to its last reading)"
        rows.append(f"{name:<18} cpu {s['cpu_s']} s{threads}{memory}{lives}")
    return "\n".join(rows)


def _after_drain_row(report: dict[str, object]) -> list[str]:
    """What was read after the drain ended, when anything was (counted above too)."""
    late = cast(dict[str, float], report.get("after_drain") or {})
    if not late.get("delivered") and not late.get("duplicates"):
        return []
    return [
        f"after the drain    {int(late['delivered'])} delivered, {int(late['duplicates'])}"
        f" duplicates, read in the {late['read_s']} s the inboxes were read on"
    ]


def _cmd(ns: argparse.Namespace) -> int:
    p = Params(
        letters=ns.letters,
        duration_s=ns.duration,
        senders=ns.senders,
        shared=ns.shared,
        rate=ns.rate,
        body_bytes=ns.body_bytes,
        batch=ns.batch,
        linger_ms=ns.linger_ms,
        faults=tuple(ns.fault),
        verify=not ns.no_verify,
        baseline_s=ns.baseline_seconds,
        durability=ns.durability,
        signing=ns.signing if ns.targets is None else "",  # running targets keep theirs
        nodes=ns.nodes,
        targets=str(ns.targets or ""),
    )
    targets = None
    try:
        for spec in p.faults:
            faults.parse_fault(spec)
        if not 0 <= p.linger_ms <= 1000:
            raise ValueError("--linger-ms must be 0 to 1000")
        if ns.targets is not None:
            if p.faults:
                raise ValueError("--fault needs the harness's own servers, not --targets")
            if ns.nodes != 2:
                raise ValueError(
                    "--nodes is for the harness's own servers; the targets file lists them"
                )
            targets = load_targets(ns.targets)
        needed = (len(targets.nodes) if targets else p.nodes) - 1
        node_names(needed + 1)
        if p.senders < needed:
            raise ValueError(f"{needed + 1} nodes need at least {needed} senders (--senders)")
        if ns.json and not ns.json.parent.is_dir():  # found now, not after minutes of a run
            raise ValueError(f"--json: no directory {ns.json.parent} for the report")
    except (ValueError, TargetsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    random.seed(0)

    async def main(tmp: Path) -> dict[str, object]:
        # SIGTERM (a CI timeout, kill) cancels the run like Ctrl-C: the cluster is stopped
        # by run()'s own clean-up, never left running.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(p, tmp, targets)

    try:
        with tempfile.TemporaryDirectory(prefix="chapar-load-") as tmp:
            report = asyncio.run(main(Path(tmp)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: servers stopped, no report", file=sys.stderr)
        return 130
    # The report file first: a run of minutes is not lost to a standard output that went
    # (the summary into a closed pipe ends the command, OUTPUT_FAILED).
    if ns.json:
        try:
            ns.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            # The summary in its stead; if that cannot be printed either, one line says
            # both were lost.
            emit(
                [_summary(report)],
                "the run's summary could not be printed, and its report could not be written"
                f" to {ns.json}: {exc.strerror or exc}",
            )
            print(f"error: --json: cannot write the report: {exc}", file=sys.stderr)
            return 1
    emit(
        [_summary(report)],
        "the run's summary could not be printed"
        + (f" (the report is in {ns.json})" if ns.json else ""),
    )
    return (
        0
        if report["lost"] == report["duplicates"] == report["misrouted"] == 0
        and report["verify_failures"] == 0
        and report["handed_over"] == report["delivered"]
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
    sp.add_argument(
        "--senders",
        type=int,
        default=4,
        help="concurrent submission streams (with --shared: senders on one stream a node)",
    )
    sp.add_argument(
        "--shared",
        action="store_true",
        help="the senders of a node share one stream (SharedStream), one letter a call",
    )
    sp.add_argument(
        "--rate", type=float, default=0.0, help="offered letters/s in total (0: flat out)"
    )
    sp.add_argument("--body-bytes", type=int, default=1500)
    sp.add_argument("--batch", type=int, default=64, help="letters per stream frame")
    sp.add_argument(
        "--linger-ms",
        type=float,
        default=DEFAULT_STREAM_LINGER_S * 1000,
        help="how long a stream frame that is not full waits for more letters (0 to 1000)",
    )
    sp.add_argument(
        "--fault", action="append", default=[], help="e.g. kill-hub@10s, stop-recipient@5s:30s"
    )
    sp.add_argument("--no-verify", action="store_true", help="skip verifying each received letter")
    sp.add_argument("--baseline-seconds", type=float, default=3.0, help="0 skips the raw baseline")
    sp.add_argument("--durability", choices=["full", "normal"], default="full")
    sp.add_argument(
        "--signing",
        choices=_SIGNING,
        default="ed25519",
        help="signing keys of the harness's own PKI (running targets keep theirs)",
    )
    sp.add_argument(
        "--nodes",
        type=int,
        default=2,
        help=f"agency nodes to start, 2 to {MAX_NODES}: letters go from each to the next",
    )
    sp.add_argument(
        "--targets",
        type=Path,
        help="drive running servers listed in this TOML file instead (see loadtest/targets.py)",
    )
    sp.add_argument("--json", type=Path, help="write the report here")
    sp.set_defaults(func=_cmd)
