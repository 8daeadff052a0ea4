"""What a caller is told of an exception no handler expected (node.rpc.errors.unexpected):
a canonical code with a reason, the incident id shared with the server's log line."""

from __future__ import annotations

import errno
import logging
import sqlite3

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from node.core.errors import Code
from node.rpc.errors import to_status, unexpected
from node.rpc.wire import _guarded


@pytest.mark.parametrize(
    ("exc", "code", "reason", "retry"),
    [
        (sqlite3.OperationalError("database or disk is full"), Code.RESOURCE_EXHAUSTED,
         "STORAGE_FULL", 60.0),
        (sqlite3.OperationalError("database is locked"), Code.UNAVAILABLE, "STORAGE_BUSY", 1.0),
        (sqlite3.OperationalError("disk I/O error"), Code.INTERNAL, "STORAGE_FAILED", 5.0),
        (sqlite3.DatabaseError("database disk image is malformed"), Code.INTERNAL,
         "STORAGE_FAILED", 5.0),
        # An OSError (a file the handler writes): the same mapping as the document store's
        # (node.rpc.errors.storage_error), a full disk told from another I/O error.
        (OSError(errno.ENOSPC, "No space left on device", "/srv/secret/x.tmp"),
         Code.RESOURCE_EXHAUSTED, "STORAGE_FULL", 60.0),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/secret/x.tmp"),
         Code.RESOURCE_EXHAUSTED, "STORAGE_FULL", 60.0),
        (OSError(errno.EIO, "Input/output error", "/srv/secret/x.tmp"), Code.INTERNAL,
         "STORAGE_FAILED", None),
        # OSErrors that are no disk's: a defect's timeout, a broken connection.
        (TimeoutError("secret-internal-name"), Code.INTERNAL, "INTERNAL_ERROR", None),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), Code.INTERNAL,
         "INTERNAL_ERROR", None),
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
    assert "secret" not in error.message
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


class _Aborted(Exception):
    pass


class _Context:
    """What ``_guarded`` uses of a grpc.aio servicer context: done() and abort()."""

    def __init__(self) -> None:
        self.status: status_pb2.Status | None = None

    def done(self) -> bool:
        return False

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, bytes]]
    ) -> None:
        self.status = status_pb2.Status.FromString(
            dict(trailing_metadata)["grpc-status-details-bin"]
        )
        raise _Aborted


async def test_a_full_disk_under_a_handler_ends_its_call_storage_full_with_a_retry_delay() -> None:
    async def handler(request: object, context: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/srv/node/partial")

    context = _Context()
    with pytest.raises(_Aborted):
        await _guarded(handler, "NodeService.SubmitLetter")(None, context)
    assert context.status is not None
    assert context.status.code == Code.RESOURCE_EXHAUSTED
    info = error_details_pb2.ErrorInfo()
    retry = error_details_pb2.RetryInfo()
    assert context.status.details[0].Unpack(info)
    assert info.reason == "STORAGE_FULL"
    assert info.metadata["incident"]
    assert any(d.Unpack(retry) for d in context.status.details)
    assert retry.retry_delay.seconds == 60


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (sqlite3.OperationalError("database or disk is full"), "STORAGE_FULL"),
        (sqlite3.OperationalError("disk I/O error"), "STORAGE_FAILED"),
    ],
)
def test_a_database_failure_says_only_the_failing_request_was_not_stored(
    exc: Exception, reason: str
) -> None:
    # A stream (Connect, a submission stream) stored its earlier frames before the
    # failure: "nothing of this call was stored" was untrue of it.
    error = unexpected(exc, "HubService.Connect")
    assert error.reason == reason
    assert "nothing of this call" not in error.message
    assert "nothing of the request that failed was stored" in error.message
    assert "a stream's earlier requests stay stored" in error.message
