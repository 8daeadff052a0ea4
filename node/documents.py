"""The node's DocumentService, and its two sides of moving documents through the hub.

* Back-ends upload (client stream) into the store, download (server stream from an
  offset) and stat. Same mutual TLS and authorisation as NodeService; an upload or
  download under way ends when a directory revokes its certificate, as the back-end's
  other streams do.
* A document of another agency is fetched at its first download: ``HubService.
  FetchDocument`` streams it from the owning node through the hub; this node writes it to
  a temporary file while hashing it and keeps it only when size and SHA-256 match the
  address (DATA_LOSS / DIGEST_MISMATCH otherwise, nothing kept), and records that it had
  it from that owner (``NodeStore.record_fetch``). Its size is the one the letters naming
  it sign: another announced, or a chunk past it, ends the fetch there (DATA_LOSS /
  SIZE_MISMATCH, nothing kept), before the node writes more than that. A broken fetch resumes from the bytes
  already written. For a client limited to some mailboxes whose right to it comes from a
  letter its owner sent, the node fetches it from that owner even when the store holds
  the same content for another reason, until it has had it from that owner
  (``Agency.document_access``).
* When the hub asks for one of this agency's documents (a ``document_request`` frame on
  the Connect stream), ``push`` answers with a node-initiated ``PushDocument`` stream:
  the node never needs an inbound port. It checks its copy as it reads it: a corrupt one
  is set aside, and the fetch ends with DATA_LOSS / DOCUMENT_CORRUPT.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc

from client_sdk import pb
from client_sdk.documents import CHUNK_BYTES
from client_sdk.errors import from_rpc_error
from node.agency import Access, Agency
from node.core.documents import (
    MAX_EMPTY_CHUNKS,
    check_media_type,
    check_size,
    chunk_of,
    document_uri,
    empty_chunks_refused,
    parse_document_uri,
)
from node.core.errors import ChaparError, Code, hub_unavailable
from node.document_store import DocumentStore, DocumentWriter, FileId
from node.metrics import count_rejection
from node.rpc.errors import abort, code_of, storage_error
from node.tasks import unless_set

if TYPE_CHECKING:
    from node.rpc.hub_link import HubLink

__all__ = ["MAX_EMPTY_CHUNKS", "Documents", "push"]

log = logging.getLogger("chapar.documents")
# A fetch that broke after some bytes goes on from them for as long as this passes
# between two bytes, trying again every _RESUME_PAUSE_S (the hub or the owner restarting).
_RESUME_WAIT_S = 15.0
_RESUME_PAUSE_S = 0.2
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED)
_DIGEST_BYTES = hashlib.sha256().digest_size
# How long an upload whose request stream ended, and whose content may be cut short,
# waits for a cancellation by its client before it is committed (see _upload).
_SETTLE_S = 0.05
_STORE = "the node's document store"  # what failed, in a storage_error's message


class Documents(pb.DocumentServiceServicer):
    def __init__(self, agency: Agency, store: DocumentStore) -> None:
        self.agency = agency
        self.store = store
        self.link: HubLink | None = None
        # By address: a fetch from one owner never serves a download of another's (the
        # same digest, named by an agency that may not have it).
        self._fetches: dict[str, _Fetch] = {}

    # -- upload -------------------------------------------------------------------------

    async def UploadDocument(  # type: ignore[override]  # answers via context.write
        self,
        request_iterator: AsyncIterator[pb.UploadDocumentRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._revocable(context, False, lambda a: self._upload(a, request_iterator, context))

    async def _revocable(
        self,
        context: grpc.aio.ServicerContext,
        read_only: bool,
        transfer: Callable[[Access], Coroutine[Any, Any, None]],
    ) -> None:
        """Runs an upload or a download for an authorised back-end until its end, or until
        a directory revokes the certificate it was admitted with (or a CA above it): it
        then ends at once, UNAUTHENTICATED with the revocation's reason, as the back-end's
        inbox and submission streams do (an upload keeps nothing: its temporary file goes).
        A stop of the node lets it finish within the grace period."""
        try:
            stream = self.agency._open_stream(context, read_only=read_only)
        except ChaparError as exc:
            await abort(context, exc)
            return
        with self.agency._registered(stream):
            if await unless_set(transfer(stream.access), stream.revoked):
                return
        assert stream.refused is not None
        log.warning("a transfer of %s ended: %s", stream.identity.uri, stream.refused.reason)
        await abort(context, stream.refused)

    async def _upload(
        self,
        access: Access,
        request_iterator: AsyncIterator[pb.UploadDocumentRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise ChaparError(
                    Code.INVALID_ARGUMENT,
                    "UPLOAD_HEADER_MISSING",
                    "the first message of an upload must be its header",
                    field_violations=[("header", "missing")],
                )
            header = first.header
            check_media_type(header.media_type, self.store.limits, "header.media_type")
            if header.size < 0:
                raise ChaparError(Code.INVALID_ARGUMENT, "INVALID_SIZE", "header.size is negative")
            if header.sha256 and len(header.sha256) != _DIGEST_BYTES:
                # Refused with the header, not after the content it could never match.
                raise ChaparError(
                    Code.INVALID_ARGUMENT,
                    "INVALID_DIGEST",
                    f"header.sha256 is {len(header.sha256)} bytes, not {_DIGEST_BYTES}"
                    " (a SHA-256 digest, raw; empty when unknown)",
                    metadata={"size": str(len(header.sha256))},
                    field_violations=[("header.sha256", "not a 32-byte SHA-256 digest")],
                )
            try:
                writer = self.store.writer(expected_size=header.size, expected_sha256=header.sha256)
                try:
                    await context.write(pb.UploadDocumentResponse())  # header accepted: send on
                    empty = 0
                    async for message in request_iterator:
                        chunk = chunk_of(message, what="an upload", missing="UPLOAD_PART_MISSING")
                        try:
                            empty += not chunk
                            if empty > MAX_EMPTY_CHUNKS:
                                raise empty_chunks_refused(
                                    what="an upload", reason="UPLOAD_EMPTY_CHUNKS"
                                )
                            writer.write(chunk)
                        except (OSError, ChaparError) as exc:
                            writer.discard()
                            # The content is refused (past the size limit or the size
                            # announced: RESOURCE_EXHAUSTED, INVALID_ARGUMENT; too many
                            # empty chunks: INVALID_ARGUMENT) or the disk
                            # failed, while the client still sends. Read the rest before
                            # the status goes: a status that ends the call under a client's
                            # write reaches it as a bare INTERNAL (grpc/grpc#36066), its
                            # code and reason lost, which would tell it to retry at once.
                            await _drain(request_iterator, header.size or writer.limit)
                            if isinstance(exc, ChaparError):
                                raise
                            raise storage_error(exc, "nothing was stored", where=_STORE) from exc
                    if not header.size or writer.size != header.size:
                        # gRPC ends the request stream alike whether the client
                        # half-closed or cancelled; the cancellation reaches this task a
                        # moment later. Content that may be cut short (nothing announced,
                        # or short of the size announced) waits for it here: a cancelled
                        # upload is then neither stored nor refused with a status that can
                        # no longer be sent (an incident in the log).
                        await asyncio.sleep(_SETTLE_S)
                    digest, size, existed = await writer.commit()
                finally:
                    writer.discard()
            except OSError as exc:  # the temporary file is gone (discard): nothing stored
                raise storage_error(exc, "nothing was stored", where=_STORE) from exc
        except ChaparError as exc:
            log.info("upload refused: %s %s", exc.reason, exc.message)
            await abort(context, exc)
            return
        uri = document_uri(self.agency.config.agency, digest)
        log.info("document %s stored (%d bytes%s)", uri, size, ", existed" if existed else "")
        if access.identity.kind == "client":  # it may use what it uploaded (require_document)
            await self.agency.store.record_upload(digest, access.identity.name)
        await context.write(
            pb.UploadDocumentResponse(
                document=pb.DocumentInfo(uri=uri, sha256=digest, size=size), existed=existed
            )
        )

    # -- stat and download ----------------------------------------------------------------

    async def StatDocument(
        self, request: pb.StatDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatDocumentResponse:
        try:
            access = self.agency._authorize(context, read_only=True)
            _, digest = parse_document_uri(request.uri)
            held_serves = await self.agency.document_access(access, digest, request.uri)
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        # Not the copy held for another reason: for this caller it is still to be fetched.
        size = self.store.size(digest) if held_serves else None
        if size is None:
            return pb.StatDocumentResponse(stored=False)
        return pb.StatDocumentResponse(
            stored=True, document=pb.DocumentInfo(uri=request.uri, sha256=digest, size=size)
        )

    async def DownloadDocument(  # type: ignore[override]  # answers via context.write
        self, request: pb.DownloadDocumentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._revocable(context, True, lambda a: self._download(a, request, context))

    async def _download(
        self, access: Access, request: pb.DownloadDocumentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        joined: tuple[_Fetch, BinaryIO] | None = None
        try:
            owner, digest = parse_document_uri(request.uri)
            # False: this caller may have it only as fetched from its owner, whatever copy
            # the store holds (Agency.document_access).
            held_serves = await self.agency.document_access(access, digest, request.uri)
            if request.offset < 0:
                raise ChaparError(
                    Code.INVALID_ARGUMENT,
                    "INVALID_OFFSET",
                    "offset is negative",
                    field_violations=[("offset", "negative")],
                )
            size = self.store.size(digest) if held_serves else None
            if size is None:
                if owner == self.agency.config.agency:
                    raise ChaparError(
                        Code.NOT_FOUND,
                        "DOCUMENT_NOT_FOUND",
                        f"this node holds no document {request.uri}",
                        metadata={"uri": request.uri},
                    )
                joined = self._join_fetch(request.uri, digest, held_serves=held_serves)
            if joined is not None:
                try:
                    size = await joined[0].total()
                except BaseException:
                    joined[1].close()
                    raise
            else:  # held here, or a fetch completed between the two looks
                size = self.store.size(digest)
            if size is None:
                raise _moving()
            if request.offset > size:
                raise ChaparError(
                    Code.OUT_OF_RANGE,
                    "OFFSET_OUT_OF_RANGE",
                    f"offset {request.offset} is past the end ({size} bytes)",
                    metadata={"size": str(size)},
                )
        except ChaparError as exc:
            if joined is not None:
                joined[1].close()
            log.info("download refused: %s %s", exc.reason, exc.message)
            await abort(context, exc)
            return
        info = pb.DocumentInfo(uri=request.uri, sha256=digest, size=size)
        if joined is not None:
            await self._relay_fetch(*joined, request.offset, info, context)
            return
        # A whole-file read is checked on the way out too: a copy corrupted on this disk
        # is dropped (the next download fetches it again) instead of served twice.
        hasher = hashlib.sha256() if request.offset == 0 else None
        read = self.store.file_id(digest)  # before the file is opened: see DocumentStore.remove
        first = True
        try:
            async with contextlib.aclosing(self.store.read(digest, request.offset)) as chunks:
                async for chunk in chunks:
                    if hasher is not None:
                        hasher.update(chunk)
                    await context.write(
                        pb.DownloadDocumentResponse(document=info if first else None, chunk=chunk)
                    )
                    first = False
        except FileNotFoundError:  # removed by retention since it was looked up
            await abort(context, _moving())
            return
        except OSError as exc:
            log.error("reading document %s failed: %r", request.uri, exc)
            await abort(context, storage_error(exc, "retry the download", where=_STORE))
            return
        if first:
            await context.write(pb.DownloadDocumentResponse(document=info))
        if hasher is not None and hasher.digest() != digest:
            if owner != self.agency.config.agency:
                _drop_fetched(self.store, digest, read, request.uri)
            else:
                _set_aside_own(self.store, digest, read, request.uri)
            await abort(
                context,
                ChaparError(
                    Code.DATA_LOSS,
                    "DIGEST_MISMATCH",
                    "the stored copy does not match its digest",
                    metadata={"uri": request.uri},
                ),
            )

    # -- fetching from the owner through the hub ------------------------------------------

    def _join_fetch(
        self, uri: str, digest: bytes, *, held_serves: bool
    ) -> tuple[_Fetch, BinaryIO] | None:
        """The fetch of ``uri`` under way (or a new one), with its file open for reading.

        One fetch per address at a time. None when a fetch completed meanwhile and
        ``held_serves``: the store holds the document (without it, the store's copy is not
        for this download, which fetches afresh). No await here, so nothing moves between
        the checks. A temporary file the disk refuses to make or open is the storage's
        error, as for an upload (``storage_error``), logged; none is left behind.
        """
        fetch = self._fetches.get(uri)
        if fetch is not None:
            try:
                return fetch, fetch.open_reader()
            except FileNotFoundError:  # that fetch has just ended
                if held_serves and self.store.size(digest) is not None:
                    return None
        try:
            writer = self.store.writer(expected_sha256=digest)
        except OSError as exc:
            raise _no_temporary_file(uri, exc) from exc
        fetch = _Fetch(writer)
        try:
            reader = fetch.open_reader()
        except OSError as exc:
            writer.discard()
            raise _no_temporary_file(uri, exc) from exc
        self._fetches[uri] = fetch
        fetch.task = asyncio.create_task(self._fetch(uri, digest, fetch))

        def ended(task: asyncio.Task[int]) -> None:
            if self._fetches.get(uri) is fetch:
                del self._fetches[uri]
            if not task.cancelled():
                task.exception()  # retrieved: a failure is logged by _fetch and sent to readers

        fetch.task.add_done_callback(ended)
        return fetch, reader

    async def _relay_fetch(
        self,
        fetch: _Fetch,
        reader: BinaryIO,
        offset: int,
        info: pb.DocumentInfo,
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Serves a document while it is being fetched: reads the growing temporary file.

        The client gets the bytes as they arrive; the fetch checks the digest at the end,
        and a mismatch ends this stream with DATA_LOSS too (the SDK then keeps nothing).
        """
        try:
            first = True
            position = offset
            while True:
                seen = fetch.changed
                available = fetch.writer.size
                if position < available:
                    await asyncio.to_thread(reader.seek, position)
                    chunk = await asyncio.to_thread(
                        reader.read, min(CHUNK_BYTES, available - position)
                    )
                    position += len(chunk)
                    await context.write(
                        pb.DownloadDocumentResponse(document=info if first else None, chunk=chunk)
                    )
                    first = False
                    continue
                if fetch.task is not None and fetch.task.done():
                    break
                await seen.wait()
            if first:
                await context.write(pb.DownloadDocumentResponse(document=info))
        finally:
            reader.close()
        assert fetch.task is not None
        if fetch.task.cancelled():  # the node is stopping
            error: BaseException | None = _interrupted()
        else:
            error = fetch.task.exception()
        if isinstance(error, OSError):  # writing the copy: the disk is full or failing
            log.error("fetch of %s failed: %r", info.uri, error)
            error = storage_error(error, "nothing was kept", where=_STORE)
        elif error is not None and not isinstance(error, ChaparError):
            log.error("fetch of %s failed: %r", info.uri, error)
            error = ChaparError(
                Code.INTERNAL, "FETCH_FAILED", "the node could not store the document; retry"
            )
        if error is not None:
            await abort(context, error)

    async def _fetch(self, uri: str, digest: bytes, fetch: _Fetch) -> int:
        """Fetches ``uri`` into ``fetch.writer`` through the hub.

        A first call that fails before a byte arrives is answered at once (the owner is
        offline, the hub refuses): the back-end retries. Once bytes have come, a break
        (the call ends with UNAVAILABLE, INTERNAL or CANCELLED, or the hub link closes its
        channel when the hub goes away) is resumed from the bytes held, on the link as it
        is now: waiting for it to reconnect and for the owner to be back, for up to
        ``_RESUME_WAIT_S`` without a new byte.
        """
        writer = fetch.writer
        loop = asyncio.get_running_loop()
        resume_by: float | None = None  # set at a break: when to stop trying to go on
        try:
            # What the letters naming it sign (their sender is its owner): the owner's
            # announcement must be one of these, and no byte past it is written.
            signed = await self.agency.store.signed_sizes(uri)
            most = max(signed) if signed else None
            link = self.link
            while True:
                if link is None:
                    stub = None
                elif resume_by is None:
                    stub = link.stub
                else:  # after a break: the link may be reconnecting
                    stub = await link.wait_stub(max(0.0, resume_by - loop.time()))
                if stub is None:
                    raise hub_unavailable("the node is not connected to the hub")
                offset = writer.size
                call = stub.FetchDocument(pb.FetchDocumentRequest(uri=uri, offset=offset))
                failure: grpc.aio.AioRpcError | None = None
                try:
                    async for message in call:
                        if message.size:
                            check_size(message.size, self.store.limits)
                            if signed and message.size not in signed:
                                raise _wrong_size(uri, signed, 0, announced=message.size)
                            writer.expected_size = message.size
                            fetch.announce(message.size)
                        bound = writer.expected_size or most
                        if bound is not None and writer.size + len(message.chunk) > bound:
                            # Not the document, whatever follows: stop at this chunk rather
                            # than write on to max_file_bytes before the digest says so.
                            raise _wrong_size(
                                uri, signed, bound, sent=writer.size + len(message.chunk)
                            )
                        writer.write(message.chunk)
                        fetch.notify()
                    if not writer.expected_size or writer.size >= writer.expected_size:
                        break
                    # Ended without an error but short of the size announced: the hub's
                    # relay was cut (a hub shutting down ends the owner's push as if it
                    # were complete). Go on from the bytes held, as after a break.
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    # Not us: the hub link closed the call's channel (the hub went away).
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in _RESUMABLE:
                        raise _fetch_error(uri, exc) from exc
                    failure = exc
                finally:
                    call.cancel()  # a no-op when it ended; stops the hub when we refuse
                if writer.size > offset:
                    resume_by = loop.time() + _RESUME_WAIT_S  # progress: a fresh budget
                elif resume_by is None and failure is not None:
                    raise _fetch_error(uri, failure) from failure  # not a byte yet
                elif resume_by is None:
                    resume_by = loop.time() + _RESUME_WAIT_S
                elif loop.time() >= resume_by:
                    if failure is not None:
                        raise _fetch_error(uri, failure) from failure
                    raise hub_unavailable("the hub link did not come back")
                log.warning(
                    "fetch of %s broke at %d bytes (%s); resuming",
                    uri,
                    writer.size,
                    failure.code().name if failure is not None else "ended early",
                )
                await asyncio.sleep(_RESUME_PAUSE_S)
            fetch.announce(writer.size)
            _, size, _ = await writer.commit()
            # Its owner had it: letters from that owner give their mailboxes this copy now.
            owner, _ = parse_document_uri(uri)
            await self.agency.store.record_fetch(digest, owner)
        except ChaparError as exc:
            log.warning("fetch of %s failed: %s %s", uri, exc.reason, exc.message)
            raise
        finally:
            writer.discard()
            fetch.notify(final=True)
        log.info("fetched %s (%d bytes), digest verified", uri, size)
        return size


