"""The one error type of the core, carrying its canonical gRPC code and ErrorInfo reason.

The rpc layer turns a ChaparError into a gRPC status with a ``google.rpc.ErrorInfo``
(domain ``chapar.exchange``) in exactly one place (``node.rpc.errors``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence

__all__ = [
    "ERROR_DOMAIN",
    "ChaparError",
    "Code",
    "hub_unavailable",
    "letter_not_found",
    "request_id_reused",
]

ERROR_DOMAIN = "chapar.exchange"


class Code(enum.IntEnum):
    """Canonical status codes (google.rpc.Code) the core uses."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ChaparError(Exception):
    """A refusal with a canonical code, an UPPER_SNAKE reason and dynamic metadata."""

    def __init__(
        self,
        code: Code,
        reason: str,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"ChaparError({self.code.name}, {self.reason!r}, {self.message!r})"


def hub_unavailable(why: str) -> ChaparError:
    """UNAVAILABLE / HUB_UNAVAILABLE, retry in a second: what a node asks of the hub cannot
    be asked now."""
    return ChaparError(Code.UNAVAILABLE, "HUB_UNAVAILABLE", f"{why}; retry", retry_after_s=1.0)


def letter_not_found(shams: str, where: str) -> ChaparError:
    """NOT_FOUND / LETTER_NOT_FOUND for a letter this node does not hold ``where``."""
    return ChaparError(
        Code.NOT_FOUND, "LETTER_NOT_FOUND", f"no letter {shams} {where}", metadata={"shams": shams}
    )


def request_id_reused(request_id: str) -> ChaparError:
    """ALREADY_EXISTS / REQUEST_ID_REUSED: a request_id that named a different letter before.

    Answering with that letter's receipt would tell the caller its own letter went when
    it did not, and hand it another letter's number."""
    return ChaparError(
        Code.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
        f"request_id {request_id!r} was used for a different letter; use a new one",
        metadata={"request_id": request_id},
    )
