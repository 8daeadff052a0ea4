"""Business status updates: who may report which status about which letter (pure, no I/O).

A status update is a signed letter of kind ``LETTER_KIND_STATUS_UPDATE`` whose header names
the letter it is about (``in_reply_to``) and a ``BusinessStatus``. One rule decides whether
an update fits the letter it names, and the submitting node (to refuse a draft), the
receiving node (to link an update to a letter it holds, or refuse it) and the SDK's
offline verification (``Tracking.verify``) all apply this one function, to signed headers
only:

* it goes from the letter's sender to some of the letter's recipients, or from one of the
  letter's recipients to the letter's sender (agency codes; mailboxes are free). Anyone
  else, or any other addressee, is ``NOT_A_PARTY``: a third party's "update" about someone
  else's letter is a forgery attempt, however well it is signed;
* ``BUSINESS_STATUS_RECALL_REQUESTED`` is the sender's to report; every other status a
  recipient's (edXML's use of the codes), else ``STATUS_WRONG_DIRECTION``;
* it is about a letter, never about another status update (``STATUS_ABOUT_STATUS_UPDATE``):
  back-ends that report a status on every letter they receive would otherwise answer each
  other's updates for ever.

The latest status of an agency is the one of its update numbered last (SHAMS year, then
sequence: one counter a year per agency, in signing order, whatever its clock says), not
the one that arrived last: a reconnect can reorder arrivals.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

from client_sdk import pb
from client_sdk.shams import format_shams

__all__ = [
    "BUSINESS_STATUSES",
    "StatusFault",
    "latest_statuses",
    "status_name",
    "status_update_fault",
]

BUSINESS_STATUSES: Final = frozenset(v for v in pb.BusinessStatus.values() if v)
"""Every status a node accepts in a draft (``BUSINESS_STATUS_UNSPECIFIED`` excluded)."""
_RECALL_REQUESTED: Final = pb.BUSINESS_STATUS_RECALL_REQUESTED
_STATUS_UPDATE: Final = pb.LETTER_KIND_STATUS_UPDATE


@dataclass(frozen=True, slots=True)
class StatusFault:
    """Why a status update does not fit its letter: an UPPER_SNAKE reason and a message."""

    reason: str
    message: str


def status_update_fault(
    letter: pb.EnvelopeHeader, sender: str, recipients: Collection[str], status: int
) -> StatusFault | None:
    """None when an update from agency ``sender`` to agencies ``recipients`` reporting
    ``status`` fits ``letter`` (the header of the letter it is about); else why not:
    ``MISSING_STATUS``, ``STATUS_ABOUT_STATUS_UPDATE`` (``letter`` is itself a status
    update), ``NOT_A_PARTY`` or ``STATUS_WRONG_DIRECTION``."""
    about = format_shams(letter.shams)
    if not status:
        return StatusFault("MISSING_STATUS", f"a status update about {about} names no status")
    if letter.kind == _STATUS_UPDATE:
        return StatusFault(
            "STATUS_ABOUT_STATUS_UPDATE",
            f"{about} is itself a status update: a status is reported about a letter, never"
            " about another status update",
        )
    origin = letter.sender.agency
    addressees = {r.agency for r in letter.recipients}
    to = set(recipients)
    as_sender = sender == origin and bool(to) and to <= addressees
    as_recipient = sender in addressees and to == {origin}
    if not as_sender and not as_recipient:
        if sender == origin:
            message = (
                f"a status update about {about} from its sender {sender} goes to its"
                f" recipients; not to {', '.join(sorted(to - addressees)) or 'no one'}"
            )
        elif sender in addressees:
            message = (
                f"a status update about {about} from its recipient {sender} goes to its"
                f" sender {origin} alone; not to {', '.join(sorted(to)) or 'no one'}"
            )
        else:
            message = f"{sender} is neither the sender nor a recipient of {about}"
        return StatusFault("NOT_A_PARTY", message)
    name = status_name(status)
    if status == _RECALL_REQUESTED and not as_sender:
        return StatusFault(
            "STATUS_WRONG_DIRECTION",
            f"{name} is for the sender of {about} ({origin}) to report, not for {sender}",
        )
    if status != _RECALL_REQUESTED and not as_recipient:
        return StatusFault(
            "STATUS_WRONG_DIRECTION",
            f"{name} is for a recipient of {about} to report, not for its sender {sender}",
        )
    return None


def latest_statuses(updates: Iterable[pb.EnvelopeHeader]) -> dict[str, int]:
    """Each recipient's latest reported status among ``updates`` (headers), by sending
    agency, the latest being the one it numbered last (SHAMS year, then sequence: an
    agency numbers its letters from one counter a year, in the order it signs them, so
    a clock stepping back cannot reorder them as ``create_time`` would). A sender's
    RECALL_REQUESTED is no recipient's status: left out (on a letter to itself an agency
    is both sides)."""
    latest: dict[str, tuple[tuple[int, int], int]] = {}
    for header in updates:
        if header.status == _RECALL_REQUESTED:
            continue
        key = (header.shams.year, header.shams.sequence)
        agency = header.sender.agency
        if agency not in latest or key >= latest[agency][0]:
            latest[agency] = (key, header.status)
    return {agency: status for agency, (_, status) in latest.items()}


def status_name(status: int) -> str:
    """``ACCEPTED`` for ``BUSINESS_STATUS_ACCEPTED``; the number for an unknown value."""
    try:
        return pb.BusinessStatus.Name(status).removeprefix("BUSINESS_STATUS_")  # type: ignore[arg-type]
    except ValueError:
        return str(status)
