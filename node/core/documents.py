"""Documents: addresses, limits and the rules for attachment references (no I/O).

A document is addressed by its owner and its content: ``chapar://<agency>/documents/
sha256/<hex>``. Only the address travels with a letter; the header's reference adds the
digest, size, media type and file name, and the sender's signature covers all of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from client_sdk import pb
from node.core.errors import ChaparError, Code

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MEDIA_TYPES",
    "MAX_ATTACHMENTS",
    "MAX_EMPTY_CHUNKS",
    "DocumentLimits",
    "base_media_type",
    "check_media_type",
    "check_size",
    "chunk_of",
    "document_uri",
    "empty_chunks_refused",
    "parse_document_uri",
    "refused_attachment",
    "unfetchable_attachment",
    "validate_attachments",
]

DEFAULT_MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
MAX_ATTACHMENTS = 100
# Empty chunks an upload or a push may carry: no size limit counts them, so without a bound
# a raw client (or a bad owner) could send them for ever, holding the call (and, after a
# refusal, the node's reading of the rest; for a push, the fetch it answers) open. Our code
# sends none; a client in another language may send an empty last read, or a few.
MAX_EMPTY_CHUNKS: Final = 1024
DEFAULT_MEDIA_TYPES = frozenset(
    {
        "application/pdf",
        "application/msword",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "application/vnd.ms-excel",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "application/vnd.ms-powerpoint",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "application/vnd.oasis.opendocument.text",
        "application/vnd.oasis.opendocument.spreadsheet",
        "application/xml",
        "text/plain",
        "text/csv",
        "image/png",
        "image/jpeg",
        "image/tiff",
    }
)
_URI = re.compile(r"chapar://(?P<agency>[A-Z0-9.\-]{2,64})/documents/sha256/(?P<hex>[0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """What the document store accepts (configuration ``[documents]``)."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    media_types: frozenset[str] = field(default_factory=lambda: DEFAULT_MEDIA_TYPES)


def document_uri(agency: str, digest: bytes) -> str:
    return f"chapar://{agency}/documents/sha256/{digest.hex()}"


def parse_document_uri(uri: str, field: str = "uri") -> tuple[str, bytes]:
    """(owning agency, SHA-256) of a document address; INVALID_ARGUMENT otherwise."""
    match = _URI.fullmatch(uri)
    if match is None:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "INVALID_DOCUMENT_URI",
            f"{field} is not chapar://<agency>/documents/sha256/<64 hex digits>",
            field_violations=[(field, "not a document address")],
        )
    return match["agency"], bytes.fromhex(match["hex"])


def senders_documents(header: pb.EnvelopeHeader, sender: str) -> list[bytes]:
    """SHA-256 of those attachments of a verified letter that are its sender's own
    documents: an address the sender owns, naming the digest the header gives. Only those
    can be fetched (from the sender, through the hub), so only those are granted to the
    recipients and indexed for their mailboxes; a reference to anyone else's document, or
    whose address and digest differ, is one an honest node refuses to number, and gives a
    recipient's mailbox no right to a document its node happens to hold.

    A digest under the sender's own address is taken at its word (nobody can tell whether
    the sender has that content without asking it): it gives the recipients a right to the
    sender's copy, fetched through the hub, and the recipient node's own copy of that
    digest serves a mailbox-limited client only once the node has had it from the sender
    (``NodeStore.may_use_document``), never because it holds it for another mailbox."""
    out: list[bytes] = []
    for ref in header.attachments:
        try:
            owner, digest = parse_document_uri(ref.uri)
        except ChaparError:
            continue
        if owner == sender and digest == ref.sha256:
            out.append(digest)
    return out


def base_media_type(media_type: str) -> str:
    """``type/subtype`` in lower case, without parameters (``; charset=...``)."""
    return media_type.split(";", 1)[0].strip().lower()


def check_media_type(media_type: str, limits: DocumentLimits, field: str) -> None:
    if base_media_type(media_type) not in limits.media_types:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "MEDIA_TYPE_NOT_ALLOWED",
            f"{field} {media_type!r} is not an allowed media type",
            metadata={"media_type": media_type[:100]},
            field_violations=[(field, "media type not allowed")],
        )


def unfetchable_attachment(header: pb.EnvelopeHeader, sender: str) -> tuple[str, str] | None:
    """Why no recipient could ever download an attachment of a verified letter from
    ``sender`` (reason, detail), or None: a reference to another agency's document, or
    whose address and digest differ, grants nothing (``senders_documents``), so its fetch
    is refused for good. Honest nodes refuse to number such a letter (``validate_attachments``
    gives the same reasons); the hub refuses to relay it, a recipient's node to take it, as
    for a letter whose attachment its own store would refuse."""
    if len(header.attachments) > MAX_ATTACHMENTS:
        return (
            "TOO_MANY_ATTACHMENTS",
            f"{len(header.attachments)} attachments, at most {MAX_ATTACHMENTS}",
        )
    for i, ref in enumerate(header.attachments):
        try:
            owner, digest = parse_document_uri(ref.uri)
        except ChaparError as exc:
            return exc.reason, f"attachment {i}: {exc.message}"
        if owner != sender:
            return (
                "DOCUMENT_NOT_OWNED",
                f"attachment {i} is a document of {owner}, not of the letter's sender {sender}",
            )
        if ref.sha256 != digest:
            return (
                "DOCUMENT_DIGEST_MISMATCH",
                f"attachment {i}'s sha256 is not the digest in its uri",
            )
        if ref.size < 0:
            return "INVALID_SIZE", f"attachment {i}'s size is negative"
    return None


