"""A review of the load harness's bookkeeping: each test proves a figure the report gets
wrong (it fails on the code it was written against)."""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

from client_sdk import Receipt, pb
from client_sdk.errors import Unavailable
from client_sdk.shams import parse_shams
from loadtest import harness
from loadtest.targets import Endpoint
from node import faults

FIRST = "SENDER.A/O/2026/0000001"
SECOND = "SENDER.A/O/2026/0000002"


def _receipt(shams: str, request_id: str) -> Receipt:
    return Receipt(shams, parse_shams(shams), b"", pb.Evidence(), request_id)


class _TwoLetterInbox:
    """The recipient node's inbox stream: ``shams`` in turn, then the stream ends."""

    def __init__(self, shams: list[str]) -> None:
        self.shams = shams
        self.done = asyncio.Event()

    def client(self, *args: object, **kwargs: object) -> _TwoLetterInbox:
        return self

    async def __aenter__(self) -> _TwoLetterInbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def trust_from_directory(self, trust: object) -> object:
        return trust

    async def inbox(self) -> AsyncIterator[SimpleNamespace]:
        for shams in self.shams:
            yield SimpleNamespace(shams=shams, ack=functools.partial(self.ack, shams))
        await self.done.wait()  # the drain is over
        raise Unavailable("the node is stopping", reason="STREAM_ENDED")

    async def ack(self, shams: str) -> pb.Evidence:
        return pb.Evidence()


async def test_a_submission_numbered_twice_is_a_duplicate_even_when_the_first_answer_was_lost(
    monkeypatch,
) -> None:
    # A sender resubmits only what was never answered (its stream broke before the
    # receipt came). If the node numbers that retry a second time (the very fault the
    # request-id check in _Plan.accepted is meant to catch), the harness holds only the
    # second number: the first letter is delivered, read, acknowledged ... and dropped from
    # the report, which says 0 duplicates, 0 lost: one submission, two letters delivered.
    stats = harness._Stats()
    stats.submitted["r1"] = time.perf_counter()
    plan = harness._Plan("RECIPIENT.B", harness.Params(), stats, harness._Pacer(0), 1, None, "x")
    plan.accepted(_receipt(SECOND, "r1"))  # the retry's answer; the first answer was lost
    node = _TwoLetterInbox([FIRST, SECOND])  # both letters the node stored are delivered
    monkeypatch.setattr(harness, "ExchangeClient", node.client)
    ending = asyncio.Event()
    endpoint = Endpoint("RECIPIENT.B", "x:1", SimpleNamespace(trust_store=SimpleNamespace))  # type: ignore[arg-type]
    reader = asyncio.create_task(
        harness._consumer(
            endpoint, {"SENDER.A": "RECIPIENT.B"}, harness.Params(verify=False), stats, ending
        )
    )
    for _ in range(200):
        if len(stats.handed_over) == 2:
            break
        await asyncio.sleep(0.01)
    ending.set()
    node.done.set()
    await asyncio.wait_for(reader, 5)
    assert set(stats.handed_over) == {FIRST, SECOND}  # two letters read and acknowledged
    report = harness._report(
        harness.Params(), stats, 0.0, time.perf_counter(), harness.Baseline(), {}
    )
    assert report["submitted"] == 1
    assert report["duplicates"] >= 1, (
        f"one submission, two letters delivered; the report says delivered"
        f" {report['delivered']}, duplicates {report['duplicates']}, lost {report['lost']}"
    )


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
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics = ""
        self.lives: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LIFE], stdout=subprocess.PIPE)
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
    # term-/stop- faults bank a life's CPU *before* SIGTERM: what the server then does to
    # stop cleanly (end its streams, commit what was queued) is read by nobody; its /proc
    # is gone once the fault has reaped it. The lives' sum is short by every clean stop.
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
    # two lives of 0.2 s each, and one clean stop of 0.5 s
    assert figures["restarts"] == 1
    assert figures["cpu_s"] >= 0.85, f"two lives and a clean stop: {figures['cpu_s']} s of CPU"
