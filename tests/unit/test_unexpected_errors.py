"""What a caller is told of an exception no handler expected (node.rpc.errors.unexpected):
a canonical code with a reason, the incident id shared with the server's log line."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from node.core.errors import Code
from node.rpc.errors import to_status, unexpected


@pytest.mark.parametrize(
    ("exc", "code", "reason", "retry"),
    [
        (sqlite3.OperationalError("database or disk is full"), Code.RESOURCE_EXHAUSTED,
         "STORAGE_FULL", 60.0),
        (sqlite3.OperationalError("database is locked"), Code.UNAVAILABLE, "STORAGE_BUSY", 1.0),
        (sqlite3.OperationalError("disk I/O error"), Code.INTERNAL, "STORAGE_FAILED", 5.0),
        (sqlite3.DatabaseError("database disk image is malformed"), Code.INTERNAL,
         "STORAGE_FAILED", 5.0),
        (KeyError("secret-internal-name"), Code.INTERNAL, "INTERNAL_ERROR", None),
    ],
)  # fmt: skip
def test_each_unexpected_failure_has_a_code_a_reason_and_an_incident_in_the_log(
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    code: Code,
    reason: str,
    retry: float | None,
) -> None:
    with caplog.at_level(logging.ERROR, logger="chapar.rpc"):
        error = unexpected(exc, "NodeService.SubmitLetter")
    assert (error.code, error.reason, error.retry_after_s) == (code, reason, retry)
    incident = error.metadata["incident"]
    assert len(incident) == 12
    # The caller learns nothing of the server's insides; the operator finds it all.
    assert str(exc) not in error.message
    assert type(exc).__name__ not in error.message
    (record,) = caplog.records
    assert record.__dict__["incident"] == incident
    assert record.__dict__["method"] == "NodeService.SubmitLetter"
    assert record.exc_info is not None
    assert record.exc_info[1] is exc
    status = to_status(error)
    assert status.code == int(code)
    assert status.details


def test_incidents_differ() -> None:
    one = unexpected(RuntimeError("x"), "m").metadata["incident"]
    assert one != unexpected(RuntimeError("x"), "m").metadata["incident"]
