"""The SDK's exceptions and the one place gRPC failures become them.

Every failure a node reports is a gRPC status with a canonical code and a
``google.rpc.Status`` in the trailing metadata holding one ``ErrorInfo`` (domain
``chapar.exchange``, UPPER_SNAKE ``reason``, dynamic values in ``metadata``), plus
``BadRequest`` field violations or ``RetryInfo`` where they apply. The client catches
``grpc.RpcError`` at one boundary and raises the matching class with ``raise ... from exc``.

Exception tree::

    ChaparError                 any refusal or failure; .code .reason .message .metadata
    ├── InvalidArgument         INVALID_ARGUMENT      malformed letter, bad field
    ├── NotFound                NOT_FOUND             unknown recipient or letter
    ├── AlreadyExists           ALREADY_EXISTS
    ├── PermissionDenied        PERMISSION_DENIED     identity mismatch, not a party
    ├── Unauthenticated         UNAUTHENTICATED       no or bad client certificate
    ├── FailedPrecondition      FAILED_PRECONDITION   suspended agency or one not in the
    │                                                 hub's directory, revoked certificate,
    │                                                 expired letter; a call on a closed
    │                                                 client (reason CLIENT_CLOSED); the
    │                                                 client's own certificate expired or
    │                                                 not yet valid (CLIENT_CERTIFICATE_NOT_VALID)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED    size or queue quota
    ├── Unavailable             UNAVAILABLE           node, hub or peer down: retry
    ├── DeadlineExceeded        DEADLINE_EXCEEDED     the call's timeout ran out: retry
    ├── Cancelled               CANCELLED             the call was cancelled, e.g. by a node
    │                                                 shutting down: retry; a call or stream
    │                                                 under way when its client was closed
    │                                                 (reason CLIENT_CLOSED)
    ├── OutOfRange              OUT_OF_RANGE          a download offset past the end
    ├── DataLoss                DATA_LOSS             a document's content is not its digest
    └── InternalError           any other code (INTERNAL, UNKNOWN, ...) and answers the SDK
                                cannot make sense of (MALFORMED_RESPONSE) or that are about
                                another letter than the one asked for (LETTER_MISMATCH)

Submitting again after ``Unavailable``, ``DeadlineExceeded`` or ``Cancelled`` is safe when
the same ``request_id`` is used: the node returns the original receipt.

A node refuses the TLS handshake of a client whose certificate has expired, and gRPC reports
that only as ``UNAVAILABLE``, which would be retried for ever. So an ``UNAVAILABLE`` failure
of a client whose own certificate is outside its validity window (``CertificateValidity``,
read once when the client is made, consulted on that code only) becomes
``FailedPrecondition`` (``CLIENT_CERTIFICATE_NOT_VALID``, not retryable) instead.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from client_sdk import pb

if TYPE_CHECKING:
    from client_sdk.client import Draft

__all__ = [
    "ERROR_DOMAIN",
    "AlreadyExists",
    "Cancelled",
    "ChaparError",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "from_submit_error",
]

ERROR_DOMAIN = "chapar.exchange"
# The trailing metadata key of the binary google.rpc.Status (gRPC's rich error model).
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ChaparError(Exception):
    """A call failed: canonical ``code``, ErrorInfo ``reason`` and ``metadata``.

    ``reason`` is "" when the failure did not come with an ErrorInfo (e.g. the node could
    not be reached). ``field_violations`` lists ``(field, description)`` pairs from a
    ``BadRequest``; ``retry_after`` is the delay in seconds from a ``RetryInfo`` (0 for a
    negative one; None without one, or for one out of a Duration's range).

    ``unanswered``, on an error that ended a ``send_stream``, holds the drafts the stream
    had taken from its producer and not answered, in order: sending them again is safe
    (same request ids). On an error of ``send`` or ``send_status``, it holds the one draft
    the call made, with the request id generated for it: after a retryable error (the
    node may have stored the letter before the deadline passed or the connection broke)
    send it again (``send_many(error.unanswered)``, or ``send(..., request_id=...)``) and
    the node answers the original receipt instead of numbering a second letter. Empty on
    any other error. (``SyncExchangeClient.send_stream`` adds one more later if its helper
    thread was waiting inside the producer: see there.)
    """

    default_code: Any = grpc.StatusCode.UNKNOWN
    unanswered: tuple[Draft, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """True when trying again later (with the same request_id) may succeed."""
        return self.retry_after is not None or self.code in _RETRYABLE_CODES

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )


class InvalidArgument(ChaparError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ChaparError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ChaparError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ChaparError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ChaparError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ChaparError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ChaparError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ChaparError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ChaparError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ChaparError):
    default_code = grpc.StatusCode.CANCELLED


class OutOfRange(ChaparError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class DataLoss(ChaparError):
    default_code = grpc.StatusCode.DATA_LOSS


class InternalError(ChaparError):
    default_code = grpc.StatusCode.INTERNAL


# CANCELLED reaches a caller that did not cancel only when the server cancelled the call
# (a node stopping, say): whether it took effect is unknown, exactly as with UNAVAILABLE.
_RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_CLASS_OF_CODE: dict[grpc.StatusCode, type[ChaparError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        OutOfRange,
        DataLoss,
    )
}
# grpc.StatusCode values are (int, name) pairs; google.rpc.Code uses the int.
_STATUS_CODE_OF_INT: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _error(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    field_violations: Sequence[tuple[str, str]] = (),
    retry_after: float | None = None,
) -> ChaparError:
    cls = _CLASS_OF_CODE.get(code, InternalError)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=field_violations,
        retry_after=retry_after,
    )


@dataclass(frozen=True, slots=True)
class CertificateValidity:
    """When a client's own TLS certificate is valid (its notBefore and notAfter, UTC)."""

    not_before: dt.datetime
    not_after: dt.datetime

    def refusal(self, now: dt.datetime | None = None) -> FailedPrecondition | None:
        """``FailedPrecondition`` (``CLIENT_CERTIFICATE_NOT_VALID``) if ``now`` (the clock
        by default) is outside the window, which the node refuses; None inside it."""
        now = now if now is not None else dt.datetime.now(dt.UTC)
        if now > self.not_after:
            message = (
                f"this client's certificate expired at {self.not_after:%Y-%m-%d %H:%M:%S} UTC:"
                " the node refuses it. Renew it (chapar pki renew) and make a new client with"
                " the new certificate"
            )
        elif now < self.not_before:
            message = (
                f"this client's certificate is not valid before"
                f" {self.not_before:%Y-%m-%d %H:%M:%S} UTC: the node refuses it until then"
                " (or renew it: chapar pki renew)"
            )
        else:
            return None
        return FailedPrecondition(
            message,
            reason="CLIENT_CERTIFICATE_NOT_VALID",
            metadata={
                "not_before": self.not_before.isoformat(),
                "not_after": self.not_after.isoformat(),
            },
        )


def from_rpc_error(
    exc: grpc.RpcError, *, certificate: CertificateValidity | None = None
) -> ChaparError:
    """Translates a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``).

    ``certificate`` is the validity of the client's own certificate: an ``UNAVAILABLE``
    failure outside it is the node refusing the handshake, and becomes ``FailedPrecondition``
    (``CLIENT_CERTIFICATE_NOT_VALID``). Only that code looks at the clock.
    """
    code_of = getattr(exc, "code", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    if (
        code == grpc.StatusCode.UNAVAILABLE
        and certificate is not None
        and (refusal := certificate.refusal()) is not None
    ):
        return refusal
    details_of = getattr(exc, "details", None)
    details = details_of() if callable(details_of) else None
    status = _rich_status(exc)
    if status is None:
        return _error(code, details or code.name)
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
            metadata.update(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = _delay_seconds(retry.retry_delay)
    return _error(
        code,
        status.message or details or code.name,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )


def from_submit_error(err: pb.SubmitError) -> ChaparError:
    """Translates the per-letter error of a batch or stream submission (with its retry
    delay, so that ``retryable`` says the same as for the call's own status)."""
    code = _STATUS_CODE_OF_INT.get(err.code, grpc.StatusCode.UNKNOWN)
    return _error(
        code,
        err.message or code.name,
        reason=err.reason,
        metadata=err.metadata,
        retry_after=_delay_seconds(err.retry_delay) if err.HasField("retry_delay") else None,
    )


# google.protobuf.Duration's valid range: about 10,000 years either way.
_MAX_DURATION_S = 315_576_000_000


def _delay_seconds(delay: duration_pb2.Duration) -> float | None:
    """A retry delay in seconds, never below 0 (a sleep refuses a negative one); None for
    a Duration out of its range, which is no delay (ToTimedelta raised OverflowError)."""
    if abs(delay.seconds) > _MAX_DURATION_S or abs(delay.nanos) >= 1_000_000_000:
        return None
    return max(0.0, delay.seconds + delay.nanos / 1e9)


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    trailing_of = getattr(exc, "trailing_metadata", None)
    trailing = trailing_of() if callable(trailing_of) else None
    for key, value in trailing or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None
