"""The hub's part in moving documents: who may fetch what, and the pipe between nodes.

The hub stores no document. When a node fetches another agency's document
(``FetchDocument``), the hub checks that the node's agency is a recipient of a letter from
the owner that references that digest (grants are recorded from each verified, signed
header before the letter is accepted), asks the owning node with a ``document_request``
frame on its Connect stream, and pipes the chunks the owner pushes (``PushDocument``, a
node-initiated call) through a queue of a few chunks: memory stays flat and a slow
reader slows the owner down (backpressure), whatever the file's size.

A reload of the directory that no longer admits the fetching node's certificate (revoked,
its agency suspended or retired) ends the fetch at once with the status a new call would
get (``Hub.refusal``); one that no longer admits the owner's ends its push the same way,
and the fetch with UNAVAILABLE / OWNER_NOT_ADMITTED (its node keeps nothing of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from cryptography import x509

from client_sdk import pb
from node.core.documents import (
    MAX_EMPTY_CHUNKS,
    chunk_of,
    empty_chunks_refused,
    parse_document_uri,
    senders_documents,
)
from node.core.errors import ChaparError, Code
from node.rpc.errors import abort
from node.tasks import unless_set

if TYPE_CHECKING:
    from node.hub import Hub

__all__ = ["DocumentRelay"]

log = logging.getLogger("chapar.hub.documents")
# Of an owner's error_reason (its text, as long as a message may be), what the log shows.
_REASON_LOGGED = 100
_QUEUE_CHUNKS = 4
# For the owner to be asked and its push to start, and between two of its chunks.
_OWNER_ANSWER_S = 30.0


@dataclass(eq=False)
class _Transfer:
    owner: str
    fetcher: str
    fetcher_certificate: x509.Certificate
    offset: int = 0  # where the fetch asked the owner's push to start
    # The certificate of the owner's push, once it started.
    pusher_certificate: x509.Certificate | None = None
    # Set by a reload that no longer admits the fetcher (fetch_refused) or the owner
    # (push_refused): that call ends at once with that status (its event set).
    fetch_refused: ChaparError | None = None
    push_refused: ChaparError | None = None
    fetch_stop: asyncio.Event = field(default_factory=asyncio.Event)
    push_stop: asyncio.Event = field(default_factory=asyncio.Event)
    queue: asyncio.Queue[pb.PushHeader | bytes | ChaparError | None] = field(
        default_factory=lambda: asyncio.Queue(_QUEUE_CHUNKS)
    )
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the fetch ended
    # The push ended without its last word (its node died or went away, its stream broke):
    # what the fetch reads once the chunks already queued are out.
    broken: ChaparError | None = None
    cut: asyncio.Event = field(default_factory=asyncio.Event)

    def refuse_fetch(self, error: ChaparError) -> None:
        if self.fetch_refused is None:
            self.fetch_refused = error
            self.break_off(error)  # a fetch still waiting for the owner's header
            self.fetch_stop.set()

    def refuse_push(self, error: ChaparError) -> None:
        if self.push_refused is None:
            self.push_refused = error
            self.break_off(
                ChaparError(
                    Code.UNAVAILABLE,
                    "OWNER_NOT_ADMITTED",
                    f"the node of {self.owner} is no longer admitted ({error.reason}); its"
                    " push ended",
                    metadata={"owner": self.owner, "cause": error.reason},
                    retry_after_s=5.0,
                )
            )
            self.push_stop.set()

    def break_off(self, error: ChaparError) -> None:
        if self.broken is None:
            self.broken = error
            self.cut.set()

    async def take(self) -> pb.PushHeader | bytes | ChaparError | None:
        """The next item the push sent, or, once those are out, why it broke off."""
        if self.broken is None:  # wait for the next item, or for the push to break off
            get = asyncio.ensure_future(self.queue.get())
            cut = asyncio.ensure_future(self.cut.wait())
            try:
                await asyncio.wait({get, cut}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cut.cancel()
                if not get.done():
                    get.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await get
            if get.done() and not get.cancelled():
                return get.result()
        return self.queue.get_nowait() if not self.queue.empty() else self.broken


class DocumentRelay:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._transfers: dict[str, _Transfer] = {}

    def end_refused(self) -> None:
        """After a reload: the transfers whose fetching or owning node the directory no
        longer admits end (each call with the status a new call of it would get)."""
        for transfer in list(self._transfers.values()):
            error = self.hub.refusal(transfer.fetcher, transfer.fetcher_certificate)
            if error is not None:
                log.warning("ending a fetch by %s: %s", transfer.fetcher, error.reason)
                transfer.refuse_fetch(error)
            if transfer.pusher_certificate is not None:
                error = self.hub.refusal(transfer.owner, transfer.pusher_certificate)
                if error is not None:
                    log.warning("ending a push by %s: %s", transfer.owner, error.reason)
                    transfer.refuse_push(error)

    async def fetch(
        self, request: pb.FetchDocumentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        request_id = str(uuid.uuid4())
        try:  # whatever ends the fetch (its caller gone too), the transfer is ended
            await self._fetch(request, context, request_id)
        finally:
            self._end(request_id, self._transfers.get(request_id))

    async def _fetch(
        self,
        request: pb.FetchDocumentRequest,
        context: grpc.aio.ServicerContext,
        request_id: str,
    ) -> None:
        transfer: _Transfer | None = None
        try:
            agency, certificate = self.hub._peer(context)
            owner, digest = parse_document_uri(request.uri)
            if request.offset < 0:
                raise ChaparError(Code.INVALID_ARGUMENT, "INVALID_OFFSET", "offset is negative")
            if owner == agency or not await self.hub.store.may_fetch(digest, owner, agency):
                raise ChaparError(
                    Code.PERMISSION_DENIED,
                    "NOT_A_RECIPIENT",
                    f"{agency} is not a recipient of a letter from {owner} referencing "
                    "this document",
                    metadata={"agency": agency, "uri": request.uri},
                )
            session = self.hub._sessions.get(owner)
            if session is None:
                raise ChaparError(
                    Code.UNAVAILABLE,
                    "OWNER_OFFLINE",
                    f"the node of {owner} is not connected; retry later",
                    metadata={"owner": owner},
                    retry_after_s=5.0,
                )
            # Admitted again, with no wait before the transfer is registered: a reload
            # while the grant was read ends only transfers registered then.
            if (refused := self.hub.refusal(agency, certificate)) is not None:
                raise refused
            transfer = _Transfer(owner, agency, certificate, request.offset)
            self._transfers[request_id] = transfer
            try:
                # Asking counts against the owner's time to answer: its stream may be full
                # (a slow reader), or its session over, with nobody to read the queue again.
                # A reload that refuses the fetcher ends the wait for room too (the wait
                # for the header ends with it: refuse_fetch breaks the transfer off).
                ask = session.out.put(
                    pb.ConnectResponse(
                        document_request=pb.DocumentRequest(
                            request_id=request_id, sha256=digest, offset=request.offset
                        )
                    )
                )
                async with asyncio.timeout(_OWNER_ANSWER_S):
                    if not await unless_set(ask, transfer.fetch_stop):
                        assert transfer.fetch_refused is not None
                        raise transfer.fetch_refused
                    header = await transfer.take()
            except TimeoutError:
                raise ChaparError(
                    Code.UNAVAILABLE,
                    "OWNER_NOT_ANSWERING",
                    f"the node of {owner} did not answer; retry later",
                    retry_after_s=5.0,
                ) from None
            if isinstance(header, ChaparError):  # the push broke off before its header
                raise header
            if not isinstance(header, pb.PushHeader) or header.error_reason:
                raise _owner_refused(owner, request.uri, header)
        except ChaparError as exc:
            log.info("fetch refused: %s %s", exc.reason, exc.message)
            self._end(request_id, transfer)
            await abort(context, exc)
            return
        if not await unless_set(self._relay(transfer, header, context), transfer.fetch_stop):
            assert transfer.fetch_refused is not None
            await abort(context, transfer.fetch_refused)

    async def _relay(
        self, transfer: _Transfer, header: pb.PushHeader, context: grpc.aio.ServicerContext
    ) -> None:
        """Sends the fetcher what the owner pushes, until the push's end."""
        await context.write(pb.FetchDocumentResponse(size=header.size))
        while (item := await self._next(transfer)) is not None:
            if isinstance(item, ChaparError):  # the push broke: the fetcher resumes
                await abort(context, item)
            if isinstance(item, bytes):
                await context.write(pb.FetchDocumentResponse(chunk=item))

    @staticmethod
    async def _next(transfer: _Transfer) -> pb.PushHeader | bytes | ChaparError | None:
        """The push's next item; UNAVAILABLE / PUSH_STALLED when its owner sent nothing for
        ``_OWNER_ANSWER_S`` (a node alive, its connection up and pinging, and its push stuck:
        keepalive never ends that). The fetch ends, so does the push (``_put`` finds the
        fetch gone), and the fetching node resumes from the bytes it has."""
        try:
            return await asyncio.wait_for(transfer.take(), _OWNER_ANSWER_S)
        except TimeoutError:
            log.warning("push from %s stalled for %g s; fetch ended", transfer.owner,
                        _OWNER_ANSWER_S)  # fmt: skip
            return ChaparError(
                Code.UNAVAILABLE,
                "PUSH_STALLED",
                f"the node of {transfer.owner} sent nothing for {_OWNER_ANSWER_S:g} s; retry"
                " from the bytes received",
                metadata={"owner": transfer.owner},
                retry_after_s=1.0,
            )

    def _end(self, request_id: str, transfer: _Transfer | None) -> None:
        self._transfers.pop(request_id, None)
        if transfer is not None:
            transfer.gone.set()

    async def push(
        self,
        request_iterator: AsyncIterator[pb.PushDocumentRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PushDocumentResponse:
        relayed = 0
        transfer: _Transfer | None = None
        finished = False
        try:
            agency, certificate = self.hub._peer(context)
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise ChaparError(
                    Code.INVALID_ARGUMENT, "PUSH_HEADER_MISSING", "a push starts with its header"
                )
            transfer = self._transfers.get(first.header.request_id)
            if transfer is None or transfer.owner != agency:
                raise ChaparError(
                    Code.NOT_FOUND,
                    "NO_SUCH_REQUEST",
                    "no document request of this node is waiting under that id",
                )
            # Admitted again after the wait for the header: a reload meanwhile ends only
            # pushes it found started (end_refused).
            if (refused := self.hub.refusal(agency, certificate)) is not None:
                raise refused
            transfer.pusher_certificate = certificate
            header, pipe = first.header, transfer

            async def relay() -> None:
                nonlocal relayed, finished
                await self._put(pipe, header)
                empty = 0
                async for message in request_iterator:
                    if message.WhichOneof("part") == "error_reason":
                        # The owner cannot send the rest: its copy is corrupt (it has set
                        # it aside). The fetch ends with that, not resumed; the push OK.
                        log.warning(
                            "push from %s ended after %d bytes: %r",
                            pipe.owner,
                            pipe.offset + relayed,
                            message.error_reason[:_REASON_LOGGED],  # the owner's text
                        )
                        await self._put(pipe, _owner_copy_corrupt(pipe.owner))
                        finished = True
                        return
                    chunk = chunk_of(message, what="a push", missing="PUSH_PART_MISSING")
                    if not chunk:  # not passed on, and bounded: no byte count sees them
                        empty += 1
                        if empty > MAX_EMPTY_CHUNKS:
                            raise empty_chunks_refused(what="a push", reason="PUSH_EMPTY_CHUNKS")
                        continue
                    await self._put(pipe, chunk)
                    relayed += len(chunk)
                if not header.error_reason and pipe.offset + relayed != header.size:
                    # The stream ended short of (or past) the document: a cancelled call
                    # ends the request iterator like a finished one (the hub shutting
                    # down). The fetch must then fail in a way its node resumes from,
                    # never end "OK".
                    cut = ChaparError(
                        Code.UNAVAILABLE,
                        "PUSH_INTERRUPTED",
                        f"the owner's push ended after {pipe.offset + relayed} of "
                        f"{header.size} bytes; retry from the bytes received",
                        retry_after_s=1.0,
                    )
                    await self._put(pipe, cut)
                    raise cut
                await self._put(pipe, None)
                finished = True

            if not await unless_set(relay(), transfer.push_stop):
                assert transfer.push_refused is not None
                raise transfer.push_refused
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        finally:
            if transfer is not None and not finished:
                # Ended any other way (its node gone, its call cancelled, a malformed
                # frame): the fetch must learn it, not wait for the next chunk for ever.
                transfer.break_off(
                    ChaparError(
                        Code.UNAVAILABLE,
                        "PUSH_INTERRUPTED",
                        f"the owner's push broke off after {transfer.offset + relayed} bytes;"
                        " retry from the bytes received",
                        retry_after_s=1.0,
                    )
                )
        return pb.PushDocumentResponse(bytes_relayed=relayed)

    @staticmethod
    async def _put(transfer: _Transfer, item: pb.PushHeader | bytes | ChaparError | None) -> None:
        """Waits for room in the pipe; UNAVAILABLE / FETCH_ENDED when the fetch has ended
        (for a chunk also while the pipe has room: the owner stops reading its document for
        no one; a not-found answer's end still ends its push OK)."""
        if transfer.gone.is_set() and isinstance(item, bytes):  # chunks for no one
            raise _fetch_ended()
        if not await unless_set(transfer.queue.put(item), transfer.gone):
            raise _fetch_ended()


def _owner_refused(owner: str, uri: str, header: pb.PushHeader | bytes | None) -> ChaparError:
    """Why the fetch ends when the owner's push opens with an error_reason (or not with a
    header): UNAVAILABLE / OWNER_STORAGE_FAILED when its document store failed to look the
    document up, NOT_FOUND / DOCUMENT_NOT_FOUND for DOCUMENT_NOT_FOUND and any reason this
    hub does not know (a newer node's)."""
    if isinstance(header, pb.PushHeader) and header.error_reason == "STORAGE_FAILED":
        return ChaparError(
            Code.UNAVAILABLE,
            "OWNER_STORAGE_FAILED",
            f"the node of {owner} could not read its document store (it logs why); retry later",
            metadata={"owner": owner, "uri": uri},
            retry_after_s=5.0,
        )
    return ChaparError(
        Code.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
        f"the node of {owner} does not hold {uri}",
        metadata={"uri": uri},
    )


def _owner_copy_corrupt(owner: str) -> ChaparError:
    return ChaparError(
        Code.DATA_LOSS,
        "DOCUMENT_CORRUPT",
        f"the node of {owner} found its copy corrupt while sending it (and set it aside, or"
        " tried to): it has none to send until the file is uploaded there again",
        metadata={"owner": owner},
    )


def _fetch_ended() -> ChaparError:
    return ChaparError(
        Code.UNAVAILABLE, "FETCH_ENDED", "the fetching node is gone", retry_after_s=1.0
    )


def document_grants(header: pb.EnvelopeHeader, sender: str) -> list[tuple[bytes, str, str]]:
    """(digest, owner, recipient) fetches a verified letter allows: each recipient may fetch
    the documents it references. Only the sender's own documents are granted (a node
    refuses to number a letter referencing anyone else's). The hub records them in the
    same transaction that accepts the letter, so no accepted letter lacks its grants."""
    return [
        (digest, sender, r.agency)
        for digest in senders_documents(header, sender)
        for r in header.recipients
    ]
