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
