"""The message-cost tool (loadtest.message_cost): checks the measurement, never speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module, run_module_json

pytestmark = pytest.mark.integration


def test_each_pace_is_measured_with_the_cpu_of_both_processes(tmp_path: Path) -> None:
    result, report = run_module_json(
        "loadtest.message_cost",
        *("--rates", "50", "0", "--seconds", "0.5"),
        out=tmp_path / "cost.json",
    )
    paced, flat = report["rows"]
    assert (paced["rate"], flat["rate"]) == (50, 0)
    # Paced: about 50 a second for half a second; flat out: many more.
    assert 10 <= paced["messages"] <= 40
    assert flat["messages"] > paced["messages"]
    assert paced["cpu_us_per_message"] > 0
    assert flat["cpu_us_per_message"] > 0
    assert report["payload_bytes"] == 2000
    assert "flat out" in result.stdout
    assert "50/s" in result.stdout


def test_a_negative_rate_is_refused() -> None:
    result = run_module("loadtest.message_cost", "--rates", "-1", timeout=60)
    assert result.returncode == 2
    assert "rates must be" in result.stderr
