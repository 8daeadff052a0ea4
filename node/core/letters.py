"""Letters: validating what a back-end submits and building the header the node signs.

The node validates a draft completely before anything is numbered or stored, so a refused
letter leaves no trace. Text is normalised to Unicode NFC (TCVN 6909 requires Unicode for
Vietnamese correspondence; NFC gives one byte form per text) and control characters are
refused.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.identity import is_agency_code
from client_sdk.shams import format_shams
from client_sdk.signing import sha256
from client_sdk.statuses import BUSINESS_STATUSES, status_update_fault
from client_sdk.trust import set_timestamp, valid_timestamp
from node.core.directory import DirectoryView
from node.core.documents import DocumentLimits, validate_attachments
from node.core.errors import ChaparError, Code

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "NEEDS_PARENT",
    "LetterLimits",
    "build_header",
    "fit_status_update",
    "normalise_text",
    "quoted_shams",
    "valid_timestamp",
    "validate_draft",
    "validate_shams",
]

DEFAULT_CONTENT_TYPE = "text/plain; charset=utf-8"
_KINDS = frozenset(pb.LetterKind.values())
_PRIORITIES = frozenset(pb.Priority.values())
# Kinds that answer a letter, so name it (in_reply_to): refused without one at submission,
# at the hub and at the recipient's node alike.
NEEDS_PARENT = frozenset({pb.LetterKind.LETTER_KIND_REPLY, pb.LetterKind.LETTER_KIND_STATUS_UPDATE})
_STATUS_UPDATE = pb.LETTER_KIND_STATUS_UPDATE


@dataclass(frozen=True, slots=True)
class LetterLimits:
    """Size limits for one letter (configuration ``[limits]``)."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_recipients: int = 100
    max_subject_chars: int = 1000
    max_mailbox_chars: int = 128


def _invalid(reason: str, message: str, field: str, **metadata: str) -> ChaparError:
    return ChaparError(
        Code.INVALID_ARGUMENT,
        reason,
        message,
        metadata=metadata,
        field_violations=[(field, message)],
    )


def normalise_text(value: str, field: str, *, max_chars: int, required: bool) -> str:
    """NFC-normalises ``value``; refuses control characters, over-long and (if required) empty text."""
    text = unicodedata.normalize("NFC", value)
    # Printable text, the usual case, has no control or surrogate character (both are
    # "Other" to isprintable); only the rest is read a character at a time.
    if not text.isprintable() and any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise _invalid("INVALID_TEXT", f"{field} contains control characters", field)
    if required and not text.strip():
        raise _invalid("EMPTY_FIELD", f"{field} must not be empty", field)
    if len(text) > max_chars:
        raise _invalid("TEXT_TOO_LONG", f"{field} is longer than {max_chars} characters", field)
    return text


# Read once: each attribute of a protobuf enum wrapper is a Python-level __getattr__.
_SHAMS_DOMAINS = frozenset(
    (pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, pb.ShamsDomain.SHAMS_DOMAIN_INTERNAL)
)


def validate_shams(shams: pb.Shams, field: str) -> None:
    if (
        not is_agency_code(shams.origin)
        or shams.domain not in _SHAMS_DOMAINS
        or not 1000 <= shams.year <= 9999
        or shams.sequence < 1
    ):
        raise _invalid("INVALID_SHAMS", f"{field} is not a valid SHAMS number", field)


