"""The hub role: directory, store-and-forward relay, evidence routing.

One ``Connect`` stream per agency node. The identity of the node is the SAN URI of its TLS
client certificate; a header or signature speaking for any other agency is a security
violation and ends the stream with PERMISSION_DENIED. Every other fault in a letter is
answered with signed RELAY_REJECTION evidence and nothing is stored.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import HUB_ATTESTATION_PAYLOAD_TYPE, Signer, sha256
from client_sdk.trust import (
    TrustStore,
    VerificationError,
    datetime_of,
    der,
    revocations_of,
    seconds_of,
    set_timestamp,
)
from node.config import (
    MAX_FRAME_LETTERS,
    HubConfig,
    load_hub_config,
    read_certificates,
    read_revocation_file,
)
from node.core.directory import DirectoryView
from node.core.documents import unfetchable_attachment
from node.core.errors import ChaparError, Code, letter_not_found
from node.core.evidence import evidence_content, evidence_message
from node.core.letters import NEEDS_PARENT, quoted_shams, valid_timestamp, validate_shams
from node.core.splice import ENVELOPE_BATCH, EVIDENCE_BATCH, Field
from node.hub_documents import DocumentRelay, document_grants
from node.metrics import (
    EXPIRED,
    HUB_CONNECTED_NODES,
    RELAY_DUPLICATES,
    RELAY_REJECTED,
    RELAYED,
    count_rejection,
    count_verification_failure,
)
from node.reload import NOT_LOADED, RestartOnly, modification_times
from node.rpc.errors import abort
from node.rpc.peer import peer_certificate
from node.storage.hub_store import NOTICES_KEPT_S, HubStore, IncomingLetter, Tree
from node.tasks import (
    BOOKKEEPING_INTERVAL_S,
    LETTER_INTERVAL_S,
    Cadence,
    drain,
    every,
    handle_concurrently,
)

__all__ = ["MAX_RECEIPT_BYTES", "Hub", "build_directory"]

log = logging.getLogger("chapar.hub")
_EXPIRY_PAGE = 500  # queued letters past their expire_time read at a time
# How long past its expire_time a letter pushed to a node that has not answered since waits
# for that node before it expires anyway, with EXPIRY reason DELIVERY_UNCONFIRMED.
UNANSWERED_GRACE_S = 24 * 3600.0
E = pb.EvidenceEvent
_RECEIPT_EVENTS = frozenset(
    {E.EVIDENCE_EVENT_DELIVERY, E.EVIDENCE_EVENT_DELIVERY_FAILURE, E.EVIDENCE_EVENT_HANDOVER}
)
# The most a receipt may hold, serialised with only its known fields (its detail is free
# text): the hub keeps every receipt, and shows it in every Track of its letter. Honest
# details are a line.
MAX_RECEIPT_BYTES = 64 * 1024
_OUT_FRAMES = 16
_PUSH_BATCH = 256
# A deliveries frame stops at this many bytes of envelopes (one letter always goes): well
# under what a node accepts (64 MiB), and large letters are not all read at once.
_PUSH_FRAME_BYTES = 8 * 1024 * 1024
# Frames of one stream handled at once (their store jobs share commits).
_FRAMES_IN_FLIGHT = 8
_MIN_NONCE, _MAX_NONCE = 16, 64  # bytes of a hello's nonce the welcome signs back
_HELLO_WAIT_S = 30.0  # for a node's first frame, once its stream is open
# After a restore of a node, the notices it acknowledged are routed again from this long
# before its copy's time (or hub.clock_skew_s, if more): the copy's time is by its
# machine's clock, ours by ours, and a node that far ahead of ours has its letters taken.
NODE_RESTORE_MARGIN_S = 300.0
# At most once in this long an agency's hello has its notices routed again: each reads all
# the agency's notices kept. A hello asking sooner is refused, and its node asks again.
NODE_RESTORE_EVERY_S = 60.0
# Deliveries and notices go out as stored, spliced into their frames (node.core.splice).
_DELIVERIES = Field(pb.ConnectResponse, "deliveries")
_NOTICES = Field(pb.ConnectResponse, "evidence")


def _existing(path: Path | None) -> Path | None:
    return path if path is not None and path.exists() else None


# What the hub reads once, at start (the server's addresses, options and credentials, its
# store), under the key docs/OPERATIONS.md names: a reload keeps the value running and says
# so (node.reload). Every other key a reload applies; hub.name too, which a reload
# publishes in the directory (a rename announced, OPERATIONS.md) while the hub attests and
# signs as its start's name (self.identity) until a restart.
_RESTART_ONLY = RestartOnly(
    {
        "listen": "hub.listen",
        "database": "hub.database",
        "ready_file": "hub.ready_file",
        "durability": "hub.durability",
        "metrics_listen": "hub.metrics_listen",
        "metrics_tls": "hub.metrics_tls",
        "max_frame_bytes": "hub.max_frame_bytes",
        "keepalive_s": "hub.keepalive_s",
        "tls": "tls",
        "signing": "signing",
    },
    log,
)


def revocation_messages(times: Mapping[str, dt.datetime]) -> list[pb.Revocation]:
    """``Directory.revocations`` for the serials revoked from a time on."""
    out = []
    for serial, since in times.items():
        revocation = pb.Revocation(serial=serial)
        set_timestamp(revocation.since, since)
        out.append(revocation)
    return out


def build_directory(
    config: HubConfig,
    signer: Signer,
    intermediates: Sequence[x509.Certificate],
    *,
    version: int | None = None,
    revoked_serials: Sequence[str] | None = None,
    revocations: Sequence[pb.Revocation] = (),
) -> pb.Directory:
    """The directory message the hub publishes: its configuration plus the revocation file
    (or ``revoked_serials`` and the times of ``revocations``, when given instead).

    The version defaults to the current time in microseconds, so it grows across hub
    restarts too, past the versions a run's reloads (one more each) gave: a node compares
    it for equality, and one restart's version equal to the last run's would leave the
    nodes with the old directory.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    states = {
        "active": pb.AGENCY_STATE_ACTIVE,
        "suspended": pb.AGENCY_STATE_SUSPENDED,
        "retired": pb.AGENCY_STATE_RETIRED,
    }
    if revoked_serials is None:
        revoked_serials, times = read_revocation_file(config.revocation_file)
        revocations = revocation_messages(times)
    directory = pb.Directory(
        version=version if version is not None else time.time_ns() // 1000,
        revoked_serials=revoked_serials,
        revocations=revocations,
        hub=config.identity.uri,
        hub_signing_certificates=[signer.certificate.public_bytes(Encoding.DER)],
        intermediate_certificates=[c.public_bytes(Encoding.DER) for c in intermediates],
    )
    for i, entry in enumerate(config.agencies):
        certs = []
        for j, path in enumerate(entry.signing_certificates):
            for cert in read_certificates(path, f"agencies[{i}].signing_certificates[{j}]"):
                certs.append(cert.public_bytes(Encoding.DER))
        directory.agencies.add(
            code=entry.code,
            display_name=entry.name,
            state=states[entry.state],
            signing_certificates=certs,
        )
    directory.update_time.FromDatetime(dt.datetime.now(dt.UTC))
    return directory