def _no_temporary_file(uri: str, exc: OSError) -> ChaparError:
    log.error("fetch of %s failed: the document store refused its temporary file (%s)", uri, exc)
    return storage_error(exc, "nothing was fetched", where=_STORE)


def _interrupted() -> ChaparError:
    return ChaparError(
        Code.UNAVAILABLE,
        "FETCH_INTERRUPTED",
        "the fetch through the hub was interrupted; retry the download",
        retry_after_s=1.0,
    )


def _wrong_size(
    uri: str, signed: set[int], bound: int, *, announced: int | None = None, sent: int = 0
) -> ChaparError:
    """DATA_LOSS / SIZE_MISMATCH: the owner announced another size than the letters naming
    ``uri`` sign (``signed``), or sent more than ``bound`` bytes (that size, or the one it
    announced when no letter names it). Nothing is kept."""
    expected = " or ".join(str(size) for size in sorted(signed or {bound}))
    if announced is not None:
        what, metadata = f"announced {announced} bytes", {"announced": str(announced)}
    else:
        what, metadata = f"sent {sent} bytes or more", {"actual": str(sent)}
    source = "its letters sign" if signed else "it announced"
    return ChaparError(
        Code.DATA_LOSS,
        "SIZE_MISMATCH",
        f"the owner of {uri} {what}; {source} {expected}: nothing was kept",
        metadata={"uri": uri, "expected": expected, **metadata},
    )


