"""The JSON log format: a line about a batch of letters names them as a JSON array."""

from __future__ import annotations

import json
import logging

from node.server import _JsonFormatter


def _format(message: str, **extra: object) -> dict[str, object]:
    record = logging.LogRecord("chapar.node", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    entry = json.loads(_JsonFormatter().format(record))
    assert isinstance(entry, dict)
    return entry


def test_batch_line_carries_numbers_and_request_ids_as_json_arrays() -> None:
    numbers = ["000.00.00.G22/O/2026/0000041", "000.00.00.G22/O/2026/0000042"]
    entry = _format(
        "letters accepted",
        shams=numbers,
        request_ids=["r-1", ""],
        count=2,
        peer="urn:chapar:client:000.00.00.G22:backend",
    )
    assert entry["message"] == "letters accepted"
    assert entry["shams"] == numbers
    assert entry["request_ids"] == ["r-1", ""]
    assert entry["count"] == 2
    assert entry["peer"] == "urn:chapar:client:000.00.00.G22:backend"


def test_fields_not_listed_or_empty_are_left_out() -> None:
    entry = _format("letters relayed", shams=["A/O/2026/1"], peer="", body="secret")
    assert set(entry) == {"time", "level", "logger", "message", "shams"}


def test_a_line_stays_one_line_for_every_reader_whatever_a_peer_put_in_it() -> None:
    # json.dumps escapes only U+0000-U+001F; with ensure_ascii=False it wrote NEL (U+0085),
    # LINE SEPARATOR (U+2028) and PARAGRAPH SEPARATOR (U+2029) raw. A back-end's
    # request_id may hold U+2028 (the node refuses only C0 and C1 controls there) and is
    # logged in "letters accepted": a reader that splits lines as Python's splitlines() or
    # JavaScript do saw a second line of the back-end's making (a forged entry, here
    # claiming an error). Still readable: escaped, the value decodes the same.
    forged = '{"level":"error","logger":"chapar.hub","message":"hub compromised"}'
    request_id = f"r-1\u2028{forged}"
    record = logging.LogRecord(
        "chapar.node", logging.INFO, __file__, 1, "refused %s", ("a\x85b\u2029c",), None
    )
    record.__dict__.update(request_ids=[request_id], peer="urn:chapar:client:X.Y:backend")
    line = _JsonFormatter().format(record)
    assert line.splitlines() == [line]
    entry = json.loads(line)
    assert entry["request_ids"] == [request_id]
    assert entry["message"] == "refused a\x85b\u2029c"
    assert "é" in _JsonFormatter().format(
        logging.LogRecord("chapar.node", logging.INFO, __file__, 1, "café", (), None)
    )  # other text stays as it is (ensure_ascii=False), readable
