"""The async client agency back-ends use to talk to their node (``NodeService``).

This module owns the mapping between Python values and the NodeService messages, and the
one I/O seam: a ``grpc.aio.Channel``. ``ExchangeClient(target, credentials)`` dials the node
over mutual TLS; ``ExchangeClient.from_channel(channel)`` takes any channel (tests inject an
in-process one). Every ``grpc.RpcError`` is translated in ``_translated`` into a
``client_sdk.errors.ChaparError`` subclass (``Unavailable`` into ``FailedPrecondition``,
reason ``CLIENT_CERTIFICATE_NOT_VALID``, once the client's own certificate has expired).

::

    async with ExchangeClient("node.example:7443", Credentials.from_pki(pki, "G22")) as c:
        receipt = await c.send(to=["000.00.00.G01"], subject="Budget", body="...")
        async for letter in c.inbox():
            await letter.ack()

Submissions are idempotent on ``request_id`` (AIP-155): submitting again with the same id,
e.g. after ``Unavailable``, returns the original receipt and stores nothing new. ``send``
makes a fresh id per call unless given one; a ``Draft`` makes its id once, when it is
created, so resubmitting the same ``Draft`` objects is always safe. An id already used for
a different letter is refused (``AlreadyExists``, reason ``REQUEST_ID_REUSED``). Each
back-end's ids are its own (kept per client certificate identity): two back-ends of one
agency may use the same id for different letters.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import errno
import functools
import hashlib
import math
import mimetypes
import os
import re
import secrets
import shutil
import stat
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Final,
    Literal,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
)

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.credentials import Credentials
from client_sdk.documents import CHUNK_BYTES, digest_of_uri, read_chunks
from client_sdk.errors import (
    Cancelled,
    CertificateValidity,
    ChaparError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    OutOfRange,
    Unavailable,
    from_rpc_error,
    from_submit_error,
)
from client_sdk.ids import uuid7
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import sha256
from client_sdk.statuses import (
    BUSINESS_STATUSES,
    latest_statuses,
    status_name,
    status_update_fault,
)
from client_sdk.trust import (
    TrustStore,
    VerificationError,
    check_attestation,
    datetime_of,
    revocations_of,
    valid_timestamp,
)

if TYPE_CHECKING:
    from client_sdk._pb.chapar.exchange.v1.document_service_pb2_grpc import (
        DocumentServiceAsyncStub,
    )
    from client_sdk._pb.chapar.exchange.v1.node_service_pb2_grpc import NodeServiceAsyncStub

__all__ = [
    "CONTROL_CHARACTERS",
    "DEFAULT_KEEPALIVE_S",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_STREAM_BATCH_SIZE",
    "DEFAULT_STREAM_LINGER_S",
    "DEFAULT_TIMEOUT",
    "MAX_BATCH_SIZE",
    "STREAM_FRAME_BYTES",
    "TEXT_PLAIN",
    "Attachment",
    "AttachmentLike",
    "Correspondence",
    "Draft",
    "ExchangeClient",
    "KindLike",
    "Letter",
    "PriorityLike",
    "Receipt",
    "Recipient",
    "ShamsLike",
    "SharedStream",
    "StatusLike",
    "StatusUpdate",
    "Tracking",
    "TreeLetter",
    "VerifiedEvidence",
    "save_bundle",
    "to_business_status",
    "to_letter_kind",
    "to_priority",
]

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds a unary call may take unless the call says otherwise (None: no deadline)."""
MAX_BATCH_SIZE: Final = 256
"""Letters per BatchSubmitEnvelopes call; ``send_many`` splits larger lists."""
DEFAULT_STREAM_BATCH_SIZE: Final = 64
DEFAULT_MAX_IN_FLIGHT: Final = 4
"""Stream batches written but not yet answered; bounds memory and keeps the pipe full."""
DEFAULT_STREAM_LINGER_S: Final = 0.02
"""How long a stream frame that is not full waits, once, for more drafts when the stream is
busy (as Kafka's producer ``linger.ms``). A back-end sending a few hundred letters a second
then sends several letters a frame instead of one or two: at an offered 1,000 letters/s
over four streams, 6 a frame instead of 2.7, so the submission hop, which carried most of
the exchange's gRPC messages, carries less than half as many. Measured there
(docs/BENCHMARKS.md, ninth round): 5 -> 20 ms cut the CPU a letter of the whole exchange
by 5-12 %, and the p99 from submit to delivery did not get worse; at 250/s it cut the CPU
by 17-22 % and added about 10 ms to the median. A flood never waits: its
frames fill at once; nor does a draft on a quiet stream (no frame unanswered, none sent
within the linger), so a back-end sending a letter now and then sees no delay; nor the
last frame once the drafts have ended. 0 sends each frame as soon as one draft is ready."""
DEFAULT_KEEPALIVE_S: Final = 20.0
"""Seconds between the pings a client's channel sends while a call is open. A node that
does not answer one within half that (a node that hangs, or a connection a firewall or a
vanished host dropped without a FIN or RST) ends the client's calls with ``Unavailable``:
an ``inbox()`` stream or a ``send_stream`` that would wait for ever on a silent connection
fails within 1.5 x this, so the back-end reconnects. From 1 to 3600 s: nodes accept pings
every second at most."""
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Message size limit of channels the client creates (gRPC's default is 4 MiB)."""
TEXT_PLAIN: Final = "text/plain; charset=utf-8"
CONTROL_CHARACTERS: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (category Cc: C0, DEL and C1): replaced in a file name
saved (``Attachment.safe_file_name``), refused in a request_id by the node."""

Recipient: TypeAlias = "str | tuple[str, str]"
"""An agency code, or ``(agency code, mailbox)``."""
KindLike: TypeAlias = "pb.LetterKind.ValueType | int | str"
"""A LetterKind value, or its name: "letter", "reply", "status-update", "LETTER_KIND_REPLY"."""
PriorityLike: TypeAlias = "pb.Priority.ValueType | int | str"
"""A Priority value, or its name: "normal", "urgent", "very-urgent", "PRIORITY_EXPRESS"."""
StatusLike: TypeAlias = "pb.BusinessStatus.ValueType | int | str"
"""A BusinessStatus value, its name ("accepted", "recall-requested",
"BUSINESS_STATUS_COMPLETED") or its edXML code ("03")."""
ShamsLike: TypeAlias = "str | pb.Shams"
"""A SHAMS number, in canonical text or structured form."""
AttachmentLike: TypeAlias = "pb.AttachmentRef | Path"
"""A reference to a document already uploaded, or a file to upload first."""


@dataclass(frozen=True, slots=True)
class Draft:
    """One letter to submit, as ``send`` takes it; ``request_id`` is fixed at creation."""

    to: Sequence[Recipient]
    subject: str
    body: bytes | str = b""
    kind: KindLike = "letter"
    in_reply_to: ShamsLike | None = None
    priority: PriorityLike | None = None
    content_type: str | None = None
    expire_time: dt.datetime | None = None
    request_id: str | None = None
    metadata: pb.DocumentMetadata | None = None
    attachments: Sequence[pb.AttachmentRef] = ()
    sender_mailbox: str = ""
    status: StatusLike | None = None
    """Set on a status update (``kind="status_update"``), and only there; ``to`` may then
    be empty: the update goes to the other side of the letter ``in_reply_to`` names."""
    # The request built when the draft was made, kept when nothing in the draft can change
    # (see ``_built``): the streams send it rather than build it a second time.
    _request: pb.SubmitEnvelopeRequest | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A bare string is a Sequence[str] too; it means one recipient, not its characters.
        to = (self.to,) if isinstance(self.to, str) else tuple(self.to)
        object.__setattr__(self, "to", to)
        if not self.request_id:
            object.__setattr__(self, "request_id", uuid7())
        if self.expire_time is not None and self.expire_time.utcoffset() is None:
            raise ValueError("expire_time must be timezone-aware")
        # Checked here, where the back-end makes it (1.8 us): a bad value found only when a
        # stream or a batch builds its frame would end the stream, or a send_many after
        # earlier calls were accepted, and lose the good drafts around it.
        try:
            request = self.to_request()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid draft: {exc}") from exc
        if self._unchangeable():
            object.__setattr__(self, "_request", request)

    def _unchangeable(self) -> bool:
        """Whether every value of the draft is immutable: no protobuf message (metadata,
        attachments, an ``in_reply_to`` as a Shams), no bytearray body, no list as a
        recipient. A draft holding one is built again when sent, as a caller may have
        changed it since."""
        return (
            self.metadata is None
            and not self.attachments
            and (self.in_reply_to is None or isinstance(self.in_reply_to, str))
            and isinstance(self.body, bytes | str)
            and all(isinstance(r, str | tuple) for r in self.to)
        )

    def _built(self) -> pb.SubmitEnvelopeRequest:
        """The request to send: the one built when the draft was made, when kept (nothing
        in the draft can have changed since; the SDK only reads it), else a new one."""
        return self.to_request() if self._request is None else self._request

    def to_request(self) -> pb.SubmitEnvelopeRequest:
        """The SubmitEnvelopeRequest for this letter (its values were checked when it was
        made: ValueError then)."""
        request = pb.SubmitEnvelopeRequest(request_id=self.request_id or "")
        draft = request.draft
        for recipient in self.to:
            if isinstance(recipient, str):
                draft.recipients.add(agency=recipient)
            else:
                agency, mailbox = recipient
                draft.recipients.add(agency=agency, mailbox=mailbox)
        draft.subject = self.subject
        draft.kind = to_letter_kind(self.kind)
        if self.priority is not None:
            draft.priority = to_priority(self.priority)
        if isinstance(self.body, str):
            draft.body = self.body.encode()
            draft.content_type = TEXT_PLAIN if self.content_type is None else self.content_type
        else:
            draft.body = self.body
            if self.content_type is not None:
                draft.content_type = self.content_type
        if self.in_reply_to is not None:
            draft.in_reply_to.CopyFrom(_shams_pb(self.in_reply_to))
        if self.expire_time is not None:
            try:
                draft.expire_time.FromDatetime(self.expire_time)
            except OverflowError as exc:  # e.g. datetime.max west of Greenwich
                raise ValueError(
                    f"expire_time {self.expire_time.isoformat()} is not in the years 1 to 9999"
                    " in UTC"
                ) from exc
        if self.metadata is not None:
            draft.metadata.CopyFrom(self.metadata)
        if self.attachments:
            draft.attachments.extend(self.attachments)
        if self.sender_mailbox:
            draft.sender_mailbox = self.sender_mailbox
        if self.status is not None:
            draft.status = to_business_status(self.status)
        return request


@dataclass(frozen=True, slots=True)
class Receipt:
    """The node accepted a letter: its number and the signed SUBMISSION_ACCEPTANCE."""

    shams: str
    shams_pb: pb.Shams
    envelope_sha256: bytes
    evidence: pb.Evidence
    request_id: str

    @classmethod
    def from_pb(cls, receipt: pb.Receipt, request_id: str) -> Receipt:
        return cls(
            shams=receipt.shams_text or format_shams(receipt.shams),
            shams_pb=receipt.shams,
            envelope_sha256=receipt.envelope_sha256,
            evidence=receipt.evidence,
            request_id=request_id,
        )

    def content(self) -> pb.EvidenceContent:
        """The evidence's content, parsed but not verified (see ``ExchangeClient.track``)."""
        return pb.EvidenceContent.FromString(self.evidence.content)


@dataclass(frozen=True, slots=True)
class VerifiedEvidence:
    """One evidence whose signature, issuer and binding to the letter were checked."""

    event: str
    issuer: str
    recipient: str
    event_time: dt.datetime | None
    reason: str
    evidence_id: str
    content: pb.EvidenceContent

    @classmethod
    def from_content(cls, content: pb.EvidenceContent) -> VerifiedEvidence:
        return cls(
            event=_enum_name(pb.EvidenceEvent.Name, content.event, "EVIDENCE_EVENT_"),
            issuer=content.issuer,
            recipient=content.recipient,
            event_time=_time(content, "event_time"),
            reason=content.reason,
            evidence_id=content.evidence_id,
            content=content,
        )


@dataclass(frozen=True, slots=True)
class _LetterFields:
    """What a received letter says; shared by the async and the sync letter."""

    shams: str
    shams_pb: pb.Shams
    sender: str
    recipients: tuple[str, ...]
    subject: str
    body: bytes
    kind: str
    in_reply_to: str | None
    create_time: dt.datetime | None
    receive_time: dt.datetime | None
    envelope: pb.Envelope
    header: pb.EnvelopeHeader
    delivery: pb.Evidence
    status: str | None
    """For a status update (``kind == "STATUS_UPDATE"``), the status it reports about
    ``in_reply_to`` ("ACCEPTED", ...); None for any other letter, even one whose header
    sets a status. The node delivers an update about a letter it holds only if the update
    fits it (sent between that letter's two sides); about a letter it does not hold (not
    arrived yet, or never), only that letter's own sender's recall is delivered (``sender``
    says who asks), and tracked with that letter once it has come, if it fits it."""

    @staticmethod
    def _parse(item: pb.InboxLetter) -> dict[str, Any]:
        # The node verified the signature before storing the letter, so the header bytes
        # are trusted enough to parse; ``verify`` re-checks everything offline.
        try:
            header = pb.EnvelopeHeader.FromString(item.envelope.header)
        except DecodeError as exc:
            raise InternalError(
                "inbox letter with a malformed header", reason="MALFORMED_RESPONSE"
            ) from exc
        shams_pb = item.shams if item.HasField("shams") else header.shams
        return {
            "shams": item.shams_text or format_shams(shams_pb),
            "shams_pb": shams_pb,
            "sender": header.sender.agency,
            "recipients": tuple(r.agency for r in header.recipients),
            "subject": header.subject,
            "body": item.envelope.body,
            "kind": _enum_name(pb.LetterKind.Name, header.kind, "LETTER_KIND_"),
            "in_reply_to": _shams_or_none(header, "in_reply_to"),
            "create_time": _time(header, "create_time"),
            "receive_time": _time(item, "receive_time"),
            "envelope": item.envelope,
            "header": header,
            "delivery": item.delivery,
            "status": (
                status_name(header.status)
                if header.status and header.kind == pb.LETTER_KIND_STATUS_UPDATE
                else None
            ),
        }

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    def verify(self, trust: TrustStore) -> VerifiedEvidence:
        """Re-verifies the sender's signature and this node's DELIVERY evidence.

        ``trust`` must know the signing certificates involved (e.g. from ``agencies()`` or
        ``track``). Raises ``client_sdk.trust.VerificationError`` on any failure.
        """
        (delivery,) = _verify_letter(trust, self.envelope, [self.delivery])
        if delivery.content.event != pb.EVIDENCE_EVENT_DELIVERY:
            raise VerificationError("EVIDENCE_MISMATCH", f"expected DELIVERY, got {delivery.event}")
        # The number the node labelled the letter with is the one its sender signed (the
        # header's bytes are the signed ones, verified above).
        if self.shams_pb != self.header.shams or self.shams != format_shams(self.header.shams):
            raise VerificationError(
                "EVIDENCE_MISMATCH",
                f"labelled {self.shams}, signed as {format_shams(self.header.shams)}",
            )
        return delivery


@dataclass(frozen=True, slots=True)
class _AttachmentFields:
    """What a letter's signed header says of one attachment (shared by the sync twin)."""

    uri: str
    sha256: bytes
    size: int
    media_type: str
    file_name: str

    def ref(self) -> pb.AttachmentRef:
        return pb.AttachmentRef(
            uri=self.uri,
            sha256=self.sha256,
            size=self.size,
            media_type=self.media_type,
            file_name=self.file_name,
        )

    @property
    def safe_file_name(self) -> str:
        """``file_name`` as a name to save under in a directory of one's choice: its last
        part only (the sender chose it: ``../`` or ``/etc/...`` must not lead out of that
        directory), each control character as ``_`` (a NUL cannot be in a file name at
        all; a newline or an escape sequence makes listings lie), or
        ``attachment-<digest>`` when nothing usable is left."""
        # No leading dots either: hidden names are where downloads keep their partial
        # files (``fetch``), and the sender must not name one of those. Control characters
        # go first: a sender's node checks for them, but a recipient's does not (a node
        # of another version, or hostile, chooses the name).
        name = CONTROL_CHARACTERS.sub("_", self.file_name)
        name = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
        if not name:
            return f"attachment-{self.sha256.hex()[:16]}"
        return _fit_name(name, _NAME_BYTES)


@dataclass(frozen=True, slots=True)
class Attachment(_AttachmentFields):
    """An attachment of a received letter: its address, digest, size, type and name.

    ``await attachment.save(path)`` downloads it through the agency's own node and checks
    size and SHA-256 against the signed reference before the file appears at ``path``.
    """

    _client: ExchangeClient = field(repr=False, compare=False)

    @classmethod
    def from_ref(cls, ref: pb.AttachmentRef, client: ExchangeClient) -> Attachment:
        return cls(ref.uri, ref.sha256, ref.size, ref.media_type, ref.file_name, client)

    async def save(self, path: Path | str, *, timeout: float | None = None) -> Path:
        """Downloads to ``path`` (resuming a partial download of it); see ``fetch``."""
        return await self._client.fetch(self.ref(), path, timeout=timeout)

    async def save_into(self, directory: Path | str, *, timeout: float | None = None) -> Path:
        """Downloads into ``directory`` under ``safe_file_name``; returns the file's path.

        The directory must exist (FileNotFoundError otherwise): it is not made here.
        A file of that name holding another document (another letter's attachment of the
        same name) is left alone: this one is saved as ``<stem>-<digest prefix><suffix>``.
        """
        return await self._client.fetch(
            self.ref(), Path(directory) / self.safe_file_name, timeout=timeout, keep_others=True
        )


@dataclass(frozen=True, slots=True)
class Letter(_LetterFields):
    """A letter from the inbox stream; ``await letter.ack()`` hands it over."""

    _client: ExchangeClient = field(repr=False, compare=False)

    @property
    def attachments(self) -> list[Attachment]:
        """The letter's attachments (references signed by the sender)."""
        return [Attachment.from_ref(r, self._client) for r in self.header.attachments]

    async def ack(self) -> pb.Evidence:
        """Acknowledges the letter; returns the node's HANDOVER evidence (idempotent).

        Acknowledgements made in the same event-loop turn, or while an earlier batch is
        unanswered, travel together in one batch on the client's acknowledgement stream
        (``StreamAckEnvelopes``); each still gets its own evidence or exception.
        """
        return await self._client._acks.ack(self.shams_pb)


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A business status an agency reported about a letter: a signed letter of kind
    STATUS_UPDATE. As parsed from its header; ``Tracking.verify`` checks it."""

    shams: str
    """The update's own number."""
    agency: str
    """Who reported it: the update's sender."""
    status: str
    """"ACCEPTED", "RECALL_REQUESTED", ..."""
    time: dt.datetime | None
    """When its sender signed it (its ``create_time``)."""
    note: str | None
    """Its body as text, when the envelope holds it; None when it does not: a node's
    ``track`` of a letter returns its updates without their notes, which ``track`` of the
    update itself (``shams``) returns. "" for an update signed without a note."""
    envelope: pb.Envelope
    header: pb.EnvelopeHeader

    @classmethod
    def from_envelope(cls, envelope: pb.Envelope) -> StatusUpdate:
        """Raises ``DecodeError`` if the header bytes are not a header, ``ValueError`` if
        its SHAMS number is not valid."""
        header = pb.EnvelopeHeader.FromString(envelope.header)
        return cls(
            shams=format_shams(header.shams),
            agency=header.sender.agency,
            status=status_name(header.status),
            time=_time(header, "create_time"),
            note=(
                envelope.body.decode("utf-8", errors="replace")
                if _holds_body(envelope, header)
                else None
            ),
            envelope=envelope,
            header=header,
        )


@dataclass(frozen=True, slots=True)
class Tracking:
    """A letter as the node knows it: envelope, per-recipient state and evidence, and the
    business status updates about it."""

    shams: str
    envelope: pb.Envelope
    header: pb.EnvelopeHeader
    direction: str
    statuses: dict[str, str]
    evidence: list[pb.Evidence]
    certificates: list[bytes]
    body_purged: bool = False
    revoked_serials: frozenset[int] = frozenset()
    """Serials a saved bundle listed as revoked (``from_bundle``); ``verify`` applies them."""
    revoked_since: Mapping[int, dt.datetime] = field(default_factory=dict)
    """Of those, the ones revoked from a time on, with their time: what their keys signed
    before it verifies (``TrustStore.set_revoked``)."""
    status_updates: list[StatusUpdate] = field(default_factory=list)
    """The status updates about this letter its node sent or received, in the order it
    stored them; a node lists them without their notes (``StatusUpdate.note`` None)."""
    business_statuses: dict[str, str] = field(default_factory=dict)
    """Each recipient's latest reported status, as the node says (recipients that reported
    one); ``verify`` checks it against the signed updates."""

    @classmethod
    def from_response(
        cls, response: pb.GetEnvelopeResponse, asked: pb.Shams | None = None
    ) -> Tracking:
        """The tracking in a node's ``GetEnvelopeResponse``; ``asked``: the number asked
        for, used when the header carries none. Raises ``DecodeError`` if the header bytes
        (the letter's or a status update's) are not a header, ``ValueError`` if one holds
        no valid SHAMS number."""
        header = pb.EnvelopeHeader.FromString(response.envelope.header)
        shams = header.shams if header.HasField("shams") or asked is None else asked
        return cls(
            shams=format_shams(shams),
            envelope=response.envelope,
            header=header,
            direction=_enum_name(pb.LetterDirection.Name, response.direction, "LETTER_DIRECTION_"),
            statuses={
                s.agency: _enum_name(pb.DeliveryState.Name, s.state, "DELIVERY_STATE_")
                for s in response.statuses
            },
            evidence=list(response.evidence),
            certificates=list(response.certificates),
            body_purged=response.body_purged,
            status_updates=[StatusUpdate.from_envelope(e) for e in response.status_updates],
            business_statuses={
                s.agency: status_name(s.business_status)
                for s in response.statuses
                if s.business_status
            },
        )

    @classmethod
    def from_bundle(cls, bundle: bytes | pb.EvidenceBundle) -> Tracking:
        """The letter in a saved ``EvidenceBundle`` (``ExchangeClient.evidence_bundle``,
        ``chapar track --save``), with the revocations it was saved with.

        Nothing is verified yet: ``verify`` does that, offline. Raises
        ``client_sdk.trust.VerificationError`` (``BUNDLE_MALFORMED``) for bytes that are
        not a bundle.
        """
        try:
            if isinstance(bundle, bytes):
                bundle = pb.EvidenceBundle.FromString(bundle)
            if not bundle.HasField("letter") or not bundle.letter.HasField("envelope"):
                raise ValueError("the bundle holds no letter")
            tracking = cls.from_response(bundle.letter)
            revoked, since = revocations_of(bundle.revoked_serials, bundle.revocations)
        # ValueError: a serial that is not hex, a revocation's time that is none
        except (DecodeError, ValueError) as exc:
            raise VerificationError("BUNDLE_MALFORMED", f"not an evidence bundle: {exc}") from exc
        return replace(tracking, revoked_serials=frozenset(revoked), revoked_since=since)

    def verify(
        self, trust: TrustStore, *, hubs: Collection[str] | None = None
    ) -> list[VerifiedEvidence]:
        """Verifies the letter, every evidence and every status update offline, in order.

        Adds the response's certificates to ``trust`` (they still have to chain to its
        roots) and applies a bundle's revoked serials for this call only (a serial ``trust``
        revokes already, for all time or from an earlier time, stays so), checks the sender's
        signature and body digest (unless retention purged the body: ``body_purged`` and
        no body), then each evidence's signature, issuer, and that it concerns this very letter
        (SHAMS and header digest); with ``hubs`` (identity URIs, ``urn:chapar:hub:<NAME>``),
        the hub's evidence (relays, expiry) counts only from one of them
        (``ISSUER_NOT_ALLOWED``): the CA may certify other hubs (a staging one), and only a
        name the verifier gives tells the exchange's hub from them (the bundle names none
        its holder could not edit); without, from any hub the CA certified, each shown with
        its issuer (a hub renamed while a letter went signs under both names). Then each
        status update: its signature (and its body's
        digest, when it still has its body), that it is a status update about this letter,
        and that it goes between the letter's two sides (``client_sdk.statuses``: a third
        party's "update" fails with ``NOT_A_PARTY``); last, that each recipient's
        ``business_statuses`` entry is its latest signed update. Returns the verified
        evidence; raises ``client_sdk.trust.VerificationError`` on the first failure.
        """
        try:
            trust.add_certificates(self.certificates)
        # DER that is no certificate (a bundle's, a node's): ValueError, and cryptography's
        # InvalidVersion or DuplicateExtension, which are not ValueErrors
        except Exception as exc:
            raise VerificationError(
                "CERTIFICATE_MALFORMED", f"a certificate that does not parse: {exc}"
            ) from exc
        # The bundle's revocations apply to this verification only: a bundle is anyone's
        # to hand over, and one listing an honest key would otherwise have every later
        # verification with this store refuse that key's letters.
        revoked, since = trust.revoked_serials, trust.revoked_since
        if self.revoked_serials:
            trust.add_revoked(self.revoked_serials, self.revoked_since)
        try:
            # body_purged is not signed: a body that is there is always checked, or a
            # changed body with the flag set would pass.
            verified = _verify_letter(
                trust,
                self.envelope,
                self.evidence,
                check_body=not self.body_purged or bool(self.envelope.body),
                hubs=hubs,
            )
            _verify_status_updates(trust, self.header, self.status_updates, self.business_statuses)
        finally:
            if self.revoked_serials:
                trust.set_revoked(revoked, since)
        return verified


@dataclass(frozen=True, slots=True)
class TreeLetter:
    """One letter of a ``Correspondence`` as the hub recorded it (``pb.TrackedLetter``).

    A redacted letter (one the caller is no party of) has its number and the number it
    answers, nothing else (whatever else an answer carries for it is not shown here, and
    ``Correspondence.verify`` refuses it). The other fields are the hub's account,
    unverified until ``Correspondence.verify`` checks them against the signed header and
    evidence; a letter whose envelope the hub's retention removed (``signed`` False) has
    no signed header to check them against: only its evidence verifies."""

    shams: str
    in_reply_to: str | None
    """The letter it answers; None if none (or ``links_unknown``)."""
    redacted: bool
    sender: str | None
    recipients: tuple[str, ...]
    kind: str | None
    """"LETTER", "REPLY", "STATUS_UPDATE", ...; None when redacted or not known."""
    status: str | None
    """A status update's business status ("ACCEPTED", ...); None on other letters."""
    accept_time: dt.datetime | None
    """When the hub accepted it, by the hub's clock (unsigned)."""
    envelope: pb.Envelope | None
    """The signed letter without its body; None when redacted or removed by retention."""
    header: pb.EnvelopeHeader | None
    """``envelope``'s header, parsed (None if there is none or it does not parse)."""
    evidence: list[pb.Evidence]
    """All the hub recorded about the letter, in its order."""
    links_unknown: bool
    signed: bool
    """Shown in full with its signed envelope: its account can be checked against it.
    False when redacted, or when retention removed the envelope (body and header purged
    at the hub): sender, recipients, kind, status and in_reply_to are then the hub's word."""
    message: pb.TrackedLetter
    children: list[TreeLetter] = field(default_factory=list)
    """The letters of the tree answering this one, in the hub's order."""

    @classmethod
    def from_pb(cls, message: pb.TrackedLetter) -> TreeLetter:
        """Raises ``ValueError`` if its number is not a valid SHAMS number."""
        header: pb.EnvelopeHeader | None = None
        envelope = message.envelope if message.HasField("envelope") else None
        if envelope is not None:
            with contextlib.suppress(DecodeError):  # verify says so
                header = pb.EnvelopeHeader.FromString(envelope.header)
        full = not message.redacted
        return cls(
            shams=format_shams(message.shams),
            in_reply_to=_shams_or_none(message, "in_reply_to"),
            redacted=message.redacted,
            sender=message.sender if full else None,
            recipients=tuple(message.recipients) if full else (),
            kind=(
                _enum_name(pb.LetterKind.Name, message.kind, "LETTER_KIND_")
                if full and not message.links_unknown
                else None
            ),
            status=status_name(message.status) if full and message.status else None,
            accept_time=_time(message, "accept_time") if full else None,
            envelope=envelope if full else None,
            header=header if full else None,
            evidence=list(message.evidence) if full else [],
            links_unknown=message.links_unknown if full else False,
            signed=full and envelope is not None,
            message=message,
        )

    @property
    def last_event(self) -> str | None:
        """The event of the last evidence recorded ("DELIVERY", "HANDOVER", ...), as the
        evidence says before it is verified; None without evidence."""
        if not self.evidence:
            return None
        try:
            content = pb.EvidenceContent.FromString(self.evidence[-1].content)
        except DecodeError:
            return None
        return _enum_name(pb.EvidenceEvent.Name, content.event, "EVIDENCE_EVENT_")


@dataclass(frozen=True, slots=True)
class Correspondence:
    """The correspondence tree around a letter (``ExchangeClient.track_correspondence``,
    or a ``HubService.Track`` answer): its letters, linked by ``in_reply_to``."""

    shams: str
    """The letter asked for: ``verify`` checks the answer's first letter is that one."""
    letters: list[TreeLetter]
    """Every letter, in the hub's order: the one asked for, its ancestors, then the rest."""
    roots: list[TreeLetter]
    """The letters answering none of the others: the tree's first letter, and any whose
    parent the hub does not hold or did not return (``truncated``); each letter is under
    exactly one root, even where hostile links make a cycle."""
    certificates: list[bytes]
    truncated: bool
    """The hub cut the tree (1,000 letters, 32 MiB)."""

    @classmethod
    def from_response(
        cls,
        response: pb.TrackCorrespondenceResponse | pb.TrackResponse,
        asked: ShamsLike | None = None,
    ) -> Correspondence:
        """The tree an answer holds, about letter ``asked`` (by default the answer's first
        letter: give the number asked for, so that ``verify`` checks the answer is about
        it). Raises ``ValueError`` if the answer holds no letter, or a number (``asked``
        included) is not a valid SHAMS number."""
        letters = [TreeLetter.from_pb(m) for m in response.letters]
        if not letters:
            raise ValueError("the answer holds no letter")
        index: dict[str, TreeLetter] = {}
        for letter in letters:
            index.setdefault(letter.shams, letter)
        answering: dict[str, list[TreeLetter]] = {}
        for letter in index.values():
            if letter.in_reply_to is not None:
                answering.setdefault(letter.in_reply_to, []).append(letter)
        placed: set[str] = set()
        roots: list[TreeLetter] = []

        def plant(root: TreeLetter) -> None:
            roots.append(root)
            placed.add(root.shams)
            level = [root]
            while level:
                below: list[TreeLetter] = []
                for letter in level:
                    for child in answering.get(letter.shams, []):
                        if child.shams not in placed:
                            placed.add(child.shams)
                            letter.children.append(child)
                            below.append(child)
                level = below

        for letter in index.values():
            if letter.in_reply_to is None or letter.in_reply_to not in index:
                plant(letter)
        for letter in index.values():  # left: letters on a cycle of links
            if letter.shams not in placed:
                plant(letter)
        if asked is None:
            wanted = letters[0].shams
        else:
            wanted = format_shams(parse_shams(asked) if isinstance(asked, str) else asked)
        return cls(
            shams=wanted,
            letters=letters,
            roots=roots,
            certificates=list(response.certificates),
            truncated=response.truncated,
        )

    def letter(self, shams: ShamsLike) -> TreeLetter | None:
        """The letter of the tree numbered ``shams``, if there is one."""
        wanted = shams if isinstance(shams, str) else format_shams(shams)
        return next((t for t in self.letters if t.shams == wanted), None)

    def walk(self) -> Iterator[tuple[int, TreeLetter]]:
        """(depth, letter) for every letter, depth first from each root."""
        stack = [(0, root) for root in reversed(self.roots)]
        while stack:
            depth, letter = stack.pop()
            yield depth, letter
            stack.extend((depth + 1, child) for child in reversed(letter.children))

    def verify(
        self, trust: TrustStore, *, hubs: Collection[str] | None = None
    ) -> list[VerifiedEvidence]:
        """Verifies offline that the answer is about the letter asked for (``shams``, its
        first letter, shown in full: ``TRACK_MISMATCH``), and every letter shown in full:
        that its sender is the origin of its number, its envelope's signature (with its
        batch proof; the body is not there, its signed header is what verifies), that the
        hub's account (sender, recipients, kind, in_reply_to, status) is what that header
        signs (``TRACK_MISMATCH``), and each evidence: signature, issuer allowed for its
        event (with ``hubs``, a relay or an expiry only from one of them, as
        ``Tracking.verify``), about this very letter. A letter without its envelope (``signed`` False)
        has only its evidence verified: its account stays the hub's word. A redacted
        letter must carry nothing but its number and the one it answers
        (``TRACK_MISMATCH``). Adds ``certificates`` to ``trust`` (they still have to chain
        to its roots). Returns the verified evidence; raises
        ``client_sdk.trust.VerificationError`` on the first failure, naming the letter."""
        first = self.letters[0]
        if first.shams != self.shams or first.redacted:
            raise VerificationError(
                "TRACK_MISMATCH",
                f"the answer is not the tree of {self.shams} shown in full"
                f" (its first letter is {first.shams}{', redacted' if first.redacted else ''})",
            )
        try:
            trust.add_certificates(self.certificates)
        except Exception as exc:  # as in Tracking.verify: DER that is no certificate
            raise VerificationError(
                "CERTIFICATE_MALFORMED", f"a certificate that does not parse: {exc}"
            ) from exc
        verified: list[VerifiedEvidence] = []
        for letter in self.letters:
            try:
                if letter.redacted:
                    _verify_redacted(letter.message)
                    continue
                verified.extend(_verify_tracked(trust, letter.message, hubs))
            except VerificationError as exc:
                raise VerificationError(exc.reason, f"letter {letter.shams}: {exc}") from exc
        return verified


@dataclass(frozen=True, slots=True)
class _Ready:
    """A draft's request, built once, with its size on the wire: what submission streams
    and ``send_many`` frame (by the size of the whole request, not of the body alone: a
    huge subject or metadata counts too)."""

    request: pb.SubmitEnvelopeRequest
    size: int

    @classmethod
    def of(cls, draft: Draft) -> _Ready:
        request = draft._built()
        return cls(request, request.ByteSize())

    def to_request(self) -> pb.SubmitEnvelopeRequest:
        return self.request


_Submittable: TypeAlias = _Ready


class _Feed(Protocol):
    async def next_batch(self) -> list[_Submittable]: ...

    async def aclose(self) -> None: ...


class ExchangeClient:
    """Async client of one node; use as ``async with ExchangeClient(...) as client``.

    The ``timeout`` of a call (seconds) becomes its gRPC deadline rather than an
    ``asyncio.timeout``: the node learns it too and stops working on an abandoned call.
    """

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        *,
        server_name: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Dials ``target`` (``host:port``) over mutual TLS.

        ``server_name`` overrides the name the node's TLS certificate is checked against
        (when dialling an address that is not in the certificate); ``timeout`` is the
        default deadline of unary calls in seconds; ``keepalive_s`` the interval of pings
        while a call is open (``DEFAULT_KEEPALIVE_S``; None sends none); ``options`` are
        extra channel options. A client certificate not valid now (expired, or not yet
        valid) raises ``FailedPrecondition`` (``CLIENT_CERTIFICATE_NOT_VALID``) here: the
        node would refuse every handshake, which a client sees only as ``Unavailable``,
        retryable, for ever. For the same reason, once the certificate expires while the
        client runs, a call that fails with ``Unavailable`` (as every call does once the
        connection the node accepted before has gone: the node refuses the new handshake)
        raises that ``FailedPrecondition`` instead, saying when it expired: renew the
        certificate (``chapar pki renew``) and make a new client with it. Streams end with
        it too. (The validity is read here once, and looked at only on ``Unavailable``.)
        """
        certificate = _own_certificate(credentials)
        keepalive = []
        if keepalive_s is not None:
            if not 1 <= keepalive_s <= 3600:  # NaN too
                raise ValueError("keepalive_s must be from 1 to 3600 seconds, or None")
            keepalive = [
                ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", round(keepalive_s * 500)),
                # grpc 1.85 waits for a keepalive ping's answer this long (1 min by default).
                ("grpc.http2.ping_timeout_ms", round(keepalive_s * 500)),
                # gRPC stops pinging after two pings with nothing sent: a quiet inbox
                # stream must keep pinging.
                ("grpc.http2.max_pings_without_data", 0),
            ]
        channel_options = [
            *keepalive,
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            # A fixed 1 MiB receive window: a large download cannot make the client buffer
            # more than that (BDP probing lets it grow); ``options`` may override it.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024 * 1024),
            *options,
        ]
        if server_name:
            channel_options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.aio.secure_channel(
            target, credentials.channel_credentials(), options=channel_options
        )
        self._setup(channel, owns_channel=True, timeout=timeout, certificate=certificate)

    @classmethod
    def from_channel(
        cls, channel: grpc.aio.Channel, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> ExchangeClient:
        """A client over an existing channel, which the caller keeps and closes. (It does
        not know the channel's client certificate: ``Unavailable`` stays ``Unavailable``.)"""
        client = cls.__new__(cls)
        client._setup(channel, owns_channel=False, timeout=timeout, certificate=None)
        return client

    def _setup(
        self,
        channel: grpc.aio.Channel,
        *,
        owns_channel: bool,
        timeout: float | None,
        certificate: CertificateValidity | None,
    ) -> None:
        self._channel = channel
        self._certificate = certificate  # the client's own, when it made the channel
        self._owns_channel = owns_channel
        self._timeout = timeout
        self._stub = cast("NodeServiceAsyncStub", pb.NodeServiceStub(channel))
        self._acks = _AckGatherer(self)
        self._documents = cast("DocumentServiceAsyncStub", pb.DocumentServiceStub(channel))

    async def __aenter__(self) -> ExchangeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel if this client created it."""
        await self._acks.close()
        if self._owns_channel:
            self._owns_channel = False
            await self._channel.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    async def send(
        self,
        *,
        to: Sequence[Recipient],
        subject: str,
        body: bytes | str,
        kind: KindLike = "letter",
        in_reply_to: ShamsLike | None = None,
        priority: PriorityLike | None = None,
        content_type: str | None = None,
        expire_time: dt.datetime | None = None,
        request_id: str | None = None,
        metadata: pb.DocumentMetadata | None = None,
        attachments: Sequence[AttachmentLike] = (),
        sender_mailbox: str = "",
        status: StatusLike | None = None,
        timeout: float | None = None,
    ) -> Receipt:
        """Submits one letter and returns its receipt.

        ``to`` holds agency codes or ``(agency, mailbox)`` pairs. A ``str`` body is sent
        as UTF-8 with content type ``text/plain; charset=utf-8``. Without ``request_id`` a
        UUID is generated; passing the id of an earlier submission returns its original
        receipt (``receipt.request_id`` tells it), which makes retries safe. A failure
        carries the draft it sent, with its id, in ``error.unanswered``: retry with that.
        ``attachments`` holds references from ``upload`` or paths of files, which are
        uploaded first (identical content is stored once, so uploading again is harmless).
        ``status`` is for ``kind="status_update"`` only (see ``send_status``).
        """
        refs = [a if isinstance(a, pb.AttachmentRef) else await self.upload(a) for a in attachments]
        draft = Draft(
            to=to,
            subject=subject,
            body=body,
            kind=kind,
            in_reply_to=in_reply_to,
            priority=priority,
            content_type=content_type,
            expire_time=expire_time,
            request_id=request_id,
            metadata=metadata,
            attachments=refs,
            sender_mailbox=sender_mailbox,
            status=status,
        )
        return await self._submit_one(draft, timeout)

    async def send_status(
        self,
        about: ShamsLike,
        status: StatusLike,
        note: str = "",
        *,
        to: Sequence[Recipient] = (),
        subject: str | None = None,
        request_id: str | None = None,
        sender_mailbox: str = "",
        timeout: float | None = None,
    ) -> Receipt:
        """Reports a business status about letter ``about`` (one this agency sent or
        received) and returns the receipt of the status update, itself a signed letter.

        Recipients of a letter report RECEIVED, REJECTED, ACCEPTED, ASSIGNED, PROCESSING,
        COMPLETED, RECALL_AGREED or RECALL_REFUSED to its sender; its sender reports
        RECALL_REQUESTED to its recipients. Without ``to`` the node addresses the update to
        that other side (all of the recipients); ``to`` may name some of them. On a letter
        this agency sent to itself, RECALL_REQUESTED goes as its sender, any other status
        as a recipient. The node
        refuses a letter it does not hold (``NotFound``, ``IN_REPLY_TO_NOT_FOUND``), a status
        update as ``about`` (``InvalidArgument``, ``STATUS_ABOUT_STATUS_UPDATE``: a back-end
        that reports on every inbox letter skips those of kind ``STATUS_UPDATE``), an
        addressee on neither side (``PermissionDenied``, ``NOT_A_PARTY``) and a status that
        is the other side's to report (``InvalidArgument``, ``STATUS_WRONG_DIRECTION``).
        ``note`` is the update's text; ``subject`` defaults to "<STATUS>: <about>".
        """
        name = status_name(to_business_status(status))
        about_text = about if isinstance(about, str) else format_shams(about)
        draft = Draft(
            to=to,
            subject=subject if subject is not None else f"{name}: {about_text}",
            body=note,
            kind=pb.LETTER_KIND_STATUS_UPDATE,
            in_reply_to=about,
            request_id=request_id,
            sender_mailbox=sender_mailbox,
            status=status,
        )
        return await self._submit_one(draft, timeout)

    async def _submit_one(self, draft: Draft, timeout: float | None) -> Receipt:
        try:
            return await self._submit_request(draft._built(), timeout)
        except ChaparError as error:
            # A retryable failure (a deadline, a node restarting) may come after the node
            # stored the letter: the draft, with the request id generated for it, lets the
            # caller send it again safely (the node answers the original receipt).
            error.unanswered = (draft,)
            raise

    async def _submit_request(
        self, request: pb.SubmitEnvelopeRequest, timeout: float | None
    ) -> Receipt:
        with _translated(self._certificate):
            response: pb.SubmitEnvelopeResponse = await self._stub.SubmitEnvelope(
                request, timeout=self._deadline(timeout)
            )
        return Receipt.from_pb(response.receipt, request.request_id)

    async def send_many(
        self,
        letters: Sequence[Draft],
        *,
        timeout: float | None = None,
    ) -> list[Receipt | ChaparError]:
        """Submits many letters with BatchSubmitEnvelopes: calls of at most 256 letters and
        ``STREAM_FRAME_BYTES`` of requests (one letter always goes), under what a node takes.

        Returns one receipt or error per letter, in order. A failure of a whole call
        raises; letters of earlier calls were accepted, and submitting the same drafts
        again returns their receipts. A letter over ``STREAM_FRAME_BYTES`` (its whole request)
        goes by a call of its own, so that a node whose message limit it passes refuses it
        alone (``ResourceExhausted``, in its place) and not the letters of a whole call.
        """
        results: list[Receipt | ChaparError] = []
        calls = _SyncFeed(map(_Ready.of, letters), MAX_BATCH_SIZE)
        while batch := await calls.next_batch():
            requests = [d.to_request() for d in batch]
            if _alone(batch):
                try:
                    results.append(await self._submit_request(requests[0], timeout))
                except ChaparError as error:
                    if error.retryable:  # as a failed call: raised
                        raise
                    results.append(error)  # its refusal (too large for the node, ...)
                continue
            with _translated(self._certificate):
                response: pb.BatchSubmitEnvelopesResponse = await self._stub.BatchSubmitEnvelopes(
                    pb.BatchSubmitEnvelopesRequest(requests=requests),
                    timeout=self._deadline(timeout),
                )
            results.extend(_results(response.results, requests))
        return results

    def send_stream(
        self,
        drafts: AsyncIterable[Draft] | Iterable[Draft],
        *,
        batch_size: int = DEFAULT_STREAM_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        linger_s: float = DEFAULT_STREAM_LINGER_S,
    ) -> AsyncGenerator[Receipt | ChaparError, None]:
        """Submits letters over one StreamSubmitEnvelopes stream; the high-throughput path.

        Drafts are grouped into frames of up to ``batch_size`` with up to ``max_in_flight``
        frames unanswered. A frame takes what is ready; if that is less than a full frame
        and the stream is busy (an earlier frame unanswered, or one sent within
        ``linger_s``), it waits ``linger_s`` once for more: a slow producer never waits for
        a full frame, a draft on a quiet stream goes at once, and one on a busy stream at
        most ``linger_s`` late, or as soon as ``drafts`` ends (or fails). Yields one receipt
        or error per draft, in order. A plain iterable is read on the event loop and must
        not block; everything it yields is ready, so it never lingers.

        The stream takes drafts ahead of the answers (up to ``batch_size * max_in_flight``
        in flight, and as many buffered before them). A ``ChaparError`` that ends it lists
        those it took and did not answer in ``error.unanswered``, in order, for the caller
        to send again (same request ids: safe) along with the drafts it has not given yet.
        """
        return self._send_stream(
            drafts, batch_size=batch_size, max_in_flight=max_in_flight, linger_s=linger_s
        )

    async def _send_stream(
        self,
        drafts: AsyncIterable[Draft] | Iterable[Draft],
        *,
        batch_size: int,
        max_in_flight: int,
        linger_s: float,
    ) -> AsyncGenerator[Receipt | ChaparError, None]:
        """``send_stream``: ``_submit_stream``, keeping the drafts taken and unanswered."""
        taken: collections.deque[Draft] = collections.deque()

        def take(draft: Draft) -> _Ready:
            taken.append(draft)
            return _Ready.of(draft)

        source: AsyncIterable[_Ready] | Iterable[_Ready] = (
            (take(d) async for d in drafts)
            if isinstance(drafts, AsyncIterable)
            else map(take, drafts)
        )
        stream = self._submit_stream(
            source, batch_size=batch_size, max_in_flight=max_in_flight, linger_s=linger_s
        )
        async with contextlib.aclosing(stream):
            try:
                async for result in stream:
                    taken.popleft()
                    yield result
            except ChaparError as error:  # the stream and its producer have stopped
                error.unanswered = tuple(taken)
                raise

    async def _submit_stream(
        self,
        drafts: AsyncIterable[_Submittable] | Iterable[_Submittable],
        *,
        batch_size: int,
        max_in_flight: int,
        linger_s: float,
    ) -> AsyncGenerator[Receipt | ChaparError, None]:
        """``send_stream``, for drafts or requests built already (``SharedStream``)."""
        _check_stream_options(batch_size, max_in_flight, linger_s)
        loop = asyncio.get_running_loop()
        unanswered = 0  # frames written and not yet answered
        last_sent = -math.inf

        def busy() -> bool:
            return unanswered > 0 or loop.time() - last_sent < linger_s

        # First: a call refused (a closed client) leaves no feed running.
        with _translated(self._certificate):
            call = self._stub.StreamSubmitEnvelopes()
        feed: _Feed = (
            _AsyncFeed(drafts, batch_size, max_in_flight, linger_s, busy=busy)
            if isinstance(drafts, AsyncIterable)
            else _SyncFeed(drafts, batch_size)
        )
        window = asyncio.Semaphore(max_in_flight)
        written: asyncio.Queue[list[pb.SubmitEnvelopeRequest] | asyncio.Task[Receipt] | None] = (
            asyncio.Queue()
        )

        async def write_all() -> None:
            nonlocal unanswered, last_sent
            try:
                while batch := await feed.next_batch():
                    if _alone(batch):
                        # Over a frame's bytes: by a call of its own, so that a node whose
                        # message limit it passes refuses it alone, not the stream and
                        # every draft in flight on it (answered in its place, in order).
                        # It takes a place in the window as a frame does (released when
                        # its answer is read): max_in_flight bounds these calls too.
                        await window.acquire()
                        written.put_nowait(
                            asyncio.create_task(self._submit_request(batch[0].to_request(), None))
                        )
                        continue
                    await window.acquire()
                    requests = [d.to_request() for d in batch]
                    async with _write_translated(call, self._certificate):
                        await call.write(pb.StreamSubmitEnvelopesRequest(requests=requests))
                    unanswered += 1
                    last_sent = loop.time()
                    written.put_nowait(requests)
                async with _write_translated(call, self._certificate):
                    await call.done_writing()
            finally:
                written.put_nowait(None)

        writer = asyncio.create_task(write_all())
        try:
            while (requests := await written.get()) is not None:
                if isinstance(requests, asyncio.Task):
                    try:
                        outcome: Receipt | ChaparError = await requests
                    except ChaparError as error:
                        outcome = error
                    window.release()
                    yield outcome
                    continue
                try:
                    with _translated(self._certificate):
                        response = await call.read()
                except ChaparError as error:
                    # A write that met the end of the stream marks the call INTERNAL; the
                    # writer then raises what it learnt, which says more.
                    if error.code == grpc.StatusCode.INTERNAL:
                        await asyncio.wait([writer], timeout=1.0)
                        cause = (
                            writer.exception() if writer.done() and not writer.cancelled() else None
                        )
                        if cause is not None:
                            raise cause from error
                    raise
                if response is grpc.aio.EOF:
                    raise _stream_ended()
                window.release()
                unanswered -= 1
                for result in _results(response.results, requests):
                    yield result
            await writer  # re-raises what stopped the writer: a bad draft, a broken stream
            with _translated(self._certificate):
                extra = await call.read()  # the final status; raises if it is an error
            if extra is not grpc.aio.EOF:
                raise InternalError("unexpected answer on the stream", reason="MALFORMED_RESPONSE")
        finally:
            writer.cancel()
            call.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            while not written.empty():  # calls of their own not answered: cancelled
                if isinstance(left := written.get_nowait(), asyncio.Task):
                    left.cancel()
                    await asyncio.gather(left, return_exceptions=True)
            await feed.aclose()

    def shared_stream(
        self,
        *,
        batch_size: int = DEFAULT_STREAM_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        linger_s: float = DEFAULT_STREAM_LINGER_S,
    ) -> SharedStream:
        """A ``SharedStream``: one submission stream for many concurrent callers,
        ``await shared.send(draft)`` each. Use it as ``async with``."""
        return SharedStream(
            self, batch_size=batch_size, max_in_flight=max_in_flight, linger_s=linger_s
        )

    async def inbox(
        self, mailbox: str | None = None, *, on_open: Callable[[], object] | None = None
    ) -> AsyncGenerator[Letter, None]:
        """Streams letters not yet acknowledged, then new ones as they arrive (endless).

        ``on_open``, if given, is called once the node has admitted the stream (its
        headers came), before the first letter and whether or not any letter waits: from
        then on a letter stored is streamed (a test or a script can wait for it before
        sending). A stream refused is not open: the error is raised, ``on_open`` not called.

        A letter comes again on a new stream until it is acknowledged with ``ack``. A node
        that stops ends the stream (as does one whose reloaded configuration changed this
        client's mailboxes): ``Unavailable`` (reason ``STREAM_ENDED``, retryable),
        as on the submission streams, so that a back-end reading in a loop learns it and
        reads again, rather than finding its loop ended as if the inbox had no end. A stream
        that breaks after the client's certificate expired ends with ``FailedPrecondition``
        (``CLIENT_CERTIFICATE_NOT_VALID``) instead: reading again could not succeed.
        """
        with _translated(self._certificate):
            call = self._stub.StreamInbox(pb.StreamInboxRequest(mailbox=mailbox or ""))
        try:
            with _translated(self._certificate):
                if on_open is not None:
                    await call.initial_metadata()
                    if not call.done():  # headers, not a refusal's trailers alone
                        on_open()
                async for response in call:
                    for item in response.letters:
                        yield Letter(**Letter._parse(item), _client=self)
            raise _stream_ended()
        finally:
            call.cancel()

    async def ack(self, shams: ShamsLike, *, timeout: float | None = None) -> pb.Evidence:
        """Acknowledges a received letter; returns the HANDOVER evidence (idempotent)."""
        request = pb.AckEnvelopeRequest(shams=_shams_pb(shams))
        with _translated(self._certificate):
            response: pb.AckEnvelopeResponse = await self._stub.AckEnvelope(
                request, timeout=self._deadline(timeout)
            )
        return response.evidence

    async def ack_many(
        self, numbers: Sequence[ShamsLike], *, timeout: float | None = None
    ) -> list[pb.Evidence | ChaparError]:
        """Acknowledges several letters in one call: per letter, HANDOVER evidence or error."""
        request = pb.BatchAckEnvelopesRequest(shams=[_shams_pb(n) for n in numbers])
        with _translated(self._certificate):
            response: pb.BatchAckEnvelopesResponse = await self._stub.BatchAckEnvelopes(
                request, timeout=self._deadline(timeout)
            )
        return _ack_outcomes(response.results, numbers)

    async def track(self, shams: ShamsLike, *, timeout: float | None = None) -> Tracking:
        """Fetches a letter this agency sent or received, with its evidence and states.

        An answer about another letter than the one asked for (its header's number), which
        would verify as that letter's, raises ``InternalError`` (``LETTER_MISMATCH``)."""
        request = pb.GetEnvelopeRequest(shams=_shams_pb(shams))
        with _translated(self._certificate):
            response: pb.GetEnvelopeResponse = await self._stub.GetEnvelope(
                request, timeout=self._deadline(timeout)
            )
        try:
            tracking = Tracking.from_response(response, request.shams)
        except (DecodeError, ValueError) as exc:  # ValueError: a header's SHAMS number
            raise InternalError(
                "letter or status update with a malformed header", reason="MALFORMED_RESPONSE"
            ) from exc
        _require_about(request.shams, _number_of(tracking.header), "track")
        return tracking

    async def track_correspondence(
        self, shams: ShamsLike, *, timeout: float | None = None
    ) -> Correspondence:
        """The correspondence tree around a letter this agency sent or received, as the
        hub recorded it: the letters it answers, those answering it, at any depth, with
        their evidence; letters this agency (or this client's mailboxes) is no party of
        come redacted. ``Correspondence.verify`` checks it offline. A tree whose first
        letter, the one it tracks, is not the letter asked for raises ``InternalError``
        (``LETTER_MISMATCH``) here already, as ``verify`` would (``TRACK_MISMATCH``)."""
        request = pb.TrackCorrespondenceRequest(shams=_shams_pb(shams))
        with _translated(self._certificate):
            response: pb.TrackCorrespondenceResponse = await self._stub.TrackCorrespondence(
                request, timeout=self._deadline(timeout)
            )
        try:
            tree = Correspondence.from_response(response, request.shams)
        except ValueError as exc:
            raise InternalError(
                "a correspondence tree that does not parse", reason="MALFORMED_RESPONSE"
            ) from exc
        _require_about(request.shams, tree.letters[0].shams, "track_correspondence")
        return tree

    async def evidence_bundle(
        self, shams: ShamsLike, *, timeout: float | None = None
    ) -> pb.EvidenceBundle:
        """A letter with all its evidence and the exchange's revocations, to be saved for
        an auditor or a court (``bundle.SerializeToString()``): ``Tracking.from_bundle``
        (or ``chapar verify``) verifies it later offline with the root CA alone.

        A letter whose header is not the letter asked for (its number), which would verify
        as that letter's, raises ``InternalError`` (``LETTER_MISMATCH``; a header that does
        not parse, ``MALFORMED_RESPONSE``): no bundle."""
        request = pb.GetEnvelopeRequest(shams=_shams_pb(shams))
        with _translated(self._certificate):
            letter: pb.GetEnvelopeResponse = await self._stub.GetEnvelope(
                request, timeout=self._deadline(timeout)
            )
        try:
            header = pb.EnvelopeHeader.FromString(letter.envelope.header)
            number = _number_of(header)
        except (DecodeError, ValueError) as exc:  # ValueError: the header's SHAMS number
            raise InternalError(
                "letter with a malformed header", reason="MALFORMED_RESPONSE"
            ) from exc
        _require_about(request.shams, number, "evidence_bundle")
        with _translated(self._certificate):
            directory: pb.ListAgenciesResponse = await self._stub.ListAgencies(
                pb.ListAgenciesRequest(), timeout=self._deadline(timeout)
            )
        bundle = pb.EvidenceBundle(
            letter=letter,
            revoked_serials=directory.revoked_serials,
            revocations=directory.revocations,
            directory_version=directory.directory_version,
        )
        bundle.saved_time.GetCurrentTime()
        return bundle

    # -- documents ----------------------------------------------------------------------

    async def upload(
        self,
        path: Path | str,
        *,
        media_type: str | None = None,
        file_name: str | None = None,
        timeout: float | None = None,
    ) -> pb.AttachmentRef:
        """Uploads a file to the node's document store, in chunks; returns its reference.

        The media type is guessed from the file name unless given. The node's digest is
        checked against the one computed while reading (DataLoss if they differ). No
        deadline unless ``timeout`` is given: a large file takes as long as it takes.
        """
        path = Path(path)
        media = media_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        size = (await asyncio.to_thread(path.stat)).st_size
        hasher = hashlib.sha256()

        header = pb.UploadDocumentRequest(header=pb.UploadHeader(media_type=media, size=size))
        with _translated(self._certificate):
            call = self._documents.UploadDocument(timeout=timeout)
            try:
                await call.write(header)
                # The node accepts or refuses the header before any content is sent.
                accepted = await call.read()
                if accepted is grpc.aio.EOF:
                    raise InternalError("the node ended the upload", reason="MALFORMED_RESPONSE")
                # A node that refuses mid-way ends the call: the next write learns its
                # status (not a bare InvalidStateError "RPC already finished").
                async with (
                    _write_translated(call, self._certificate),
                    contextlib.aclosing(read_chunks(path)) as chunks,
                ):
                    async for chunk in chunks:
                        hasher.update(chunk)
                        await call.write(pb.UploadDocumentRequest(chunk=chunk))
                    await call.done_writing()
                response = await call.read()
            finally:
                call.cancel()
        if response is grpc.aio.EOF or not response.HasField("document"):
            raise InternalError("the node did not say where it stored the file",
                                reason="MALFORMED_RESPONSE")  # fmt: skip
        document = response.document
        if document.sha256 != hasher.digest() or document.size != size:
            raise DataLoss(
                f"the node stored {document.size} bytes with another digest than {path}",
                reason="DIGEST_MISMATCH",
            )
        return pb.AttachmentRef(
            uri=document.uri,
            sha256=document.sha256,
            size=document.size,
            media_type=media,
            file_name=file_name if file_name is not None else path.name,
        )

    async def stat(self, uri: str, *, timeout: float | None = None) -> pb.StatDocumentResponse:
        """Whether the node holds a document, with its digest and size."""
        with _translated(self._certificate):
            response: pb.StatDocumentResponse = await self._documents.StatDocument(
                pb.StatDocumentRequest(uri=uri), timeout=self._deadline(timeout)
            )
        return response

    async def download(
        self, uri: str, *, offset: int = 0, timeout: float | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Streams a document's bytes from ``offset``, through the agency's own node.

        The bytes are not checked here; ``fetch`` checks them against the digest.
        """
        async for response in self._download(uri, offset, timeout):
            if response.chunk:
                yield response.chunk

    async def _download(
        self, uri: str, offset: int, timeout: float | None
    ) -> AsyncGenerator[pb.DownloadDocumentResponse, None]:
        with _translated(self._certificate):
            call = self._documents.DownloadDocument(
                pb.DownloadDocumentRequest(uri=uri, offset=offset), timeout=timeout
            )
        try:
            with _translated(self._certificate):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def fetch(
        self,
        document: pb.AttachmentRef | str,
        path: Path | str,
        *,
        timeout: float | None = None,
        keep_others: bool = False,
    ) -> Path:
        """Downloads a document to ``path``, resuming its partial file when it exists.

        The partial file is ``.<name>.<16 hex digits of the digest>.part`` beside ``path``:
        hidden, and of this document only, so that no file saved under a name of its own
        (``safe_file_name`` has no leading dot) is taken for it. With ``keep_others`` a
        file at ``path`` holding another document is left alone (another letter's
        attachment of the same name, saved before or at the same time): the document is
        saved beside it as ``<stem>-<16 hex digits of the digest><suffix>``, and the path
        returned says where. The file appears at
        ``path`` only when its size and SHA-256 are those of the
        reference (or of the address, for a bare URI); otherwise the partial file is
        deleted and DataLoss is raised. Both files are created mode 0600 (letter content;
        a partial file readable by others is made owner-only before it is resumed). One
        download at a time writes that partial file (an exclusive ``flock`` on it): another
        into the same path, from this process or another, waits for it (within its
        ``timeout``, if given: DeadlineExceeded ``DOWNLOAD_IN_PROGRESS``), then keeps the
        file it left at ``path`` if that is the document (after checking its digest), or
        else resumes from what it left.
        """
        uri = document if isinstance(document, str) else document.uri
        try:
            expected = digest_of_uri(uri)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_DOCUMENT_URI") from exc
        expected_size = document.size if isinstance(document, pb.AttachmentRef) else None
        if isinstance(document, pb.AttachmentRef) and document.sha256 != expected:
            raise InvalidArgument(
                "the reference's digest is not the one in its address",
                reason="DOCUMENT_DIGEST_MISMATCH",
            )
        path = Path(path)
        part = partial_path(path, expected)
        try:
            async with asyncio.timeout(timeout):  # the wait for another download counts
                out, waited = await _lock_part(part)
        except TimeoutError:
            raise DeadlineExceeded(
                f"another download into {path} held it for the whole timeout",
                reason="DOWNLOAD_IN_PROGRESS",
            ) from None
        try:
            if waited and await _holds(path, expected, expected_size):
                # The download this one waited for finished it: the .part (ours now) is of no use.
                await asyncio.to_thread(part.unlink, missing_ok=True)
                return path
            await self._fetch_locked(uri, expected, expected_size, path, part, out, timeout)
            if not keep_others:
                await asyncio.to_thread(part.replace, path)
                return path
            try:
                return await asyncio.to_thread(_place, part, path, expected)
            except FileExistsError as exc:
                raise FailedPrecondition(str(exc), reason="SAVE_NAMES_TAKEN") from exc
        finally:
            out.close()  # and so unlocked: a download waiting on the .part goes on

    async def _fetch_locked(
        self,
        uri: str,
        expected: bytes,
        expected_size: int | None,
        path: Path,
        part: Path,
        out: BinaryIO,
        timeout: float | None,
    ) -> None:
        """``fetch`` once it holds ``part`` (``out``, opened to append and locked): the
        document, verified, in ``part``."""
        hasher = hashlib.sha256()
        offset = 0
        async with contextlib.aclosing(read_chunks(part)) as chunks:
            async for chunk in chunks:
                hasher.update(chunk)
                offset += len(chunk)
        if expected_size is not None and offset > expected_size:
            await asyncio.to_thread(out.truncate, 0)
            hasher, offset = hashlib.sha256(), 0
        resumed_from = offset
        while True:
            try:
                # Closed on the way out, so that a stop here cancels the call at once.
                async with contextlib.aclosing(self._download(uri, offset, timeout)) as got:
                    async for response in got:
                        if response.HasField("document") and expected_size is None:
                            expected_size = response.document.size
                        if not response.chunk:
                            continue
                        if (
                            expected_size is not None
                            and offset + len(response.chunk) > expected_size
                        ):
                            # Past the size signed (or announced): not the document, whatever
                            # follows. Stop reading, rather than write up to the node's own
                            # limit (gigabytes) before the check at the end says so.
                            raise DataLoss(
                                f"the node sent more of {uri} than its {expected_size} bytes; nothing kept",
                                reason="DIGEST_MISMATCH",
                                metadata={"uri": uri},
                            )
                        hasher.update(response.chunk)
                        await asyncio.to_thread(out.write, response.chunk)
                        offset += len(response.chunk)
                await asyncio.to_thread(out.flush)
            except BaseException as exc:
                if isinstance(exc, OutOfRange) and resumed_from:
                    # The partial file is longer than the document (left by an earlier
                    # download to this path of another document): no piece of it. Start
                    # again rather than fail so at every retry.
                    await asyncio.to_thread(out.truncate, 0)
                    hasher, offset, resumed_from = hashlib.sha256(), 0, 0
                    continue
                # Nothing to resume from, or what came is known bad: leave no file behind.
                if offset == 0 or isinstance(exc, DataLoss):
                    await asyncio.to_thread(part.unlink, missing_ok=True)
                raise
            break
        # The bytes hashed are the ones this call wrote; the file must hold only those (a
        # writer that does not take the lock may have appended to it, or taken it away).
        try:
            on_disk = (await asyncio.to_thread(part.stat)).st_size
        except FileNotFoundError:
            on_disk = -1
        if offset != expected_size or hasher.digest() != expected or on_disk != offset:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            shared = "" if on_disk == offset else " (another writer wrote into its file)"
            raise DataLoss(
                f"downloaded {offset} bytes that are not the document {uri}{shared}; nothing kept",
                reason="DIGEST_MISMATCH",
                metadata={"uri": uri},
            )

    async def wait_connected(self) -> None:
        """Waits until the channel to the node is connected (its TLS handshake done), for
        a caller that bounds it itself (``asyncio.timeout``): a node that accepts
        connections and never answers otherwise looks like an empty inbox. A connection
        that fails (the node down, the handshake refused) raises ``Unavailable`` at once."""
        channel = self._channel
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                raise Unavailable(
                    "the node cannot be reached (down, or refusing the connection)",
                    reason="NODE_UNREACHABLE",
                )
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                raise FailedPrecondition("the client is closed", reason="CLIENT_CLOSED")
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    async def agencies(self, *, timeout: float | None = None) -> list[pb.Agency]:
        """The agencies of the exchange, as the node last fetched them from the hub."""
        with _translated(self._certificate):
            response: pb.ListAgenciesResponse = await self._stub.ListAgencies(
                pb.ListAgenciesRequest(), timeout=self._deadline(timeout)
            )
        return list(response.agencies)

    async def trust_from_directory(
        self, trust: TrustStore, *, timeout: float | None = None
    ) -> TrustStore:
        """Adds to ``trust`` (which holds the root CA: ``credentials.trust_store()``) what
        the node's directory holds: the intermediate CAs, every agency's and hub's signing
        certificates, and the revoked serials (with the times of those revoked from a time
        on: what their keys signed before verifies). Returns it, ready to verify inbox letters,
        receipts and evidence from any agency, whichever intermediate CA issued its key."""
        with _translated(self._certificate):
            response: pb.ListAgenciesResponse = await self._stub.ListAgencies(
                pb.ListAgenciesRequest(), timeout=self._deadline(timeout)
            )
        try:
            revoked, since = revocations_of(response.revoked_serials, response.revocations)
            trust.add_certificates(response.intermediate_certificates)
            trust.add_certificates(response.hub_signing_certificates)
            for agency in response.agencies:
                trust.add_certificates(agency.signing_certificates)
        # a serial that is not hex, a revocation's time that is none, DER that is no certificate
        except ValueError as exc:
            raise InternalError(
                f"a directory that does not parse: {exc}", reason="MALFORMED_RESPONSE"
            ) from exc
        trust.add_revoked(revoked, since)
        return trust

    async def revocations(self, *, timeout: float | None = None) -> list[int]:
        """Serials of the certificates the exchange has revoked, as the node last fetched
        the directory, every one: those revoked from a time on (a key retired) too, without
        their times, so that applied alone (``trust.set_revoked(await client.revocations())``)
        they count for all time and what such a key signed before its time fails.
        ``trust_from_directory`` applies them with their times: use it to verify offline."""
        with _translated(self._certificate):
            response: pb.ListAgenciesResponse = await self._stub.ListAgencies(
                pb.ListAgenciesRequest(), timeout=self._deadline(timeout)
            )
        try:
            return [int(serial, 16) for serial in response.revoked_serials]
        except ValueError as exc:
            raise InternalError(
                "a revoked serial that is not hexadecimal", reason="MALFORMED_RESPONSE"
            ) from exc


def _own_certificate(credentials: Credentials) -> CertificateValidity:
    """The validity of the client's certificate (the first of its chain), which must
    include now: its ``FailedPrecondition`` (``CLIENT_CERTIFICATE_NOT_VALID``) otherwise."""
    leaf = x509.load_pem_x509_certificates(credentials.certificate_chain)[0]
    validity = CertificateValidity(leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    if (refusal := validity.refusal()) is not None:
        raise refusal
    return validity


@contextlib.contextmanager
def _translated(certificate: CertificateValidity | None) -> Iterator[None]:
    """The one boundary where gRPC failures become ChaparError subclasses; ``certificate``
    is the client's own (see ``from_rpc_error``), None when the client did not make its
    channel."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, certificate=certificate) from exc
    except grpc.aio.UsageError as exc:
        # grpc.aio's answer to a call on a closed channel: the call never went out. A letter
        # read from a closed client's inbox is acknowledged through a new client (the node
        # streams it again there, since it was not acknowledged).
        if "closed" not in str(exc):
            raise
        raise _client_closed() from exc
    except asyncio.CancelledError:
        # grpc.aio raises CancelledError from a call cancelled under it: the channel closed
        # (``close()`` from another task) while a stream was being read or written. That is
        # no cancellation of our caller's task (which would be marked as cancelling): a
        # ChaparError, so that the caller learns its stream ended, and why.
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise _closed_under_call() from None


def _client_closed() -> FailedPrecondition:
    """A call on a closed client (async or blocking): it was not made."""
    return FailedPrecondition("the client is closed: the call was not made", reason="CLIENT_CLOSED")


def _closed_under_call() -> Cancelled:
    """A call or stream under way when its client was closed (async or blocking)."""
    return Cancelled("the call was cancelled: its client was closed", reason="CLIENT_CLOSED")


def _check_stream_options(batch_size: int, max_in_flight: int, linger_s: float) -> None:
    if batch_size < 1 or batch_size > MAX_BATCH_SIZE or max_in_flight < 1:
        raise ValueError("need 1 <= batch_size <= 256 and max_in_flight >= 1")
    if not 0 <= linger_s <= 1:
        raise ValueError("need 0 <= linger_s <= 1")


_PART_LOCK_POLL_S: Final = 0.05
"""How often a download waiting for another into the same path tries its lock again."""
_SAVED_MODE: Final = 0o600
"""Of a downloaded document and its partial file: owner only, from creation."""


def save_bundle(path: Path | str, bundle: pb.EvidenceBundle | bytes) -> Path:
    """Saves an evidence bundle (``ExchangeClient.evidence_bundle``) as ``chapar track
    --save`` does, for ``chapar verify`` or ``Tracking.from_bundle``: whole or not at all
    (a new temporary file beside ``path``, never one another user placed there nor through
    a link, synced, then renamed over it), mode 0600 from creation (a bundle holds the
    letter's body, no other local user's to read; a file it replaces keeps none of its
    mode). Blocking: in a busy event loop, ``await asyncio.to_thread(save_bundle, ...)``.
    Returns the path; an ``OSError`` leaves nothing behind."""
    path = Path(path)
    data = bundle if isinstance(bundle, bytes) else bundle.SerializeToString()
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(part, flags, _SAVED_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return path


async def _lock_part(part: Path) -> tuple[BinaryIO, bool]:
    """``part`` opened to append (created if missing) under an exclusive ``flock``, and
    whether another download held it first. The lock is the open file's: closing it
    unlocks, and two opens in one process exclude each other as two processes do. The
    wait polls (a cancelled caller stops waiting, and the event loop never blocks)."""
    waited = False
    while True:
        out = await asyncio.to_thread(_open_part, part)
        try:
            while not _try_lock(out):
                waited = True
                await asyncio.sleep(_PART_LOCK_POLL_S)
            # The download that held it may have renamed it into place or deleted it: the
            # lock must be on the file at ``part`` now, or another would write there too.
            if await asyncio.to_thread(_is_at, out, part):
                return out, waited
        except BaseException:
            out.close()
            raise
        out.close()
        waited = True


def _open_part(part: Path) -> BinaryIO:
    """``part`` opened to append, created mode 0600 if it is not there: a document is letter
    content, no other local user's to read (as ``chapar track --save`` writes an evidence
    bundle). One left readable by others (by an earlier version, which took the umask's
    mode) is made owner-only before a byte more goes into it, where the file system keeps
    modes (on FAT, say, the mount's options decide them, and chmod fails). A link under
    that name is not followed (OSError, ELOOP), and a file of another user there is not
    used (PermissionError): the name is fixed, so another local user who can write in the
    directory could point it at a file of the saving user's, or leave one of their own."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(part, flags, _SAVED_MODE)
    try:
        st = os.fstat(fd)
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            # Another local user's file under the fixed name (a shared directory): what
            # went into it, and the attachment linked from it, would be theirs to read and
            # change whatever its mode.
            raise PermissionError(
                errno.EPERM, "a partial file of another user is in the way", str(part)
            )
        if st.st_mode & 0o077 and hasattr(os, "fchmod"):  # not on Windows
            with contextlib.suppress(OSError):
                os.fchmod(fd, _SAVED_MODE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def _try_lock(out: BinaryIO) -> bool:
    try:
        import fcntl  # POSIX: elsewhere the size check after is all there is
    except ImportError:
        return True
    try:
        fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: the size check after is all there is
        pass
    return True


def _is_at(out: BinaryIO, path: Path) -> bool:
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(out.fileno())
    return (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino)


_NAME_BYTES = 255  # the longest file name most file systems take, in bytes
_SUFFIX_BYTES = 16  # a longer "suffix" (text after a dot in a long name) is no extension


def _fit_name(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` bytes as the file system takes it (``os.fsencode``, so a
    name read from a directory with undecodable bytes works too), never inside a
    character, keeping a short suffix (``.pdf``)."""
    if len(os.fsencode(name)) <= limit:
        return name
    stem, suffix = _split_suffix(name)
    room = max(0, limit - len(os.fsencode(suffix)))
    head = os.fsencode(stem)[:room]
    # A UTF-8 character cut in two goes whole: its lead byte (11xxxxxx) and what came of
    # its continuation bytes (10xxxxxx).
    lead = len(head)
    while lead and head[lead - 1] & 0xC0 == 0x80:
        lead -= 1
    if lead and head[lead - 1] >= 0xC0:
        first = head[lead - 1]
        length = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
        if len(head) - (lead - 1) < length:
            head = head[: lead - 1]
    return os.fsdecode(head) + suffix


def _split_suffix(name: str) -> tuple[str, str]:
    """(stem, ".ext") when the name ends in a short extension, else (name, "")."""
    stem, dot, ext = name.rpartition(".")
    if dot and stem and len(os.fsencode(ext)) <= _SUFFIX_BYTES:
        return stem, f".{ext}"
    return name, ""


def partial_path(path: Path, digest: bytes) -> Path:
    """Where ``fetch`` keeps the partial download of the document ``digest`` into
    ``path``: ``.<name>.<16 hex digits of the digest>.part`` beside it (the name cut so
    that the whole stays within 255 bytes)."""
    name = _fit_name(path.name, _NAME_BYTES - 23)
    return path.with_name(f".{name}.{digest.hex()[:16]}.part")


def _beside(path: Path, digest: bytes) -> Path:
    """``<stem>-<16 hex digits of the digest><suffix>``, within 255 bytes."""
    stem, suffix = _split_suffix(path.name)
    stem = _fit_name(stem, max(0, _NAME_BYTES - 17 - len(os.fsencode(suffix))))
    return path.with_name(f"{stem}-{digest.hex()[:16]}{suffix}")


def _place(part: Path, path: Path, digest: bytes) -> Path:
    """Puts the verified ``part`` at ``path`` unless something there is not this document
    (another document, a directory, a pipe ...), then beside it (``_beside``). Each name is
    claimed atomically (a hard link, or an exclusively created file where the file system
    has no hard links), so two saves of different documents of one name at once both keep
    theirs. Returns where it is. If it cannot be placed, ``part`` stays: complete and
    verified, a later save into a free name places it without downloading it again."""
    size = part.stat().st_size
    for target in (path, _beside(path, digest)):
        if _claim(part, target):
            return target
        if _holds_now(target, digest, size):
            part.unlink()
            return target
    raise FileExistsError(
        f"{path} and {_beside(path, digest)} both hold something else; the verified download"
        f" waits in {part.name} (free either name and save again)"
    )


def _claim(part: Path, target: Path) -> bool:
    """Moves ``part`` to ``target`` if that name is free; False if it is taken."""
    try:
        os.link(part, target)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (FAT, many SMB and FUSE mounts): claim the name
        try:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0)
            fd = os.open(target, flags, _SAVED_MODE)
        except FileExistsError:
            return False
        # The content is copied into the claimed file (not renamed over it), so the name
        # never holds an empty placeholder for longer than the first write, and a failure
        # leaves no file there that is not the document.
        try:
            with os.fdopen(fd, "wb") as out, part.open("rb") as source:
                shutil.copyfileobj(source, out, CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()
            raise
    part.unlink()
    return True


def _holds_now(path: Path, digest: bytes, size: int | None) -> bool:
    """Whether ``path`` is a regular file of this digest (and size, if given), in the
    calling thread; never opens a directory or a pipe."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
        return False
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                hasher.update(chunk)
    except OSError:  # unreadable to us: not known to be the document
        return False
    return hasher.digest() == digest


async def _holds(path: Path, digest: bytes, size: int | None) -> bool:
    """Whether the file at ``path`` is the document of this digest (and size)."""
    return await asyncio.to_thread(_holds_now, path, digest, size)


@contextlib.asynccontextmanager
async def _write_translated(
    call: Any, certificate: CertificateValidity | None
) -> AsyncIterator[None]:
    """A stream write's failures as ChaparError: the call's own status when it had ended
    (grpc.aio says only "RPC already finished"; an OK end is a stopping node's, see
    ``_stream_ended``), and Unavailable when the stream ended under the write, which grpc
    reports as INTERNAL with the node's status lost. Either way the frames unanswered may
    or may not have been taken: resubmitting their drafts (same request ids) is safe.
    Unavailable becomes ``certificate``'s refusal once it expired, as in ``_translated``."""
    try:
        yield
    except asyncio.InvalidStateError:
        code = await call.code()
        if code == grpc.StatusCode.OK:
            raise _stream_ended() from None
        status = grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )
        raise from_rpc_error(status, certificate=certificate) from None
    except grpc.RpcError as exc:
        error = from_rpc_error(exc, certificate=certificate)
        if error.code == grpc.StatusCode.INTERNAL:
            refusal = certificate.refusal() if certificate is not None else None
            raise refusal or Unavailable(
                "the stream ended while a frame was being written", reason="STREAM_ENDED"
            ) from exc
        raise error from exc


def _stream_ended() -> Unavailable:
    """A stream the node ended (OK) with frames unanswered: a stopping node answers what it
    has read and ends its streams, and so does a node whose configuration, reloaded,
    changed this client's mailboxes; the rest may be sent again (same request ids)."""
    return Unavailable(
        "the node ended the stream (it is stopping, or a reload of its configuration"
        " changed this client's mailboxes): open it again",
        reason="STREAM_ENDED",
    )


def _results(
    results: Sequence[pb.SubmitResult], requests: Sequence[pb.SubmitEnvelopeRequest]
) -> list[Receipt | ChaparError]:
    if len(results) != len(requests):
        raise InternalError(
            f"{len(results)} results for {len(requests)} letters", reason="MALFORMED_RESPONSE"
        )
    out: list[Receipt | ChaparError] = []
    for result, request in zip(results, requests, strict=True):
        if result.request_id and result.request_id != request.request_id:
            raise InternalError("results out of order", reason="MALFORMED_RESPONSE")
        outcome = result.WhichOneof("outcome")
        if outcome == "receipt":
            out.append(Receipt.from_pb(result.receipt, request.request_id))
        elif outcome == "error":
            out.append(from_submit_error(result.error))
        else:
            out.append(InternalError("result without an outcome", reason="MALFORMED_RESPONSE"))
    return out


# A stream frame of drafts stops at this many bytes of bodies (one draft always goes):
# under the 16 MiB a node accepts in one message, whatever the batch size.
STREAM_FRAME_BYTES: Final = 8 * 1024 * 1024


def _alone(batch: Sequence[_Submittable]) -> bool:
    """A frame of one letter over STREAM_FRAME_BYTES: it goes by a call of its own."""
    return len(batch) == 1 and batch[0].size > STREAM_FRAME_BYTES


class _Frame:
    """The drafts of one stream frame: at most ``size`` of them and STREAM_FRAME_BYTES of
    requests, and always at least one (a single letter at the limit still goes)."""

    def __init__(self, size: int) -> None:
        self.drafts: list[_Submittable] = []
        self._size = size
        self.bytes = 0  # of the drafts taken

    def take(self, draft: _Submittable) -> bool:
        """Adds ``draft``; False (and not added) when it must start the next frame."""
        if self.drafts and self.bytes + draft.size > STREAM_FRAME_BYTES:
            return False
        self.bytes += draft.size
        self.drafts.append(draft)
        return True

    @property
    def full(self) -> bool:
        return len(self.drafts) >= self._size


class _SyncFeed:
    """Batches from a plain iterable, read on the event loop. An iterable that raises ends
    the feed as ``_AsyncFeed``'s does: the frame filled before the failure goes first, and
    the failure is raised by the next call (and every one after)."""

    def __init__(self, drafts: Iterable[_Submittable], size: int) -> None:
        self._drafts = iter(drafts)
        self._size = size
        self._held: _Submittable | None = None  # read, but did not fit in the last frame
        self._failed: Exception | None = None  # what the iterable raised

    async def next_batch(self) -> list[_Submittable]:
        if self._failed is not None:
            raise self._failed
        frame = _Frame(self._size)
        pending = [self._held] if self._held is not None else []
        self._held = None
        try:
            for draft in chain(pending, self._drafts):
                if not frame.take(draft):
                    self._held = draft
                    break
                if frame.full:
                    break
        except Exception as exc:  # the producer failed: send what came before it first
            self._failed = exc
            if not frame.drafts:
                raise
        return frame.drafts

    async def aclose(self) -> None:
        pass


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


class SharedStream:
    """One ``send_stream`` that any number of tasks submit over, one draft each call.

    ``await shared.send(draft)`` returns that draft's receipt or raises its refusal, and
    drafts of concurrent callers travel together, in the frames ``send_stream`` makes (its
    linger rule applies). Back-ends with many producers (request handlers, workers) get the
    fuller frames of one stream instead of the small frames of one stream each. Measured at
    an offered 1,000 letters/s (docs/BENCHMARKS.md, tenth round): one stream instead of four
    cost the whole exchange about a fifth less CPU a letter and cut the median from
    submission to delivery by about a third.

    The stream opens with the first ``send`` and stays open until ``aclose`` (or the end
    of ``async with``), which waits for the drafts already given. If the stream breaks,
    every draft sent on it and not yet answered raises the error; a ``Draft`` keeps its
    ``request_id``, so sending it again is safe (the node returns the original receipt).
    Drafts given meanwhile go on a new stream, unless ``aclose`` has begun: then the drafts
    not yet taken raise ``Unavailable`` (reason ``STREAM_ENDED``; they were not sent, and
    sending them again is safe). A draft whose caller was cancelled before the stream
    took it is not sent; the stream takes drafts up to a few frames
    (``batch_size * max_in_flight``) ahead of the wire, so one taken already may still be
    sent, and accepted, under its ``request_id`` (sending it again returns that receipt).
    A draft is checked when it is made (``Draft`` raises ValueError on a bad value), and
    one over ``STREAM_FRAME_BYTES`` (its whole request) goes by a call of its own, so that
    one draft never breaks the stream for the others (unless the node's message limit is
    set below ``STREAM_FRAME_BYTES``: then a frame of small drafts may pass it).
    """

    def __init__(
        self,
        client: ExchangeClient,
        *,
        batch_size: int = DEFAULT_STREAM_BATCH_SIZE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        linger_s: float = DEFAULT_STREAM_LINGER_S,
    ) -> None:
        _check_stream_options(batch_size, max_in_flight, linger_s)
        self._client = client
        self._batch_size = batch_size
        self._max_in_flight = max_in_flight
        self._linger_s = linger_s
        self._queue: asyncio.Queue[tuple[_Ready, asyncio.Future[Receipt]] | None] = asyncio.Queue()
        self._sent: collections.deque[asyncio.Future[Receipt]] = collections.deque()
        self._taken = 0  # drafts taken from the queue onto a stream, ever
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._broken: BaseException | None = None  # what ended the last stream, if any

    async def __aenter__(self) -> SharedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def send(self, draft: Draft) -> Receipt:
        """Submits ``draft`` on the shared stream; its receipt, or its refusal raised."""
        if self._closed:
            raise RuntimeError("the shared stream is closed")
        ready = _Ready.of(draft)
        done: asyncio.Future[Receipt] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((ready, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await done

    async def aclose(self) -> None:
        """Ends the stream once every draft given so far is answered."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        # Given before the stream broke under it, and not taken: no new stream opens once
        # closing, so they were not sent (sending them again is safe).
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                error = Unavailable(
                    "the stream broke while the shared stream was closing: the draft was not sent",
                    reason="STREAM_ENDED",
                )
                error.__cause__ = self._broken
                _settle(item[1], error)

    async def _drafts(self) -> AsyncIterator[_Ready]:
        while (item := await self._queue.get()) is not None:
            ready, done = item
            if done.done():  # its caller was cancelled: not sent
                continue
            self._sent.append(done)
            self._taken += 1
            yield ready

    async def _run(self) -> None:
        taken = self._taken
        try:
            stream = self._client._submit_stream(
                self._drafts(),
                batch_size=self._batch_size,
                max_in_flight=self._max_in_flight,
                linger_s=self._linger_s,
            )
            async with contextlib.aclosing(stream):
                async for result in stream:
                    _settle(self._sent.popleft(), result)
        except BaseException as exc:
            self._broken = exc
            while self._sent:
                _settle(self._sent.popleft(), exc)
            if not isinstance(exc, Exception):
                raise
            if self._taken == taken:
                # No stream could take a draft (a closed client): the waiting ones learn
                # why, instead of a new stream after another failing the same way.
                self._fail_waiting(exc)
            elif not self._closed and not self._queue.empty():
                self._runner = asyncio.create_task(self._run())

    def _fail_waiting(self, error: Exception) -> None:
        ends = 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                ends += 1
            else:
                _settle(item[1], error)
        for _ in range(ends):  # aclose's mark stays
            self._queue.put_nowait(None)


class _AckGatherer:
    """Gathers concurrent ``Letter.ack()`` calls into batches on one acknowledgement
    stream (``StreamAckEnvelopes``; ``BatchAckEnvelopes`` calls with a node without it).

    Acknowledgements go at the end of the event-loop turn they were made in, in one batch,
    unless a batch is already unanswered: then they gather until it is answered and go
    together in the next (group commit, as the node stores submissions). A back-end
    acknowledging one letter at a time never waits for company; one acknowledging hundreds a
    second sends them a few a batch, as many as arrive during a round trip. A full batch
    goes at once.
    """

    def __init__(self, client: ExchangeClient, max_batch: int = 256):
        self._client = client
        self._max_batch = max_batch
        self._pending: list[tuple[pb.Shams, asyncio.Future[pb.Evidence]]] = []
        self._scheduled = False  # a send is due at the end of this turn
        self._calls: set[asyncio.Task[None]] = set()  # calls in flight
        self._stream: _AckStream | None = _AckStream(client)  # None: the node has none

    async def ack(self, shams: pb.Shams) -> pb.Evidence:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[pb.Evidence] = loop.create_future()
        self._pending.append((shams, done))
        if len(self._pending) >= self._max_batch:
            self._send_pending()
        elif not self._calls and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send_pending)
        return await done

    async def flush(self) -> None:
        """Sends what is waiting and waits for every call in flight."""
        self._send_pending()
        while self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)

    async def close(self) -> None:
        """``flush``, then ends the acknowledgement stream. A letter acknowledged after
        this (a client on a channel its caller keeps open) goes by a ``BatchAckEnvelopes``
        call: no stream outlives ``close``."""
        await self.flush()
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    async def _send(self, numbers: list[pb.Shams]) -> list[pb.Evidence | ChaparError]:
        """One batch over the acknowledgement stream; by ``BatchAckEnvelopes`` calls from
        the first time a node says it has no such stream (an older node)."""
        if self._stream is not None:
            stream = self._stream
            try:
                return await stream.ack_many(numbers)
            except ChaparError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    self._stream = None
                elif not (
                    stream.unanswered
                    and (exc.reason == "STREAM_ENDED" or exc.code == grpc.StatusCode.INTERNAL)
                ):
                    raise
                # A stream that ended before its first answer: an older node refusing it
                # can race the first write, and grpc then reports the write's failure with
                # the node's status lost (grpc/grpc#36066). The batch goes by a call, which
                # is safe (acknowledging again returns the same evidence) and says which.
        return await self._client.ack_many(numbers)

    def _send_pending(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._calls.add(task)
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        if self._pending and not self._calls and not self._scheduled:
            self._send_pending()  # what gathered meanwhile goes now, together

    async def _call(self, batch: list[tuple[pb.Shams, asyncio.Future[pb.Evidence]]]) -> None:
        try:
            outcomes = await self._send([s for s, _ in batch])
        except BaseException as exc:  # the call failed as a whole: every caller learns it
            for _, done in batch:
                _settle(done, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            _settle(done, outcome)


class _AckStream:
    """Acknowledgement batches over one ``StreamAckEnvelopes`` stream, answered in order.

    The stream opens with the first batch and stays open; a batch costs one write and one
    read on it instead of a unary call. When the stream breaks, every batch unanswered on
    it raises the error (acknowledging again is safe: the node answers with the same
    HANDOVER evidence), and the next batch opens a new stream. A batch unanswered within
    the client's deadline ends the stream too.
    """

    def __init__(self, client: ExchangeClient) -> None:
        self._client = client
        self._open: _AckCall | None = None
        self.unanswered = False  # the last batch failed on a stream that never answered
        # One write at a time: gRPC takes no second write on a call while one is under
        # way (it fails the whole call), and full batches go while others are unanswered.
        self._writing = asyncio.Lock()

    async def ack_many(self, numbers: list[pb.Shams]) -> list[pb.Evidence | ChaparError]:
        # Answers come in order: a batch's future stays in line even when its caller
        # stops waiting (the future is then cancelled, and its answer dropped).
        done: asyncio.Future[pb.StreamAckEnvelopesResponse] = (
            asyncio.get_running_loop().create_future()
        )
        current: _AckCall | None = None
        self.unanswered = False  # this batch's, not an earlier stream's
        try:
            # The deadline covers the wait for earlier writes and a write the node does
            # not take (flow control), as well as the answer.
            async with asyncio.timeout(self._client._deadline(None)):
                async with self._writing:  # in line in the order written
                    current = self._open
                    if current is None or current.call.done():
                        with _translated(self._client._certificate):
                            call = self._client._stub.StreamAckEnvelopes()
                        current = self._open = _AckCall(call, self._client._certificate)
                    current.waiting.append(done)
                    try:
                        async with _write_translated(current.call, self._client._certificate):
                            await current.call.write(pb.StreamAckEnvelopesRequest(shams=numbers))
                    except ChaparError as exc:  # the stream is broken: no answer will come
                        done.cancel()
                        self.unanswered = not current.answered
                        current.fail(exc)
                        raise
                try:
                    response = await done
                except ChaparError:
                    self.unanswered = not current.answered
                    raise
        except TimeoutError:
            error = DeadlineExceeded(
                "no answer to an acknowledgement batch in time", reason="ACK_TIMEOUT"
            )
            done.cancel()
            if current is not None:  # written or being written: the stream ends
                current.fail(error)
            raise error from None
        return _ack_outcomes(response.results, numbers)

    async def close(self) -> None:
        """Ends the stream; ``flush`` has left no batch waiting on it."""
        current, self._open = self._open, None
        if current is None:
            return
        with contextlib.suppress(Exception):  # ended already
            await current.call.done_writing()
        with contextlib.suppress(TimeoutError):  # the node ends the stream in turn
            await asyncio.wait_for(asyncio.shield(current.reader), 5)
        current.fail(Cancelled("the client closed", reason="CLIENT_CLOSED"))


class _AckCall:
    """One acknowledgement stream and the batches waiting for its answers, oldest first."""

    def __init__(self, call: Any, certificate: CertificateValidity | None) -> None:
        self.call = call
        self._certificate = certificate
        self.waiting: collections.deque[asyncio.Future[pb.StreamAckEnvelopesResponse]] = (
            collections.deque()
        )
        self.answered = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        error: BaseException
        try:
            with _translated(self._certificate):
                async for response in self.call:
                    if not self.waiting:
                        raise InternalError(
                            "an answer to no acknowledgement batch", reason="MALFORMED_RESPONSE"
                        )
                    self.answered = True
                    _settle(self.waiting.popleft(), response)
            error = _stream_ended()
        except BaseException as exc:  # every batch unanswered learns why
            error = exc
        self.fail(error)

    def fail(self, error: BaseException) -> None:
        """Every batch unanswered raises ``error``; the stream ends."""
        if not isinstance(error, Exception):  # the call was cancelled under the reader
            error = Cancelled("the acknowledgement stream was cancelled", reason="STREAM_ENDED")
        while self.waiting:
            _settle(self.waiting.popleft(), error)
        self.call.cancel()


def _ack_outcomes(
    results: Sequence[pb.AckResult], numbers: Sequence[object]
) -> list[pb.Evidence | ChaparError]:
    """A batch's HANDOVER evidence or error per number, in order."""
    if len(results) != len(numbers):
        raise InternalError(
            f"node answered {len(results)} of {len(numbers)} acknowledgements",
            reason="MALFORMED_RESPONSE",
        )
    return [from_submit_error(r.error) if r.HasField("error") else r.evidence for r in results]


def _settle(done: asyncio.Future[T], outcome: T | BaseException) -> None:
    """Gives a waiting caller its outcome (an exception raised to it; a cancellation
    cancels it), unless it stopped waiting."""
    if done.done():
        return
    if not isinstance(outcome, BaseException):
        done.set_result(outcome)
    elif isinstance(outcome, Exception):
        done.set_exception(outcome)
    else:
        done.cancel()


class _AsyncFeed:
    """Batches from an async iterable: a pump task fills a bounded queue, and a batch is
    whatever is ready (at least one draft) plus, when that is not a full frame and ``busy()``
    (the stream has a frame unanswered or sent within the linger), what comes within
    ``linger_s``: a flood goes in full frames, a trickle a few drafts a frame, a draft on a
    quiet stream at once, at the cost of one queue put and get per draft. The linger ends
    when the iterable does (exhausted or failed): no more can come, so the frame goes; and
    as soon as what came meanwhile fills the frame (by count or bytes), which then goes."""

    def __init__(
        self,
        drafts: AsyncIterable[_Submittable],
        size: int,
        depth: int,
        linger_s: float = 0.0,
        busy: Callable[[], bool] = lambda: True,
    ) -> None:
        self._queue: asyncio.Queue[_Submittable | _End | _Failed] = asyncio.Queue(
            maxsize=size * depth
        )
        self._size = size
        self._linger_s = linger_s
        self._busy = busy
        self._held: _Submittable | _End | _Failed | None = None
        self._ended = False  # the end or the failure is in the queue
        # While a frame lingers: what it still takes (drafts, bytes), counted down by the
        # pump, which sets _wake when the frame would be full or the drafts end.
        self._room: list[int] | None = None
        self._wake = asyncio.Event()
        self._pump = asyncio.create_task(self._run(drafts))

    async def _run(self, drafts: AsyncIterable[_Submittable]) -> None:
        try:
            async for draft in drafts:
                await self._queue.put(draft)
                if (room := self._room) is not None:
                    room[0] -= 1
                    room[1] -= draft.size
                    if room[0] <= 0 or room[1] < 0:
                        self._wake.set()
        except Exception as exc:  # handed to the writer, which raises it to the caller
            await self._queue.put(_Failed(exc))
        else:
            await self._queue.put(_End())
        self._ended = True
        self._wake.set()

    async def next_batch(self) -> list[_Submittable]:
        frame = _Frame(self._size)
        item = self._held or await self._queue.get()
        self._held = None
        lingered = not self._linger_s
        while True:
            if isinstance(item, _End | _Failed):
                # Send what came before the end or the failure first.
                self._held = item
                if frame.drafts:
                    return frame.drafts
                if isinstance(item, _Failed):
                    raise item.error
                return frame.drafts
            if not frame.take(item):
                self._held = item  # the next frame starts with it
                return frame.drafts
            if frame.full:
                return frame.drafts
            if self._queue.empty() and not lingered and self._busy() and not self._ended:
                lingered = True
                # Not a plain sleep: once the drafts have ended none can come, and the
                # last frame of a blocking send_stream (whose drafts and end reach the
                # loop a thread hop apart) waited out the linger for nothing; and a frame
                # filled meanwhile waited it out too (a linger late, every frame of a
                # stream faster than a frame a linger).
                self._room = [self._size - len(frame.drafts), STREAM_FRAME_BYTES - frame.bytes]
                self._wake.clear()
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._linger_s):
                            await self._wake.wait()
                finally:
                    self._room = None
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return frame.drafts

    async def aclose(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)


def _verify_as_created(
    trust: TrustStore, envelope: pb.Envelope, *, check_body: bool
) -> pb.EnvelopeHeader:
    # Verify the signature as of the letter's own creation time, as verify_evidence does
    # with the event time, so a letter stays verifiable after its signer's certificate
    # expires; a revocation counts as of that time too (one from a later time does not).
    header = trust.verify_envelope(envelope, check_body=check_body, as_created=True)
    # The signer is the header's sender (verify_envelope); a number is its origin's to give:
    # the hub relays no other, and a bundle of one would tie another agency's number to it.
    if header.shams.origin != header.sender.agency:
        raise VerificationError(
            "SENDER_MISMATCH",
            f"its sender {header.sender.agency!r} is not the origin of its number"
            f" {header.shams.origin!r}",
        )
    return header


def _verify_letter(
    trust: TrustStore,
    envelope: pb.Envelope,
    evidence: Iterable[pb.Evidence],
    *,
    check_body: bool = True,
    hubs: Collection[str] | None = None,
) -> list[VerifiedEvidence]:
    """The letter's signature, then each evidence's; the hub's (relays, expiry) only from
    ``hubs``, when given."""
    try:
        header = _verify_as_created(trust, envelope, check_body=check_body)
    except VerificationError as exc:
        raise VerificationError(exc.reason, f"the letter: {exc}") from exc
    digest = sha256(envelope.header)
    recipients = {r.agency for r in header.recipients}
    verified: list[VerifiedEvidence] = []
    for position, item in enumerate(evidence, 1):
        try:
            content = trust.verify_evidence(item)
            if content.shams != header.shams or content.envelope_sha256 != digest:
                raise VerificationError(
                    "EVIDENCE_MISMATCH",
                    f"evidence {content.evidence_id} is about another letter than "
                    f"{format_shams(header.shams)}",
                )
            check_attestation(
                content, sender=header.sender.agency, recipients=recipients, hubs=hubs
            )
        except VerificationError as exc:  # say which one: a bundle may hold many
            raise VerificationError(exc.reason, f"evidence {position}: {exc}") from exc
        verified.append(VerifiedEvidence.from_content(content))
    return verified


def _verify_status_updates(
    trust: TrustStore,
    letter: pb.EnvelopeHeader,
    updates: Sequence[StatusUpdate],
    claimed: dict[str, str],
) -> None:
    """Each update signed by its sender, about ``letter`` (whose signature the caller
    verified), between its two sides; then each claimed latest status backed by them."""
    about = format_shams(letter.shams)
    headers: list[pb.EnvelopeHeader] = []
    for position, update in enumerate(updates, 1):
        try:
            # A note the response leaves out (or retention removed) cannot be checked; the
            # signed header, and so the status, still is, and ``note`` says it is not held
            # (None). A note that is there must be the signed one.
            header = _verify_as_created(
                trust, update.envelope, check_body=_holds_body(update.envelope, update.header)
            )
            if (
                header.kind != pb.LETTER_KIND_STATUS_UPDATE
                or not header.HasField("in_reply_to")
                or header.in_reply_to != letter.shams
            ):
                raise VerificationError(
                    "STATUS_UPDATE_MISMATCH",
                    f"{format_shams(header.shams)} is not a status update about {about}",
                )
            recipients = [r.agency for r in header.recipients]
            fault = status_update_fault(letter, header.sender.agency, recipients, header.status)
            if fault is not None:
                raise VerificationError(fault.reason, fault.message)
        except VerificationError as exc:  # say which one, as for evidence
            raise VerificationError(exc.reason, f"status update {position}: {exc}") from exc
        headers.append(header)
    signed = {agency: status_name(s) for agency, s in latest_statuses(headers).items()}
    for agency, status in claimed.items():
        if signed.get(agency) != status:
            raise VerificationError(
                "STATUS_MISMATCH",
                f"{agency}'s latest status is given as {status}; its signed updates say"
                f" {signed.get(agency, 'none')}",
            )


def _verify_tracked(
    trust: TrustStore, letter: pb.TrackedLetter, hubs: Collection[str] | None = None
) -> list[VerifiedEvidence]:
    """One unredacted letter of a tree: its envelope and the hub's account of it, then
    its evidence (see ``Correspondence.verify``)."""
    sender, recipients = letter.sender, list(letter.recipients)
    if sender != letter.shams.origin:  # the hub accepts no other, envelope or not
        raise VerificationError(
            "TRACK_MISMATCH", f"its sender {sender!r} is not the origin of its number"
        )
    digest: bytes | None = None
    if letter.HasField("envelope"):
        envelope = letter.envelope
        # A body that is there is checked; none is sent, and the signed header stands.
        header = _verify_as_created(trust, envelope, check_body=bool(envelope.body))
        signed = (
            header.shams,
            header.sender.agency,
            list(dict.fromkeys(r.agency for r in header.recipients)),
            int(header.kind),
            header.in_reply_to if header.HasField("in_reply_to") else None,
            int(header.status),
        )
        account = (
            letter.shams,
            sender,
            recipients,
            int(letter.kind),
            letter.in_reply_to if letter.HasField("in_reply_to") else None,
            int(letter.status),
        )
        # A letter the hub has not linked yet (links_unknown) comes without kind, status
        # and in_reply_to: only what the hub knows is compared.
        known = 3 if letter.links_unknown else len(signed)
        if signed[:known] != account[:known]:
            raise VerificationError(
                "TRACK_MISMATCH", "the hub's account of the letter is not what its header signs"
            )
        digest = sha256(envelope.header)
    verified: list[VerifiedEvidence] = []
    for position, item in enumerate(letter.evidence, 1):
        try:
            content = trust.verify_evidence(item)
            if content.shams != letter.shams or (
                digest is not None and content.envelope_sha256 != digest
            ):
                raise VerificationError(
                    "EVIDENCE_MISMATCH",
                    f"evidence {content.evidence_id} is about another letter",
                )
            digest = content.envelope_sha256  # without the envelope: the first one's
            check_attestation(content, sender=sender, recipients=set(recipients), hubs=hubs)
        except VerificationError as exc:
            raise VerificationError(exc.reason, f"evidence {position}: {exc}") from exc
        verified.append(VerifiedEvidence.from_content(content))
    return verified


_REDACTED_FIELDS = frozenset({"shams", "in_reply_to", "redacted"})


def _verify_redacted(letter: pb.TrackedLetter) -> None:
    """A redacted letter carries its number and the one it answers, nothing else: the
    rest would be data no signature covers, shown as the hub's."""
    extra = sorted(f.name for f, _ in letter.ListFields() if f.name not in _REDACTED_FIELDS)
    if extra:
        raise VerificationError("TRACK_MISMATCH", f"a redacted letter carries {', '.join(extra)}")


def _holds_body(envelope: pb.Envelope, header: pb.EnvelopeHeader) -> bool:
    """Whether ``envelope`` (whose header bytes parse as ``header``) carries its body: it
    has one, or its header signs none (``body_size`` 0, an empty body to check)."""
    return bool(envelope.body) or header.body_size == 0


def _shams_or_none(
    header: pb.EnvelopeHeader | pb.TrackedLetter, name: Literal["in_reply_to"]
) -> str | None:
    """The header's SHAMS field as text; None if unset, or not a valid number (a letter a
    hub let through before it checked in_reply_to must not stop a back-end's inbox)."""
    if not header.HasField(name):
        return None
    try:
        return format_shams(getattr(header, name))
    except ValueError:
        return None


def _shams_pb(shams: ShamsLike) -> pb.Shams:
    return parse_shams(shams) if isinstance(shams, str) else shams


def _number_of(header: pb.EnvelopeHeader) -> str | None:
    """The number a letter's header carries; None if it carries none. ValueError if it is
    not a valid number."""
    return format_shams(header.shams) if header.HasField("shams") else None


def _require_about(asked: pb.Shams, answered: str | None, call: str) -> None:
    """Raises ``InternalError`` (``LETTER_MISMATCH``, not retryable) unless ``answered``,
    the number of the letter a node's answer is about (None: none), is ``asked``.

    Another letter's tracking, bundle or tree is signed and verifies: as that letter's. A
    node (faulty, or hostile) answering with one must not have it taken as the answer
    about the letter asked for."""
    try:
        wanted = format_shams(asked)
    except ValueError:  # a node must refuse a number that is none: no answer is about it
        wanted = None
    if answered is not None and answered == wanted:
        return
    raise InternalError(
        f"the node answered {call} of {wanted or 'an invalid number'} with"
        f" {f'letter {answered}' if answered else 'a letter without a number'}",
        reason="LETTER_MISMATCH",
        metadata={"asked": wanted or "", "answered": answered or ""},
    )


def _time(message: Any, name: str) -> dt.datetime | None:
    if not message.HasField(name) or not valid_timestamp(getattr(message, name)):
        return None
    return datetime_of(getattr(message, name))


# Cached: protobuf's EnumTypeWrapper.Name and .Value are Python code, about 3 us a call,
# and a letter made or received asks them the same few questions each time.
@functools.lru_cache(maxsize=1024)
def _enum_name(name_of: Any, value: int, prefix: str) -> str:
    try:
        name: str = name_of(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def _enum_value(value_of: Any, value: int | str, prefix: str, what: str) -> int:
    if isinstance(value, str):
        return _enum_named(value_of, value, prefix, what)
    return value


@functools.lru_cache(maxsize=1024)  # a name that is none raises, and is not kept
def _enum_named(value_of: Any, value: str, prefix: str, what: str) -> int:
    name = value.strip().upper().replace("-", "_").replace(" ", "_")
    if not name.startswith(prefix):
        name = prefix + name
    try:
        number: int = value_of(name)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}") from None
    return number


def to_letter_kind(value: KindLike) -> pb.LetterKind.ValueType:
    """The LetterKind of a value or a name such as "reply" or "status-update"."""
    number = _enum_value(pb.LetterKind.Value, value, "LETTER_KIND_", "letter kind")
    if number not in _LETTER_KINDS:
        raise ValueError(f"unknown letter kind {value!r}")
    return pb.LetterKind.ValueType(number)


def to_business_status(value: StatusLike) -> pb.BusinessStatus.ValueType:
    """The BusinessStatus of a value, a name such as "accepted" or "recall-requested", or
    an edXML code such as "03"."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    number = _enum_value(pb.BusinessStatus.Value, value, "BUSINESS_STATUS_", "business status")
    if number not in BUSINESS_STATUSES:
        raise ValueError(f"unknown business status {value!r}")
    return pb.BusinessStatus.ValueType(number)


def to_priority(value: PriorityLike) -> pb.Priority.ValueType:
    """The Priority of a value or a name such as "urgent"."""
    number = _enum_value(pb.Priority.Value, value, "PRIORITY_", "priority")
    if number not in _PRIORITIES:
        raise ValueError(f"unknown priority {value!r}")
    return pb.Priority.ValueType(number)


_LETTER_KINDS: Final = frozenset(pb.LetterKind.values())
_PRIORITIES: Final = frozenset(pb.Priority.values())
