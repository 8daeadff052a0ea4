"""A review of the load harness's bookkeeping: each test proves a figure the report gets
wrong (it fails on the code it was written against)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from types import SimpleNamespace

from client_sdk import Receipt, pb
from client_sdk.shams import parse_shams
from loadtest import harness
from node import faults

FIRST = "SENDER.A/O/2026/0000001"
SECOND = "SENDER.A/O/2026/0000002"


def _receipt(shams: str, request_id: str) -> Receipt:
    return Receipt(shams, parse_shams(shams), b"", pb.Evidence(), request_id)


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
