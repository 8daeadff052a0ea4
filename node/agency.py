"""The node role: an agency's gateway (NodeService for its back-ends).

The node validates, numbers and signs letters, keeps outbox and inbox, and issues
SUBMISSION_ACCEPTANCE, DELIVERY and HANDOVER evidence with the agency's signing key. It
talks to the hub through ``node.rpc.hub_link.HubLink``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.client import CONTROL_CHARACTERS
from client_sdk.errors import from_rpc_error
from client_sdk.identity import Identity
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import Signer, key_id, sha256
from client_sdk.statuses import latest_statuses
from client_sdk.trust import (
    TrustStore,
    VerificationError,
    is_ca,
    revocations_of,
    seconds_of,
    set_timestamp,
)
from node.config import ENVELOPE_EXTRA_BYTES, NodeConfig, frame_room, load_node_config
from node.core.directory import DirectoryView
from node.core.documents import parse_document_uri
from node.core.errors import ChaparError, Code, hub_unavailable, letter_not_found
from node.core.evidence import evidence_content, evidence_message
from node.core.letters import build_header, fit_status_update, normalise_text, validate_draft
from node.core.splice import Field
from node.document_store import DocumentStore
from node.metrics import SUBMIT_REJECTED
from node.reload import NOT_LOADED, RestartOnly, modification_times
from node.rpc.errors import abort, code_of, to_submit_error
from node.rpc.peer import peer_certificate
from node.storage.node_store import HeldLetter, NewLetter, NodeStore, request_key
from node.tasks import drain, every

if TYPE_CHECKING:
    from node.rpc.hub_link import HubLink

__all__ = ["Agency"]

log = logging.getLogger("chapar.node")
_INBOX_BATCH = 256
# An inbox frame stops at this many bytes of letters (one always goes): well under what
# the SDK accepts (64 MiB), and large letters are not all read at once.
_INBOX_FRAME_BYTES = 8 * 1024 * 1024
_INBOX_LETTERS = Field(pb.StreamInboxResponse, "letters")
_INBOX_ENVELOPE = Field(pb.InboxLetter, "envelope")
_INBOX_DELIVERY = Field(pb.InboxLetter, "delivery")
# Acknowledgement answers, joined from each result's bytes (node.core.splice): the evidence
# is serialised once, not copied into an AckResult, then into the answer, then serialised.
_ACK_EVIDENCE = Field(pb.AckResult, "evidence")
_STREAM_ACK_RESULTS = Field(pb.StreamAckEnvelopesResponse, "results")
_BATCH_ACK_RESULTS = Field(pb.BatchAckEnvelopesResponse, "results")
_MAX_BATCH = 1024
# After a restore of the hub, letters and receipts are sent again from this long before the
# copy's time: the copy's time is by the clock of the machine that took it, ours by ours.
HUB_RESTORE_MARGIN_S = 300.0
_MAX_ACK_BATCH = 1000
F = TypeVar("F")
R = TypeVar("R")
S = TypeVar("S", pb.BatchSubmitEnvelopesResponse, pb.StreamSubmitEnvelopesResponse)
# Letters numbered and signed together at most (several calls' worth; trees of 256).
_MAX_SIGNING_GROUP = 4096
_STATUS_UPDATE = pb.LETTER_KIND_STATUS_UPDATE
_RECALL_REQUESTED = pb.BUSINESS_STATUS_RECALL_REQUESTED
_OUTGOING = pb.LetterDirection.LETTER_DIRECTION_OUTGOING
_INCOMING = pb.LetterDirection.LETTER_DIRECTION_INCOMING
# How long the node waits for the hub's answer to a Track (less if its caller's deadline
# comes first); the hub is unavailable past it.
_TRACK_TIMEOUT_S = 10.0
_HUB_GONE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
# What the node reads once, at start, under the key docs/OPERATIONS.md names: a reload
# keeps the value running and says so (node.reload). Its identity (node.agency: its
# numbers, its certificates), the hub it dials and the one it accepts before a directory
# (the hub link's), the server's address, options, message limit and credentials, its
# store and document directory, its /metrics server. Every other key a reload applies
# (Agency.reload_if_changed): each is read where it is used, at each use.
_RESTART_ONLY = RestartOnly(
    {
        "agency": "node.agency",
        "listen": "node.listen",
        "hub": "node.hub",
        "hub_name": "node.hub_name",
        "database": "node.database",
        "ready_file": "node.ready_file",
        "durability": "node.durability",
        "metrics_listen": "node.metrics_listen",
        "metrics_tls": "node.metrics_tls",
        "keepalive_s": "node.keepalive_s",
        "max_message_bytes": "limits.max_message_bytes",
        "documents_dir": "documents.directory",
        "tls": "tls",
        "signing": "signing",
    },
    log,
)


class _StreamEnded(Exception):
    """A back-end stream's frame found its client's mailboxes changed by a reload after it
    was read, before it was applied: it is not applied, and the stream ends (OK) with it
    unanswered, as at a stop; the back-end sends it again on a new stream, admitted with
    its new mailboxes (the SDK's STREAM_ENDED)."""


@dataclass(frozen=True, slots=True)
class Access:
    """A caller's identity and the mailboxes it may use (None: all of them)."""

    identity: Identity
    mailboxes: frozenset[str] | None
    # The back-end stream whose frames act with it, which a revocation or a reload may end
    # while one is being handled (``still_current``); None: a unary call's.
    stream: _OpenStream | None = field(default=None, compare=False, repr=False)

    def still_current(self) -> None:
        """Raises when this is the access of a stream ended since: its refusal when its
        certificate was revoked, _StreamEnded when a reload changed its client's mailboxes.
        Asked once a frame's checks have read what they need, with no wait from there to
        its storing: a revocation or reload landing while they read is not missed."""
        if self.stream is None:
            return
        if self.stream.refused is not None:
            raise self.stream.refused
        if self.stream.stale:
            raise _StreamEnded

    def may_see(self, mailboxes: Iterable[str]) -> bool:
        return self.mailboxes is None or not self.mailboxes.isdisjoint(mailboxes)

    def require(self, mailboxes: Iterable[str], what: str) -> None:
        boxes = list(mailboxes)
        if not self.may_see(boxes):
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "MAILBOX_NOT_ALLOWED",
                f"{self.identity.uri} may not use {what}",
                metadata={"identity": self.identity.uri, "mailboxes": ",".join(boxes)},
            )


