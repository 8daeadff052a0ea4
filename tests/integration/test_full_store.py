"""The full-store tool (loadtest.full_store): checks the measurement, never speed. Three
runs on one cluster, each with letters of its own, none lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_module

pytestmark = pytest.mark.integration


def test_a_round_runs_fresh_fill_and_full_on_the_same_servers(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    result = run_module(
        "loadtest.full_store",
        *("--seconds", "1", "--fill-seconds", "1", "--rate", "200", "--out", str(out)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reports = {
        n: json.loads((out / f"round1_{n}.json").read_text()) for n in ("fresh", "fill", "full")
    }
    for name, report in reports.items():
        assert report["letters"] > 0, name
        assert report["letters"] == report["delivered"] == report["handed_over"], name
        assert (report["lost"], report["duplicates"], report["refused"]) == (0, 0, 0), name
        assert report["params"]["shared"] is True
    assert reports["fill"]["params"]["rate"] == 0
    # The full run's letters were new ones: the servers had numbered the others before.
    assert reports["full"]["letters"] >= 150
    assert "fresh" in result.stdout
    assert "full" in result.stdout
