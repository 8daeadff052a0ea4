"""The node's side of ``HubService.Connect``: one outbound stream, kept up with backoff.

Up the stream go the outbox (in batches, with a bounded number in flight), and the
evidence this node issued as a recipient until the hub acknowledges it. Down come relay
results, letters for this agency (verified, stored once, answered with DELIVERY or
DELIVERY_FAILURE evidence) and evidence about the agency's own letters (stored, then
acknowledged). Everything is persisted before it is acknowledged, so a dropped stream only
means resending: nothing is lost and the stores de-duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError

from client_sdk import pb
from client_sdk.errors import from_rpc_error
from client_sdk.shams import format_shams
from client_sdk.signing import HUB_ATTESTATION_PAYLOAD_TYPE, sha256
from client_sdk.statuses import StatusFault
from client_sdk.trust import (
    TrustStore,
    VerificationError,
    check_attestation,
    seconds_of,
    valid_timestamp,
)
from node.agency import Agency
from node.config import MAX_MESSAGE
from node.core.documents import refused_attachment, senders_documents
from node.core.errors import ChaparError
from node.core.evidence import evidence_content
from node.core.letters import NEEDS_PARENT, quoted_shams, validate_shams
from node.core.splice import ENVELOPE_BATCH, EVIDENCE_BATCH, Field
from node.metrics import HUB_CLOCK_OFFSET, RECONNECTS, count_verification_failure
from node.rpc.wire import serialize
from node.storage.db import fits
from node.storage.node_store import StoredEvidence
from node.tasks import BOOKKEEPING_INTERVAL_S, LETTER_INTERVAL_S, Cadence, handle_concurrently

if TYPE_CHECKING:
    from node.document_store import DocumentStore

__all__ = ["HUB_CLOCK_WARN_S", "HubLink"]

log = logging.getLogger("chapar.link")
T = TypeVar("T")
R = TypeVar("R")
E = pb.EvidenceEvent
_INITIAL_BACKOFF_S = 0.2
# The hub's clock this far from ours (either way) is logged as a warning at each stream:
# the hub refuses letters created more than its clock_skew_s (5 minutes by default) ahead
# of its clock, and the restore margins assume clocks at most 5 minutes apart.
HUB_CLOCK_WARN_S = 60.0
_RECEIPT_BATCH = 256
# Frames from the hub handled at once (their store jobs share commits).
_FRAMES_IN_FLIGHT = 8
# Frames our own sender may have queued before it waits for the writer to catch up.
_QUEUED_FRAMES = 8
_FRAME_MARGIN = 1024 * 1024  # a frame's own fields around its letters
_CONNECT = f"/{pb.HUB_SERVICE.full_name}/Connect"
_RELAY = Field(pb.ConnectRequest, "envelopes")
_RECEIPTS = Field(pb.ConnectRequest, "receipts")
# Receipts in one frame at most.
_RECEIPT_FRAME = 1024
# Failures a newer directory may mend (a signing key or CA added since this node read it:
# a key rotated at another agency, or at the hub), and how often they refetch it at most.
_DIRECTORY_MENDS = frozenset({"SIGNER_UNKNOWN", "CERTIFICATE_UNTRUSTED"})
_REFETCH_EVERY_S = 1.0  # doubled (to _REFETCH_AT_MOST_S) while a fetch brings nothing new
_REFETCH_AT_MOST_S = 300.0
# Routed evidence held back on one stream at most, unacknowledged, to be verified again
# after a directory change (_Session.unmended); more waits for the next stream.
_UNMENDED_HELD = 1024
# A letter that reaches this node later than this past its expire_time is refused
# (LETTER_EXPIRED): the hub pushed it before, on a stream lost before this node answered.
# Within it, clocks that differ a little do not refuse a letter the hub found in time.
_EXPIRY_SKEW_S = 60.0
# The hub's refusal of an agency missing from its directory (node.hub, _peer).
_UNKNOWN_SENDER = "UNKNOWN_SENDER"
# Read once: a status update is linked to its letter as it is stored (NodeStore).
_STATUS_UPDATE = pb.LETTER_KIND_STATUS_UPDATE


class _Refused(Exception):
    """The hub refused this agency: one it does not know (UNKNOWN_SENDER), or suspended or
    retired in the directory it then gave. Logged once, when learnt (Agency)."""


class _NotTheHub(Exception):
    """The server dialled did not prove that it is the hub (ConnectWelcome.attestation)."""


class _HubFault(Exception):
    """The hub ended the stream, or sent a frame that does not parse: the session ends with
    this reason logged (no traceback: nothing of the node's failed), and the link dials again."""


def check_hub_attestation(
    trust: TrustStore,
    welcome: pb.ConnectWelcome,
    agency: str,
    nonce: bytes,
    hub: str | None = None,
) -> str:
    """The hub's identity URI, once its welcome's attestation proves, for ``nonce``, that
    a hub's signing key (chained to this node's roots, not revoked) authenticated
    ``agency`` on this connection; ``_NotTheHub`` says why not. ``hub``: the identity URI
    of the hub this node accepts (``Agency.hub_identity``: its saved directory's, or
    ``node.hub_name``'s); a signing key of any other hub is refused, since the CA may
    certify more than one (a staging hub, a renamed one). None: any hub (trust on first
    use). The certificates it carries go into a store of their own, never this node's."""
    if not welcome.HasField("attestation"):
        raise _NotTheHub("it did not attest that it is the hub (an older hub, or not a hub)")
    attestation = welcome.attestation
    scratch = trust.snapshot()
    try:
        scratch.add_certificates(attestation.certificates)
        identity = scratch.verify_signed(
            HUB_ATTESTATION_PAYLOAD_TYPE, attestation.content, attestation.signature
        )
        content = pb.HubAttestationContent.FromString(attestation.content)
    except VerificationError as exc:
        raise _NotTheHub(f"its attestation does not verify: {exc.reason} {exc}") from exc
    except Exception as exc:  # DER that is no certificate, content that does not parse
        raise _NotTheHub(f"its attestation is malformed: {exc!r}") from exc
    if identity.kind != "hub" or content.hub != identity.uri:
        raise _NotTheHub(f"its attestation is signed by {identity.uri}, not a hub")
    if hub is not None and identity.uri != hub:
        raise _NotTheHub(
            f"its attestation is signed by {identity.uri}, not by {hub}, the hub this node"
            " accepts (the one its directory names, or node.hub_name)"
        )
    if content.agency != agency or content.nonce != nonce:
        raise _NotTheHub(
            f"its attestation is for {content.agency!r} and another hello: relayed from"
            " another connection"
        )
    return identity.uri


def _hub_ahead_s(attestation: pb.HubAttestation) -> float:
    """How far the hub's clock is ahead of this node's (negative: behind), as its welcome's
    signed attest_time says (checked by check_hub_attestation); 0 without a valid one."""
    content = pb.HubAttestationContent.FromString(attestation.content)
    if not content.HasField("attest_time") or not valid_timestamp(content.attest_time):
        return 0.0
    return seconds_of(content.attest_time) - time.time()


def _note_hub_clock(hub_ahead_s: float) -> None:
    """Exports how far the hub's clock is ahead of ours (chapar_node_hub_clock_offset_seconds)
    and warns when it is HUB_CLOCK_WARN_S or more either way."""
    HUB_CLOCK_OFFSET.set(hub_ahead_s)
    if abs(hub_ahead_s) >= HUB_CLOCK_WARN_S:
        log.warning(
            "the hub's clock is %.0f s %s this node's: the hub refuses letters created more"
            " than its clock_skew_s (5 minutes by default) ahead of its clock; set both"
            " machines' clocks by NTP",
            abs(hub_ahead_s),
            "ahead of" if hub_ahead_s > 0 else "behind",
            extra={"reason": "HUB_CLOCK_OFFSET"},
        )


class HubLink:
    def __init__(self, agency: Agency, credentials: grpc.ChannelCredentials) -> None:
        self.agency = agency
        self.credentials = credentials
        self.connected = asyncio.Event()
        self._stopping = False
        self._wake = asyncio.Event()
        self._stub: pb.HubServiceStub | None = None
        self.document_store: DocumentStore | None = None
        self._pushes: set[asyncio.Task[None]] = set()
        self._refetch = asyncio.Lock()
        self._refetched_at = float("-inf")
        self._refetch_every = _REFETCH_EVERY_S

    @property
    def stub(self) -> pb.HubServiceStub | None:
        """The hub's stub while connected (document fetches ride on the same channel)."""
        return self._stub

    async def wait_stub(self, timeout: float) -> pb.HubServiceStub | None:
        """The hub's stub once connected, waiting up to ``timeout`` seconds for the link to
        come back; None if it does not."""
        if self._stub is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), timeout)
        return self._stub

    def on_document_request(self, request: pb.DocumentRequest) -> None:
        """The hub wants one of our documents: push it on a call of its own."""
        from node.documents import push

        if self._stub is None or self.document_store is None:
            return
        task = asyncio.create_task(
            push(self._stub, self.document_store, request, self.agency.config.agency)
        )
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def refresh_directory(self) -> None:
        """Fetches the hub's current directory (revocations, agency states) and applies it."""
        if self._stub is None:
            return
        async with self._refetch:  # verified() waits for it, instead of fetching again
            await self._fetch_directory()

    async def _fetch_directory(self) -> None:
        if self._stub is None:
            return
        held = self._version()
        await self.agency.set_directory(await self._ask_directory(self._stub))
        if self._version() != held:
            self._refetch_every = _REFETCH_EVERY_S

    async def _ask_directory(self, stub: pb.HubServiceStub) -> pb.Directory:
        """The directory the server answers with: it knows this agency then (one removed
        from the directory is refused the call too)."""
        response: pb.GetDirectoryResponse = await stub.GetDirectory(
            pb.GetDirectoryRequest(), timeout=30
        )
        self.agency.set_in_directory(True)
        return response.directory

    async def _learn_own_state(self) -> None:
        """After a refused welcome: this agency's state as the server's directory gives it.

        The server has not attested that it is the hub (only a welcome does): of its
        directory only this agency's own entry is taken, onto the directory held, in memory
        (never its revocations, certificates or other agencies, nor saved). Such a server
        can refuse this node anyway; it cannot poison what the node trusts. A node holding
        no directory yet takes the answer whole, in memory, as it has nothing to lose."""
        if self._stub is None:
            return
        async with self._refetch:
            directory = await self._ask_directory(self._stub)
            held = self.agency.directory
            if held is None:
                await self.agency.set_directory(directory, persist=False)
                return
            code = self.agency.config.agency
            said = {a.code: a.state for a in directory.agencies}
            if code not in said:
                return
            mended = pb.Directory()
            mended.CopyFrom(held.message)
            for entry in mended.agencies:
                if entry.code == code:
                    entry.state = said[code]
            if mended != held.message:
                await self.agency.set_directory(mended, persist=False)

    def _version(self) -> int | None:
        return self.agency.directory.version if self.agency.directory is not None else None

    async def verified(
        self,
        items: Sequence[T],
        verify: Callable[[Sequence[T]], list[R | VerificationError]],
    ) -> list[R | VerificationError]:
        """``verify(items)``, with those that fail for a signing key or CA this node does
        not know verified again after a fresh directory: the hub sends a directory update
        when one changes, but a letter or evidence signed with the new key may be read
        before it is applied (frames are handled concurrently), and would otherwise be
        refused for good. A fetch in flight (a directory update's) is waited for, not
        repeated; otherwise the directory is fetched at most once a ``_REFETCH_EVERY_S``,
        and less often while fetches bring no new version (a key no directory lists)."""
        held = self._version()
        results = verify(items)
        stale = [
            i
            for i, r in enumerate(results)
            if isinstance(r, VerificationError) and r.reason in _DIRECTORY_MENDS
        ]
        if not stale or self._stub is None:
            return results
        async with self._refetch:  # one fetch for every frame that failed meanwhile
            loop = asyncio.get_running_loop()
            if self._version() == held and loop.time() - self._refetched_at >= self._refetch_every:
                try:
                    await self._fetch_directory()
                except grpc.aio.AioRpcError as exc:
                    log.warning("directory refetch failed: %s", exc.code().name)
                    return results
                finally:
                    self._refetched_at = loop.time()
                if self._version() == held:  # nothing new: wait longer before the next
                    self._refetch_every = min(self._refetch_every * 2, _REFETCH_AT_MOST_S)
        for i, again in zip(stale, verify([items[i] for i in stale]), strict=True):
            results[i] = again
        return results

    async def run(self) -> None:
        """Keeps a stream to the hub up until stopped: exponential backoff with full jitter."""
        backoff = _INITIAL_BACKOFF_S
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except _Refused:
                pass  # logged once, when learnt (Agency.set_in_directory, set_directory)
            except _NotTheHub as exc:
                log.error("refusing %s as the hub: %s", self.agency.config.hub, exc)
            except _HubFault as exc:
                log.warning("hub stream ended: %s", exc)
            except grpc.aio.AioRpcError as exc:
                log.warning("hub stream ended: %s %s", exc.code().name, exc.details())
            except Exception:
                log.exception("hub stream failed")
            finally:
                self.connected.clear()
                self.agency.hub_connected = False
                self._stub = None  # its channel is closed with the session
            if self._stopping:
                return
            RECONNECTS.inc()
            if asyncio.get_running_loop().time() - started > 5.0:
                backoff = _INITIAL_BACKOFF_S
            delay = random.uniform(0, backoff)
            backoff = min(backoff * 2, self.agency.config.reconnect_max_s)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        options = [
            # A hub that stops answering pings (hung, or its host gone without a FIN) ends
            # the session within 1.5 x keepalive_s, and the node reconnects.
            ("grpc.keepalive_time_ms", round(self.agency.config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.agency.config.keepalive_s * 500)),
            # grpc 1.85 waits for a keepalive ping's answer this long (1 min by default).
            ("grpc.http2.ping_timeout_ms", round(self.agency.config.keepalive_s * 500)),
            ("grpc.http2.max_pings_without_data", 0),  # an idle session keeps pinging
            # As large as any frame either side may make: the hub's pushes carry one letter
            # of up to its max_frame_bytes alone, and our relay frames are cut at
            # relay_frame_bytes, both up to MAX_MESSAGE (a frame over a fixed 64 MiB here
            # could never be written, and its session failed the same way for ever).
            ("grpc.max_receive_message_length", MAX_MESSAGE + _FRAME_MARGIN),
            ("grpc.max_send_message_length", MAX_MESSAGE + _FRAME_MARGIN),
            # Fixed receive window (see node.server): memory flat while documents stream.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", 1024 * 1024),
        ]
        async with grpc.aio.secure_channel(
            self.agency.config.hub, self.credentials, options=options
        ) as channel:
            stub = pb.HubServiceStub(channel)
            # Like stub.Connect(), but frames may also be spliced bytes (node.core.splice).
            call = channel.stream_stream(
                _CONNECT,
                request_serializer=serialize,
                response_deserializer=pb.ConnectResponse.FromString,
            )()
            directory_version = self.agency.directory.version if self.agency.directory else 0
            nonce = os.urandom(32)  # signed back in the welcome: check_hub_attestation
            hello = pb.ConnectHello(
                software_version="chapar/0.1", directory_version=directory_version, nonce=nonce
            )
            if self.agency.numbers_unconfirmed is not None:
                # Restored, and no welcome since (confirm_numbers below ends this): the hub
                # routes again the evidence this node acknowledged after its copy.
                mark = await self.agency.store.restore_mark()
                if mark is not None:
                    snapshot = round(mark.snapshot_time * 1e9)
                    hello.node_restore.snapshot_time.FromNanoseconds(snapshot)
            try:
                # The hub may refuse the stream before it reads our hello: then the write
                # raises its refusal, as a read would.
                await call.write(pb.ConnectRequest(hello=hello))
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INTERNAL,
                ):
                    # This agency was suspended or retired: learn it from the directory,
                    # so this node refuses submissions instead of queueing them. (grpc may
                    # report that refusal as INTERNAL, its status lost: grpc/grpc#36066.)
                    # Removed from the directory, it is refused the directory too.
                    self._stub = stub
                    try:
                        await self._learn_own_state()
                    except grpc.aio.AioRpcError as refused:
                        if _UNKNOWN_SENDER in (_reason(exc), _reason(refused)):
                            self.agency.set_in_directory(False)
                            raise _Refused from exc
                    else:
                        if self.agency.own_state() not in (None, pb.AGENCY_STATE_ACTIVE):
                            raise _Refused from exc
                raise
            if first is grpc.aio.EOF or first.WhichOneof("frame") != "welcome":
                raise RuntimeError("hub did not welcome the node")
            # Before anything else goes to it or is taken from it: TLS admits any server
            # certificate of the exchange's CA that names the address, an agency's too.
            check_hub_attestation(
                self.agency.trust,
                first.welcome,
                self.agency.config.agency,
                nonce,
                self.agency.hub_identity,
            )
            hub_ahead_s = _hub_ahead_s(first.welcome.attestation)
            _note_hub_clock(hub_ahead_s)
            self._stub = stub
            self.agency.set_in_directory(True)
            await self.agency.set_hub_frame_bytes(first.welcome.max_frame_bytes)
            await self.agency.confirm_numbers(first.welcome.accepted_sequences)
            if first.welcome.HasField("hub_restore"):
                # Before this stream's session reads the outbox and the receipts: what it
                # marks for sending again is read from the start.
                await self.agency.on_hub_restore(first.welcome.hub_restore, hub_ahead_s=hub_ahead_s)
            if first.welcome.directory_version != directory_version:
                await self.refresh_directory()
            log.info("connected to hub %s", first.welcome.hub)
            self.connected.set()
            self.agency.hub_connected = True
            session = _Session(self, call)
            await session.run()


