"""The load harness's own bookkeeping, which decides what a report claims: a submission
numbered twice is a duplicate (whichever of its answers came), a refused letter counts
once, percentiles take the nearest rank, a fixed rate sends every slot before its
deadline, every life of a server counts with its stop, and the raw baseline's message
follows the letters' size."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import pytest

from client_sdk import Receipt, pb
from client_sdk.errors import InvalidArgument, ResourceExhausted, Unavailable
from client_sdk.shams import parse_shams
from loadtest import harness
from loadtest.targets import Endpoint
from node import faults
from node.cluster import ReapedPopen

LETTER = "SENDER.A/O/2026/0000001"


def _plan(stats: harness._Stats, pacer: harness._Pacer, deadline: float | None) -> harness._Plan:
    return harness._Plan("RECIPIENT.B", harness.Params(), stats, pacer, None, deadline, "x")


def _receipt(shams: str, request_id: str) -> Receipt:
    return Receipt(shams, parse_shams(shams), b"", pb.Evidence(), request_id)


def test_a_request_id_answered_with_a_second_number_counts_as_a_duplicate() -> None:
    stats = harness._Stats()
    stats.submitted["r1"] = time.perf_counter()
    plan = _plan(stats, harness._Pacer(0), None)
    plan.accepted(_receipt("SENDER.A/O/2026/0000001", "r1"))
    plan.accepted(_receipt("SENDER.A/O/2026/0000001", "r1"))  # the same answer again: fine
    assert harness._duplicates(stats) == 0
    plan.accepted(_receipt("SENDER.A/O/2026/0000002", "r1"))  # stored twice under two numbers
    assert harness._duplicates(stats) == 1
    assert list(stats.accepted) == ["SENDER.A/O/2026/0000001"]


async def test_a_late_pacer_still_sends_every_slot_before_the_deadline() -> None:
    # Behind schedule (the exchange pushing back), the slots due before the deadline are
    # still sent, late, their wait counted in their latency: none is dropped at the end.
    pacer = harness._Pacer(100.0)  # a slot every 10 ms
    start = pacer.next
    deadline = start + 0.05  # five slots
    plan = _plan(harness._Stats(), pacer, deadline)
    await asyncio.sleep(0.2)  # far behind: the wall clock is past the deadline
    slots = []
    while plan.more(len(slots)):
        slots.append(await pacer.wait())
    assert len(slots) == 5
    assert slots == pytest.approx([start + i * 0.01 for i in range(5)])
    assert pacer.max_lag_s >= 0.15


def test_percentiles_are_not_one_rank_high_on_small_samples() -> None:
    # at(q) took ordered[int(q * n)]: whenever q * n was whole it was one rank above the
    # nearest rank (ceil(q * n)-th value), so the p99 of 100 latencies (a 10 s window at
    # 10 letters/s, a short run) was always their maximum, the p95 of 20 too, and the
    # median of two values the larger one.
    hundred = harness._percentiles([ms / 1000 for ms in range(1, 101)])  # 1 .. 100 ms
    assert hundred["max"] == 100.0
    assert hundred["p99"] == 99.0, f"p99 of 1..100 ms reported as {hundred['p99']} ms"
    assert hundred["p50"] == 50.0, f"p50 of 1..100 ms reported as {hundred['p50']} ms"
    twenty = harness._percentiles([ms / 1000 for ms in range(1, 21)])
    assert twenty["p95"] == 19.0, f"p95 of 1..20 ms reported as {twenty['p95']} ms"
    pair = harness._percentiles([0.010, 0.090])
    assert pair["p50"] == 10.0, f"p50 of (10, 90) ms reported as {pair['p50']} ms"


@pytest.mark.parametrize("body", [100, 1500, 64_000])
def test_the_baseline_message_follows_the_letters_size(body: int) -> None:
    size = len(harness._sample_envelope(body))
    assert body + 300 < size < body + 400


def test_a_letter_that_never_verifies_counts_once_and_does_not_hold_the_drain() -> None:
    stats = harness._Stats()
    stats.accepted = {"L1": 0.0, "L2": 0.0}
    stats.delivered = {"L2": 0.0}
    stats.handed_over = {"L2": 0.0}
    stats.unverified = {"L1", "EARLIER-RUN"}  # L1 came (maybe often) only in bad copies
    assert harness._drained(stats)  # L1 is lost now; waiting would not change that
    stats.unverified.add("L2")  # a bad copy of L2 before a good one: it was delivered
    assert harness._drained(stats)
    stats.delivered.pop("L2")
    stats.unverified.discard("L2")
    assert not harness._drained(stats)


def test_the_drain_check_builds_no_set_while_the_counts_fall_short() -> None:
    # The drain is checked every 0.2 s; it built the set of every accepted letter before
    # comparing counts, about 14 ms a check at 30,000 letters on a slow machine.
    stats = harness._Stats()
    stats.accepted = {f"L{i}": 0.0 for i in range(100_000)}
    stats.delivered = dict.fromkeys(list(stats.accepted)[:99_000], 0.0)
    stats.handed_over = dict(stats.delivered)
    start = time.process_time()
    for _ in range(200):
        assert not harness._drained(stats)
    spent = time.process_time() - start
    assert spent < 0.2, f"200 checks of a drain 1,000 letters short took {spent:.2f} s"


@pytest.mark.parametrize("start", [0.0, 16723.00214149, 12345.678901234, 1e6 + 0.1])
def test_the_slots_before_a_deadline_are_counted_whatever_the_clock_reads(start: float) -> None:
    # The slots are sums of intervals: at some clock readings the fifth of five fell a
    # rounding error short of the deadline and a sixth letter was sent (a fresh clone's
    # full run failed the test above so).
    pacer = harness._Pacer(100.0)
    pacer.next = start
    plan = _plan(harness._Stats(), pacer, start + 0.05)
    made = 0
    while plan.more(made):
        pacer.next += pacer.interval
        made += 1
    assert made == 5


class _RefusingNode:
    """A node that refuses every letter (a per-letter error on the stream, as send_stream
    yields it: the stream itself goes on and ends normally)."""

    def __init__(self) -> None:
        self.streams = 0

    async def send_stream(self, drafts, **kwargs: object):  # type: ignore[no-untyped-def]
        self.streams += 1
        async for _ in drafts:
            await asyncio.sleep(0.001)
            yield InvalidArgument("refused", reason="BODY_TOO_LARGE")


async def test_a_refused_letter_is_counted_once_and_not_sent_again_forever() -> None:
    # _sender popped a draft from its unanswered ones only on a Receipt: a refused draft
    # stayed there, so once the stream ended the sender sent it again at once, and again,
    # each time counting one more refusal; for a refusal that will not change the run never
    # ended, and for a retryable one (RECIPIENT_QUEUE_FULL) ``refused`` counted attempts,
    # in a loop without a pause. _shared_sender counts a final refusal once and stops.
    stats = harness._Stats()
    plan = harness._Plan("RECIPIENT.B", harness.Params(), stats, harness._Pacer(0), 1, None, "x")
    node = _RefusingNode()
    sender = asyncio.create_task(harness._sender(0, node, plan))  # type: ignore[arg-type]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(sender), 1.0)
    still_sending = not sender.done()
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sender
    assert len(stats.submitted) == 1
    assert (stats.refused, node.streams, still_sending) == (1, 1, False), (
        f"one letter refused: counted {stats.refused} times over {node.streams} streams,"
        f" sender still sending after 1 s: {still_sending}"
    )


class _BusyNode:
    """A node that refuses each letter's first try for now (retryable, with a retry_after)
    and accepts it when it comes again."""

    def __init__(self) -> None:
        self.tries: list[tuple[str, float]] = []  # (request id, when)

    async def send_stream(self, drafts, **kwargs: object):  # type: ignore[no-untyped-def]
        async for draft in drafts:
            self.tries.append((draft.request_id, time.monotonic()))
            if [rid for rid, _ in self.tries].count(draft.request_id) == 1:
                yield ResourceExhausted("busy", reason="RECIPIENT_QUEUE_FULL", retry_after=0.2)
            else:
                yield _receipt(LETTER, draft.request_id)


async def test_a_letter_refused_for_now_is_sent_again_after_its_retry_after_and_not_counted() -> (
    None
):
    stats = harness._Stats()
    plan = harness._Plan("RECIPIENT.B", harness.Params(), stats, harness._Pacer(0), 1, None, "x")
    node = _BusyNode()
    await asyncio.wait_for(harness._sender(0, node, plan), 5)  # type: ignore[arg-type]
    (rid,) = stats.submitted
    assert [r for r, _ in node.tries] == [rid, rid]
    assert node.tries[1][1] - node.tries[0][1] >= 0.2  # after the node's retry_after
    assert stats.refused == 0
    assert list(stats.accepted) == [LETTER]


@contextlib.contextmanager
def _busy_process(cpu_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """A process that has burnt ``cpu_s`` of CPU and waits to be ended (killed on exit)."""
    code = (
        "import time\n"
        "t = time.process_time()\n"
        f"while time.process_time() - t < {cpu_s}: pass\n"
        "print('done', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"done\n"
            yield proc
        finally:
            proc.kill()


def test_a_server_that_ends_by_itself_keeps_the_cpu_of_its_last_reading() -> None:
    # The CPU of a server process that exited outside a fault (a crash) was read from
    # /proc only at the end, when there was nothing left to read: the report said 0 s.
    with _busy_process(0.3) as proc:
        probe = harness._Probe(SimpleNamespace(proc=proc, metrics=""))  # type: ignore[arg-type]
        probe.sample()
        proc.kill()
        proc.wait()
        figures = probe.end()
    assert figures["cpu_s"] >= 0.25
    assert figures["exited"] == 1


def test_a_server_still_running_is_read_at_the_end() -> None:
    with _busy_process(0.2) as proc:
        probe = harness._Probe(SimpleNamespace(proc=proc, metrics=""))  # type: ignore[arg-type]
        figures = probe.end()
    assert figures["cpu_s"] >= 0.15
    assert "exited" not in figures


async def test_a_life_a_fault_ended_is_counted_once_and_not_as_exited() -> None:
    with _busy_process(0.2) as proc:
        probe = harness._Probe(SimpleNamespace(proc=proc, metrics=""))  # type: ignore[arg-type]
        probe.sample()
        await probe.bank()  # the fault reads it, then kills it (its restart failed here)
        proc.kill()
        proc.wait()
        figures = probe.end()
    assert 0.15 <= figures["cpu_s"] < 0.35
    assert "exited" not in figures
    assert figures["restarts"] == 1


_LIFE = (
    "import signal, sys, time\n"
    "def burn(s):\n"
    "    t = time.process_time()\n"
    "    while time.process_time() - t < s: pass\n"
    "def stop(*_):\n"
    "    burn(0.5)  # a clean stop's work: streams ended, the queued writes committed\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "burn(0.2)\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(0.05)\n"
)


class _Server:
    """A server process as node.cluster.ServerProcess drives it: each life burns 0.2 s
    of CPU, and 0.5 s more on SIGTERM before it exits."""

    def __init__(self) -> None:
        self.proc: ReapedPopen | None = None
        self.metrics = ""
        self.lives: list[ReapedPopen] = []

    def start(self) -> None:
        self.proc = ReapedPopen([sys.executable, "-c", _LIFE], stdout=subprocess.PIPE)
        self.lives.append(self.proc)

    async def wait_ready(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line == b"ready\n"
        return "x:1"

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


async def test_the_cpu_a_server_spends_stopping_cleanly_in_a_fault_is_counted() -> None:
    # term-/stop- faults banked a life's CPU *before* SIGTERM: what the server then did to
    # stop cleanly (end its streams, commit what was queued) was read by nobody; its /proc
    # is gone once the fault has reaped it. The lives' sum was short by every clean stop.
    # The life's figures now come from its reaping (os.wait4: ReapedPopen.rusage).
    server = _Server()
    server.start()
    await server.wait_ready()
    probe = harness._Probe(server)  # type: ignore[arg-type]
    cluster = SimpleNamespace(hub=server)
    try:
        await faults.inject(
            cluster,  # type: ignore[arg-type]
            faults.parse_fault("term-hub@0s"),
            sender="SENDER.A",
            recipient="RECIPIENT.B",
            before_end=lambda proc: probe.bank(),
        )
        figures = probe.end()
    finally:
        for life in server.lives:
            life.kill()
            life.wait()
            assert life.stdout is not None
            life.stdout.close()
    # two lives of 0.2 s each, and one clean stop of 0.5 s
    assert figures["restarts"] == 1
    assert figures["cpu_s"] >= 0.85, f"two lives and a clean stop: {figures['cpu_s']} s of CPU"


class _Inbox:
    """A node's inbox stream as the harness's reader sees it: letter 1, then (once
    ``again`` is set) a second copy of it, then the stream ends as a stopping node ends it."""

    def __init__(self) -> None:
        self.again = asyncio.Event()
        self.connections = 0
        self.acked: list[str] = []

    def client(self, *args: object, **kwargs: object) -> _Inbox:
        self.connections += 1
        return self

    async def __aenter__(self) -> _Inbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def trust_from_directory(self, trust: object) -> object:
        return trust

    async def inbox(self) -> AsyncIterator[SimpleNamespace]:
        for _ in range(2):
            yield SimpleNamespace(
                shams=LETTER, subject="load 0-0", ack=functools.partial(self.ack, LETTER)
            )
            await self.again.wait()
        raise Unavailable("the node is stopping", reason="STREAM_ENDED")

    async def ack(self, shams: str) -> pb.Evidence:
        self.acked.append(shams)
        return pb.Evidence()


async def test_the_reader_counts_a_copy_read_after_the_drain_and_ends_with_its_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The drain ends once every letter came once; the inboxes were then no longer read, so
    # a copy the node had streamed meanwhile (a duplicate) was never counted. The reader
    # now reads on until its stream closes (the servers stop), and does not reconnect.
    node = _Inbox()
    monkeypatch.setattr(harness, "ExchangeClient", node.client)
    stats, ending = harness._Stats(), asyncio.Event()
    endpoint = Endpoint("RECIPIENT.B", "x:1", SimpleNamespace(trust_store=SimpleNamespace))  # type: ignore[arg-type]
    params = harness.Params(verify=False)
    reader = asyncio.create_task(
        harness._consumer(endpoint, {"SENDER.A": "RECIPIENT.B"}, params, stats, ending)
    )
    for _ in range(100):
        if LETTER in stats.handed_over:
            break
        await asyncio.sleep(0.01)
    assert LETTER in stats.handed_over
    ending.set()  # the drain is over
    node.again.set()  # the copy comes, then the stream ends
    await asyncio.wait_for(reader, 5)
    assert stats.duplicates == 1
    assert node.connections == 1


def test_the_summary_says_what_was_read_after_the_drain_only_when_anything_was() -> None:
    quiet = {"after_drain": {"read_s": 0.1, "delivered": 0, "duplicates": 0}}
    assert harness._after_drain_row(quiet) == []
    late = {"after_drain": {"read_s": 0.2, "delivered": 3, "duplicates": 1}}
    (row,) = harness._after_drain_row(late)
    assert "3 delivered, 1 duplicates" in row


FIRST, SECOND = LETTER, "SENDER.A/O/2026/0000002"


class _Letters:
    """The recipient node's inbox stream: ``letters`` (number, subject) in turn, then,
    once ``done`` is set, the stream ends as a stopping node ends it."""

    def __init__(self, letters: list[tuple[str, str]]) -> None:
        self.letters = letters
        self.done = asyncio.Event()

    def client(self, *args: object, **kwargs: object) -> _Letters:
        return self

    async def __aenter__(self) -> _Letters:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def trust_from_directory(self, trust: object) -> object:
        return trust

    async def inbox(self) -> AsyncIterator[SimpleNamespace]:
        for shams, subject in self.letters:
            yield SimpleNamespace(
                shams=shams, subject=subject, ack=functools.partial(self.ack, shams)
            )
        await self.done.wait()  # the drain is over
        raise Unavailable("the node is stopping", reason="STREAM_ENDED")

    async def ack(self, shams: str) -> pb.Evidence:
        return pb.Evidence()


async def _read_all(node: _Letters, stats: harness._Stats) -> None:
    """The harness's reader on ``node`` until it has handed every letter over."""
    ending = asyncio.Event()
    endpoint = Endpoint("RECIPIENT.B", "x:1", SimpleNamespace(trust_store=SimpleNamespace))  # type: ignore[arg-type]
    reader = asyncio.create_task(
        harness._consumer(
            endpoint, {"SENDER.A": "RECIPIENT.B"}, harness.Params(verify=False), stats, ending
        )
    )
    for _ in range(200):
        if len(stats.handed_over) == len(node.letters):
            break
        await asyncio.sleep(0.01)
    ending.set()
    node.done.set()
    await asyncio.wait_for(reader, 5)
    assert set(stats.handed_over) == {shams for shams, _ in node.letters}