def _fetch_error(uri: str, exc: grpc.aio.AioRpcError) -> ChaparError:
    error = from_rpc_error(exc)
    return ChaparError(
        code_of(exc.code(), Code.UNAVAILABLE),
        error.reason or exc.code().name,
        f"fetching {uri} through the hub: {error.message}",
        metadata={"uri": uri, **error.metadata},
        retry_after_s=error.retry_after,
    )


class _Fetch:
    """One document being fetched through the hub, and the downloads waiting on it."""

    def __init__(self, writer: DocumentWriter) -> None:
        self.writer = writer
        self.task: asyncio.Task[int] | None = None
        self.changed = asyncio.Event()
        self._size: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def open_reader(self) -> BinaryIO:
        """The temporary file, opened before it can be renamed or removed."""
        return self.writer.path.open("rb")

    def announce(self, size: int) -> None:
        if not self._size.done():
            self._size.set_result(size)

    def notify(self, *, final: bool = False) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()
        if final and not self._size.done():
            self._size.cancel()

    async def total(self) -> int:
        """The document's size once the owner announced it; the fetch's error otherwise."""
        assert self.task is not None
        await asyncio.wait({self._size, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self._size.done() and not self._size.cancelled():
            return self._size.result()
        try:
            return await self.task  # raises what ended the fetch
        except ChaparError:
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our download itself is cancelled
            # The fetch was (the node is stopping): an answer, not a silent cancellation,
            # which would leave the back-end's call without a status.
            raise _interrupted() from None
        except OSError as exc:  # writing the copy: the disk is full or failing
            log.error("fetch failed: %r", exc)
            raise storage_error(exc, "nothing was kept", where=_STORE) from exc
        except Exception as exc:
            log.error("fetch failed: %r", exc)
            raise ChaparError(
                Code.INTERNAL, "FETCH_FAILED", "the node could not store the document; retry"
            ) from exc


async def _drain(messages: AsyncIterator[pb.UploadDocumentRequest], limit: int) -> None:
    """Reads and drops the rest of an upload, up to ``limit`` bytes of chunks and
    ``MAX_EMPTY_CHUNKS`` messages with none (which no count of bytes ever bounds)."""
    seen = empty = 0
    async for message in messages:
        seen += len(message.chunk)
        empty += not message.chunk
        if seen > limit or empty > MAX_EMPTY_CHUNKS:
            return


def _set_aside_own(store: DocumentStore, digest: bytes, read: FileId | None, uri: str) -> bool:
    """Moves aside this agency's own copy of ``uri`` found corrupt (``DocumentStore.
    quarantine``) and says so; False, saying nothing, when another reader moved it first
    (the copy now in place may be a good one, uploaded again since). A move the disk
    refuses is said too, with its error: the copy stays in place, and uploading the file
    again still repairs it (the upload replaces it)."""
    try:
        if not store.quarantine(digest, read):
            return False
    except OSError as exc:
        log.error(
            "our document %s is corrupt, and could not be moved aside (%s): upload it again"
            " to repair it",
            uri,
            exc,
        )
        return True
    log.error("our document %s is corrupt; moved aside: upload it again to repair it", uri)
    return True


def _drop_fetched(store: DocumentStore, digest: bytes, read: FileId | None, uri: str) -> None:
    """Drops a copy of another agency's ``uri`` found corrupt (``DocumentStore.remove``):
    the next download fetches it again. A removal the disk refuses is said, with its error
    (until it is removed, each download of it ends DATA_LOSS)."""
    try:
        store.remove(digest, read)
    except OSError as exc:
        log.error(
            "stored document %s is corrupt, and this copy could not be dropped (%s): remove"
            " %s, and the next download fetches it again",
            uri,
            exc,
            store.path(digest),
        )
        return
    log.error("stored document %s is corrupt; dropping this copy", uri)


def _moving() -> ChaparError:
    return ChaparError(Code.UNAVAILABLE, "DOCUMENT_MOVING", "retry the download", retry_after_s=0.1)


PUSH_CHECK_REST_BYTES = 64 * 1024 * 1024
"""A push ended early reads at most this much more of a file found sound before to check it
again (``push``)."""


async def push(
    stub: pb.HubServiceStub, store: DocumentStore, request: pb.DocumentRequest, agency: str
) -> None:
    """Answers the hub's document_request: streams the document from the asked offset.

    Asked from its start (as every fetch first is), the document is checked as it is read,
    each chunk sent once the next is read: a copy that does not match its digest, or the
    size announced, is set aside as a whole-file download of it does (``DocumentStore.
    quarantine``: uploading the file again repairs it), logged and counted once, and the
    push ends with DOCUMENT_CORRUPT in place of its last chunk, which the hub passes on to
    the fetch. A push the hub ends early (the fetching node refused the size announced, or
    went away) still reads the rest for the check: a truncated copy is found so. A file
    already found sound (``DocumentStore.found_sound``) is read on only when at most
    ``PUSH_CHECK_REST_BYTES`` is left: a fetch cancelled at its start each time reads a
    large file whole once, not each time. A store that cannot look the document up (a disk
    error, a file where a folder belongs: not "no such file") is logged, and the push
    answers at once with a header whose error_reason is STORAGE_FAILED.
    """
    refusal = "DOCUMENT_NOT_FOUND"  # the header's error_reason when no copy is sent
    try:
        size = store.size(request.sha256)
        read = store.file_id(request.sha256)  # before the file is opened: see DocumentStore.remove
    except OSError as exc:  # not "no such file" (None): a disk error, a file for a folder
        log.error(
            "push of %s failed: the document store cannot look up %s (%s)",
            request.request_id,
            document_uri(agency, request.sha256),
            exc,
        )
        size, read, refusal = None, None, "STORAGE_FAILED"
    uri = document_uri(agency, request.sha256) if size is not None else ""
    hasher = hashlib.sha256() if request.offset == 0 else None
    got = 0

    def unsound() -> bool:
        """After a whole read: whether the copy is corrupt (then set aside, and said once)."""
        if hasher is None:
            return False
        if got == size and hasher.digest() == request.sha256:
            store.found_sound(request.sha256, read, got)
            return False
        if _set_aside_own(store, request.sha256, read, uri):  # not when another push just did
            count_rejection(Code.DATA_LOSS.name, "DOCUMENT_CORRUPT")
        return True

    call = stub.PushDocument()
    try:
        if size is None or request.offset < 0 or request.offset > size:
            await call.write(
                pb.PushDocumentRequest(
                    header=pb.PushHeader(request_id=request.request_id, error_reason=refusal)
                )
            )
        else:
            await call.write(
                pb.PushDocumentRequest(
                    header=pb.PushHeader(request_id=request.request_id, size=size)
                )
            )
            held = b""
            async with contextlib.aclosing(store.read(request.sha256, request.offset)) as chunks:
                try:
                    async for chunk in chunks:
                        got += len(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        if held:
                            await call.write(pb.PushDocumentRequest(chunk=held))
                        held = chunk
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    # The hub ended it early (the fetching node refused the size a
                    # truncated copy announces, or went away): read on for the check,
                    # unless the rest is large and this file was found sound before (a
                    # fetch cancelled at its start each time would make the node read and
                    # hash a whole 2 GiB file each time).
                    if hasher is not None and (
                        (size or 0) - got <= PUSH_CHECK_REST_BYTES
                        or not store.sound(request.sha256, read, size)
                    ):
                        async for chunk in chunks:
                            got += len(chunk)
                            hasher.update(chunk)
                        unsound()
                    raise
            if unsound():
                await call.write(pb.PushDocumentRequest(error_reason="DOCUMENT_CORRUPT"))
            elif held:
                await call.write(pb.PushDocumentRequest(chunk=held))
        await call.done_writing()
        await call
    except asyncio.InvalidStateError:  # a write after the hub's status: say which
        log.info(
            "push of %s ended early by the hub: %s %s",
            request.request_id,
            await call.code(),
            await call.details(),
        )
    except grpc.aio.AioRpcError as exc:
        log.warning("push of %s ended: %s %s", request.request_id, exc.code(), exc.details())
    except OSError as exc:  # removed by retention meanwhile, or a disk error: the fetch fails
        log.error("push of %s failed reading the document: %r", request.request_id, exc)
        call.cancel()
