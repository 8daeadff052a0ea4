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


def test_samples_lacking_the_labels_status_reads_are_shown_with_question_marks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A proxy's or an older exporter's samples without the labels render reads (stage,
    # outcome, code, reason) or with a rank that is no integer raised out of render
    # (KeyError 'stage', ValueError from int()): a traceback in place of the screen.
    body = (
        'chapar_build_info{role="hub",version="1.0"} 1\n'
        "chapar_ready 1\n"
        'chapar_hub_queue_top_depth{rank="first",agency="A"} 5\n'
        'chapar_hub_queue_top_depth{rank="2",agency="B"} 3\n'
        "chapar_letters_total 7\n"
        'chapar_rejections_total{code="NOT_FOUND"} 3\n'
        "chapar_last_rejection_timestamp_seconds 1700000000\n"
    )
    code, out, err = _status(monkeypatch, capsys, body)
    assert (code, err) == (0, "")
    rows = [row.split() for row in out.splitlines()]
    assert ["2", "B", "3", "-"] in rows  # the rank that is one first
    assert ["first", "A", "5", "-"] in rows
    assert ["Letters", "?", "?", "7"] in rows
    assert ["22:13:20", "?", "/", "?", "(0)"] in rows


@pytest.mark.parametrize(
    ("offset", "shown"), [("0.4", "0 s ahead of"), ("-600", "10 min behind"), ("NaN", "?")]
)
def test_a_nodes_screen_says_how_far_the_hubs_clock_is_from_its_own(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    offset: str,
    shown: str,
) -> None:
    # chapar_node_hub_clock_offset_seconds (the hub's clock ahead of the node's, from its
    # signed welcome) has an alert; the screen an operator reads first did not show it.
    body = SERVER + f"chapar_node_hub_connected 1\nchapar_node_hub_clock_offset_seconds {offset}\n"
    code, out, err = _status(monkeypatch, capsys, body)
    assert (code, err) == (0, "")
    assert f"Hub clock            {shown} ours".replace("? ours", "?") in out.splitlines()
