"""The one place a ChaparError becomes a gRPC status (code + google.rpc.ErrorInfo), and
where what a handler did not expect (``unexpected``) or a disk failing under a call
(``storage_error``) becomes a ChaparError."""

from __future__ import annotations

import errno
import logging
import math
import sqlite3
import uuid
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from client_sdk import pb
from node.core.errors import ERROR_DOMAIN, ChaparError, Code
from node.metrics import count_rejection

__all__ = [
    "abort",
    "code_of",
    "status_code",
    "storage_error",
    "to_status",
    "to_submit_error",
    "unexpected",
]

log = logging.getLogger("chapar.rpc")
# A disk (or quota) with no room, or a file too large for it: STORAGE_FULL.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# What became of a call whose database write failed: true of a unary call and of a stream
# (Connect, a submission stream) whose earlier requests were stored before the failure.
_ROLLED_BACK = (
    "its write was rolled back whole: nothing of the request that failed was stored"
    " (a stream's earlier requests stay stored); retry later"
)


def code_of(status: grpc.StatusCode, otherwise: Code) -> Code:
    """The core's ``Code`` of a gRPC status a peer answered, ``otherwise`` for one the core
    does not name."""
    try:
        return Code(status.value[0])
    except ValueError:
        return otherwise


def status_code(error: ChaparError) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == int(error.code):
            return code
    return grpc.StatusCode.UNKNOWN


def to_status(error: ChaparError) -> status_pb2.Status:
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
        )
    )
    details.append(info)
    if error.field_violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in error.field_violations
                ]
            )
        )
        details.append(bad)
    if error.retry_after_s is not None:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=_duration(error.retry_after_s)))
        details.append(retry)
    return status_pb2.Status(code=int(error.code), message=error.message, details=details)


async def abort(context: grpc.aio.ServicerContext, error: ChaparError) -> None:
    """Ends the call with the error's status; never returns."""
    count_rejection(error.code.name, error.reason)
    status = to_status(error)
    await context.abort(
        status_code(error),
        error.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


def storage_error(
    exc: OSError,
    outcome: str,
    *,
    where: str,
    metadata: Mapping[str, str] | None = None,
) -> ChaparError:
    """What a client is told when a disk fails under a call: RESOURCE_EXHAUSTED /
    STORAGE_FULL when it has no room (or the file is too large for it), INTERNAL /
    STORAGE_FAILED for any other I/O error. ``where`` names what failed and ``outcome``
    says what became of the call; the error's own text (a path) is not told, only its
    kind (strerror)."""
    kind = exc.strerror or "I/O error"
    if exc.errno in _NO_ROOM:
        return ChaparError(
            Code.RESOURCE_EXHAUSTED,
            "STORAGE_FULL",
            f"{where} has no room ({kind}); {outcome}",
            metadata=metadata,
            retry_after_s=60.0,
        )
    return ChaparError(
        Code.INTERNAL,
        "STORAGE_FAILED",
        f"{where} failed ({kind}); {outcome}",
        metadata=metadata,
    )


def unexpected(exc: Exception, method: str) -> ChaparError:
    """What a caller is told of an exception no handler expected (DESIGN section 9: every
    failure is a canonical code with an ErrorInfo reason, never a Python exception's text).

    The database failing (SQLite rolls the failing write's transaction back whole, so
    nothing of the request that failed was stored; a stream's earlier requests, stored
    before, stay stored): RESOURCE_EXHAUSTED / STORAGE_FULL when it has no room, UNAVAILABLE /
    STORAGE_BUSY when it is locked, INTERNAL / STORAGE_FAILED for any other error, each
    with a retry delay (the store heals, and a retry with the same request id is answered
    from what was stored). A file's I/O failing (an OSError) is ``storage_error``'s, the
    mapping the document store's calls use: STORAGE_FULL for no room, STORAGE_FAILED for
    any other. Anything else (a timeout or a broken connection among them: OSErrors, but
    no disk's) is INTERNAL / INTERNAL_ERROR. Each carries an incident id that the server's
    log carries with the traceback.
    """
    incident = uuid.uuid4().hex[:12]
    log.error(
        "%s failed unexpectedly (incident %s): %r",
        method,
        incident,
        exc,
        exc_info=exc,
        extra={"incident": incident, "method": method},
    )
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "full" in text:
            return ChaparError(
                Code.RESOURCE_EXHAUSTED,
                "STORAGE_FULL",
                f"the server's database has no room; {_ROLLED_BACK}",
                metadata={"incident": incident},
                retry_after_s=60.0,
            )
        if isinstance(exc, sqlite3.OperationalError) and "locked" in text:
            return ChaparError(
                Code.UNAVAILABLE,
                "STORAGE_BUSY",
                "the server's database is busy; retry",
                metadata={"incident": incident},
                retry_after_s=1.0,
            )
        return ChaparError(
            Code.INTERNAL,
            "STORAGE_FAILED",
            f"the server's database failed; {_ROLLED_BACK}",
            metadata={"incident": incident},
            retry_after_s=5.0,
        )
    if isinstance(exc, OSError) and not isinstance(exc, (TimeoutError, ConnectionError)):
        return storage_error(
            exc,
            f"the call failed (incident {incident} in its log)",
            where="the server's storage",
            metadata={"incident": incident},
        )
    return ChaparError(
        Code.INTERNAL,
        "INTERNAL_ERROR",
        f"the server failed on this call (incident {incident} in its log)",
        metadata={"incident": incident},
    )


def to_submit_error(error: ChaparError) -> pb.SubmitError:
    """The per-letter form of an error inside a batch or stream result; its retry delay
    too, which a status carries as RetryInfo."""
    count_rejection(error.code.name, error.reason)
    return pb.SubmitError(
        code=int(error.code) if int(error.code) in code_pb2.Code.values() else code_pb2.UNKNOWN,
        reason=error.reason,
        message=error.message,
        metadata=error.metadata,
        retry_delay=_duration(error.retry_after_s) if error.retry_after_s is not None else None,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
