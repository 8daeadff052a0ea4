"""``chapar status`` (node/status.py) on what a scrape gives: the server's text, or a proxy's
in its place. Driven without a server: ``_scrape`` gives the body."""

from __future__ import annotations

import argparse

import pytest

from node import status

SERVER = (
    'chapar_build_info{role="node",version="1.0"} 1\n'
    "chapar_ready 1\n"
    'chapar_rejections_total{code="NOT_FOUND",reason="DOCUMENT_NOT_FOUND"} 3\n'
    'chapar_rejections_total{code="UNAVAILABLE",reason="OWNER_OFFLINE"} 2\n'
    'chapar_last_rejection_timestamp_seconds{code="UNAVAILABLE",reason="OWNER_OFFLINE"}'
    " 1700000000\n"
)


def _status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], body: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(status, "_scrape", lambda *_: body.encode())
    ns = argparse.Namespace(target="127.0.0.1:9100", demo=None, ca=None, cert=None, key=None)
    code = status._status(ns)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("when", ["NaN", "+Inf", "-Inf", "1e20", "-1e20"])
def test_a_last_error_whose_timestamp_is_no_time_is_shown_without_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], when: str
) -> None:
    # chapar_last_rejection_timestamp_seconds is shown as a time of day. A value that is
    # none (NaN, an infinity, past the years a datetime holds), from a proxy or a broken
    # exporter, raised out of render (ValueError "Invalid value NaN", OverflowError
    # "timestamp out of range for platform time_t"): a traceback in place of the screen.
    labels = 'code="NOT_FOUND",reason="DOCUMENT_NOT_FOUND"'
    body = SERVER + f"chapar_last_rejection_timestamp_seconds{{{labels}}} {when}\n"
    code, out, err = _status(monkeypatch, capsys, body)
    assert (code, err) == (0, "")
    rows = out.splitlines()
    start = rows.index("Last errors          when (UTC)  code / reason (count)")
    assert [row.split() for row in rows[start + 1 :]] == [
        ["22:13:20", "UNAVAILABLE", "/", "OWNER_OFFLINE", "(2)"],  # the real time first
        ["?", "NOT_FOUND", "/", "DOCUMENT_NOT_FOUND", "(3)"],
    ]
