"""The sequential-acknowledgement tool (loadtest.sequential_acks): checks the measurement,
never speed. Every letter must be acknowledged, one at a time, and answered with HANDOVER
evidence before its time counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module, run_module_json

pytestmark = pytest.mark.integration


def test_every_letter_is_acknowledged_one_at_a_time_and_handed_over(tmp_path: Path) -> None:
    result, report = run_module_json(
        "loadtest.sequential_acks", "--letters", "20", out=tmp_path / "acks.json"
    )
    assert (report["letters"], report["handed_over"]) == (20, 20)
    ack = report["ack_ms"]
    assert 0 < ack["p50"] <= ack["p99"]
    assert report["acks_per_s"] > 0
    assert "20 acknowledgements one at a time" in result.stdout


def test_a_letter_count_out_of_range_is_refused() -> None:
    result = run_module("loadtest.sequential_acks", "--letters", "0", timeout=60)
    assert result.returncode == 2
    assert "letters must be" in result.stderr
