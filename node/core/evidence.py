"""Evidence content: what each issuer states about a letter (ETSI EN 319 522 events).

Only the content is built here; signing happens in the shell with the issuer's key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import ParamSpec

from client_sdk import pb
from client_sdk.ids import uuid7
from client_sdk.trust import set_timestamp

__all__ = ["event_name", "evidence_content", "evidence_message"]

P = ParamSpec("P")


def evidence_message(
    event: pb.EvidenceEvent.ValueType,
    *,
    issuer: str,
    shams: pb.Shams | None,
    envelope_sha256: bytes,
    recipient: str,
    now: dt.datetime,
    reason: str = "",
    detail: str = "",
    evidence_id: str | None = None,
) -> pb.EvidenceContent:
    """An EvidenceContent with a fresh id unless given (``evidence_content`` gives its
    bytes, serialised deterministically, ready to sign)."""
    # Set field by field: protobuf's keyword arguments cost about twice as much.
    content = pb.EvidenceContent()
    content.evidence_id = evidence_id or uuid7()
    content.event = event
    content.issuer = issuer
    content.envelope_sha256 = envelope_sha256
    content.recipient = recipient
    if reason:
        content.reason = reason
    if detail:
        content.detail = detail
    if shams is not None:
        content.shams.CopyFrom(shams)
    set_timestamp(content.event_time, now)
    return content


def _serialised(build: Callable[P, pb.EvidenceContent]) -> Callable[P, bytes]:
    def serialised(*args: P.args, **kwargs: P.kwargs) -> bytes:
        return build(*args, **kwargs).SerializeToString(deterministic=True)

    return serialised


# Serialised EvidenceContent, ready to sign: ``evidence_message``'s bytes, same arguments.
evidence_content = _serialised(evidence_message)


def event_name(event: int) -> str:
    """``EVIDENCE_EVENT_DELIVERY`` -> ``DELIVERY``."""
    return pb.EvidenceEvent.Name(event).removeprefix("EVIDENCE_EVENT_")  # type: ignore[arg-type]