def _report(stats: harness._Stats) -> dict[str, object]:
    return harness._report(
        harness.Params(), stats, 0.0, time.perf_counter(), harness.Baseline(), {}
    )


_LATENCIES = {
    "latency_ms": {
        stage: {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
        for stage in ("submit_accepted", "submit_delivered", "submit_handover")
    },
    "windows": {"delivered_lps": []},
}


async def test_a_submission_numbered_twice_is_a_duplicate_even_when_the_first_answer_was_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A sender resubmits only what was never answered (its stream broke before the
    # receipt came). If the node numbers that retry a second time (the very fault the
    # request-id check in _Plan.accepted is meant to catch), the harness holds only the
    # second number: the first letter was delivered, read, acknowledged ... and dropped
    # from the report, which said 0 duplicates, 0 lost: one submission, two letters
    # delivered. Both letters carry the draft's subject, which the harness made.
    stats = harness._Stats()
    plan = harness._Plan("RECIPIENT.B", harness.Params(), stats, harness._Pacer(0), 1, None, "x")
    draft = await plan.draft(0, 0)
    assert draft.request_id is not None
    plan.accepted(_receipt(SECOND, draft.request_id))  # the retry's; the first answer was lost
    node = _Letters([(FIRST, draft.subject), (SECOND, draft.subject)])  # both delivered
    monkeypatch.setattr(harness, "ExchangeClient", node.client)
    await _read_all(node, stats)
    report = _report(stats)
    assert report["submitted"] == 1
    assert (report["delivered"], report["lost"]) == (1, 0)
    assert (report["duplicates"], report["numbered_twice"]) == (1, 1), (
        f"one submission, two letters delivered; the report says delivered"
        f" {report['delivered']}, duplicates {report['duplicates']}, lost {report['lost']}"
    )
    assert "duplicates 1 (1 numbered twice)" in harness._summary(report | _LATENCIES)


async def test_a_letter_delivered_before_its_receipt_or_of_an_earlier_run_is_no_duplicate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A letter may reach the recipient before its receipt reaches the sender; a running
    # target's inbox may hold a driven agency's letter of an earlier run (its subject
    # lacks this run's mark), never accepted in this one.
    stats = harness._Stats()
    plan = harness._Plan("RECIPIENT.B", harness.Params(), stats, harness._Pacer(0), 1, None, "x")
    draft = await plan.draft(0, 0)
    assert draft.request_id is not None
    earlier = draft.subject.replace(stats.run, harness._Stats().run)
    node = _Letters([(FIRST, draft.subject), (SECOND, earlier)])
    monkeypatch.setattr(harness, "ExchangeClient", node.client)
    await _read_all(node, stats)
    plan.accepted(_receipt(FIRST, draft.request_id))  # the receipt comes after the letter
    report = _report(stats)
    assert (report["delivered"], report["lost"], report["duplicates"]) == (1, 0, 0)
    assert report["numbered_twice"] == 0


async def test_the_progress_line_stops_when_the_run_ends_not_at_its_next_tick() -> None:
    # Off a terminal the line is written every 5 s; a run that has drained must not wait
    # out the rest of that interval (it did, up to 5 s a run, in every loadtest tool).
    stop, sent = asyncio.Event(), asyncio.Event()
    progress = asyncio.create_task(
        harness._progress(
            harness._Stats(), time.perf_counter(), stop, harness.Params(letters=1), sent
        )
    )
    await asyncio.sleep(0.1)
    stop.set()
    ended = time.monotonic()
    await asyncio.wait_for(progress, 10)
    assert time.monotonic() - ended < 1.0


class _SlowAcks(_Letters):
    """An inbox of many letters whose acknowledgements wait until ``answer`` is set."""

    def __init__(self, letters: list[tuple[str, str]]) -> None:
        super().__init__(letters)
        self.answer = asyncio.Event()
        self.acked: list[str] = []
        self.most_waiting = 0
        self._waiting = 0

    async def ack(self, shams: str) -> pb.Evidence:
        self._waiting += 1
        self.most_waiting = max(self.most_waiting, self._waiting)
        await self.answer.wait()
        self._waiting -= 1
        self.acked.append(shams)
        return pb.Evidence()


async def test_letters_waiting_for_their_acknowledgement_hold_no_task_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader made a task a letter, each waiting on a Semaphore(256) for its turn to
    # acknowledge: flat out, thousands waited (live tasks and coroutines for the cyclic GC
    # to walk), and Python 3.11's Semaphore scans its waiters at every release (the ones
    # it has woken and that have not run yet among them). Letters now wait in a queue; at
    # most 256 acknowledgements are under way, in the order the letters came.
    numbers = [f"SENDER.A/O/2026/{n:07d}" for n in range(1, 2001)]
    node = _SlowAcks([(n, "load 0-0") for n in numbers])
    monkeypatch.setattr(harness, "ExchangeClient", node.client)
    stats = harness._Stats()
    ending = asyncio.Event()
    endpoint = Endpoint("RECIPIENT.B", "x:1", SimpleNamespace(trust_store=SimpleNamespace))  # type: ignore[arg-type]
    reader = asyncio.create_task(
        harness._consumer(
            endpoint, {"SENDER.A": "RECIPIENT.B"}, harness.Params(verify=False), stats, ending
        )
    )
    for _ in range(200):
        if len(stats.delivered) == len(numbers):
            break
        await asyncio.sleep(0.01)
    assert len(stats.delivered) == len(numbers)
    tasks = len(asyncio.all_tasks())
    assert tasks < 300, f"{tasks} tasks for 2,000 letters waiting for their acknowledgement"
    node.answer.set()
    for _ in range(500):
        if len(stats.handed_over) == len(numbers):
            break
        await asyncio.sleep(0.01)
    assert node.acked == numbers  # each once, in the order they came
    assert node.most_waiting == 256
    ending.set()
    node.done.set()
    await asyncio.wait_for(reader, 5)
