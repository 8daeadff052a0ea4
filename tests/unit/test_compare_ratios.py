"""The comparison of two versions' load tests (loadtest.compare): the order of the runs and
the ratios, from synthetic reports."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.compare import compare, order, summary_of


def _report(cpu_us: dict[str, float], delivered: int = 1000) -> dict[str, Any]:
    total = sum(cpu_us.values()) / 1000
    return {
        "delivered": delivered,
        "lost": 0,
        "duplicates": 0,
        "handed_over": delivered,
        "throughput_lps": 1000.0,
        "cpu_ms_per_letter": total,
        "processes": {
            name: {"cpu_s": us * delivered / 1e6, "peak_rss_mb": 50} for name, us in cpu_us.items()
        },
        "latency_ms": {"submit_delivered": {"p50": 40.0, "p95": 80.0, "p99": 100.0, "max": 120}},
        "reference_cpu_ms": 1.0,
    }


def test_the_sides_alternate_so_that_neither_always_runs_first() -> None:
    assert order(1) == ["A", "B"]
    assert order(3) == ["A", "B", "B", "A", "A", "B"]


def test_ratios_are_b_over_a_and_relative_ones_divide_out_the_machine() -> None:
    # Pair 1 on a fast machine, pair 2 on one 20 % slower; B saves 10 % at the recipient.
    a1 = summary_of(_report({"hub": 400, "recipient": 400}))
    b1 = summary_of(_report({"hub": 400, "recipient": 360}))
    b2 = summary_of(_report({"hub": 480, "recipient": 432}))
    a2 = summary_of(_report({"hub": 480, "recipient": 480}))
    assert a1["cpu_us_per_letter"] == {"hub": 400.0, "recipient": 400.0}
    result = compare([("A", a1), ("B", b1), ("B", b2), ("A", a2)], relative_to="hub")
    assert result["ratios"]["recipient"]["pairs"] == [0.9, 0.9]
    assert result["ratios"]["all processes"]["mean"] == pytest.approx(0.95)
    assert result["relative"] == {
        "recipient": {"mean": 0.9, "min": 0.9, "max": 0.9, "pairs": [0.9, 0.9]}
    }
    # A pair across the machine's change alone would mislead; relative to the hub it does not.
    across = compare([("A", a1), ("B", b2)], relative_to="hub")
    assert across["ratios"]["recipient"]["mean"] == pytest.approx(1.08)
    assert across["relative"]["recipient"]["mean"] == pytest.approx(0.9)


def test_runs_that_do_not_make_pairs_of_a_and_b_are_refused() -> None:
    run = summary_of(_report({"hub": 400}))
    with pytest.raises(ValueError, match="pairs"):
        compare([("A", run)])
    with pytest.raises(ValueError, match="one A and one B"):
        compare([("A", run), ("A", run)])
    with pytest.raises(ValueError, match="no process 'relay'"):
        compare([("A", run), ("B", run)], relative_to="relay")