class _Session:
    """One stream's worth of state: what is in flight on it."""

    def __init__(self, link: HubLink, call: grpc.aio.StreamStreamCall) -> None:
        self.link = link
        self.agency = link.agency
        self.call = call
        # Frames go out through one writer task: a handler of incoming frames never waits
        # for the network. (With writes under a lock, a blocked write - the hub not reading
        # because its own writes to us were blocked - stopped our reading too: both ends
        # waited for each other with full flow-control windows, seen after a hub restart.)
        self.outgoing: asyncio.Queue[pb.ConnectRequest | bytes] = asyncio.Queue()
        self.relaying: dict[bytes, str] = {}  # envelope digest -> shams, sent and not answered
        self.receipts_sent: set[str] = set()
        self.receipt_cursor = 0  # rowid of the last receipt row read on this stream
        # DELIVERY evidence of letters just stored, waiting for the receipt cadence.
        self.pending_receipts: list[bytes] = []  # serialised, spliced into frames
        # Set once a deliveries frame has handed its letters to the store: the next frame
        # hands its own after it, so a frame that waited (for a directory fetch) keeps its
        # place in the inbox (frames are handled concurrently; node.tasks).
        self._stored_turn: asyncio.Future[None] | None = None
        # A lone delivery's DELIVERY receipt waits for its HANDOVER too, when the back-end
        # reads at once: one receipts frame, one store transaction at the hub, one notice
        # to the sender and one acknowledgement each way instead of two.
        self.receipt_cadence = Cadence(
            BOOKKEEPING_INTERVAL_S, self._wake, linger_s=BOOKKEEPING_INTERVAL_S
        )
        self.relay_cadence = Cadence(LETTER_INTERVAL_S, self._wake)
        # Routed evidence (notices) that failed only for a key or CA this node's directory
        # lacks (_DIRECTORY_MENDS), by evidence id, with the directory version it failed
        # against: unacknowledged, so the hub sends it again on the next stream, and
        # verified again on this one once the directory held changes (_handle).
        self.unmended: dict[str, tuple[pb.Evidence, int | None]] = {}

    def write(self, frame: pb.ConnectRequest | bytes) -> None:
        """Queues a frame for the stream's writer task (``_write_all``)."""
        self.outgoing.put_nowait(frame)

    async def _write_all(self) -> None:
        while True:
            frame = await self.outgoing.get()
            await self.call.write(frame)
            self.outgoing.task_done()

    async def run(self) -> None:
        tasks = {
            asyncio.create_task(self._read()),
            asyncio.create_task(self._send()),
            asyncio.create_task(self._write_all()),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            self.receipt_cadence.close()
            self.relay_cadence.close()
            self.call.cancel()

    def _wake(self) -> None:
        self.link._wake.set()

    async def _send(self) -> None:
        agency = self.agency
        cursor = 0
        # What must be read again: set by the agency's signals, cleared when read, so a
        # wake-up with nothing new costs no database read.
        outbox_dirty = receipts_dirty = True
        while not self.link._stopping:
            if self.outgoing.qsize() >= _QUEUED_FRAMES:
                await self.outgoing.join()  # the hub reads slowly: wait for it, not memory
            self.link._wake.clear()
            if agency.outbox_changed.is_set():
                agency.outbox_changed.clear()
                outbox_dirty = True
            if agency.receipts_changed.is_set():
                agency.receipts_changed.clear()
                receipts_dirty = True
            sent = False
            batch = agency.config.relay_batch  # as a reload may have set it
            window = batch * 4
            if outbox_dirty and len(self.relaying) < window and self.relay_cadence.ready():
                outbox_dirty = False
                # Frames under the hub's frame limit (the first letter always goes), read
                # by size first: a backlog of large letters is not loaded to send a few.
                hub_room = agency.hub_frame_room
                room = agency.config.relay_frame_bytes
                rows = await agency.store.outbox_to_relay(
                    cursor, batch, room if hub_room is None else min(room, hub_room)
                )
                if rows and hub_room is not None and len(rows[0][2]) > hub_room:
                    # Alone larger than the hub takes (accepted before the hub said so, or
                    # before its limit was lowered): it would end every session the same
                    # way and hold up the letters behind it. Left in the outbox (its
                    # depth and age show it) until the hub's max_frame_bytes is raised.
                    rowid, shams, blob, _ = rows[0]
                    cursor = rowid
                    outbox_dirty = True
                    sent = True  # read on at once
                    log.error(
                        "letter %s (%d bytes) is larger than the hub takes in a frame (%d"
                        " bytes of letters): kept in the outbox, not relayed, until the"
                        " hub's max_frame_bytes is raised",
                        shams,
                        len(blob),
                        hub_room,
                        extra={"shams": [shams], "reason": "LETTER_TOO_LARGE_FOR_HUB"},
                    )
                    rows.clear()
                if rows:
                    envelopes: list[bytes] = []
                    for rowid, shams, blob, digest in rows:
                        self.relaying[digest] = shams
                        envelopes.append(blob)
                        cursor = rowid
                    # A full read or a frame cut short by size: more may be waiting.
                    outbox_dirty = rows.more
                    # Spliced as stored (node.core.splice): not parsed and serialised again.
                    self.write(_RELAY.one(ENVELOPE_BATCH.many(envelopes)))
                    sent = True
                    if not outbox_dirty:  # a full read's rest goes at once
                        self.relay_cadence.sent()
            if (receipts_dirty or self.pending_receipts) and self.receipt_cadence.ready():
                receipts, self.pending_receipts = self.pending_receipts, []
                if receipts_dirty:
                    receipts_dirty = False
                    pending = await agency.store.receipts_after(self.receipt_cursor, _RECEIPT_BATCH)
                    receipts_dirty = len(pending) == _RECEIPT_BATCH
                    if pending:
                        self.receipt_cursor = pending[-1][0]
                        # Those of deliveries just stored are in pending_receipts already.
                        receipts += [e for _, eid, e in pending if eid not in self.receipts_sent]
                        self.receipts_sent.update(eid for _, eid, _ in pending)
                # Frames of _RECEIPT_FRAME at most, and under the hub's frame limit (one
                # it refuses ends the stream, and the same frame would come again).
                hub_room = agency.hub_frame_room
                start = 0
                while start < len(receipts):
                    chunk = receipts[start : start + _RECEIPT_FRAME]
                    if hub_room is not None:
                        chunk = chunk[: fits([len(r) for r in chunk], hub_room)]
                    self.write(_RECEIPTS.one(EVIDENCE_BATCH.many(chunk)))
                    start += len(chunk)
                if receipts:
                    sent = True
                    if not receipts_dirty:  # a full read's rest goes at once
                        self.receipt_cadence.sent()
            if not sent:
                waits = [
                    asyncio.create_task(ev.wait())
                    for ev in (self.link._wake, agency.outbox_changed, agency.receipts_changed)
                ]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def _frames(self) -> AsyncIterator[pb.ConnectResponse]:
        while True:
            frame = await self.call.read()
            if frame is grpc.aio.EOF:
                raise _HubFault("hub closed the stream")
            if frame is None:  # grpc's word for a message its deserializer could not parse
                raise _HubFault("hub sent a frame that does not parse (MALFORMED_FRAME)")
            yield frame

    async def _read(self) -> None:
        await handle_concurrently(self._frames(), self._handle, _FRAMES_IN_FLIGHT)

    async def _handle(self, frame: pb.ConnectResponse) -> None:
        kind = frame.WhichOneof("frame")
        if kind == "relay_results":
            await self._relay_results(frame.relay_results.evidence)
        elif kind == "deliveries":
            await self._deliveries(frame.deliveries.envelopes)
        elif kind == "evidence":
            await self._evidence(frame.evidence.evidence)
        elif kind == "directory_update":
            if self.agency.directory is None or (
                frame.directory_update.version != self.agency.directory.version
            ):
                await self.link.refresh_directory()
        elif kind == "queue_status":
            status = frame.queue_status
            self.agency.full_recipients = frozenset(status.full_recipients)
            if status.retry_after_ms > 0:
                self.agency.quota_retry_after_s = status.retry_after_ms / 1000
        elif kind == "document_request":
            self.link.on_document_request(frame.document_request)
        elif kind == "receipt_acks":
            ids = list(frame.receipt_acks.evidence_ids)
            # The mark rides on the next transaction; until it commits, a read of unsent
            # receipts still returns them, and receipts_sent keeps them from going twice.
            self.agency.store.receipts_acknowledged_later(
                ids, lambda _: self.receipts_sent.difference_update(ids)
            )
        if self.unmended:  # the directory may have changed above (or in a frame's fetch)
            await self._evidence_again()
        self._wake()

    async def _verify(
        self, evidence: Sequence[pb.Evidence]
    ) -> tuple[list[tuple[pb.Evidence, pb.EvidenceContent, str]], list[pb.Evidence]]:
        """The evidence that verifies, with its content and its SHAMS number as text ("" if
        it names none), and the evidence that failed only for a signing key or CA a newer
        directory may bring (``_DIRECTORY_MENDS``); every failure is counted and logged."""
        out = []
        unmended = []
        checked = await self.link.verified(evidence, self.agency.trust.verify_evidence_many)
        me = self.agency.config.agency  # the sender of every letter the hub tells us of
        for item, content in zip(evidence, checked, strict=True):
            try:
                if isinstance(content, VerificationError):
                    raise content
                # A relay by the hub, a delivery by its recipient, a submission by us.
                check_attestation(content, sender=me)
                out.append((item, content, _shams_text(content)))
            except VerificationError as exc:
                count_verification_failure("evidence", exc.reason)
                log.error("evidence from the hub does not verify (%s): %s", exc.reason, exc)
                if exc.reason in _DIRECTORY_MENDS:
                    unmended.append(item)
        return out, unmended

    async def _relay_results(self, evidence: Sequence[pb.Evidence]) -> None:
        items = []
        verified, _ = await self._verify(evidence)
        for item, content, text in verified:
            shams = self.relaying.pop(content.envelope_sha256, None) or text
            if not shams:
                continue
            if content.event == pb.EVIDENCE_EVENT_RELAY_REJECTION:
                log.error("hub rejected %s: %s %s", shams, content.reason, content.detail)
            items.append((item, content, shams))
        if len(verified) < len(evidence):
            # Their letters leave the window (a window of them would stop every letter),
            # still to relay: they go again on the next stream, when the answer may verify.
            kept = {id(e) for e, _, _ in verified}
            for item in evidence:
                if id(item) not in kept and (digest := _quoted_digest(item)):
                    self.relaying.pop(digest, None)
        if items:
            await self._record(items)

    async def _record(self, items: Sequence[tuple[pb.Evidence, pb.EvidenceContent, str]]) -> None:
        """Stores verified evidence about letters this node sent. What the store refuses as
        not about the letter sent under its number (another digest, a recipient the letter
        does not name, a number this node never sent unless it was restored from a copy:
        NodeStore.record_sender_evidence) is counted and logged as evidence that does not
        verify, as an offline verifier would find it; it is acknowledged as such evidence
        is (``_evidence``)."""
        for refused in await self.agency.store.record_sender_evidence(items):
            count_verification_failure("evidence", refused.reason)
            log.error(
                "evidence from the hub does not verify (%s): %s", refused.reason, refused.detail
            )

    async def _evidence(self, evidence: Sequence[pb.Evidence]) -> None:
        version = self.link._version()  # read first: a change during the check retries it
        verified, unmended = await self._verify(evidence)
        items = [(e, c, shams) for e, c, shams in verified if shams]
        if items:
            await self._record(items)
        if self.unmended:  # verified now: no longer held (nothing held, nothing to look up)
            for _, content, _ in verified:
                self.unmended.pop(content.evidence_id, None)
        # Acknowledge what we stored and what can never verify (it would only come back;
        # the store's refusals too: not about the letter sent, they never will be);
        # content too malformed to name its id cannot be acknowledged, but must not stop
        # the stream either. Not what failed only for a key or CA this node's directory
        # lacks: acknowledged, the hub would forget it and this node never store it (the
        # recipient's state stuck, the body never purged). The hub sends it again on the
        # next stream (its notices go by a cursor per stream: not again on this one), and
        # it is verified again here after a directory change (_evidence_again).
        held = {id(e) for e in unmended}
        for item in unmended:
            if (i := _quoted_evidence_id(item)) and (
                i in self.unmended or len(self.unmended) < _UNMENDED_HELD
            ):
                self.unmended[i] = (item, version)
        ids = [c.evidence_id for _, c, _ in verified]
        if len(verified) < len(evidence):  # the rest: all of it verifies, flat out
            stored = {id(e) for e, _, _ in verified}
            ids += [
                i
                for e in evidence
                if id(e) not in stored and id(e) not in held and (i := _quoted_evidence_id(e))
            ]
        if ids:
            self.write(pb.ConnectRequest(evidence_acks=pb.EvidenceAckBatch(evidence_ids=ids)))

    async def _evidence_again(self) -> None:
        """Verifies again the evidence held back (``unmended``) that failed against another
        directory version than the one held now; once per change, so held evidence never
        spins."""
        version = self.link._version()
        again = [i for i, (_, v) in self.unmended.items() if v != version]
        if again:
            await self._evidence([self.unmended.pop(i)[0] for i in again])

    async def _deliveries(self, envelopes: Sequence[pb.Envelope]) -> None:
        agency = self.agency
        me = agency.config.agency
        now = dt.datetime.now(dt.UTC)
        now_s = now.timestamp()
        good: list[tuple[str, str, list[str], pb.Envelope]] = []
        documents: list[list[bytes]] = []  # each good letter's attachments (SHA-256)
        updates: dict[int, pb.EnvelopeHeader] = {}  # status updates among them, by index
        verified_ids: list[tuple[pb.Shams, bytes]] = []  # each good letter's number and digest
        refused: list[tuple[pb.Shams | None, bytes, VerificationError]] = []
        before, turn = self._stored_turn, asyncio.get_running_loop().create_future()
        self._stored_turn = turn
        try:
            # As of each letter's signing, as its verifiers will check it offline: the hub
            # relayed it then, and its signer's certificate may expire while it waits.
            checked = await self.link.verified(
                envelopes, lambda items: agency.trust.verify_envelopes(items, as_created=True)
            )
            if before is not None and not before.done():
                # Only after a wait above: otherwise it is done already. Shielded: this
                # frame cancelled (the stream ending) must not cancel the one before's turn.
                await asyncio.shield(before)
        finally:
            # From here to the store's queue nothing waits (the next frame runs only then).
            if not turn.done():
                turn.set_result(None)
        for envelope, verified in zip(envelopes, checked, strict=True):
            digest = sha256(envelope.header)
            try:
                if isinstance(verified, VerificationError):
                    raise verified
                header = verified
                mine = [r for r in header.recipients if r.agency == me]
                if not mine:
                    raise VerificationError("NOT_A_RECIPIENT", f"letter is not addressed to {me}")
                # The hub relays no other (Hub._check_letter), but a letter under a number
                # that is none, or another agency's, must not end the session (format_shams
                # below) nor enter the inbox: the SDK's verification refuses it too.
                try:
                    validate_shams(header.shams, "header.shams")
                except ChaparError as exc:
                    raise VerificationError("INVALID_SHAMS", exc.message) from exc
                if header.shams.origin != header.sender.agency:
                    raise VerificationError(
                        "SENDER_MISMATCH",
                        f"letter from {header.sender.agency} numbered by {header.shams.origin}",
                    )
                if header.kind in NEEDS_PARENT and not header.HasField("in_reply_to"):
                    # A reply or a status about no letter, which nothing can judge or
                    # thread (the hub refuses it, MISSING_IN_REPLY_TO, but not one before
                    # that check): refused, not delivered looking like a real one.
                    raise VerificationError(
                        "MISSING_IN_REPLY_TO",
                        "a reply or status update names no letter (in_reply_to)",
                    )
                if (
                    header.HasField("expire_time")
                    and seconds_of(header.expire_time) + _EXPIRY_SKEW_S <= now_s
                ):
                    # Pushed again after a lost stream (the hub holds back its EXPIRY for a
                    # letter its recipient may have had): one this node already holds gets
                    # its DELIVERY again (_refusals), one it never had is refused.
                    raise VerificationError("LETTER_EXPIRED", "the letter's expire_time has passed")
                if header.attachments and (
                    unfit := refused_attachment(header, agency.config.documents)
                ):
                    raise VerificationError(*unfit)
            except VerificationError as exc:
                refused.append((quoted_shams(envelope), digest, exc))
                continue
            envelope.DiscardUnknownFields()  # as the hub does: nothing unsigned rides along
            good.append(
                (
                    format_shams(header.shams),
                    header.sender.agency,
                    [r.mailbox for r in mine],
                    envelope,
                )
            )
            documents.append(senders_documents(header, header.sender.agency))
            verified_ids.append((header.shams, digest))
            if header.kind == _STATUS_UPDATE and _names_a_letter(header):
                updates[len(good) - 1] = header

        fresh: set[int] = set()  # the letters new to the inbox, by their place in good

        def answer(
            i: int, event: pb.EvidenceEvent.ValueType, reason: str = "", detail: str = ""
        ) -> pb.Evidence:
            shams, digest = verified_ids[i]  # as verified above: not parsed and hashed again
            content = evidence_content(
                event,
                issuer=agency.identity.uri,
                shams=shams,
                envelope_sha256=digest,
                recipient=me,
                now=now,
                reason=reason,
                detail=detail,
            )
            return pb.Evidence(content=content)  # signed with the batch: seal_evidence

        def make_delivery(i: int) -> pb.Evidence:
            fresh.add(i)  # only asked for letters stored now, not those delivered before
            return answer(i, pb.EVIDENCE_EVENT_DELIVERY)

        misfits: dict[int, StatusFault] = {}  # status updates refused as they are stored

        def make_refusal(i: int, fault: StatusFault) -> pb.Evidence:
            # A status update about a letter this node holds, which it does not fit (the
            # store judges it in the transaction that would store it): refused as a letter
            # failing its checks is, instead of delivered looking like a real one. Or a
            # letter under a number this node holds for another (SHAMS_REUSED).
            misfits[i] = fault
            return answer(i, E.EVIDENCE_EVENT_DELIVERY_FAILURE, fault.reason, fault.message)

        receipts: list[StoredEvidence] = []
        if good:
            receipts.extend(
                await agency.store.store_incoming(
                    good,
                    make_delivery,
                    agency.signer.seal_evidence,
                    documents,
                    updates,
                    make_refusal,
                    agency.identity.uri,
                )
            )
            agency.notify_inbox()  # DELIVERED is counted at the commit (node.monitor)
            for i, fault in misfits.items():
                count_verification_failure("envelope", fault.reason)
                log.error(
                    "refusing a delivered letter: %s %s",
                    fault.reason,
                    fault.message,
                    extra={"shams": [good[i][0]], "peer": good[i][1]},
                )
            if fresh and log.isEnabledFor(logging.INFO):
                # One line per frame and sending agency, so ``peer`` stays one agency code.
                # Letters delivered before (pushed again after a lost receipt) are answered
                # and not logged again, as they are not counted again (node.monitor).
                by_sender: dict[str, list[str]] = {}
                for i, (shams, sender, _, _) in enumerate(good):
                    if i in fresh:
                        by_sender.setdefault(sender, []).append(shams)
                for sender, numbers in by_sender.items():
                    log.info(
                        "letters delivered",
                        extra={"shams": numbers, "count": len(numbers), "peer": sender},
                    )
            if again := [
                good[i][0] for i in range(len(good)) if i not in fresh and i not in misfits
            ]:
                receipts.extend(await self._handovers_again(again))
        if refused:
            receipts.extend(await self._refusals(refused, now))
        self.receipts_sent.update(r.evidence_id for r in receipts)
        # Sent by _send, at the receipt cadence.
        self.pending_receipts.extend(r.blob for r in receipts)
        self._wake()

    async def _handovers_again(self, numbers: Sequence[str]) -> list[StoredEvidence]:
        """The HANDOVER evidence of letters delivered again that were handed over here.

        A letter comes again when its DELIVERY was lost, or when the hub was restored from a
        copy and its sender sent it again: such a hub lost the HANDOVER too, and may have
        dropped it when this node sent it again before the letter was back (a receipt for
        a letter the hub does not hold is refused). Sent after the DELIVERY, it reaches the
        sender; a hub that has it stores it once and routes nothing new. Letters delivered
        for the first time (nearly all) cost nothing here."""
        entries = await self.agency.store.inbox_entries(numbers)
        return [
            StoredEvidence.of(handover.SerializeToString())
            for _, _, handover, _ in entries.values()
            if handover is not None
        ]

    async def _refusals(
        self, refused: Sequence[tuple[pb.Shams | None, bytes, VerificationError]], now: dt.datetime
    ) -> list[StoredEvidence]:
        """DELIVERY_FAILURE evidence for letters that fail their checks, except those this
        node answered before (delivered again after a lost receipt): they get the same
        answer again, a DELIVERY or the first DELIVERY_FAILURE, so that a certificate that
        expired or was revoked meanwhile does not contradict a delivery, nor does a second
        refusal double the first."""
        agency = self.agency
        me = agency.config.agency
        texts = [_quoted_text(s) for s, _, _ in refused]
        earlier = await agency.store.earlier_answers(
            [(t, digest) for t, (_, digest, _) in zip(texts, refused, strict=True)],
            agency.identity.uri,
        )
        out: list[StoredEvidence] = []
        failures: list[tuple[str, pb.Evidence]] = []
        answered: list[str] = []
        for text, (shams, digest, exc) in zip(texts, refused, strict=True):
            if digest in earlier:
                out.append(earlier[digest])
                answered.append(text)
                continue
            count_verification_failure("envelope", exc.reason)
            log.error("refusing a delivered letter: %s %s", exc.reason, exc)
            failures.append(
                (
                    text,
                    agency.sign_evidence(
                        evidence_content(
                            E.EVIDENCE_EVENT_DELIVERY_FAILURE,
                            issuer=agency.identity.uri,
                            shams=shams,
                            envelope_sha256=digest,
                            recipient=me,
                            now=now,
                            reason=exc.reason,
                            detail=str(exc),
                        )
                    ),
                )
            )
        if failures:
            await agency.store.store_issued(failures)
            out.extend(StoredEvidence.of(e.SerializeToString()) for _, e in failures)
        if answered:  # as for a letter delivered again that passes: its HANDOVER follows
            out.extend(await self._handovers_again(answered))
        return out


def _names_a_letter(header: pb.EnvelopeHeader) -> bool:
    """Whether a status update's in_reply_to is a valid SHAMS number: only then is it
    linked (signed by its sender, it is still what a hostile or broken node wrote)."""
    if not header.HasField("in_reply_to"):
        return False
    try:
        validate_shams(header.in_reply_to, "header.in_reply_to")
    except ChaparError:
        return False
    return True


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a refusal by the hub ("" without one)."""
    return from_rpc_error(exc).reason


def _quoted_text(shams: pb.Shams | None) -> str:
    """A refused letter's number as it claims it, as text; "" when it names none valid."""
    if shams is None:
        return ""
    try:
        return format_shams(shams)
    except ValueError:
        return ""


def _evidence_id(evidence: pb.Evidence) -> str:
    return pb.EvidenceContent.FromString(evidence.content).evidence_id


def _shams_text(content: pb.EvidenceContent) -> str:
    """The number an evidence is about, as text; "" if it names none. A signed evidence
    with an invalid number does not verify (it would otherwise stop the stream)."""
    if not content.HasField("shams"):
        return ""
    try:
        return format_shams(content.shams)
    except ValueError as exc:
        raise VerificationError("INVALID_SHAMS", str(exc)) from exc


def _quoted_digest(evidence: pb.Evidence) -> bytes:
    """The envelope digest an evidence that did not verify claims, or b"" if malformed."""
    try:
        return pb.EvidenceContent.FromString(evidence.content).envelope_sha256
    except DecodeError:
        return b""


def _quoted_evidence_id(evidence: pb.Evidence) -> str:
    """The id an evidence that did not verify claims, or "" if its content is malformed."""
    try:
        return _evidence_id(evidence)
    except DecodeError:
        return ""
