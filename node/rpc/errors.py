"""The one place a ChaparError becomes a gRPC status (code + google.rpc.ErrorInfo)."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from client_sdk import pb
from node.core.errors import ERROR_DOMAIN, ChaparError, Code
from node.metrics import count_rejection

__all__ = ["abort", "code_of", "status_code", "to_status", "to_submit_error"]


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