def validate_draft(
    draft: pb.LetterDraft,
    *,
    sender: str,
    directory: DirectoryView,
    limits: LetterLimits,
    now: dt.datetime,
    documents: DocumentLimits | None = None,
) -> pb.LetterDraft:
    """Checks a draft and returns a normalised copy; raises ChaparError on the first fault.

    Recipients must be valid, distinct, present and active in the directory; the sender must
    be active. Attachment references must be well formed and name the sender's own
    documents (whether the node holds them is checked by the caller, against its store).
    """
    directory.require_sender(sender)
    out = pb.LetterDraft()
    out.CopyFrom(draft)
    # A status update without recipients goes to the other side of its letter, which
    # only the node knows: fit_status_update fills them in.
    if not draft.recipients and draft.kind != _STATUS_UPDATE:
        raise _invalid("NO_RECIPIENTS", "a letter needs at least one recipient", "draft.recipients")
    if len(draft.recipients) > limits.max_recipients:
        raise _invalid(
            "TOO_MANY_RECIPIENTS",
            f"at most {limits.max_recipients} recipients",
            "draft.recipients",
            limit=str(limits.max_recipients),
        )
    seen: set[tuple[str, str]] = set()
    for i, (src, dst) in enumerate(zip(draft.recipients, out.recipients, strict=True)):
        field = f"draft.recipients[{i}]"
        if not is_agency_code(src.agency):
            raise _invalid(
                "INVALID_AGENCY_CODE", f"{field}.agency is not an agency code", f"{field}.agency"
            )
        dst.mailbox = normalise_text(
            src.mailbox, f"{field}.mailbox", max_chars=limits.max_mailbox_chars, required=False
        )
        key = (dst.agency, dst.mailbox)
        if key in seen:
            raise _invalid(
                "DUPLICATE_RECIPIENT", f"{field} is listed twice", field, agency=src.agency
            )
        seen.add(key)
    for i, recipient in enumerate(out.recipients):
        directory.require_recipient(recipient.agency, f"draft.recipients[{i}].agency")
    out.subject = normalise_text(
        draft.subject, "draft.subject", max_chars=limits.max_subject_chars, required=True
    )
    out.sender_mailbox = normalise_text(
        draft.sender_mailbox,
        "draft.sender_mailbox",
        max_chars=limits.max_mailbox_chars,
        required=False,
    )
    if len(draft.body) > limits.max_body_bytes:
        raise ChaparError(
            Code.RESOURCE_EXHAUSTED,
            "BODY_TOO_LARGE",
            f"body is larger than {limits.max_body_bytes} bytes",
            metadata={"limit": str(limits.max_body_bytes), "size": str(len(draft.body))},
        )
    if draft.kind not in _KINDS:
        raise _invalid("INVALID_KIND", "unknown letter kind", "draft.kind")
    if draft.kind == pb.LETTER_KIND_UNSPECIFIED:
        out.kind = pb.LETTER_KIND_LETTER
    if draft.priority not in _PRIORITIES:
        raise _invalid("INVALID_PRIORITY", "unknown priority", "draft.priority")
    if draft.priority == pb.PRIORITY_UNSPECIFIED:
        out.priority = pb.PRIORITY_NORMAL
    if draft.HasField("in_reply_to"):
        validate_shams(draft.in_reply_to, "draft.in_reply_to")
    elif out.kind in NEEDS_PARENT:
        raise _invalid(
            "MISSING_IN_REPLY_TO", "a reply or status update needs in_reply_to", "draft.in_reply_to"
        )
    if draft.status:
        if out.kind != _STATUS_UPDATE:
            raise _invalid(
                "UNEXPECTED_STATUS",
                "status is set only on a letter of kind STATUS_UPDATE",
                "draft.status",
            )
        if draft.status not in BUSINESS_STATUSES:
            raise _invalid("INVALID_STATUS", "unknown business status", "draft.status")
    elif out.kind == _STATUS_UPDATE:
        raise _invalid("MISSING_STATUS", "a status update needs a status", "draft.status")
    out.content_type = normalise_text(
        draft.content_type or DEFAULT_CONTENT_TYPE,
        "draft.content_type",
        max_chars=255,
        required=True,
    )
    if draft.HasField("expire_time"):
        if not valid_timestamp(draft.expire_time):
            raise _invalid("INVALID_TIME", "expire_time is not a valid time", "draft.expire_time")
        if draft.expire_time.ToDatetime(tzinfo=dt.UTC) <= now:
            raise _invalid("EXPIRE_TIME_PAST", "expire_time is in the past", "draft.expire_time")
    if draft.attachments:
        validate_attachments(
            list(draft.attachments), sender=sender, limits=documents or DocumentLimits()
        )
        for i, ref in enumerate(out.attachments):
            field = f"draft.attachments[{i}]"
            ref.media_type = normalise_text(
                ref.media_type, f"{field}.media_type", max_chars=255, required=True
            )
            ref.file_name = normalise_text(
                ref.file_name, f"{field}.file_name", max_chars=255, required=False
            )
            # A name, not a path: recipients save attachments under it.
            if "/" in ref.file_name or "\\" in ref.file_name or ref.file_name in (".", ".."):
                raise _invalid(
                    "INVALID_FILE_NAME",
                    "file_name must be a file's name, without a directory ('/', '\\', '..')",
                    f"{field}.file_name",
                )
    if draft.HasField("metadata"):
        md = out.metadata
        if md.HasField("due_time") and not valid_timestamp(md.due_time):
            raise _invalid(
                "INVALID_TIME", "due_time is not a valid time", "draft.metadata.due_time"
            )
        for name in ("document_code", "signer_title", "signer_name"):
            setattr(
                md,
                name,
                normalise_text(
                    getattr(md, name), f"draft.metadata.{name}", max_chars=255, required=False
                ),
            )
    return out


