"""The reference loop that tells how fast the machine was during a load test."""

from __future__ import annotations

from pathlib import Path

from loadtest.reference import Reference, median_of, per_window, sample_ms


def test_the_reference_loop_takes_cpu_time_and_the_same_each_time() -> None:
    samples = sorted(sample_ms() for _ in range(7))
    assert samples[0] > 0.01  # it does work, measured in CPU time
    assert samples[3] < 50 * samples[0]  # the median is not wildly off the fastest


def test_samples_fall_into_their_windows_and_a_median_each() -> None:
    samples = [(0.5, 1.0), (1.5, 3.0), (2.0, 2.0), (10.5, 5.0), (31.0, 7.0), (-1.0, 9.0)]
    assert per_window(samples, 0.0, 10.0, 3) == [2.0, 5.0, None]
    assert median_of(samples) == 4.0
    assert median_of([]) is None


def test_the_reference_process_writes_samples_until_stopped(tmp_path: Path) -> None:
    import time

    reference = Reference(tmp_path / "reference.jsonl")
    before = time.perf_counter()
    reference.start()
    time.sleep(1.5)
    samples = reference.stop()
    assert reference.stop() == samples  # stopping again changes nothing
    assert 1 <= len(samples) <= 3  # one a second
    assert all(before < at < time.perf_counter() and ms > 0 for at, ms in samples)


def test_a_run_shorter_than_the_process_start_up_still_gets_a_sample(tmp_path: Path) -> None:
    reference = Reference(tmp_path / "reference.jsonl")
    reference.start()
    samples = reference.stop()  # at once: the process has not written yet
    assert len(samples) == 1