@dataclass(eq=False)
class _Session:
    agency: str
    certificate: x509.Certificate  # the TLS certificate it was admitted with
    # Frames to send: messages, or frames spliced from stored bytes (node.core.splice).
    out: asyncio.Queue[pb.ConnectResponse | bytes] = field(
        default_factory=lambda: asyncio.Queue(_OUT_FRAMES)
    )
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # What the pusher must read again: set when something was stored for this agency (or
    # room freed in its delivery window), cleared when read. A wake without them is cheap.
    queue_dirty: bool = True
    notices_dirty: bool = True
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[str] = field(default_factory=set)
    # Letters of an earlier session's window pushed again on this one (Hub._unanswered).
    repushed: set[str] = field(default_factory=set)
    status_sent: int = -1
    directory_sent: int = 0
    notice_cadence: Cadence = field(init=False)
    delivery_cadence: Cadence = field(init=False)

    def __post_init__(self) -> None:
        self.notice_cadence = Cadence(BOOKKEEPING_INTERVAL_S, self.wake.set)
        self.delivery_cadence = Cadence(LETTER_INTERVAL_S, self.wake.set)


class Hub(pb.HubServiceServicer):
    def __init__(
        self,
        config: HubConfig,
        store: HubStore,
        signer: Signer,
        trust: TrustStore,
        directory: pb.Directory,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # Set, and replaced by a new one, whenever a reload took a configuration.
        self.reloaded = asyncio.Event()
        # What add_servicer enforces on each frame, fixed when the server starts (a reload
        # does not change it): the welcome tells nodes this, not a reloaded value.
        self.max_frame_bytes = config.max_frame_bytes
        self.store = store
        # When this hub's database was restored from a backup (start reads it), else None.
        self.restore: pb.HubRestore | None = None
        self.signer = signer
        self.trust = trust
        self._take_directory(directory)
        self.identity = config.identity
        self._sources = self._source_stamps()
        # The revocation file the serials in force were read from (kept from, while the
        # one configured is missing); None while none has been.
        self._revocations_from = _existing(config.revocation_file)
        self._missing_logged: Path | None = None  # the missing file last logged
        # The hub's signing certificates before the one in use (_keep_earlier_signers).
        self._earlier_signers: list[bytes] = []
        self._sessions: dict[str, _Session] = {}
        # When (monotonic) each agency's notices were last routed again (NODE_RESTORE_EVERY_S).
        self._routed_again: dict[str, float] = {}
        # Letters pushed to an agency on a session that ended before it answered them: its
        # node may have delivered them (its receipt lost with the stream), so they do not
        # expire (for UNANSWERED_GRACE_S); they are pushed again, expired or not, and its
        # node's answer decides (the answer it gave before, or a DELIVERY_FAILURE if it
        # never had the letter and its expire_time has passed). Letters with an expire_time
        # are marked in the queue when pushed, so that a restart knows them too (start).
        self._unanswered: dict[str, set[str]] = {}
        self._depth: dict[str, int] = {}
        self._full: set[str] = set()
        self._status_version = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.documents = DocumentRelay(self)
        trust.revocation_listeners.append(self.end_refused)

    def _take_directory(self, directory: pb.Directory) -> None:
        """Puts ``directory`` in force, its certificates and revoked serials trusted: in
        that order, so that the trust store's listeners (end_refused) see it in force."""
        self.directory = DirectoryView(directory)
        self._trust_directory(directory)

    def _trust_directory(self, directory: pb.Directory) -> None:
        self.trust.add_certificates(directory.intermediate_certificates)
        self.trust.add_certificates(directory.hub_signing_certificates)
        for agency in directory.agencies:
            self.trust.add_certificates(agency.signing_certificates)
        self.trust.set_revoked(*revocations_of(directory.revoked_serials, directory.revocations))

    # -- directory changes without a restart -------------------------------------------------

    def _source_stamps(self) -> tuple[float, ...]:
        return modification_times(self.config_path, self.config.revocation_file)

    def _vanished_revocations(self, config: HubConfig) -> list[str] | None:
        """The running revoked serials when the revocation file configured is missing and
        some file was read before, else None. Either the file they were read from is gone
        (an editor or a tool replacing it, caught mid-way) or the configuration now names
        a file that does not exist (a mistyped path): lifting every revocation on either
        would be the worst reading. They stay in force, with an error logged once, until
        the file configured exists; emptying it, or removing the key, lifts them."""
        path = config.revocation_file
        if path is None or self._revocations_from is None or path.exists():
            self._missing_logged = None
            return None
        kept = list(self.directory.message.revoked_serials)
        if self._missing_logged != path:
            if path == self._revocations_from:
                log.error(
                    "revocation file %s is missing; keeping the %d revoked serials in force",
                    path,
                    len(kept),
                )
            else:
                log.error(
                    "revocation file %s, as configured now, is missing; keeping the %d"
                    " revoked serials read from %s in force until it exists",
                    path,
                    len(kept),
                    self._revocations_from,
                )
            self._missing_logged = path
        return kept

    async def _keep_revocations(self) -> None:
        """At start: the revoked serials in force are kept in the store, so that a restart
        while the configured revocation file is missing (a path mistyped in a reload, a
        file replaced mid-way, which the running hub kept them through) keeps them in
        force, logged, instead of lifting every one. Removing the key, or emptying the
        file, still lifts them: that is the operator's word."""
        path = self.config.revocation_file
        if path is not None and not path.exists():
            kept = await self.store.saved_revocations()
            times = await self.store.saved_revocation_times()
            if kept and not self.directory.message.revoked_serials:
                log.error(
                    "revocation file %s is missing; keeping the %d revoked serials of the"
                    " last run in force until it exists",
                    path,
                    len(kept),
                )
                directory = pb.Directory()
                directory.CopyFrom(self.directory.message)
                directory.revoked_serials[:] = kept
                directory.revocations.extend(revocation_messages(times))
                self._take_directory(directory)
                self._revocations_from = path  # kept from: reloads keep them while missing
                self._missing_logged = path
                return
        await self._save_revocations(self.directory.message)

    async def _save_revocations(self, directory: pb.Directory) -> None:
        await self.store.save_revocations(
            list(directory.revoked_serials),
            {r.serial: datetime_of(r.since) for r in directory.revocations},
        )

    async def _keep_earlier_signers(self) -> None:
        """At start: the hub's signing certificate is kept in the store, and those it
        signed with before (a key renewed with ``chapar pki renew``, then a restart) are
        listed after it in the directory's ``hub_signing_certificates``. Without them the
        evidence the old key signed, in letters' chains here and at every node, would find
        no certificate: an auditor's ``Track`` here, a back-end's ``trust_from_directory``,
        a node that joins later. The old private key is gone; a revoked one is refused by
        the trust stores as any revoked certificate."""
        self._earlier_signers = await self.store.keep_signing_certificate(
            der(self.signer.certificate)
        )
        if self._earlier_signers:
            directory = pb.Directory()
            directory.CopyFrom(self.directory.message)
            directory.hub_signing_certificates.extend(self._earlier_signers)
            self._take_directory(directory)
            log.info(
                "the directory lists %d earlier signing certificates of this hub",
                len(self._earlier_signers),
            )

    async def reload_if_changed(self) -> int:
        """Re-reads the configuration and revocation file when either changed.

        A new directory version is published to every connected node; streams of nodes
        now revoked, suspended or retired are closed. A bad file is logged and ignored
        (the running directory stays).
        """
        stamps = self._source_stamps()
        if stamps == self._sources:
            return 0
        try:
            read = load_hub_config(self.config_path) if self.config_path else self.config
            config = _RESTART_ONLY.kept(read, self.config)
            kept = self._vanished_revocations(config)
            directory = build_directory(
                config,
                self.signer,
                self.trust.intermediates,
                version=self.directory.version + 1,
                revoked_serials=kept,
                revocations=self.directory.message.revocations if kept is not None else (),
            )
            directory.hub_signing_certificates.extend(self._earlier_signers)
        except NOT_LOADED as exc:
            self._sources = stamps  # logged once; read again when a file changes
            log.error("directory not reloaded, keeping version %d: %s", self.directory.version, exc)
            return 0
        self._sources = stamps
        self._revocations_from = _existing(config.revocation_file) or (
            config.revocation_file if kept is not None else None
        )
        _RESTART_ONLY.warn(read, self.config)
        self.config = config
        # The repeating tasks measure the wait under way against their periods as reloaded.
        self.reloaded.set()
        self.reloaded = asyncio.Event()
        for recipient in list(self._depth):  # against the quota as reloaded
            self._update_full(recipient)
        unchanged = pb.Directory()
        unchanged.CopyFrom(directory)
        unchanged.version = self.directory.version
        unchanged.update_time.CopyFrom(self.directory.message.update_time)
        if unchanged == self.directory.message:  # a file touched, or only the quota changed
            return 0
        revocations_changed = (directory.revoked_serials, directory.revocations) != (
            self.directory.message.revoked_serials,
            self.directory.message.revocations,
        )
        self._take_directory(directory)
        if revocations_changed:
            # What a restart keeps in force while the file is missing (_keep_revocations).
            await self._save_revocations(directory)
        log.info(
            "directory version %d: %d agencies, %d revoked serials",
            directory.version,
            len(directory.agencies),
            len(directory.revoked_serials),
        )
        # Taking it ended the sessions and transfers no longer admitted (end_refused).
        for session in list(self._sessions.values()):
            if not session.closed.is_set():
                self._push_unanswered_again(session)
                session.wake.set()
        return 1

    def end_refused(self) -> None:
        """Closes the streams of nodes the directory in force or the trust store's
        revocations no longer admit (revoked, suspended, retired), and ends their document
        transfers: a fetch or push under way would otherwise run to its end (a 1 GiB
        attachment). Called whenever the trust store's revocations are set (every
        directory taken) and when a revocation scheduled for a time comes due
        (node.server)."""
        for session in list(self._sessions.values()):
            if session.closed.is_set():
                continue
            if self.refusal(session.agency, session.certificate) is not None:
                log.warning("closing the stream of %s: no longer admitted", session.agency)
                session.closed.set()
        self.documents.end_refused()

    def refusal(self, agency: str, certificate: x509.Certificate) -> ChaparError | None:
        """Why a call of ``agency``'s node with ``certificate``, admitted before the
        directory in force, would be refused now (what ``_peer`` says to a new call);
        None while it is admitted. The whole chain is checked, as at connection: a revoked
        CA above it counts too."""
        try:
            self.trust.verify_certificate(certificate, "tls")
        except VerificationError as exc:
            return ChaparError(
                Code.UNAUTHENTICATED, exc.reason, f"client certificate refused: {exc}"
            )
        try:
            self.directory.require_sender(agency)
        except ChaparError as exc:
            return exc
        return None

    @property
    def connected(self) -> int:
        return len(self._sessions)

    def queue_depths(self) -> dict[str, int]:
        """Letters queued per recipient as counted for the quotas (a copy, for the metrics)."""
        return dict(self._depth)

    # -- lifecycle of the hub itself ------------------------------------------------------

    async def start(self) -> None:
        """Keeps the revocations in force, loads queue depths and starts the expiry and
        retention loops."""
        await self._keep_revocations()
        await self._keep_earlier_signers()
        self._depth = await self.store.depths()
        mark = await self.store.restore_mark()
        if mark is not None:
            # Told in every welcome: nodes send again what the copy may lack.
            self.restore = pb.HubRestore(
                snapshot_time=timestamp_of(mark.snapshot_time),
                restore_time=timestamp_of(mark.restore_time),
            )
        for recipient in list(self._depth):
            self._update_full(recipient)
        await self._load_unanswered()
        # Their periods are read from the configuration in force, which a reload changes,
        # and a reload wakes a wait under way to measure it again.
        self._tasks = [
            asyncio.create_task(every(period, action, name, lambda: self.reloaded), name=name)
            for period, action, name in (
                (lambda: self.config.expiry_interval_s, self.expire_due, "expiry"),
                (lambda: self.config.purge_interval_s, self.purge, "retention"),
                (lambda: self.config.reload_interval_s, self.reload_if_changed, "reload"),
            )
        ]

    def link_held_letters_later(self) -> asyncio.Task[None]:
        """Links, once, in the background, the letters accepted before the correspondence
        tree (``HubStore.link_held_letters``): it reads every envelope held, bodies and
        all, which on a large hub on a cold disk takes long, so the hub serves meanwhile
        (its ``Track`` says ``links_unknown`` of letters not linked yet). Called once the
        hub serves; stopped with the hub, it resumes at the next start."""
        task = asyncio.create_task(self._link_held_letters(), name="link-held-letters")
        self._tasks.append(task)
        return task

    async def _link_held_letters(self) -> None:
        try:
            linked = await self.store.link_held_letters()
        except Exception:
            log.exception("linking the letters accepted before the correspondence tree failed;"
                          " it resumes at the next start")  # fmt: skip
            return
        if linked:
            log.info("linked %d letters accepted before the correspondence tree", linked)

    async def _load_unanswered(self) -> None:
        """Letters pushed to their node before the hub last stopped and not answered (marked
        in the queue: only those with an expire_time, the others need no answer to be
        kept from expiring): their node may have delivered them."""
        for recipient, shams in await self.store.pushed():
            self._unanswered.setdefault(recipient, set()).add(shams)

    def close_sessions(self) -> None:
        """Ends every Connect stream cleanly (shutdown): nodes reconnect and resend."""
        for session in list(self._sessions.values()):
            session.closed.set()

    async def stop(self) -> None:
        self.close_sessions()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- quotas ---------------------------------------------------------------------------

    def _count(self, recipient: str, delta: int) -> None:
        self._depth[recipient] = max(0, self._depth.get(recipient, 0) + delta)
        self._update_full(recipient)

    def _update_full(self, recipient: str) -> None:
        """Full at the quota; not full again below 90% of it, so the flag does not flap."""
        depth = self._depth.get(recipient, 0)
        quota = self.config.queue_quota
        if recipient not in self._full and depth >= quota:
            self._full.add(recipient)
        elif recipient in self._full and depth < quota * 0.9:
            self._full.discard(recipient)
        else:
            return
        log.warning(
            "queue of %s is %s (%d letters)",
            recipient,
            "full" if recipient in self._full else "no longer full",
            depth,
        )
        self._status_version += 1
        for session in self._sessions.values():
            session.wake.set()

    def _queue_status(self) -> pb.QueueStatus:
        return pb.QueueStatus(
            full_recipients=sorted(self._full),
            retry_after_ms=int(self.config.quota_retry_after_s * 1000),
        )

    # -- expiry and retention -------------------------------------------------------------

    async def expire_due(self) -> int:
        """Issues EXPIRY evidence for every queued letter past its expire_time, a page at a
        time: one page a run fell behind a large backlog expiring at once (100,000 letters
        took 200 runs), its senders told that much later, its queue counted full meanwhile.
        Each page is one write, awaited before the next is read: other tasks (the streams)
        have their turns in between, and a page's evidence (made and signed on the event
        loop) holds them up for about 10 ms (_EXPIRY_PAGE, _expiries)."""
        total = 0
        after = (float("-inf"), 0)
        # Pages of letters being delivered are read past, not stopped at: a recipient whose
        # window is full of expired letters must not hold up every other queue's expiry.
        while True:
            now = dt.datetime.now(dt.UTC)
            rows = await self.store.expired(now.timestamp(), _EXPIRY_PAGE, after)
            if not rows:
                break
            after = rows[-1][4]
            if items := self._expiries(rows, now):
                total += await self._expire(items)
            if len(rows) < _EXPIRY_PAGE:
                break
        if total:
            log.info("expired %d queued letters", total)
        return total

    async def _expire(self, items: Sequence[tuple[str, str, str, pb.Evidence, str]]) -> int:
        """Stores one page's EXPIRY evidence and dequeues its letters; how many were."""
        done = await self.store.expire(items)
        for recipient, shams, *_ in items:
            if unanswered := self._unanswered.get(recipient):
                unanswered.discard(shams)  # expired now, or answered meanwhile
        EXPIRED.inc(len(done))
        for recipient, sender in done:
            self._count(recipient, -1)
            self._wake(sender, notices=True)
        return len(done)

    def _expiries(
        self, rows: Sequence[tuple[str, str, bytes, str, object]], now: dt.datetime
    ) -> list[tuple[str, str, str, pb.Evidence, str]]:
        """EXPIRY evidence for those of ``rows`` not being delivered right now, signed as one
        batch (Merkle trees, one signature each: ``Signer.sign_evidence``), as relay
        evidence is: a signature a letter held the event loop about 30 ms a page of 500,
        the batch about 8 ms (Ed25519 or ECDSA P-256). Each evidence still verifies on its
        own."""
        due: list[tuple[str, str, str, str]] = []
        contents: list[bytes] = []
        for recipient, shams, digest, sender, place in rows:
            session = self._sessions.get(recipient)
            if session is not None and shams in session.inflight:
                continue  # being delivered right now: its receipt decides
            reason, detail = "LETTER_EXPIRED", "not delivered before its expire_time"
            if shams in self._unanswered.get(recipient, ()):
                # Pushed on a stream that ended: its node's answer decides, if it comes.
                expire_at = place[0] if isinstance(place, tuple) else now.timestamp()
                if expire_at + UNANSWERED_GRACE_S > now.timestamp():
                    continue
                reason = "DELIVERY_UNCONFIRMED"
                detail = (
                    "pushed to the recipient's node, which did not answer within"
                    f" {UNANSWERED_GRACE_S:.0f} s of its expire_time"
                )
            content = evidence_message(
                E.EVIDENCE_EVENT_EXPIRY,
                issuer=self.identity.uri,
                shams=parse_shams(shams),
                envelope_sha256=digest,
                recipient=recipient,
                now=now,
                reason=reason,
                detail=detail,
            )
            due.append((recipient, shams, sender, content.evidence_id))
            contents.append(content.SerializeToString(deterministic=True))
        if not contents:
            return []
        signed = self.signer.sign_evidence(contents)
        return [
            (recipient, shams, sender, evidence, evidence_id)
            for (recipient, shams, sender, evidence_id), evidence in zip(due, signed, strict=True)
        ]

    async def purge(self) -> int:
        """Drops envelopes of letters accepted more than retention_s ago that are in no
        queue any more, and notices acknowledged more than NOTICES_KEPT_S ago."""
        now = time.time()
        before = now - self.config.retention_s
        total = await drain(lambda: self.store.purge(before))
        if total:
            log.info("retention: purged %d envelopes", total)
        notices = await drain(lambda: self.store.purge_notices(now - NOTICES_KEPT_S))
        if notices:
            log.info("retention: deleted %d acknowledged notices", notices)
        return total

    def _peer(
        self, context: grpc.aio.ServicerContext, *, active: bool = True
    ) -> tuple[str, x509.Certificate]:
        """The connected node's agency code and TLS certificate, if admitted.

        ``active=False`` admits a suspended or retired agency too (never a revoked
        certificate): it may still read the directory, to learn its own state.
        """
        cert, identity = peer_certificate(context, self.trust)
        if identity.kind != "agency":
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "NOT_AN_AGENCY_NODE",
                f"{identity.uri} is not an agency node",
                metadata={"identity": identity.uri},
            )
        if active:
            self.directory.require_sender(identity.agency)
        elif self.directory.agency(identity.agency) is None:
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "UNKNOWN_SENDER",
                f"no agency {identity.agency} in the directory",
                metadata={"agency": identity.agency},
            )
        return identity.agency, cert

    async def GetDirectory(
        self, request: pb.GetDirectoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDirectoryResponse:
        try:
            self._peer(context, active=False)
        except ChaparError as exc:
            await abort(context, exc)
        return pb.GetDirectoryResponse(directory=self.directory.message)

    async def Track(
        self, request: pb.TrackRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrackResponse:
        """The correspondence tree around a letter, for a party of it or an auditor."""
        try:
            _, identity = peer_certificate(context, self.trust)
            caller = self._tracker(identity)
            validate_shams(request.shams, "shams")
            shams = format_shams(request.shams)
            # Who may see the tree first, in two indexed reads: no walk for a stranger.
            parties = await self.store.parties(shams)
            if parties is None:
                # An agency learns nothing of another's numbers, not even that one is
                # not taken (which would tell how many letters that agency has sent).
                if caller is None or request.shams.origin == caller:
                    raise letter_not_found(shams, "at the hub")
                raise _not_a_party(caller, shams)
            if caller is not None and caller != parties.sender and caller not in parties.recipients:
                raise _not_a_party(caller, shams)
            tree = await self.store.tree(shams, caller, parties=parties)
            if tree is None:  # letters are never removed: not after the read above
                raise letter_not_found(shams, "at the hub")
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        log.info(
            "correspondence tracked",
            extra={"shams": [shams], "peer": identity.uri, "count": len(tree.letters)},
        )
        return self._tracked(tree)

    def _tracker(self, identity: Identity) -> str | None:
        """Who may track: an agency in the directory (whatever its state: it may read its
        past letters), by its code; an auditor, None (it sees everything)."""
        if identity.kind == "auditor":
            return None
        if identity.kind != "agency":
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "NOT_AN_AGENCY_NODE",
                f"{identity.uri} is neither an agency node nor an auditor",
                metadata={"identity": identity.uri},
            )
        if self.directory.agency(identity.agency) is None:
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "UNKNOWN_SENDER",
                f"no agency {identity.agency} in the directory",
                metadata={"agency": identity.agency},
            )
        return identity.agency

    def _tracked(self, tree: Tree) -> pb.TrackResponse:
        """``tree`` (as the store read it for its caller) as an answer, with the
        certificates of the signers of what it shows, and no others."""
        response = pb.TrackResponse(truncated=tree.truncated)
        key_ids: dict[bytes, None] = {}
        for letter in tree.letters:
            tracked = response.letters.add(shams=parse_shams(letter.shams))
            if letter.in_reply_to is not None:
                tracked.in_reply_to.CopyFrom(parse_shams(letter.in_reply_to))
            if letter.redacted:  # the store left it its number and its followed link
                tracked.redacted = True
                continue
            tracked.sender = letter.sender
            tracked.recipients.extend(letter.recipients)
            tracked.kind = pb.LetterKind.ValueType(letter.kind or 0)
            tracked.status = pb.BusinessStatus.ValueType(letter.status)
            tracked.links_unknown = letter.kind is None
            tracked.accept_time.CopyFrom(timestamp_of(letter.accepted_at))
            if letter.envelope is not None:
                tracked.envelope.CopyFrom(letter.envelope)
                key_ids[letter.envelope.signature.key_id] = None
            tracked.evidence.extend(letter.evidence)
            key_ids.update((e.signature.key_id, None) for e in letter.evidence)
        certificates: dict[bytes, None] = {}
        for kid in key_ids:
            cert = self.trust.certificate(kid)
            if cert is not None:
                certificates[der(cert)] = None
        message = self.directory.message
        certificates.update((c, None) for c in message.hub_signing_certificates)
        certificates.update((c, None) for c in message.intermediate_certificates)
        response.certificates.extend(certificates)
        return response

    async def FetchDocument(  # type: ignore[override]  # answers via context.write
        self, request: pb.FetchDocumentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self.documents.fetch(request, context)

    async def PushDocument(
        self,
        request_iterator: AsyncIterator[pb.PushDocumentRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PushDocumentResponse:
        return await self.documents.push(request_iterator, context)

    async def Connect(  # type: ignore[override]  # answers via context.write
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            agency, certificate = self._peer(context)
            # A node's first frame is its hello, whose nonce the welcome signs back. Then
            # admitted again: a reload while it was awaited (a suspension, a revocation)
            # closes only sessions already registered.
            first = await asyncio.wait_for(anext(request_iterator, None), _HELLO_WAIT_S)
            agency, certificate = self._peer(context)
        except ChaparError as exc:
            await abort(context, exc)
            return
        except TimeoutError:
            await abort(
                context,
                ChaparError(
                    Code.INVALID_ARGUMENT,
                    "HELLO_MISSING",
                    f"a node sends its hello first, within {_HELLO_WAIT_S:g} s",
                ),
            )
            return
        if first is None:
            return
        nonce = b""
        restored: pb.NodeRestore | None = None
        if first.WhichOneof("frame") == "hello":
            nonce = first.hello.nonce
            if first.hello.HasField("node_restore"):
                restored = first.hello.node_restore
                if (refused := self._node_restore_refusal(agency, restored)) is not None:
                    await abort(context, refused)
                    return
        else:  # handled as any frame (a client that sends no hello gets no attestation)
            request_iterator = _after(first, request_iterator)
        old = self._sessions.get(agency)
        if old is not None:
            log.info("node %s reconnected; closing its previous stream", agency)
            old.closed.set()  # its pusher puts nothing more in its window
            self._leave_unanswered(old)
        session = _Session(agency, certificate, directory_sent=self.directory.version)
        self._sessions[agency] = session
        HUB_CONNECTED_NODES.set(len(self._sessions))
        log.info("node %s connected", agency)
        tasks: list[asyncio.Task[object]] = []
        try:  # from here on the session is registered: whatever happens, it is removed
            if restored is not None:
                # Before the welcome, which ends the node's asking, and before this
                # stream's pusher reads the notices from the first.
                await self._route_again(agency, restored)
            welcome = pb.ConnectWelcome(
                hub=self.identity.uri,
                directory_version=self.directory.version,
                # The node moves its counters up to these (a node restored from an older
                # copy would otherwise number letters with numbers taken).
                accepted_sequences=await self.store.accepted_sequences(agency),
                hub_restore=self.restore,
                max_frame_bytes=self.max_frame_bytes,
            )
            if _MIN_NONCE <= len(nonce) <= _MAX_NONCE:
                welcome.attestation.CopyFrom(self._attest(agency, nonce))
            await context.write(pb.ConnectResponse(welcome=welcome))
            reader = asyncio.create_task(self._read(session, request_iterator))
            pusher = asyncio.create_task(self._push(session))
            writer = asyncio.create_task(self._write(session, context))
            closed = asyncio.create_task(session.closed.wait())
            tasks = [reader, pusher, writer, closed]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for ended in (reader, pusher, writer):
                failure = ended.exception() if ended.done() and not ended.cancelled() else None
                if isinstance(failure, ChaparError):
                    log.warning(
                        "closing stream of %s: %s %s", agency, failure.reason, failure.message
                    )
                    await abort(context, failure)
                if failure is not None:
                    raise failure
        finally:
            for pending in tasks:
                pending.cancel()
            self._end_session(session)
            log.info("node %s disconnected", agency)

    def _node_restore_refusal(self, agency: str, restored: pb.NodeRestore) -> ChaparError | None:
        """Why a hello saying ``agency``'s node was restored is refused (a snapshot time
        that is none; its notices routed again less than NODE_RESTORE_EVERY_S ago), or None,
        the routing again then counted as done now."""
        if not valid_timestamp(restored.snapshot_time):
            return ChaparError(
                Code.INVALID_ARGUMENT,
                "INVALID_TIME",
                "hello node_restore.snapshot_time is not a valid time",
            )
        now = time.monotonic()
        since = now - self._routed_again.get(agency, -NODE_RESTORE_EVERY_S)
        if since < NODE_RESTORE_EVERY_S:
            return ChaparError(
                Code.UNAVAILABLE,
                "NODE_RESTORE_TOO_SOON",
                f"this agency's notices were routed again after a restore {since:.0f} s"
                f" ago; a hello saying so again is taken after {NODE_RESTORE_EVERY_S:g} s",
                retry_after_s=NODE_RESTORE_EVERY_S - since,
            )
        self._routed_again[agency] = now
        return None

    async def _route_again(self, agency: str, restored: pb.NodeRestore) -> None:
        """A node restored from a copy: routes again the notices it acknowledged since
        shortly before the copy's time (HubStore.route_again): by NODE_RESTORE_MARGIN_S,
        or clock_skew_s if more, as far as the node's clock may be ahead of ours while we
        take its letters (the copy's time is by its clock)."""
        snapshot = seconds_of(restored.snapshot_time)
        margin = max(NODE_RESTORE_MARGIN_S, self.config.clock_skew_s)
        count = await self.store.route_again(agency, snapshot - margin)
        log.warning(
            "node %s was restored from a copy taken at %s: routing again %d notices it"
            " acknowledged since",
            agency,
            # From the Timestamp, not the float: the last valid instant rounds into year 10000.
            restored.snapshot_time.ToDatetime(dt.UTC).isoformat(timespec="seconds"),
            count,
            extra={"peer": agency, "reason": "NODE_RESTORED", "count": count},
        )

    def _attest(self, agency: str, nonce: bytes) -> pb.HubAttestation:
        """The hub's signed word, for a node's hello, that it is the hub and authenticated
        ``agency`` on this connection (ConnectWelcome.attestation)."""
        content = pb.HubAttestationContent(hub=self.identity.uri, agency=agency, nonce=nonce)
        set_timestamp(content.attest_time, dt.datetime.now(dt.UTC))
        raw = content.SerializeToString()
        return pb.HubAttestation(
            content=raw,
            signature=self.signer.sign(HUB_ATTESTATION_PAYLOAD_TYPE, raw),
            certificates=[der(self.signer.certificate), *map(der, self.trust.intermediates)],
        )

    def _leave_unanswered(self, session: _Session) -> None:
        """A session ending: its window's letters wait for its node's answer."""
        if session.inflight:
            self._unanswered.setdefault(session.agency, set()).update(session.inflight)

    def _end_session(self, session: _Session) -> None:
        session.notice_cadence.close()
        session.delivery_cadence.close()
        agency = session.agency
        if session.inflight:
            self._leave_unanswered(session)
            self._wake(agency, queue=True)  # a session that replaced this one
        if self._sessions.get(agency) is session:
            del self._sessions[agency]
        HUB_CONNECTED_NODES.set(len(self._sessions))

    @staticmethod
    async def _write(session: _Session, context: grpc.aio.ServicerContext) -> None:
        """Sends the session's frames in order; one task for the stream's life."""
        while True:
            await context.write(await session.out.get())

    async def _read(self, session: _Session, frames: AsyncIterator[pb.ConnectRequest]) -> None:
        async def handle(frame: pb.ConnectRequest) -> None:
            kind = frame.WhichOneof("frame")
            if kind == "envelopes":
                results = await self._relay(session.agency, frame.envelopes.envelopes)
                await session.out.put(
                    pb.ConnectResponse(relay_results=pb.EvidenceBatch(evidence=results))
                )
            elif kind == "receipts":
                ids = await self._receipts(session, frame.receipts.evidence)
                await session.out.put(
                    pb.ConnectResponse(receipt_acks=pb.EvidenceAckBatch(evidence_ids=ids))
                )
            elif kind == "evidence_acks":  # rides on the next transaction
                acked = frame.evidence_acks.evidence_ids
                _check_frame_count(session.agency, "evidence ids", len(acked))
                self.store.ack_notices_later(session.agency, acked)

        await handle_concurrently(frames, handle, _FRAMES_IN_FLIGHT)

    # -- relay ----------------------------------------------------------------------------

    def _check_letter(
        self,
        agency: str,
        envelope: pb.Envelope,
        verified: pb.EnvelopeHeader | VerificationError,
    ) -> IncomingLetter:
        """Checks one letter from ``agency``, given what ``TrustStore.verify_envelopes`` said
        of it; ChaparError says why it is refused."""
        signer_cert = self.trust.certificate(envelope.signature.key_id)
        if signer_cert is None:
            raise ChaparError(
                Code.INVALID_ARGUMENT, "SIGNER_UNKNOWN", "the signing key is not in the directory"
            )
        try:
            identity = self.trust.verify_certificate(
                signer_cert, "signing", kid=envelope.signature.key_id
            )
            if identity.agency != agency:
                raise ChaparError(
                    Code.PERMISSION_DENIED,
                    "SENDER_MISMATCH",
                    f"node {agency} sent a letter signed by {identity.uri}",
                    metadata={"node": agency, "signer": identity.uri},
                )
            if isinstance(verified, VerificationError):
                raise verified
            header = verified
        except VerificationError as exc:
            count_verification_failure("envelope", exc.reason)
            code = (
                Code.PERMISSION_DENIED if exc.reason == "SENDER_MISMATCH" else Code.INVALID_ARGUMENT
            )
            raise ChaparError(code, exc.reason, str(exc), metadata={"node": agency}) from exc
        if header.sender.agency != agency:  # verify_envelope ties it to the signer; belt and braces
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "SENDER_MISMATCH",
                f"node {agency} sent a letter from {header.sender.agency}",
            )
        validate_shams(header.shams, "header.shams")
        if header.HasField("in_reply_to"):  # its recipients parse and look it up
            validate_shams(header.in_reply_to, "header.in_reply_to")
        elif header.kind in NEEDS_PARENT:
            # A reply or a status about no letter: a status could be judged against
            # nothing, and either would be delivered looking like a real one, threaded to
            # nothing. Nodes refuse to build one.
            raise ChaparError(
                Code.INVALID_ARGUMENT,
                "MISSING_IN_REPLY_TO",
                "a reply or a status update names the letter it answers (in_reply_to)",
            )
        if header.shams.origin != agency:
            raise ChaparError(
                Code.PERMISSION_DENIED,
                "SENDER_MISMATCH",
                f"node {agency} sent a letter numbered by {header.shams.origin}",
            )
        if not header.recipients:
            raise ChaparError(Code.INVALID_ARGUMENT, "NO_RECIPIENTS", "letter has no recipients")
        if header.attachments and (unfit := unfetchable_attachment(header, agency)):
            raise ChaparError(Code.INVALID_ARGUMENT, *unfit)
        for i, r in enumerate(header.recipients):
            self.directory.require_recipient(r.agency, f"header.recipients[{i}].agency")
        self._check_create_time(header)
        # Stored, relayed and shown as the proto defines it: the signature covers the header
        # bytes alone, so fields unknown to the proto would ride along unsigned (and as
        # large as a frame). Header and body are bytes fields: never encoded again.
        envelope.DiscardUnknownFields()
        return IncomingLetter(
            expire_at=seconds_of(header.expire_time) if header.HasField("expire_time") else None,
            shams=format_shams(header.shams),
            shams_pb=header.shams,
            grants=document_grants(header, agency) if header.attachments else (),
            sender=agency,
            recipients=[r.agency for r in header.recipients],
            envelope=envelope.SerializeToString(),
            envelope_sha256=sha256(envelope.header),
            kind=header.kind,
            in_reply_to=format_shams(header.in_reply_to)
            if header.HasField("in_reply_to")
            else None,
            status=header.status,
        )

    def _check_create_time(self, header: pb.EnvelopeHeader) -> None:
        """The sender's clock may be ahead by clock_skew_s at most; a letter may have waited
        in an outbox (hub outage) for max_letter_age_s at most."""
        if not header.HasField("create_time"):
            raise ChaparError(
                Code.INVALID_ARGUMENT, "CREATE_TIME_MISSING", "header has no create_time"
            )
        for name in ("create_time", "expire_time"):
            if header.HasField(name) and not valid_timestamp(getattr(header, name)):
                raise ChaparError(
                    Code.INVALID_ARGUMENT, "INVALID_TIME", f"header {name} is not a valid time"
                )
        created = seconds_of(header.create_time)
        now = time.time()
        if created > now + self.config.clock_skew_s or created < now - self.config.max_letter_age_s:
            raise ChaparError(
                Code.INVALID_ARGUMENT,
                "CREATE_TIME_OUT_OF_WINDOW",
                f"create_time is {created - now:+.0f}s from the hub's clock",
                metadata={"offset_s": f"{created - now:.0f}"},
            )

    async def _relay(self, agency: str, envelopes: Sequence[pb.Envelope]) -> list[pb.Evidence]:
        _check_frame_count(agency, "letters", len(envelopes))
        now = dt.datetime.now(dt.UTC)
        # Rejections are signed together, once the frame is judged (one signature, as for
        # the acceptances), and logged in one line.
        rejections: list[pb.Evidence] = []
        rejected: list[tuple[str, str, str]] = []  # reason, number (as quoted), message
        outcomes: list[IncomingLetter | pb.Evidence | list[pb.Evidence]] = []
        refused: dict[int, tuple[ChaparError, pb.Envelope, bytes]] = {}  # and header digest
        for envelope, verified in zip(
            envelopes, self.trust.verify_envelopes(envelopes), strict=True
        ):
            try:
                outcomes.append(self._check_letter(agency, envelope, verified))
            except ChaparError as exc:
                if exc.code == Code.PERMISSION_DENIED:
                    raise
                refused[len(outcomes)] = (exc, envelope, sha256(envelope.header))
                outcomes.append([])  # a rejection, unless it is a letter already accepted
        # The letters go to the store before this handler's first wait: frames are handled
        # concurrently, and a queue keeps the order in which their jobs were handed in
        # (node.tasks.handle_concurrently). Refusals, which may need a look-up, come after.
        letters = [o for o in outcomes if isinstance(o, IncomingLetter)]
        queued: list[str] = []
        fresh: set[str] = set()

        def make_relay(letter: IncomingLetter, recipient: str) -> pb.Evidence:
            queued.append(recipient)  # only called for letters stored now, not duplicates
            fresh.add(letter.shams)
            content = evidence_content(
                pb.EVIDENCE_EVENT_RELAY_ACCEPTANCE,
                issuer=self.identity.uri,
                shams=letter.shams_pb or parse_shams(letter.shams),
                envelope_sha256=letter.envelope_sha256,
                recipient=recipient,
                now=now,
            )
            return pb.Evidence(content=content)  # signed with the batch: seal_evidence

        def committed(kept: list[list[pb.Evidence]]) -> None:
            # At the commit, in the event loop, even if this frame's handler was cancelled
            # meanwhile (its node reconnected): the queue depths and the pushes to the
            # recipients follow what was stored, not who was still waiting for it.
            RELAYED.inc(len(queued))  # counted with what was stored, as the depths
            for recipient in queued:
                self._count(recipient, +1)
            for letter, relays in zip(letters, kept, strict=True):
                if relays:
                    for r in letter.recipients:
                        self._wake(r, queue=True)

        stored = iter(
            await self.store.accept(
                letters, make_relay, self.signer.seal_evidence, on_commit=committed
            )
            if letters
            else []
        )
        if refused:
            # A letter sent again because the answer to it was lost is judged by what held
            # when it was accepted: since then it may have aged out of the window, its
            # signer's certificate expired or its recipient been suspended. It stays
            # accepted; a rejection now would contradict the evidence already signed.
            quoted = {at: quoted_shams(e, agency) for at, (_, e, _) in refused.items()}
            kept = await self.store.accepted_relays(
                agency, [(quoted[at], digest) for at, (_, _, digest) in refused.items()]
            )
            for at, (error, _, digest) in refused.items():
                relays = kept.get(digest)
                if relays:
                    outcomes[at] = relays
                    continue
                count_rejection(error.code.name, error.reason)
                shams = quoted[at]
                rejected.append((error.reason, _shams_text(shams), error.message))
                outcomes[at] = rejection = pb.Evidence(
                    content=evidence_content(
                        E.EVIDENCE_EVENT_RELAY_REJECTION,
                        issuer=self.identity.uri,
                        shams=shams,
                        envelope_sha256=digest,
                        recipient="",
                        now=now,
                        reason=error.reason,
                        detail=error.message,
                    )
                )
                rejections.append(rejection)
        RELAY_REJECTED.inc(sum(isinstance(o, pb.Evidence) for o in outcomes))
        results: list[pb.Evidence] = []
        relayed: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, list):  # accepted before: sent again
                RELAY_DUPLICATES.inc()
                results.extend(outcome)
                continue
            if not isinstance(outcome, IncomingLetter):
                results.append(outcome)
                continue
            relays = next(stored)
            if not relays:  # the number is taken by a different letter: a replay or a forgery
                count_rejection(Code.ALREADY_EXISTS.name, "SHAMS_REUSED")
                RELAY_REJECTED.inc()
                detail = "another letter already carries this number"
                rejected.append(("SHAMS_REUSED", outcome.shams, detail))
                rejection = pb.Evidence(
                    content=evidence_content(
                        E.EVIDENCE_EVENT_RELAY_REJECTION,
                        issuer=self.identity.uri,
                        shams=parse_shams(outcome.shams),
                        envelope_sha256=outcome.envelope_sha256,
                        recipient="",
                        now=now,
                        reason="SHAMS_REUSED",
                        detail=detail,
                    )
                )
                rejections.append(rejection)
                results.append(rejection)
                continue
            results.extend(relays)
            if outcome.shams in fresh:
                relayed.append(outcome.shams)
            else:
                RELAY_DUPLICATES.inc()
        if rejections:
            self.signer.seal_evidence(rejections)  # in place: they are in results
            _log_rejected(agency, rejected)
        if relayed and log.isEnabledFor(logging.INFO):  # one line per frame, not per letter
            log.info(
                "letters relayed", extra={"shams": relayed, "count": len(relayed), "peer": agency}
            )
        return results

    # -- receipts from recipients -----------------------------------------------------------

    async def _receipts(self, session: _Session, evidence: Sequence[pb.Evidence]) -> list[str]:
        agency = session.agency
        _check_frame_count(agency, "receipts", len(evidence))
        valid: list[tuple[pb.Evidence, pb.EvidenceContent, str]] = []
        ids: list[str] = []
        refused: list[tuple[str, str]] = []  # (reason, message): one log line a frame
        for item, content in zip(evidence, self.trust.verify_evidence_many(evidence), strict=True):
            # Kept as the hub stores, routes and shows it: only what the proto defines (the
            # signature covers the content alone, so fields unknown to it, kept by a parse
            # and serialised again, would ride along unsigned and unbounded).
            item.DiscardUnknownFields()
            if item.ByteSize() > MAX_RECEIPT_BYTES:
                # Stored for good and shown in every Track of its letter: a recipient may
                # not make a letter's record grow by megabytes a receipt.
                refused.append(("EVIDENCE_TOO_LARGE", f"over {MAX_RECEIPT_BYTES} bytes"))
                count_rejection(Code.INVALID_ARGUMENT.name, "EVIDENCE_TOO_LARGE")
                self._unverified_receipt(session, item)
                continue
            if isinstance(content, VerificationError):
                count_verification_failure("evidence", content.reason)
                refused.append((content.reason, str(content)))
                count_rejection(Code.INVALID_ARGUMENT.name, content.reason)
                self._unverified_receipt(session, item)
                continue
            # Verified: acknowledged from here on, taken or refused for good (sending it
            # again would change nothing; one that does not verify may once a key is known).
            ids.append(content.evidence_id)
            try:
                shams = format_shams(content.shams)
            except ValueError:
                refused.append(("INVALID_SHAMS", "it names no valid number"))
                count_rejection(Code.INVALID_ARGUMENT.name, "INVALID_SHAMS")
                continue
            if (
                content.issuer != f"urn:chapar:agency:{agency}"
                or content.recipient != agency
                or content.event not in _RECEIPT_EVENTS
            ):
                refused.append(("RECEIPT_ISSUER_MISMATCH", "about someone else"))
                count_rejection(Code.PERMISSION_DENIED.name, "RECEIPT_ISSUER_MISMATCH")
                continue
            valid.append((item, content, shams))
        if refused:
            _log_refusals("receipts from %s refused: %d receipts", agency, refused)
        if valid:

            def committed(outcome: tuple[list[str], int, list[str]]) -> None:
                # At the commit, even if this handler was cancelled meanwhile: a resent
                # receipt dequeues nothing, so a depth not counted now never would be.
                senders, dequeued, _ = outcome
                for sender in senders:
                    self._wake(sender, notices=True)
                if dequeued:
                    self._count(agency, -dequeued)

            # Refused receipts (logged by the store, which knows why): not answers.
            _, _, strangers = await self.store.record_receipts(
                agency, valid, committed, on_refused=_count_refused_receipts
            )
            answered = {s for _, _, s in valid} - set(strangers)
            session.inflight.difference_update(answered)
            if unanswered := self._unanswered.get(agency):
                unanswered.difference_update(answered)
            for shams in strangers:  # not its answer: as for one that does not verify
                self._leave_window(session, shams)
        # Room in its delivery window: a read the window cut short left queue_dirty set.
        session.wake.set()
        return ids

    def _unverified_receipt(self, session: _Session, item: pb.Evidence) -> None:
        """A receipt that does not verify leaves its letter's place in the delivery window
        (a window of them would stop every delivery to the node), unanswered: it goes again
        on the next stream, when the answer may verify (a key this hub learns on a reload),
        and does not expire meanwhile (its node may hold it); not on this one, whose
        answer would be the same."""
        try:
            shams = format_shams(pb.EvidenceContent.FromString(item.content).shams)
        except (DecodeError, ValueError):
            return
        self._leave_window(session, shams)

    @staticmethod
    def _push_unanswered_again(session: _Session) -> None:
        """After a directory change: letters whose answers did not verify, or that were
        already pushed again on this stream, go again (their answers may verify now)."""
        if session.repushed:
            session.repushed.clear()
            session.queue_dirty = True

    def _leave_window(self, session: _Session, shams: str) -> None:
        """A letter in the window whose answer could not be taken: unanswered, not pushed
        again on this stream (unless a reload changes the directory: reload_if_changed)."""
        if shams in session.inflight:
            session.inflight.discard(shams)
            session.repushed.add(shams)
            self._unanswered.setdefault(session.agency, set()).add(shams)

    # -- pushing deliveries and notices -------------------------------------------------------

    async def _unanswered_rows(
        self, session: _Session, limit: int, max_bytes: int
    ) -> list[tuple[int, str, bytes, float | None]]:
        """Up to ``limit`` letters (``max_bytes`` of envelopes, but one always) an earlier
        session of this agency left unanswered and this one has not pushed yet, still
        queued, expired or not (see ``_unanswered``)."""
        unanswered = self._unanswered.get(session.agency)
        if not unanswered:
            return []
        while True:  # until some are still queued (those gone leave the set)
            numbers = sorted(unanswered - session.repushed - session.inflight)[:limit]
            if not numbers:
                return []
            rows, gone = await self.store.queued_of(session.agency, numbers, max_bytes)
            unanswered.difference_update(gone)  # answered, or expired
            if rows or not gone:
                break
        session.queue_dirty |= len(numbers) == limit or rows.more
        # Past its grace a letter is the expiry loop's (which may be expiring it now): not
        # pushed, nor read again on this stream.
        late = time.time() - UNANSWERED_GRACE_S
        session.repushed.update(r[1] for r in rows if r[3] is not None and r[3] <= late)
        return [r for r in rows if r[1] not in session.inflight and (r[3] is None or r[3] > late)]

    def _wake(self, agency: str, *, queue: bool = False, notices: bool = False) -> None:
        session = self._sessions.get(agency)
        if session is not None:
            session.queue_dirty |= queue
            session.notices_dirty |= notices
            session.wake.set()

    async def _push(self, session: _Session) -> None:
        last_queue = 0
        last_notice = 0
        window = self.config.delivery_window
        while True:
            session.wake.clear()
            sent = False
            if session.directory_sent != self.directory.version:
                session.directory_sent = self.directory.version
                await session.out.put(
                    pb.ConnectResponse(
                        directory_update=pb.DirectoryUpdate(version=self.directory.version)
                    )
                )
            if session.status_sent != self._status_version:
                session.status_sent = self._status_version
                await session.out.put(pb.ConnectResponse(queue_status=self._queue_status()))
            room = window - len(session.inflight)
            if room > 0 and session.queue_dirty and session.delivery_cadence.ready():
                session.queue_dirty = False
                room_bytes = _PUSH_FRAME_BYTES
                again = await self._unanswered_rows(session, min(room, _PUSH_BATCH), room_bytes)
                if again:
                    # In the window now, so that the page below does not carry them twice.
                    session.repushed.update(r[1] for r in again)
                    session.inflight.update(r[1] for r in again)
                    room -= len(again)
                    room_bytes -= sum(len(r[2]) for r in again)
                    # The queue's turn comes with room.
                    session.queue_dirty |= room <= 0 or room_bytes <= 0
                rows: Sequence[tuple[int, str, bytes, float | None]] = []
                if room > 0 and room_bytes > 0:
                    limit = min(room, _PUSH_BATCH)
                    page = await self.store.queued(session.agency, last_queue, limit, room_bytes)
                    # A frame cut by the window, the batch or its size: read on at once. A
                    # letter stored meanwhile set queue_dirty itself.
                    session.queue_dirty |= page.more
                    if page:
                        last_queue = page[-1][0]
                    # Checked now, not at the read: the expiry loop may have passed over a
                    # letter meanwhile, when it was not yet in the window. Nor twice in it.
                    now = time.time()
                    taken = {r[1] for r in again}  # a receipt may have taken one out meanwhile
                    rows = [
                        r
                        for r in page
                        if (r[3] is None or r[3] > now)
                        and r[1] not in session.inflight
                        and r[1] not in taken
                    ]
                if session.closed.is_set():
                    return  # replaced: its window went to _unanswered, nothing more goes in
                session.inflight.update(r[1] for r in rows)  # those of ``again`` are in it
                if expiring := [r[0] for r in rows if r[3] is not None]:
                    # Marked before it goes: after a restart, it waits for its node's
                    # answer instead of expiring (_load_unanswered).
                    await self.store.mark_pushed(expiring)
                    if session.closed.is_set():
                        return
                rows = [*again, *rows]
                if rows:
                    await session.out.put(_DELIVERIES.one(ENVELOPE_BATCH.many(r[2] for r in rows)))
                    sent = True
                    if not session.queue_dirty:  # a cut frame's rest goes at once
                        session.delivery_cadence.sent()
            notices = []
            if session.notices_dirty and session.notice_cadence.ready():
                session.notices_dirty = False
                notices = await self.store.notices(session.agency, last_notice, _PUSH_BATCH)
                session.notices_dirty |= len(notices) == _PUSH_BATCH
            if notices:
                last_notice = notices[-1][0]
                await session.out.put(_NOTICES.one(EVIDENCE_BATCH.many(n[1] for n in notices)))
                if not session.notices_dirty:  # a full frame's rest goes at once
                    session.notice_cadence.sent()
                sent = True
            if not sent:
                await session.wake.wait()


async def _after(
    first: pb.ConnectRequest, rest: AsyncIterator[pb.ConnectRequest]
) -> AsyncIterator[pb.ConnectRequest]:
    yield first
    async for frame in rest:
        yield frame


def _count_refused_receipts(reason: str, count: int) -> None:
    """Receipts the store refused (HubStore.record_receipts), in chapar_rejections_total."""
    count_rejection(Code.INVALID_ARGUMENT.name, reason, count)


def _check_frame_count(agency: str, what: str, count: int) -> None:
    """A frame from a node carries MAX_FRAME_LETTERS items at most (an honest node's carry
    fewer): the hub checks a frame in one turn of its event loop (or one transaction),
    which every other stream waits for, and a frame of empty items is 2 bytes each."""
    if count > MAX_FRAME_LETTERS:
        raise ChaparError(
            Code.INVALID_ARGUMENT,
            "TOO_MANY_LETTERS",
            f"a frame carries {MAX_FRAME_LETTERS} {what} at most, not {count}",
            metadata={"node": agency, "limit": str(MAX_FRAME_LETTERS)},
        )


def _shams_text(shams: pb.Shams | None) -> str:
    """A quoted number as text for the log ("" when none, or not one of the format)."""
    try:
        return format_shams(shams) if shams is not None else ""
    except ValueError:
        return ""


def _log_rejected(agency: str, rejected: Sequence[tuple[str, str, str]]) -> None:
    """One warning line for a frame's rejected letters (reason, shams, message)."""
    _log_refusals(
        "relay rejected from %s: %d letters",
        agency,
        [(reason, message) for reason, _, message in rejected],
        shams=[shams for _, shams, _ in rejected],
    )


def _log_refusals(
    head: str,
    agency: str,
    refused: Sequence[tuple[str, str]],
    *,
    shams: Sequence[str] | None = None,
) -> None:
    """One warning line for what a frame had refused (reason, message), letters or
    receipts: ``head`` (the agency, the count), the count by reason and the first one's
    message; the letters' numbers, when given, in ``shams``. A line each let a node write
    MAX_FRAME_LETTERS lines into the hub's log with a frame of empty receipts (2 bytes
    each), frame after frame."""
    reasons = collections.Counter(reason for reason, _ in refused)
    reason, message = refused[0]
    extra: dict[str, object] = {"peer": agency, "reason": reason, "count": len(refused)}
    if shams is not None:
        extra["shams"] = list(shams)
    log.warning(
        head + " (%s); first: %s %s",
        agency,
        len(refused),
        ", ".join(f"{r} {n}" for r, n in reasons.most_common()),
        reason,
        message,
        extra=extra,
    )


def _not_a_party(agency: str, shams: str) -> ChaparError:
    return ChaparError(
        Code.PERMISSION_DENIED,
        "NOT_A_PARTY",
        f"{agency} is neither the sender nor a recipient of {shams}",
        metadata={"agency": agency, "shams": shams},
    )


def timestamp_of(seconds: float) -> Timestamp:
    """Unix seconds as a protobuf Timestamp (to the nanosecond a float holds)."""
    ts = Timestamp()
    ts.FromNanoseconds(round(seconds * 1e9))
    return ts
