"""The backlog benchmark (loadtest.backlog): a queue pre-filled at the hub drains exactly once.

Checks the measurement at a small size, never speed: a hub with 2,000 letters queued for an
offline recipient stays small, and when the recipient's node starts every letter reaches its
inbox once, verified, with DELIVERY evidence, and the hub's queue ends empty.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_module_json

pytestmark = pytest.mark.integration

N = 2000


def test_a_prefilled_backlog_drains_exactly_once_with_a_small_hub(tmp_path: Path) -> None:
    result, report = run_module_json(
        "loadtest.backlog",
        *("--letters", str(N), "--idle-seconds", "1", "--window-seconds", "2"),
        *("--workdir", str(tmp_path / "cluster")),
        out=tmp_path / "backlog.json",
    )
    assert report["letters"] == N
    assert report["verified"] == {
        "inbox_rows": N,
        "distinct_numbers": N,
        "missing": 0,
        "unexpected": 0,
        "duplicates": 0,
        "delivery_evidence": N,
        "hub_queue": 0,
        "hub_delivery_evidence": N,
        "notices_for_sender": N,  # A's node is down: its DELIVERY notices wait at the hub
    }
    assert report["exit_codes"] == {"RECIPIENT.B": 0, "hub": 0}
    # The letters were really queued at the hub before it started, and stored by the hub's code.
    assert report["fill_s"] > 0
    assert report["hub_db_mb"] > N * 1.5e-3
    assert 20 < report["hub_rss_mb_idle_with_backlog"] <= report["hub_peak_rss_mb"] < 200
    assert report["recipient_peak_rss_mb"] > 20
    assert report["drained"] == N
    assert report["partial"] is False
    assert report["drain_s"] > 0
    # drain_lps is N over the unrounded drain time; drain_s is rounded to 0.1 s.
    assert report["drain_lps"] == pytest.approx(N / report["drain_s"], rel=0.05)
    windows = report["drain_lps_windows"]
    assert windows
    assert all(w > 0 for w in windows)
    assert report["hub_queue_empty_s"] >= report["drain_s"]
    assert report["cpu_s"]["hub"] > report["cpu_s"]["hub_idle"] > 0
    assert report["cpu_s"]["recipient"] > 0
    assert "PASS" in result.stdout
