"""The batch-cost tool (loadtest.batch_cost): checks the measurement, never speed.

Every batch it submits must be read and acknowledged before its CPU is counted, each
process's share is reported, and two sizes give a fit of a fixed and a per-letter part.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module, run_module_json

pytestmark = pytest.mark.integration


def test_each_batch_is_handed_over_and_each_process_is_counted(tmp_path: Path) -> None:
    result, report = run_module_json(
        "loadtest.batch_cost",
        *("--sizes", "1", "4", "--batches", "3", "--pause-seconds", "0.1"),
        out=tmp_path / "cost.json",
    )
    assert [(r["size"], r["handed_over"]) for r in report["rows"]] == [(1, 3), (4, 12)]
    for row in report["rows"]:
        costs = row["cpu_ms_per_batch"]
        assert set(costs) == {"hub", "node-SENDER.A", "node-RECIPIENT.B", "back-ends"}
        assert all(v >= 0 for v in costs.values())
        assert row["cpu_ms_per_batch_total"] == pytest.approx(sum(costs.values()), abs=0.05)
    assert set(report["fit"]) == {"per_letter_ms", "fixed_per_batch_ms"}
    assert "ms a batch +" in result.stdout


def test_sizes_out_of_range_are_refused() -> None:
    result = run_module("loadtest.batch_cost", "--sizes", "0", timeout=60)
    assert result.returncode == 2
    assert "sizes must be" in result.stderr