def fit_status_update(
    draft: pb.LetterDraft, letter: pb.EnvelopeHeader, *, sender: str, received: bool
) -> None:
    """Checks a validated status update from ``sender`` against the header of the letter it
    is about (held by this node: ``received`` by it, or sent); raises ChaparError.

    A draft without recipients gets them here, in place: the letter's sender for a letter
    this agency received, every recipient of one it sent. Directory and quota checks of
    those recipients are the caller's (they come after this).
    """
    if not draft.recipients:
        if received:
            draft.recipients.append(letter.sender)
        else:
            draft.recipients.extend(letter.recipients)
    fault = status_update_fault(letter, sender, [r.agency for r in draft.recipients], draft.status)
    if fault is None:
        return
    about = format_shams(letter.shams)
    if fault.reason == "NOT_A_PARTY":
        raise ChaparError(
            Code.PERMISSION_DENIED,
            fault.reason,
            fault.message,
            metadata={"in_reply_to": about},
            field_violations=[("draft.recipients", fault.message)],
        )
    # The draft is wrong whatever the node's state (a letter's kind never changes):
    # INVALID_ARGUMENT, on the field that names the wrong letter.
    field = "draft.in_reply_to" if fault.reason == "STATUS_ABOUT_STATUS_UPDATE" else "draft.status"
    raise _invalid(fault.reason, fault.message, field, in_reply_to=about)


def build_header(
    draft: pb.LetterDraft,
    *,
    sender: str,
    shams: pb.Shams,
    now: dt.datetime,
    thread_root: pb.Shams | None = None,
) -> bytes:
    """The header bytes to sign for a validated draft (deterministic serialisation).

    Set field by field: a protobuf message made with keyword arguments takes about twice
    as long (each argument goes through a generic path), once a letter at the sender."""
    header = pb.EnvelopeHeader()
    header.shams.CopyFrom(shams)
    header.sender.agency = sender
    header.sender.mailbox = draft.sender_mailbox
    header.recipients.MergeFrom(draft.recipients)
    header.subject = draft.subject
    header.kind = draft.kind
    header.priority = draft.priority
    header.content_type = draft.content_type
    body = draft.body
    header.body_sha256 = sha256(body)
    header.body_size = len(body)
    if draft.attachments:
        header.attachments.MergeFrom(draft.attachments)
    header.status = draft.status  # unspecified (not serialised) but on a status update
    set_timestamp(header.create_time, now)
    if draft.HasField("expire_time"):
        header.expire_time.CopyFrom(draft.expire_time)
    if draft.HasField("in_reply_to"):
        header.in_reply_to.CopyFrom(draft.in_reply_to)
        header.thread_root.CopyFrom(thread_root if thread_root is not None else draft.in_reply_to)
    if draft.HasField("metadata"):
        header.metadata.CopyFrom(draft.metadata)
    return header.SerializeToString(deterministic=True)


def quoted_shams(envelope: pb.Envelope, origin: str | None = None) -> pb.Shams | None:
    """The number an envelope's header claims, *unverified*: only to quote in a rejection;
    with ``origin``, only a number of that origin (the hub quotes a node's own numbers, never
    another agency's: its signed rejection would say that agency's letter was refused)."""
    try:
        header = pb.EnvelopeHeader.FromString(envelope.header)
    except DecodeError:
        return None
    if not header.HasField("shams") or (origin is not None and header.shams.origin != origin):
        return None
    return header.shams