def refused_attachment(header: pb.EnvelopeHeader, limits: DocumentLimits) -> tuple[str, str] | None:
    """Why this node would not take an attachment of a received letter (reason, detail),
    or None: one no recipient could download (``unfetchable_attachment``), or one its
    document store would refuse. Checked at delivery: the sender's node holds its own
    limits, which may be wider; a letter whose attachment the recipient can never download
    would otherwise be DELIVERED and handed over, and its attachment lost for good."""
    if unfit := unfetchable_attachment(header, header.sender.agency):
        return unfit
    for i, ref in enumerate(header.attachments):
        if ref.size > limits.max_file_bytes:
            return (
                "DOCUMENT_TOO_LARGE",
                f"attachment {i} has {ref.size} bytes; this agency takes documents of up to"
                f" {limits.max_file_bytes}",
            )
        if base_media_type(ref.media_type) not in limits.media_types:
            return (
                "MEDIA_TYPE_NOT_ALLOWED",
                f"attachment {i} is {ref.media_type[:100]!r}, a media type this agency does"
                " not take",
            )
    return None


def check_size(size: int, limits: DocumentLimits) -> None:
    """RESOURCE_EXHAUSTED for a file over the limit (checked before anything is stored)."""
    if size > limits.max_file_bytes:
        raise ChaparError(
            Code.RESOURCE_EXHAUSTED,
            "DOCUMENT_TOO_LARGE",
            f"document of {size} bytes is over the limit of {limits.max_file_bytes}",
            metadata={"limit": str(limits.max_file_bytes), "size": str(size)},
        )


def validate_attachments(
    refs: list[pb.AttachmentRef], *, sender: str, limits: DocumentLimits
) -> None:
    """Checks the form of a draft's attachment references.

    Each must address a document of the sending agency whose address agrees with its
    digest, with a size within the limit and an allowed media type. Whether the node holds
    that content is the store's question (``Agency`` asks it before numbering).
    """
    if len(refs) > MAX_ATTACHMENTS:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "TOO_MANY_ATTACHMENTS",
            f"at most {MAX_ATTACHMENTS} attachments",
            metadata={"limit": str(MAX_ATTACHMENTS)},
            field_violations=[("draft.attachments", "too many")],
        )
    for i, ref in enumerate(refs):
        field = f"draft.attachments[{i}]"
        owner, digest = parse_document_uri(ref.uri, f"{field}.uri")
        if owner != sender:
            raise ChaparError(
                Code.INVALID_ARGUMENT,
                "DOCUMENT_NOT_OWNED",
                f"{field}.uri is a document of {owner}; upload it to this node first",
                metadata={"owner": owner},
                field_violations=[(f"{field}.uri", "not a document of the sender")],
            )
        if ref.sha256 != digest:
            raise ChaparError(
                Code.INVALID_ARGUMENT,
                "DOCUMENT_DIGEST_MISMATCH",
                f"{field}.sha256 is not the digest in its uri",
                field_violations=[(f"{field}.sha256", "differs from the uri")],
            )
        if ref.size < 0:
            raise ChaparError(
                Code.INVALID_ARGUMENT,
                "INVALID_SIZE",
                f"{field}.size is negative",
                field_violations=[(f"{field}.size", "negative")],
            )
        check_size(ref.size, limits)
        check_media_type(ref.media_type, limits, f"{field}.media_type")


def chunk_of(
    message: pb.UploadDocumentRequest | pb.PushDocumentRequest, *, what: str, missing: str
) -> bytes:
    """The chunk a message after an upload's or a push's header must carry; a second header
    (UNEXPECTED_HEADER) or a message with no part set (``missing``) is refused."""
    part = message.WhichOneof("part")
    if part == "header":
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "UNEXPECTED_HEADER",
            f"only the first message of {what} is a header",
            field_violations=[("header", "after the first message")],
        )
    if part is None:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            missing,
            f"a message of {what} after its header must be a chunk; this one has no part set",
            field_violations=[("chunk", "missing")],
        )
    return message.chunk


def empty_chunks_refused(*, what: str, reason: str) -> ChaparError:
    """The refusal of ``what`` (an upload, a push) once it carried more than
    ``MAX_EMPTY_CHUNKS`` empty chunks: INVALID_ARGUMENT with ``reason``."""
    return ChaparError(
        Code.INVALID_ARGUMENT,
        reason,
        f"{what} may carry at most {MAX_EMPTY_CHUNKS} empty chunks; send none",
        metadata={"max_empty_chunks": str(MAX_EMPTY_CHUNKS)},
        field_violations=[("chunk", f"empty, more than {MAX_EMPTY_CHUNKS} times")],
    )
