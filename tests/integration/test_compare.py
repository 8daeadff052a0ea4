"""loadtest.compare end to end: two trees (here the same one) in alternating real load
tests; checks the runs and the report, never speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_module

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_two_trees_run_in_turn_and_b_over_a_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    result = run_module(
        "loadtest.compare",
        *("--a", str(ROOT), "--b", str(ROOT), "--pairs", "1", "--relative-to", "hub"),
        *("--json", str(out), "--", "--letters", "200", "--baseline-seconds", "0"),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert [r["side"] for r in report["runs"]] == ["A", "B"]
    for run in report["runs"]:
        summary = run["summary"]
        assert (summary["delivered"], summary["lost"], summary["duplicates"]) == (200, 0, 0)
        assert set(summary["cpu_us_per_letter"]) == {
            "hub",
            "node-SENDER.A",
            "node-RECIPIENT.B",
            "loadgen",
        }
    assert report["ratios"]["all processes"]["mean"] > 0
    assert set(report["relative"]) == {"node-SENDER.A", "node-RECIPIENT.B", "loadgen"}
    assert report["loadtest_args"] == ["--letters", "200", "--baseline-seconds", "0"]
    assert "relative to hub, B over A:" in result.stdout


def test_a_tree_or_a_process_that_is_not_there_is_refused(tmp_path: Path) -> None:
    result = run_module("loadtest.compare", "--a", str(tmp_path), "--b", str(ROOT), timeout=60)
    assert result.returncode == 2
    assert "is not a Chapar source tree" in result.stderr
    result = run_module(
        "loadtest.compare",
        *("--a", str(ROOT), "--b", str(ROOT), "--relative-to", "relay"),
        *("--", "--letters", "50", "--baseline-seconds", "0"),
        timeout=300,
    )
    assert result.returncode == 2
    assert "no process 'relay' in the report: hub, node-SENDER.A" in result.stderr
