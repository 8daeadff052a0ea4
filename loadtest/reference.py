"""How fast the machine itself was during a run: a fixed piece of work, timed once a second.

On a shared virtual machine the same instructions take more CPU time in some minutes than
in others (whatever the host is doing; nothing inside the guest says so: no steal time, no
iowait). At a fixed offered rate the exchange's CPU a letter, and with it the tail
latency, follow that speed. So the harness starts this small process beside the servers
and reports, for each window of the run, the median CPU time of the same pure-Python
loop: a run whose windows differ in it ran on a machine that changed speed under it,
whatever the exchange did. Its own CPU (about 0.1 % of a core) is in no process's
figures. With ``--targets`` it measures the load generator's machine, not the servers'.

    python -m loadtest.reference    (JSON lines on stdout: {"t": perf_counter, "cpu_ms": ...};
                                    perf_counter is CLOCK_MONOTONIC, one clock for every process)
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = ["INTERVAL_S", "Reference", "median_of", "per_window", "sample_ms"]

INTERVAL_S = 1.0
_ROUNDS = 20_000  # about 1 ms of CPU on this machine class: 0.1 % of a core


def _work() -> int:
    total = 0
    for i in range(_ROUNDS):
        total += i * i % 7
    return total


def sample_ms() -> float:
    """CPU milliseconds (this thread's, not wall time) the fixed loop takes once."""
    before = time.thread_time()
    _work()
    return (time.thread_time() - before) * 1000


def per_window(
    samples: Sequence[tuple[float, float]], start: float, size: float, count: int
) -> list[float | None]:
    """The median of ``(time, cpu_ms)`` samples in each of ``count`` windows of ``size``
    seconds from ``start`` (None for a window without samples), in ms to 3 decimals."""
    bins: list[list[float]] = [[] for _ in range(count)]
    for at, ms in samples:
        i = int((at - start) // size)
        if 0 <= i < count:
            bins[i].append(ms)
    return [round(statistics.median(b), 3) if b else None for b in bins]


def median_of(samples: Sequence[tuple[float, float]]) -> float | None:
    """The median cpu_ms of ``(time, cpu_ms)`` samples, to 3 decimals."""
    return round(statistics.median(ms for _, ms in samples), 3) if samples else None


class Reference:
    """The reference loop as a child process for the length of a run; ``stop`` returns
    its samples, ``(perf_counter time, cpu_ms)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None
        self._samples: list[tuple[float, float]] | None = None  # read once, when stopped

    def start(self) -> None:
        self._out = self.path.open("wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.reference"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> list[tuple[float, float]]:
        """Ends the process and reads what it wrote (again: the same samples). A run
        shorter than the process's start-up still gets its first sample: up to 5 s are
        given for it."""
        if self._samples is not None:
            return self._samples
        proc, self._proc = self._proc, None
        if proc is not None:
            deadline = time.monotonic() + 5.0
            while (
                proc.poll() is None and time.monotonic() < deadline and not self.path.stat().st_size
            ):
                time.sleep(0.01)
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None
        samples: list[tuple[float, float]] = []
        with contextlib.suppress(FileNotFoundError), self.path.open() as lines:
            for line in lines:
                try:
                    item = json.loads(line)
                    samples.append((float(item["t"]), float(item["cpu_ms"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the end
        if proc is not None:
            self._samples = samples
        return samples


def main() -> None:
    while True:
        ms = sample_ms()
        try:
            sys.stdout.write(json.dumps({"t": time.perf_counter(), "cpu_ms": round(ms, 4)}) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            return
        time.sleep(INTERVAL_S)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
