"""Drain-rate windows of the backlog benchmark (loadtest.backlog._windows)."""

from __future__ import annotations

from loadtest.backlog import _windows


def test_windows_start_at_the_first_letter_and_cover_the_whole_drain() -> None:
    # Node start-up (nothing stored for 3 s), then 100 letters/s, then 50/s, last window short.
    samples = [(0.0, 0), (1.0, 0), (2.0, 0), (3.0, 0)]
    samples += [(3.0 + s, 100 * s) for s in range(1, 11)]
    samples += [(13.0 + s, 1000 + 50 * s) for s in range(1, 16)]
    assert _windows(samples, 10.0) == [100.0, 50.0, 50.0]


def test_windows_of_an_empty_drain() -> None:
    assert _windows([(0.0, 0), (1.0, 0)], 10.0) == []