@dataclass(slots=True)
class _Submission:
    """Validated letters of one call or stream frame, waiting to be numbered and stored."""

    request_ids: list[str]
    digests: list[bytes]  # of each request's draft as sent (b"" without a request_id)
    items: list[tuple[pb.LetterDraft, pb.Shams | None]]  # (draft, thread root)
    now: dt.datetime
    future: asyncio.Future[list[pb.Receipt | ChaparError]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


# The place of a letter that passed its checks, until its outcome replaces it.
_PENDING = ChaparError(Code.INTERNAL, "PENDING", "")


def _request_digest(request: pb.SubmitEnvelopeRequest) -> bytes:
    """What a request asked for, to tell a retry from another letter under a used
    request_id: SHA-256 of its draft as sent (a retry sends the same draft)."""
    if not request.request_id:
        return b""
    return sha256(request.draft.SerializeToString(deterministic=True))


def _log_letters(
    message: str, shams: list[str], access: Access, request_ids: list[str] | None = None
) -> None:
    """One INFO line for a batch of letters: their numbers as a JSON array, in order.

    ``request_ids``, when any is set, is aligned with ``shams`` ("" where none was given).
    Callers check ``log.isEnabledFor(logging.INFO)`` first, so nothing is built when off.
    """
    extra: dict[str, object] = {"shams": shams, "count": len(shams), "peer": access.identity.uri}
    if request_ids is not None and any(request_ids):
        extra["request_ids"] = request_ids
    log.info(message, extra=extra)


async def _answer_in_order(
    frames: AsyncIterator[F],
    handle: Callable[[F], Coroutine[Any, Any, R]],
    respond: Callable[[R], object],
    context: grpc.aio.ServicerContext,
    closing: asyncio.Event,
) -> None:
    """Answers a stream's frames in order, handling them concurrently (group commit joins
    their writes; at most eight wait ahead of the answer being written). A ChaparError,
    from handling a frame or from reading one (malformed, oversized), ends the stream with
    that error. Once ``closing`` is set no more frames are read: those read are answered
    and the stream ends (OK); if one of them raises _StreamEnded (its client's mailboxes
    changed before it was applied), it ends there, those from it on unanswered."""
    # The places ahead are a semaphore, not the queue's bound: the reader's last word
    # (None) must never wait for a place, or a reader cancelled then (the node stopping,
    # the caller gone) would leave the answers waiting for it, or itself waiting forever.
    pending: asyncio.Queue[asyncio.Task[R] | None] = asyncio.Queue()
    places = asyncio.Semaphore(8)

    async def read() -> None:
        try:
            async for frame in frames:
                await places.acquire()
                pending.put_nowait(asyncio.create_task(handle(frame)))
        except asyncio.CancelledError:
            if not closing.is_set():
                raise
        finally:
            pending.put_nowait(None)

    reader = asyncio.create_task(read())
    stopper = asyncio.create_task(_cancel_when(closing, reader))
    try:
        while (task := await pending.get()) is not None:
            places.release()
            try:
                result = await task
            except ChaparError as exc:
                await abort(context, exc)
                return
            except _StreamEnded:  # it and those after it unanswered: the stream ends (OK)
                return
            await context.write(respond(result))
        try:
            await reader
        except ChaparError as exc:
            await abort(context, exc)
    finally:
        reader.cancel()
        stopper.cancel()
        while not pending.empty():  # frames handled that no answer will carry
            if (left := pending.get_nowait()) is not None:
                left.add_done_callback(_outcome_unheard)


def _outcome_unheard(task: asyncio.Task[Any]) -> None:
    """A frame's outcome its stream ended before answering (what it stored stays stored,
    and a retry is answered from it): retrieved, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


async def _cancel_when(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    await event.wait()
    task.cancel()


@dataclass(eq=False)
class _OpenStream:
    """A back-end's long-lived stream: who it is, and why it ended early (if it did)."""

    access: Access
    certificate: x509.Certificate
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    refused: ChaparError | None = None  # set when its certificate was revoked
    # Set with ``refused`` (``ended`` is set at a stop too): what a document transfer,
    # which a stop lets finish, waits on.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)
    # Set with ``ended`` when a reload changed its client's mailboxes: it was admitted with
    # the old ones.
    stale: bool = False

    def __post_init__(self) -> None:
        # Its frames act with an access that knows the stream (Access.still_current).
        self.access = replace(self.access, stream=self)

    @property
    def identity(self) -> Identity:
        return self.access.identity

    @property
    def current(self) -> bool:
        """What it read may still be shown: its certificate not revoked since, nor its
        client's mailboxes changed."""
        return self.refused is None and not self.stale


class Agency(pb.NodeServiceServicer):
    """State shared by the node's servicer and its hub link."""

    def __init__(
        self,
        config: NodeConfig,
        store: NodeStore,
        signer: Signer,
        trust: TrustStore,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        # The file ``config`` was read from, read again when it changes (reload_if_changed);
        # None: never reloaded.
        self.config_path = config_path
        self._sources = modification_times(config_path)
        # Set, and replaced by a new one, whenever a reload took a configuration.
        self.reloaded = asyncio.Event()
        self.store = store
        self.signer = signer
        self.trust = trust
        self.identity = config.identity
        self.directory: DirectoryView | None = None
        # The hub identity this node accepts (node.rpc.hub_link.check_hub_attestation):
        # the one its saved directory names (hold_hub_of), before it holds one
        # node.hub_name's; None: the first hub to attest is taken (trust on first use).
        self.hub_identity: str | None = (
            Identity.for_hub(config.hub_name).uri if config.hub_name else None
        )
        self.outbox_changed = asyncio.Event()
        self.receipts_changed = asyncio.Event()
        self.hub_connected = False
        # The max_frame_bytes the hub's last welcome said (kept in the store, read back at
        # start: a node restarted while the hub is down knows it), None until a hub said;
        # the bytes of letters a frame to the hub may carry (config.frame_room of it); and
        # whether a letter this node takes could exceed that, so that only then is each
        # one measured.
        self.hub_frame_bytes: int | None = None
        self.hub_frame_room: int | None = None
        self._measure_for_hub = False
        # False once the hub refused this agency as unknown (UNKNOWN_SENDER: removed from
        # its directory, so the node cannot read its state there): letters are refused
        # until the hub answers the node again.
        self.in_directory = True
        self.directory_ready = asyncio.Event()
        # Set (to the restore's time) when the database was restored from a backup and the
        # hub has not yet told this node which numbers it holds: submissions are refused
        # until then, so that no letter takes a number the hub gave another (serve_node
        # reads it from the store; the hub link clears it at the first welcome).
        self.numbers_unconfirmed: float | None = None
        # Replaced by a fresh event at every inbox change; a waiter captures the current
        # one before reading, so no change between read and wait is missed.
        self._inbox_signal = asyncio.Event()
        self._waiting: list[_Submission] = []  # validated letters waiting to be stored
        # Request key -> the submissions holding a letter under it that passed its checks
        # and is not yet stored (their futures): a retry refused meanwhile waits for them.
        self._unsettled: dict[str, list[asyncio.Future[list[pb.Receipt | ChaparError]]]] = {}
        self._storer: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()
        # The back-ends' open streams (inbox, submission, acknowledgement), each with the
        # TLS certificate it was admitted with, checked again whenever the directory brings
        # revocations or one comes due: a stream whose certificate (or a CA above it) is
        # revoked ends (end_revoked).
        self._streams: dict[_OpenStream, x509.Certificate] = {}
        trust.revocation_listeners.append(self.end_revoked)
        self.full_recipients: frozenset[str] = frozenset()
        self.quota_retry_after_s = 30.0
        self._tasks: list[asyncio.Task[None]] = []
        self.document_store: DocumentStore | None = None
        self.hub_link: HubLink | None = None  # set by serve_node: Track rides on its channel

    def start(self) -> None:
        # Their periods are read from the configuration in force, which a reload changes,
        # and a reload wakes a wait under way to measure it again.
        self._tasks = [
            asyncio.create_task(every(period, action, name, lambda: self.reloaded), name=name)
            for period, action, name in (
                (lambda: self.config.purge_interval_s, self.purge, "retention"),
                (lambda: self.config.reload_interval_s, self.reload_if_changed, "reload"),
            )
        ]

    def end_revoked(self) -> None:
        """Ends the back-end streams and transfers whose certificate (or a CA above it) the
        trust store refuses now: called whenever its revocations change (a directory) and
        when a revocation scheduled for a time comes due (node.server)."""
        for stream, certificate in self._streams.items():
            try:
                self.trust.verify_certificate(certificate, "tls")
            except VerificationError as exc:
                log.warning("ending a stream of %s: %s", stream.identity.uri, exc.reason)
                stream.refused = ChaparError(
                    Code.UNAUTHENTICATED, exc.reason, f"client certificate refused: {exc}"
                )
                stream.ended.set()
                stream.revoked.set()

    def end_streams(self) -> None:
        """The node is stopping: every back-end stream ends once what it read is answered."""
        self.closing.set()
        for stream in self._streams:
            stream.ended.set()

    async def stop(self) -> None:
        self.end_streams()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload_if_changed(self) -> int:
        """Reads the configuration file again when it changed, and applies it (1), or
        nothing changed (0). A file that does not load is refused whole, logged once (until
        it changes again): the configuration running stays. The keys only a restart
        applies keep their running values, with a warning naming each that changed
        (node.reload); every other is read where it is used, so the next use takes it.

        The back-ends' streams whose client's mailboxes changed end (as at a stop: the
        SDK's STREAM_ENDED, and the back-end reads again, admitted with its new
        mailboxes); a stream admitted with the old ones would go on showing their letters.
        A frame such a stream read and had not applied is left unanswered, nothing of it
        stored (Access.still_current): the back-end sends it again on its new stream.
        """
        stamps = modification_times(self.config_path)
        if self.config_path is None or stamps == self._sources:
            return 0
        self._sources = stamps  # a bad file is logged once; read again when it changes
        try:
            read = load_node_config(self.config_path)
        except NOT_LOADED as exc:
            log.error("configuration not reloaded, keeping the one running: %s", exc)
            return 0
        config = _RESTART_ONLY.kept(read, self.config)
        if config.limits.max_body_bytes > config.max_message_bytes:
            # A message limit raised with the body's takes a restart: the body's waits for it.
            limits = replace(config.limits, max_body_bytes=config.max_message_bytes)
            config = replace(config, limits=limits)
        _RESTART_ONLY.warn(read, self.config)
        if config == self.config:
            return 0
        self.config = config
        if self.document_store is not None:  # uploads check its copy of the limits
            self.document_store.limits = config.documents
        # The repeating tasks measure the wait under way against their periods as reloaded.
        self.reloaded.set()
        self.reloaded = asyncio.Event()
        for stream in self._streams:
            identity = stream.identity
            if identity.kind == "client" and (
                config.clients.get(identity.name) != stream.access.mailboxes
            ):
                log.info("ending a stream of %s: its mailboxes changed", identity.uri)
                stream.stale = True
                stream.ended.set()
        log.info("configuration reloaded")
        return 1

    async def purge(self) -> int:
        """Drops bodies of done letters this node took (sent or received) more than
        retention_s ago (evidence stays), then, with ``[documents] retention_s``, the
        documents no kept letter needs."""
        before = time.time() - self.config.retention_s
        total = await drain(lambda: self.store.purge(before))
        if total:
            log.info("retention: purged %d letter bodies", total)
        if self.config.documents_retention_s > 0 and self.document_store is not None:
            await self.purge_documents(time.time() - self.config.documents_retention_s)
        return total

    async def purge_documents(self, cutoff: float) -> int:
        """Removes the documents unused since ``cutoff`` (uploaded, fetched, re-uploaded or
        attached to a letter before it) that no letter whose body is kept references."""
        store = self.document_store
        assert store is not None
        candidates = await asyncio.to_thread(store.unused_since, cutoff)
        removed = 0
        refused: list[OSError] = []  # one the disk refuses to remove does not stop the rest
        for start in range(0, len(candidates), 500):
            chunk = candidates[start : start + 500]
            in_use = await self.store.documents_in_use(chunk)
            # No await from the mtime check to the unlink: a submission attaching one of
            # these touches it first (_check_documents), and it is then kept.
            for digest in chunk:
                if digest in in_use:
                    continue
                try:
                    removed += store.remove_unused(digest, cutoff)
                except OSError as exc:
                    refused.append(exc)
        if removed:
            log.info("retention: removed %d documents", removed)
        if refused:
            log.error(
                "retention: %d documents could not be removed, the first: %s",
                len(refused),
                refused[0],
            )
        return removed

    # -- directory ------------------------------------------------------------------------

    async def set_directory(self, directory: pb.Directory, *, persist: bool = True) -> None:
        self.trust.add_certificates(directory.intermediate_certificates)
        self.trust.add_certificates(directory.hub_signing_certificates)
        known: list[tuple[bytes, bytes]] = []
        for der in [
            *directory.hub_signing_certificates,
            *(c for a in directory.agencies for c in a.signing_certificates),
        ]:
            self.trust.add_certificates([der])
            from cryptography import x509

            known.append((key_id(x509.load_der_x509_certificate(der)), der))
        known.append((self.signer.key_id, self.signer.certificate.public_bytes(Encoding.DER)))
        self.trust.add_certificates([self.signer.certificate])
        # Its listeners, end_revoked among them, check the open streams again.
        self.trust.set_revoked(*revocations_of(directory.revoked_serials, directory.revocations))
        await self.store.remember_certificates(known)
        was = self.own_state()
        self.directory = DirectoryView(directory)
        self.directory_ready.set()
        self._log_own_state(was)
        if persist:
            await self.store.save_directory(directory)
            self.hold_hub_of(directory)
        log.info("directory version %d: %d agencies", directory.version, len(directory.agencies))

    def hold_hub_of(self, directory: pb.Directory) -> None:
        """Accepts as the hub, from now on, only the hub ``directory`` names: one this node
        saves (or saved before a restart). Only the hub link saves a directory, one fetched
        over a stream whose server attested being the hub this node accepts, so only that
        hub can name another (a rename); an unattested server's is never saved."""
        if not directory.hub or directory.hub == self.hub_identity:
            return
        try:
            named = Identity.parse(directory.hub)
        except ValueError:
            named = None
        if named is None or named.kind != "hub":  # no hub could attest as it: keep ours
            log.error("the directory names %r as its hub, which is no hub", directory.hub)
            return
        if self.hub_identity is not None:
            log.warning(
                "the directory names the hub %s: it is accepted as the hub from now on, not %s",
                directory.hub,
                self.hub_identity,
            )
        self.hub_identity = directory.hub

    def own_state(self) -> pb.AgencyState.ValueType | None:
        """This agency's state in the directory held (None without one, or if unlisted)."""
        own = self.directory.agency(self.config.agency) if self.directory is not None else None
        return own.state if own is not None else None

    def _log_own_state(self, was: pb.AgencyState.ValueType | None) -> None:
        """Says once that this agency was suspended or retired, or is active again; the
        hub link then retries without a word (it reads the directory at every retry)."""
        now = self.own_state()
        if now == was or now is None:
            return
        name = pb.AgencyState.Name(now).removeprefix("AGENCY_STATE_").lower()
        if now == pb.AGENCY_STATE_ACTIVE:
            if was is not None:
                log.info("agency %s is active again in the hub's directory", self.config.agency)
            return
        log.error(
            "agency %s is %s in the hub's directory: letters are refused until it is active again",
            self.config.agency,
            name,
            extra={"agency": self.config.agency, "reason": "SENDER_INACTIVE"},
        )

    def set_in_directory(self, listed: bool) -> None:
        """Whether the hub lists this agency: it answered the node (listed), or refused it
        as an agency it does not know (not listed). Logged when it changes, not at every
        retry of the hub link."""
        if listed == self.in_directory:
            return
        self.in_directory = listed
        if listed:
            log.info("agency %s is listed in the hub's directory again", self.config.agency)
        else:
            log.error(
                "agency %s is not in the hub's directory: letters are refused until the hub"
                " lists it again",
                self.config.agency,
                extra={"agency": self.config.agency, "reason": "AGENCY_NOT_IN_DIRECTORY"},
            )

    def _not_in_directory(self) -> ChaparError:
        code = self.config.agency
        return ChaparError(
            Code.FAILED_PRECONDITION,
            "AGENCY_NOT_IN_DIRECTORY",
            f"agency {code} is not in the hub's directory; letters are refused until the hub"
            " lists it again",
            metadata={"agency": code},
        )

    def signing_certificate_fault(self, now: dt.datetime | None = None) -> str:
        """Why this node's signing certificate cannot sign a letter now ("" when it can):
        expired or not yet valid. The hub refuses every letter it signs then
        (CERTIFICATE_EXPIRED: it checks the signer's certificate as of its clock's now).
        Read at each call, from the signer held: a certificate renewed is taken at once."""
        certificate = self.signer.certificate
        now = now or dt.datetime.now(dt.UTC)
        if now > certificate.not_valid_after_utc:
            return (
                "this node's signing certificate expired at"
                f" {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
            )
        if now < certificate.not_valid_before_utc:
            return (
                "this node's signing certificate is not valid before"
                f" {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
            )
        return ""

    def _signing_certificate_not_valid(self, fault: str) -> ChaparError:
        return ChaparError(
            Code.FAILED_PRECONDITION,
            "CERTIFICATE_EXPIRED",
            f"{fault}: the hub would refuse the letters it signs; letters are refused until"
            " the node's operator renews it (signing.cert) and restarts the node",
            metadata={"certificate": "signing"},
        )

    def _numbers_unconfirmed(self) -> ChaparError:
        return ChaparError(
            Code.UNAVAILABLE,
            "NUMBERS_UNCONFIRMED",
            "this node was restored from a backup and waits for the hub to confirm which"
            " SHAMS numbers it already holds; letters are taken again once the hub answers",
            retry_after_s=1.0,
        )

    async def confirm_numbers(self, accepted: Sequence[pb.AcceptedSequence]) -> None:
        """The hub's welcome: moves the SHAMS counters up to the numbers the hub holds of
        this agency, and ends the wait of a restored node."""
        restore = self.numbers_unconfirmed
        # It logs the counters it moved up, then those a restore's --skip-numbers moved on.
        await self.store.raise_counters(self.config.agency, accepted, restore)
        if restore is not None and self.numbers_unconfirmed == restore:
            self.numbers_unconfirmed = None
            log.info("numbers confirmed by the hub after the restore; taking letters again")

    async def on_hub_restore(self, restore: pb.HubRestore, *, hub_ahead_s: float = 0.0) -> None:
        """The hub says its database was restored from a copy: once per restore, sends
        again the letters and receipts it may have lost (``NodeStore.handle_hub_restore``),
        from ``HUB_RESTORE_MARGIN_S`` before the copy's time, for the two clocks, and
        further back by ``hub_ahead_s``, how far the hub's clock is ahead of this node's
        (the copy's time is by the hub's clock, what this node recorded by its own)."""
        name = str(restore.restore_time.ToNanoseconds())
        if await self.store.hub_restore_handled(name):
            return
        snapshot = seconds_of(restore.snapshot_time)
        letters, receipts = await self.store.handle_hub_restore(
            name, snapshot - HUB_RESTORE_MARGIN_S - max(0.0, hub_ahead_s), self.identity.uri
        )
        log.warning(
            "the hub was restored from a copy taken at %s: sending again %d letters and %d"
            " receipts it may have lost",
            dt.datetime.fromtimestamp(snapshot, dt.UTC).isoformat(timespec="seconds"),
            letters,
            receipts,
            extra={"reason": "HUB_RESTORED", "count": letters + receipts},
        )
        if letters:
            self.outbox_changed.set()
        if receipts:
            self.receipts_changed.set()

    def _require_directory(self) -> DirectoryView:
        if self.directory is None:
            raise ChaparError(
                Code.UNAVAILABLE,
                "DIRECTORY_UNAVAILABLE",
                "the node has not yet fetched the directory from the hub",
                retry_after_s=1.0,
            )
        return self.directory

    # -- evidence ---------------------------------------------------------------------------

    def sign_evidence(self, content: bytes) -> pb.Evidence:
        (evidence,) = self.signer.sign_evidence([content])
        return evidence

    # -- authorisation ----------------------------------------------------------------------

    def _authorize(self, context: grpc.aio.ServicerContext, *, read_only: bool = False) -> Access:
        """Who is calling and what they may touch.

        The agency's own back-end clients (and its node identity) are admitted, limited to
        their configured mailboxes; an auditor may read (``read_only`` calls) and nothing else.
        """
        return self._access(peer_certificate(context, self.trust)[1], read_only=read_only)

    def _access(self, identity: Identity, *, read_only: bool = False) -> Access:
        if identity.kind == "auditor":
            if read_only:
                return Access(identity, None)
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "AUDITOR_READ_ONLY",
                f"{identity.uri} may read, not act",
                metadata={"identity": identity.uri},
            )
        if identity.kind not in ("client", "agency") or identity.agency != self.config.agency:
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "NOT_THIS_AGENCY",
                f"{identity.uri} may not use the node of {self.config.agency}",
                metadata={"identity": identity.uri},
            )
        mailboxes = self.config.clients.get(identity.name) if identity.kind == "client" else None
        return Access(identity, mailboxes)

    # -- submission -------------------------------------------------------------------------

    async def _submit(
        self, requests: Sequence[pb.SubmitEnvelopeRequest], access: Access
    ) -> list[pb.Receipt | ChaparError]:
        if not self.in_directory:  # as a suspended sender's: each letter refused
            refused: list[pb.Receipt | ChaparError] = [self._not_in_directory() for _ in requests]
            return await self._retries_answered(requests, refused, access)
        now = dt.datetime.now(dt.UTC)
        if fault := self.signing_certificate_fault(now):  # as the hub would refuse each letter
            refused = [self._signing_certificate_not_valid(fault) for _ in requests]
            return await self._retries_answered(requests, refused, access)
        if self.numbers_unconfirmed is not None:
            raise self._numbers_unconfirmed()
        directory = self._require_directory()
        results: list[pb.Receipt | ChaparError] = []
        valid: list[tuple[int, pb.LetterDraft, pb.Shams | None]] = []
        keys: list[str] = []  # aligned with valid
        # This call's submission, once a letter with a request_id passed its checks: a
        # retry of that letter refused meanwhile waits for it (_retries_answered).
        future: asyncio.Future[list[pb.Receipt | ChaparError]] | None = None
        handed = False
        try:
            for i, request in enumerate(requests):
                try:
                    if len(request.request_id) > 128:
                        raise ChaparError(
                            Code.INVALID_ARGUMENT,
                            "INVALID_REQUEST_ID",
                            "request_id is longer than 128 characters",
                            field_violations=[("request_id", "too long")],
                        )
                    # Not in a request_id (the store's scope mark), as in a letter's text.
                    if CONTROL_CHARACTERS.search(request.request_id):
                        raise ChaparError(
                            Code.INVALID_ARGUMENT,
                            "INVALID_REQUEST_ID",
                            "request_id holds a control character",
                            field_violations=[("request_id", "control character")],
                        )
                    draft = validate_draft(
                        request.draft,
                        sender=self.config.agency,
                        directory=directory,
                        limits=self.config.limits,
                        now=now,
                        documents=self.config.documents,
                    )
                    access.require([draft.sender_mailbox], f"the mailbox {draft.sender_mailbox!r}")
                    parent = None
                    if draft.kind == _STATUS_UPDATE:  # its letter decides its recipients
                        # On a letter to itself this agency is both sides: it asks for a
                        # recall as the sender, reports any other status as a recipient.
                        parent = await self.store.held_letter(
                            format_shams(draft.in_reply_to),
                            received_first=draft.status != _RECALL_REQUESTED,
                        )
                        self._fit_status_update(draft, parent, access, directory)
                    for ref in draft.attachments:
                        await self.require_document(access, ref.sha256, ref.uri)
                    self._check_documents(draft)
                    self._check_quota(draft)
                    self._check_hub_frame(draft)
                    if parent is None and draft.HasField("in_reply_to"):  # a reply's thread
                        parent = await self.store.held_letter(format_shams(draft.in_reply_to))
                        if parent is not None:
                            # Its header will carry the parent's thread root, and tracking
                            # it walks the parent's thread: only a letter the caller may
                            # read, as for a status update (_fit_status_update).
                            access.require(
                                _visible_mailboxes(
                                    parent.direction, parent.header, self.config.agency
                                ),
                                f"the letter {format_shams(draft.in_reply_to)}",
                            )
                    root = _thread_root(parent) if parent is not None else None
                    valid.append((i, draft, root))
                    keys.append(key := request_key(access.identity.uri, request.request_id))
                    if key:
                        if future is None:
                            future = self._unsettled_submission(keys)
                        self._unsettled.setdefault(key, []).append(future)
                    results.append(_PENDING)  # replaced below
                except ChaparError as exc:
                    results.append(exc)
            # The checks' reads are done: nothing is awaited from here to the storing.
            access.still_current()
            if not valid:
                return await self._retries_answered(requests, results, access)
            if future is None:
                future = asyncio.get_running_loop().create_future()
            handed = True
            outcomes = await self._store_letters(
                _Submission(
                    keys,
                    [_request_digest(requests[i]) for i, _, _ in valid],
                    [(draft, root) for _, draft, root in valid],
                    now,
                    future,
                )
            )
        finally:
            if future is not None and not handed:  # nothing of this call will be stored
                future.cancel()
        if len(valid) < len(requests):
            # A refusal of a retry (its sender suspended, its recipient since, its time out
            # of the window...) would deny a letter that was accepted: a known request_id
            # gets its receipt, as a duplicate submission always does. Asked once this
            # call's own letters are stored (their places still _PENDING), so that one
            # waits for no letter of its own.
            results = await self._retries_answered(requests, results, access, count=False)
        accepted: list[tuple[str, str]] = []  # (SHAMS text, request_id)
        for (i, _, _), outcome in zip(valid, outcomes, strict=True):
            results[i] = outcome
            if isinstance(outcome, pb.Receipt):
                accepted.append((outcome.shams_text, requests[i].request_id))
        SUBMIT_REJECTED.inc(sum(isinstance(r, ChaparError) for r in results))
        if accepted and log.isEnabledFor(logging.INFO):
            _log_letters(
                "letters accepted",
                [shams for shams, _ in accepted],
                access,
                [rid for _, rid in accepted],
            )
        return results  # counted at the commit (node.monitor)

    def _unsettled_submission(
        self, keys: list[str]
    ) -> asyncio.Future[list[pb.Receipt | ChaparError]]:
        """A future for a submission whose letters under ``keys`` (filled in as they pass
        their checks) are in ``_unsettled`` until it is done (stored, failed or dropped)."""
        future: asyncio.Future[list[pb.Receipt | ChaparError]] = (
            asyncio.get_running_loop().create_future()
        )

        def settled(done: asyncio.Future[list[pb.Receipt | ChaparError]]) -> None:
            for key in keys:
                if waiting := self._unsettled.get(key):
                    with contextlib.suppress(ValueError):
                        waiting.remove(done)
                    if not waiting:
                        del self._unsettled[key]

        future.add_done_callback(settled)
        return future

    async def _retries_answered(
        self,
        requests: Sequence[pb.SubmitEnvelopeRequest],
        results: list[pb.Receipt | ChaparError],
        access: Access,
        *,
        count: bool = True,
    ) -> list[pb.Receipt | ChaparError]:
        """``results`` with each refusal of a request whose request_id this client used
        before for the same draft replaced by that letter's receipt."""
        asked = [
            (i, request_key(access.identity.uri, r.request_id), _request_digest(r))
            for i, (r, result) in enumerate(zip(requests, results, strict=True))
            if r.request_id and isinstance(result, ChaparError) and result is not _PENDING
        ]
        if asked:
            # Letters under these ids that passed their checks and are being written (a
            # first submission whose answer the caller did not wait for): their commit
            # decides whether there is a receipt to answer with.
            unsettled = {f for _, key, _ in asked for f in self._unsettled.get(key, ())}
            if unsettled:
                await asyncio.wait(unsettled)
            known = await self.store.receipts_of([(key, digest) for _, key, digest in asked])
            results = list(results)
            for (i, _, _), receipt in zip(asked, known, strict=True):
                if receipt is not None:
                    results[i] = receipt
        if count:
            SUBMIT_REJECTED.inc(sum(isinstance(r, ChaparError) for r in results))
        return results

    async def _store_letters(self, submission: _Submission) -> list[pb.Receipt | ChaparError]:
        """Numbers, signs and stores validated letters; returns their receipts (or, for a
        request_id used before for another letter, its refusal).

        Submissions that arrive while an earlier one is being stored wait and are then
        stored together, as one batch under one signature (a group commit for signing):
        at moderate load, when each call or stream frame carries one letter, the hub, the
        recipient and its back-end then verify one signature for many letters. An idle
        node stores a submission at once.
        """
        # A caller cancelled meanwhile (a dropped stream) never reads its outcome: mark it
        # read, so that asyncio does not report an unretrieved exception.
        submission.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append(submission)
        if self._storer is None or self._storer.done():
            self._storer = asyncio.create_task(self._store_waiting())
        return await asyncio.shield(submission.future)

    async def _store_waiting(self) -> None:
        while self._waiting:
            year = self._waiting[0].now.year  # a batch is numbered within one year
            group: list[_Submission] = []
            rest: list[_Submission] = []
            size = 0
            for s in self._waiting:
                if s.now.year == year and (not group or size + len(s.items) <= _MAX_SIGNING_GROUP):
                    group.append(s)
                    size += len(s.items)
                else:
                    rest.append(s)
            self._waiting = rest
            items = [(s, item) for s in group for item in s.items]
            try:
                receipts = await self.store.submit(
                    [rid for s in group for rid in s.request_ids],
                    origin=self.config.agency,
                    domain=pb.SHAMS_DOMAIN_OUTGOING,
                    year=year,
                    build=functools.partial(self._build_nth, items),
                    seal=self._seal_letters,
                    digests=[d for s in group for d in s.digests],
                )
            except Exception as exc:  # each caller gets the failure (nothing was stored)
                for s in group:
                    if not s.future.done():
                        s.future.set_exception(exc)
                continue
            except BaseException:  # cancelled with the node: so are the waiting calls
                for s in [*group, *self._waiting]:
                    s.future.cancel()
                raise
            # Here, at the commit, not in the calls that wait for it: one cancelled
            # meanwhile (its deadline passed) would leave its letters unrelayed until the
            # next submission woke the hub link.
            if any(isinstance(r, pb.Receipt) for r in receipts):
                self.outbox_changed.set()
            start = 0
            for s in group:
                if not s.future.done():
                    s.future.set_result(receipts[start : start + len(s.items)])
                start += len(s.items)

    def _build_nth(
        self,
        items: Sequence[tuple[_Submission, tuple[pb.LetterDraft, pb.Shams | None]]],
        j: int,
        shams: pb.Shams,
    ) -> NewLetter:
        submission, (draft, root) = items[j]
        now = submission.now
        header = build_header(
            draft, sender=self.config.agency, shams=shams, now=now, thread_root=root
        )
        # Messages set field by field, as build_header's (half the cost of keywords).
        envelope = pb.Envelope()  # signed with the batch: seal
        envelope.header = header
        envelope.body = draft.body
        digest = sha256(header)
        content = evidence_message(
            pb.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
            issuer=self.identity.uri,
            shams=shams,
            envelope_sha256=digest,
            recipient="",
            now=now,
        )
        text = format_shams(shams)
        receipt = pb.Receipt()
        receipt.shams.CopyFrom(shams)
        receipt.shams_text = text
        receipt.envelope_sha256 = digest
        # Signed with the batch: seal.
        receipt.evidence.content = content.SerializeToString(deterministic=True)
        return NewLetter(
            text,
            envelope,
            digest,
            [r.agency for r in draft.recipients],
            receipt,
            content,
            draft.sender_mailbox,
            [a.sha256 for a in draft.attachments],
            format_shams(draft.in_reply_to) if draft.kind == _STATUS_UPDATE else "",
        )

    def _seal_letters(self, letters: Sequence[NewLetter]) -> None:
        """Signs a submitted batch: its envelopes as one Merkle batch, then its evidence."""
        self.signer.seal_envelopes([letter.envelope for letter in letters])
        self.signer.seal_evidence([letter.receipt.evidence for letter in letters])

    async def require_document(self, access: Access, digest: bytes, uri: str) -> None:
        """A client limited to some mailboxes may use (attach, and download or stat as
        this node holds it) a document only if it uploaded it or it is attached to a letter
        sent from or delivered to one of those mailboxes, and, for a letter received, the
        node has it from that letter's sender (``NodeStore.may_use_document``); refused
        before anything says whether the node holds it."""
        await self.document_access(access, digest, uri, fetchable=False)

    async def document_access(
        self, access: Access, digest: bytes, uri: str, *, fetchable: bool = True
    ) -> bool:
        """How the caller may have document ``uri`` (of SHA-256 ``digest``): True, from
        this node's store (``require_document``'s rule; every mailbox for a caller not
        limited to some); False, only fetched from its owner, the agency ``uri`` names,
        through the hub, whatever copy this node holds: a letter received into one of its
        mailboxes from that owner attaches it, and the node has not had it from the owner
        yet (a letter names a document by its digest alone, which its sender may know
        without the content). Refused otherwise (and with ``fetchable=False``, when only
        a fetch would do), before anything says whether the node holds it."""
        if access.mailboxes is None:
            return True
        if await self.store.may_use_document(digest, access.identity.name, access.mailboxes):
            return True
        owner, _ = parse_document_uri(uri)
        if (
            fetchable
            and owner != self.config.agency
            and owner in await self.store.document_senders(digest, access.mailboxes)
        ):
            return False
        raise ChaparError(
            Code.PERMISSION_DENIED,
            "MAILBOX_NOT_ALLOWED",
            f"{access.identity.uri} may not use {uri}: it did not upload it, and no letter of"
            " its mailboxes attaches it (a letter received: as its sender's own document,"
            " had from that sender)",
            metadata={"identity": access.identity.uri, "uri": uri},
        )

    def _check_documents(self, draft: pb.LetterDraft) -> None:
        """Every attachment must be in this node's store, with the size the reference says."""
        for i, ref in enumerate(draft.attachments):
            store = self.document_store
            size = store.size(ref.sha256) if store is not None else None
            if store is not None and size is not None and self.config.documents_retention_s:
                store.touch(ref.sha256)  # in use again: document retention counts from now
            if size is None:
                raise ChaparError(
                    Code.NOT_FOUND,
                    "DOCUMENT_NOT_FOUND",
                    f"this node holds no document {ref.uri}; upload it first",
                    metadata={"uri": ref.uri},
                    field_violations=[(f"draft.attachments[{i}].uri", "not in the store")],
                )
            if size != ref.size:
                raise ChaparError(
                    Code.INVALID_ARGUMENT,
                    "DOCUMENT_SIZE_MISMATCH",
                    f"{ref.uri} has {size} bytes, not {ref.size}",
                    metadata={"uri": ref.uri, "size": str(size)},
                    field_violations=[(f"draft.attachments[{i}].size", "differs from the store")],
                )

    async def set_hub_frame_bytes(self, max_frame_bytes: int, *, persist: bool = True) -> None:
        """What the hub's welcome said of the frames it takes (0: nothing); kept in the
        store when it changed (``persist=False``: read from there at start)."""
        changed = max_frame_bytes != self.hub_frame_bytes
        self.hub_frame_bytes = max_frame_bytes
        self.hub_frame_room = frame_room(max_frame_bytes) if max_frame_bytes else None
        self._measure_for_hub = (
            self.hub_frame_room is not None
            and self.config.max_message_bytes + ENVELOPE_EXTRA_BYTES > self.hub_frame_room
        )
        if persist and changed:
            await self.store.save_hub_frame_bytes(max_frame_bytes)

    def _check_hub_frame(self, draft: pb.LetterDraft) -> None:
        """Refuses a letter the hub would refuse whole (larger than its frames): accepted,
        it could never be relayed. Measured only when this node's own limits let such a
        letter through (the hub's max_frame_bytes below them)."""
        if not self._measure_for_hub or self.hub_frame_room is None:
            return
        size = draft.ByteSize() + ENVELOPE_EXTRA_BYTES
        if size > self.hub_frame_room:
            raise ChaparError(
                Code.RESOURCE_EXHAUSTED,
                "LETTER_TOO_LARGE_FOR_HUB",
                f"the letter (about {size} bytes signed) is larger than the hub takes in a"
                f" frame ({self.hub_frame_room} bytes of letters): nothing was stored",
                metadata={"limit": str(self.hub_frame_room), "size": str(size)},
            )

    def _check_quota(self, draft: pb.LetterDraft) -> None:
        """Refuses letters to recipients whose hub queue is full (the hub tells us which)."""
        if not self.full_recipients:
            return
        for recipient in draft.recipients:
            if recipient.agency in self.full_recipients:
                raise ChaparError(
                    Code.RESOURCE_EXHAUSTED,
                    "RECIPIENT_QUEUE_FULL",
                    f"the hub queue of {recipient.agency} is full; retry later",
                    metadata={"agency": recipient.agency},
                    retry_after_s=self.quota_retry_after_s,
                )

    def _fit_status_update(
        self,
        draft: pb.LetterDraft,
        parent: HeldLetter | None,
        access: Access,
        directory: DirectoryView,
    ) -> None:
        """A status update must be about a letter this node holds, one the caller may see,
        and go to the other side of it (filled in when the draft names no recipient)."""
        about = format_shams(draft.in_reply_to)
        if parent is None:
            raise ChaparError(
                Code.NOT_FOUND,
                "IN_REPLY_TO_NOT_FOUND",
                f"no letter {about} at this node: a status update is about a letter it holds",
                metadata={"shams": about},
                field_violations=[("draft.in_reply_to", "not held by this node")],
            )
        me = self.config.agency
        received = parent.direction == _INCOMING
        if parent.header.sender.agency == me and any(
            r.agency == me for r in parent.header.recipients
        ):  # a letter to itself: the status says which side reports, not which copy is here
            received = draft.status != _RECALL_REQUESTED
        mailboxes = _mailboxes_of(_INCOMING if received else _OUTGOING, parent.header, me)
        access.require(mailboxes, f"the letter {about}")
        named = len(draft.recipients)
        fit_status_update(draft, parent.header, sender=me, received=received)
        for i in range(named, len(draft.recipients)):  # filled in: checked as named ones are
            directory.require_recipient(draft.recipients[i].agency, f"draft.recipients[{i}].agency")

    async def SubmitEnvelope(
        self, request: pb.SubmitEnvelopeRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitEnvelopeResponse:
        try:
            access = self._authorize(context)
            (result,) = await self._submit([request], access)
            if isinstance(result, ChaparError):
                raise result
        except ChaparError as exc:
            log.info("submission refused: %s %s", exc.reason, exc.message)
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.SubmitEnvelopeResponse(receipt=result)

    async def _batch(
        self, requests: Sequence[pb.SubmitEnvelopeRequest], access: Access, response: type[S]
    ) -> S:
        """A batch's answer: a ``response`` whose results are its letters' outcomes, in order.
        Each result is made in its place in the response (one made first and then put in
        the response would be copied there, its receipt with it)."""
        if len(requests) > _MAX_BATCH:
            raise ChaparError(
                Code.RESOURCE_EXHAUSTED,
                "BATCH_TOO_LARGE",
                f"at most {_MAX_BATCH} letters per batch",
                metadata={"limit": str(_MAX_BATCH)},
            )
        results = await self._submit(requests, access)
        out = response()
        add = out.results.add
        for request, result in zip(requests, results, strict=True):
            made = add()  # set field by field: keywords cost about twice as much
            made.request_id = request.request_id
            if isinstance(result, ChaparError):
                made.error.CopyFrom(to_submit_error(result))
            else:
                made.receipt.CopyFrom(result)
        return out

    async def BatchSubmitEnvelopes(
        self, request: pb.BatchSubmitEnvelopesRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchSubmitEnvelopesResponse:
        try:
            access = self._authorize(context)
            return await self._batch(request.requests, access, pb.BatchSubmitEnvelopesResponse)
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc

    async def StreamSubmitEnvelopes(  # type: ignore[override]  # answers via context.write
        self,
        request_iterator: AsyncIterator[pb.StreamSubmitEnvelopesRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._answer_frames(
            request_iterator,
            context,
            lambda frame, access: self._batch(
                frame.requests, access, pb.StreamSubmitEnvelopesResponse
            ),
            lambda response: response,
        )

    # -- inbox ------------------------------------------------------------------------------

    async def StreamInbox(  # type: ignore[override]  # answers via context.write
        self, request: pb.StreamInboxRequest, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            stream = self._open_stream(context)
            # Checked and normalised as a draft's mailboxes are, which is how letters
            # store them: a decomposed spelling names the same mailbox.
            mailbox = normalise_text(
                request.mailbox,
                "mailbox",
                max_chars=self.config.limits.max_mailbox_chars,
                required=False,
            )
            if mailbox:
                stream.access.require([mailbox], f"the mailbox {mailbox!r}")
        except ChaparError as exc:
            await abort(context, exc)
            return
        # The stream's headers go now, not with its first letter: a client learns that its
        # stream is admitted and open (``inbox(on_open=...)``), even on an empty inbox.
        await context.send_initial_metadata(())
        with self._registered(stream):
            await self._send_inbox(mailbox, context, stream)
        if stream.refused is not None:
            await abort(context, stream.refused)

    async def _send_inbox(
        self, mailbox: str, context: grpc.aio.ServicerContext, stream: _OpenStream
    ) -> None:
        access = stream.access
        cursor = 0
        more = True  # a new stream reads at once
        signal = self._inbox_signal
        closing = asyncio.create_task(stream.ended.wait())
        try:
            while not stream.ended.is_set():
                if not more:
                    # Until a letter is stored after the last read began (its signal is the
                    # one taken before that read, so none is missed).
                    changed = asyncio.create_task(signal.wait())
                    await asyncio.wait({changed, closing}, return_when=asyncio.FIRST_COMPLETED)
                    changed.cancel()
                    more = True
                    continue
                signal = self._inbox_signal
                rows = await self.store.unacked_inbox(cursor, _INBOX_BATCH, _INBOX_FRAME_BYTES)
                more = rows.more
                if not rows:
                    continue
                cursor = rows[-1][0]
                letters = []
                # Each letter with the mailboxes of it that have not acknowledged it: a
                # stream shows it while one of those it reads is among them.
                for _, shams, unread, envelope, delivery, received_at in rows:
                    boxes = unread.split("\n")
                    if (mailbox and mailbox not in boxes) or not access.may_see(boxes):
                        continue
                    # The stored envelope and evidence are spliced in as they are.
                    fields = pb.InboxLetter(shams=parse_shams(shams), shams_text=shams)
                    set_timestamp(
                        fields.receive_time, dt.datetime.fromtimestamp(received_at, dt.UTC)
                    )
                    letters.append(
                        b"".join(
                            (
                                fields.SerializeToString(),
                                _INBOX_ENVELOPE.one(envelope),
                                _INBOX_DELIVERY.one(delivery),
                            )
                        )
                    )
                # Not a page read as a revocation or a reload's new mailboxes landed.
                if letters and stream.current:
                    await context.write(_INBOX_LETTERS.many(letters))
        finally:
            closing.cancel()

    def notify_inbox(self) -> None:
        signal, self._inbox_signal = self._inbox_signal, asyncio.Event()
        signal.set()

    async def AckEnvelope(
        self, request: pb.AckEnvelopeRequest, context: grpc.aio.ServicerContext
    ) -> pb.AckEnvelopeResponse:
        try:
            access = self._authorize(context)
            (evidence,) = await self._acknowledge_many([request.shams], access)
            if isinstance(evidence, ChaparError):
                raise evidence
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.AckEnvelopeResponse(evidence=evidence)

    async def BatchAckEnvelopes(  # type: ignore[override]  # answers a serialised response
        self, request: pb.BatchAckEnvelopesRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            access = self._authorize(context)
            results = await self._ack_batch(request.shams, access)
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        return _BATCH_ACK_RESULTS.many(results)

    async def StreamAckEnvelopes(  # type: ignore[override]  # answers via context.write
        self,
        request_iterator: AsyncIterator[pb.StreamAckEnvelopesRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._answer_frames(
            request_iterator,
            context,
            lambda frame, access: self._ack_batch(frame.shams, access),
            _STREAM_ACK_RESULTS.many,
        )

    async def _answer_frames(
        self,
        frames: AsyncIterator[F],
        context: grpc.aio.ServicerContext,
        handle: Callable[[F, Access], Coroutine[Any, Any, R]],
        respond: Callable[[R], object],
    ) -> None:
        """A stream of batches from an authorised client, each answered in order. It ends
        when the node stops, as inbox streams do, once the batches it has read are
        answered: a back-end keeps such a stream open for as long as it runs, and would
        otherwise hold the stop for its whole grace period. The SDK raises Unavailable for
        batches not read, which go again (request ids; acknowledgements are idempotent)."""
        try:
            stream = self._open_stream(context)
        except ChaparError as exc:
            await abort(context, exc)
            return

        async def handled(frame: F) -> R:
            if stream.refused is not None:  # read before the revocation, not yet handled
                raise stream.refused
            return await handle(frame, stream.access)

        with self._registered(stream):
            await _answer_in_order(frames, handled, respond, context, stream.ended)
        if stream.refused is not None:
            await abort(context, stream.refused)

    def _open_stream(
        self, context: grpc.aio.ServicerContext, *, read_only: bool = False
    ) -> _OpenStream:
        """An authorised back-end stream, with the certificate it was admitted with."""
        certificate, identity = peer_certificate(context, self.trust)
        return _OpenStream(self._access(identity, read_only=read_only), certificate)

    @contextlib.contextmanager
    def _registered(self, stream: _OpenStream) -> Iterator[None]:
        """Keeps ``stream`` where a stop or a revocation can end it, while it runs."""
        self._streams[stream] = stream.certificate
        if self.closing.is_set():
            stream.ended.set()
        try:
            yield
        finally:
            del self._streams[stream]

    async def _ack_batch(self, numbers: Sequence[pb.Shams], access: Access) -> list[bytes]:
        """One acknowledgement batch's results, each a serialised AckResult; ChaparError
        when the batch is too large."""
        if len(numbers) > _MAX_ACK_BATCH:  # a size limit, as for a submission batch
            raise ChaparError(
                Code.RESOURCE_EXHAUSTED,
                "BATCH_TOO_LARGE",
                f"at most {_MAX_ACK_BATCH} letters per acknowledgement batch",
                metadata={"limit": str(_MAX_ACK_BATCH)},
            )
        outcomes = await self._acknowledge_many(numbers, access)
        return [
            pb.AckResult(error=to_submit_error(o)).SerializeToString()
            if isinstance(o, ChaparError)
            else _ACK_EVIDENCE.one(o.SerializeToString())
            for o in outcomes
        ]

    async def _acknowledge_many(
        self, numbers: Sequence[pb.Shams], access: Access
    ) -> list[pb.Evidence | ChaparError]:
        """HANDOVER evidence per number, or why not: one read, one signature, one job."""
        texts: list[str | ChaparError] = []
        for number in numbers:
            try:
                texts.append(self._shams_of(number))
            except ChaparError as exc:
                texts.append(exc)
        entries = await self.store.inbox_entries([t for t in texts if isinstance(t, str)])
        access.still_current()  # nothing is awaited from here to the storing
        outcomes: list[pb.Evidence | ChaparError | str] = []
        contents: dict[str, bytes] = {}  # numbers to hand over now, once each
        # Numbers handed over before that mailboxes of this caller's have not acknowledged
        # yet (a letter to several mailboxes, one's limited client acknowledged): marked
        # now, with the evidence they have.
        marked: dict[str, pb.Evidence] = {}
        now = dt.datetime.now(dt.UTC)
        for text in texts:
            if isinstance(text, ChaparError):
                outcomes.append(text)
                continue
            entry = entries.get(text)
            if entry is None:
                outcomes.append(letter_not_found(text, "in the inbox"))
                continue
            boxes, header_bytes, evidence, unread = entry
            try:
                access.require(boxes, f"the letter {text}")
            except ChaparError as exc:
                outcomes.append(exc)
                continue
            if evidence is not None:  # acknowledged before: the same evidence again
                if unread and access.may_see(unread):  # and now for this caller's too
                    marked[text] = evidence
                    outcomes.append(text)
                else:
                    outcomes.append(evidence)
                continue
            if text not in contents:
                contents[text] = evidence_content(
                    pb.EVIDENCE_EVENT_HANDOVER,
                    issuer=self.identity.uri,
                    shams=pb.EnvelopeHeader.FromString(header_bytes).shams,
                    envelope_sha256=sha256(header_bytes),
                    recipient=self.config.agency,
                    now=now,
                )
            outcomes.append(text)
        issued: dict[str, pb.Evidence] = {}
        if contents or marked:
            signed = self.signer.sign_evidence(list(contents.values())) if contents else []
            items = [*zip(contents, signed, strict=True), *marked.items()]
            stored = await self.store.record_handovers(
                items,
                # At the commit, even if this call is cancelled meanwhile (its deadline):
                # a retry finds the handover stored and would not wake the hub link.
                on_commit=lambda _: self.receipts_changed.set(),
                # A client limited to some mailboxes acknowledges for those only: the
                # letter stays in the streams of its other mailboxes until they have it.
                mailboxes=[access.mailboxes] * len(items) if access.mailboxes is not None else (),
            )
            handed: list[str] = []
            for (text, mine), standing in zip(items, stored, strict=True):
                issued[text] = standing
                if standing is mine and text in contents:  # issued now, not concurrently
                    handed.append(text)
            if handed and log.isEnabledFor(logging.INFO):
                _log_letters("letters handed over", handed, access)
        return [issued[o] if isinstance(o, str) else o for o in outcomes]

    @staticmethod
    def _shams_of(shams: pb.Shams) -> str:
        from node.core.letters import validate_shams

        validate_shams(shams, "shams")
        return format_shams(shams)

    async def GetEnvelope(
        self, request: pb.GetEnvelopeRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEnvelopeResponse:
        try:
            access = self._authorize(context, read_only=True)
            shams = self._shams_of(request.shams)
            letter = await self.store.letter(shams)
            if letter is None:
                raise letter_not_found(shams, "at this node")
            header = pb.EnvelopeHeader.FromString(letter.envelope.header)
            access.require(
                _visible_mailboxes(letter.direction, header, self.config.agency),
                f"the letter {shams}",
            )
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        # The linked updates the caller could GetEnvelope itself: each by the mailboxes it
        # belongs to (its sender's if sent, its addressees' here if received), as a letter.
        updates: list[pb.Envelope] = []
        headers: list[pb.EnvelopeHeader] = []
        for update in letter.status_updates:
            update_header = pb.EnvelopeHeader.FromString(update.envelope.header)
            if access.may_see(
                _visible_mailboxes(update.direction, update_header, self.config.agency)
            ):
                updates.append(update.envelope)
                headers.append(update_header)
        key_ids = [
            letter.envelope.signature.key_id,
            *(e.signature.key_id for e in letter.evidence),
            *(u.signature.key_id for u in updates),
        ]
        certs = await self.store.certificates(key_ids)
        if self.directory is not None:
            certs.extend(self.directory.message.intermediate_certificates)
        reported = latest_statuses(headers)  # of those shown: the verifier checks it so
        return pb.GetEnvelopeResponse(
            envelope=letter.envelope,
            direction=letter.direction,
            evidence=letter.evidence,
            certificates=certs,
            body_purged=letter.body_purged,
            statuses=[
                pb.RecipientStatus(
                    agency=a,
                    state=pb.DeliveryState.ValueType(s),
                    business_status=pb.BusinessStatus.ValueType(reported.get(a, 0)),
                )
                for a, s in letter.statuses.items()
            ],
            status_updates=updates,
        )

    async def TrackCorrespondence(
        self, request: pb.TrackCorrespondenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrackCorrespondenceResponse:
        """The hub's correspondence tree around a letter this agency holds, asked with the
        node's identity, less what a mailbox-limited caller may not read."""
        try:
            access = self._authorize(context, read_only=True)
            shams = self._shams_of(request.shams)
            held = await self.store.held_letter(shams)
            if held is None:
                raise letter_not_found(shams, "at this node")
            access.require(
                _visible_mailboxes(held.direction, held.header, self.config.agency),
                f"the letter {shams}",
            )
            answer = await self._hub_track(request.shams, context.time_remaining())
            letters = list(answer.letters)
            certificates = list(answer.certificates)
            if access.mailboxes is not None:
                letters = [await self._as_visible(letter, access) for letter in letters]
                certificates = self._certificates_of(letters, certificates)
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.TrackCorrespondenceResponse(
            letters=letters, certificates=certificates, truncated=answer.truncated
        )

    def _certificates_of(
        self, letters: Sequence[pb.TrackedLetter], offered: Sequence[bytes]
    ) -> list[bytes]:
        """Of the hub's ``offered`` certificates, those of the signers of what ``letters``
        show, and the CAs; then the hub's: a signer of a letter redacted here is no one's
        business (its certificate names the agency it is)."""
        signers = {
            kid
            for letter in letters
            for kid in (
                *([letter.envelope.signature.key_id] if letter.HasField("envelope") else []),
                *(e.signature.key_id for e in letter.evidence),
            )
        }
        kept = [der for der in offered if sha256(der) in signers or _is_ca(der)]
        if self.directory is not None:
            kept.extend(self.directory.message.hub_signing_certificates)
        return list(dict.fromkeys(kept))

    async def _hub_track(self, shams: pb.Shams, remaining: float | None) -> pb.TrackResponse:
        """``HubService.Track`` on the hub link's channel, within the caller's deadline."""
        stub = self.hub_link.stub if self.hub_link is not None else None
        if stub is None:
            raise hub_unavailable("the node is not connected to the hub")
        timeout = _TRACK_TIMEOUT_S if remaining is None else min(_TRACK_TIMEOUT_S, remaining)
        try:
            response: pb.TrackResponse = await stub.Track(
                pb.TrackRequest(shams=shams), timeout=max(0.0, timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _HUB_GONE:
                raise hub_unavailable(f"the hub did not answer ({exc.code().name})") from exc
            error = from_rpc_error(exc)
            raise ChaparError(
                code_of(exc.code(), Code.INTERNAL),
                error.reason or "HUB_ERROR",
                f"the hub: {error.message}",
                metadata=error.metadata,
                field_violations=error.field_violations,
            ) from exc
        return response

    async def _as_visible(self, letter: pb.TrackedLetter, access: Access) -> pb.TrackedLetter:
        """``letter`` as a mailbox-limited client may see it: as GetEnvelope would let it,
        by the header the hub's answer carries or this node holds; redacted otherwise."""
        if letter.redacted:
            return letter
        header: pb.EnvelopeHeader | None = None
        direction = _INCOMING
        if letter.HasField("envelope"):
            with contextlib.suppress(DecodeError):
                header = pb.EnvelopeHeader.FromString(letter.envelope.header)
                if header.sender.agency == self.config.agency:
                    direction = _OUTGOING
        else:
            with contextlib.suppress(ValueError):
                held = await self.store.held_letter(format_shams(letter.shams))
                if held is not None:
                    header, direction = held.header, held.direction
        if header is not None and access.may_see(
            _visible_mailboxes(direction, header, self.config.agency)
        ):
            return letter
        redacted = pb.TrackedLetter(shams=letter.shams, redacted=True)
        if letter.HasField("in_reply_to"):
            redacted.in_reply_to.CopyFrom(letter.in_reply_to)
        return redacted

    async def ListAgencies(
        self, request: pb.ListAgenciesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgenciesResponse:
        try:
            self._authorize(context, read_only=True)
            directory = self._require_directory()
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        return pb.ListAgenciesResponse(
            agencies=directory.message.agencies,
            directory_version=directory.version,
            revoked_serials=directory.message.revoked_serials,
            revocations=directory.message.revocations,
            intermediate_certificates=directory.message.intermediate_certificates,
            hub_signing_certificates=directory.message.hub_signing_certificates,
        )


def _is_ca(der: bytes) -> bool:
    """Whether ``der`` is a CA certificate (an intermediate: it names no agency's letter)."""
    try:
        return is_ca(x509.load_der_x509_certificate(der))
    except ValueError:
        return False


def _thread_root(parent: HeldLetter) -> pb.Shams:
    """The first letter of the correspondence a new letter answering ``parent`` joins."""
    header = parent.header
    return header.thread_root if header.HasField("thread_root") else header.shams


def _mailboxes_of(
    direction: pb.LetterDirection.ValueType, header: pb.EnvelopeHeader, agency: str
) -> list[str]:
    """Agency ``agency``'s mailboxes a letter belongs to: its sender's, or its recipients'."""
    if direction == _OUTGOING:
        return [header.sender.mailbox]
    return [r.mailbox for r in header.recipients if r.agency == agency]


def _visible_mailboxes(
    direction: pb.LetterDirection.ValueType, header: pb.EnvelopeHeader, agency: str
) -> list[str]:
    """The mailboxes whose clients may read a letter: ``_mailboxes_of`` its direction, and
    for a letter the agency sent to itself, both sides' (it is in both boxes, and the node
    finds the sent copy first, so its addressees here were refused their own letter)."""
    if header.sender.agency == agency and any(r.agency == agency for r in header.recipients):
        return [
            header.sender.mailbox,
            *(r.mailbox for r in header.recipients if r.agency == agency),
        ]
    return _mailboxes_of(direction, header, agency)
