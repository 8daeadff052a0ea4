"""The node's DocumentService, and its two sides of moving documents through the hub.

* Back-ends upload (client stream) into the store, download (server stream from an
  offset) and stat. Same mutual TLS and authorisation as NodeService.
* A document of another agency is fetched at its first download: ``HubService.
  FetchDocument`` streams it from the owning node through the hub; this node writes it to
  a temporary file while hashing it and keeps it only when size and SHA-256 match the
  address (DATA_LOSS / DIGEST_MISMATCH otherwise, nothing kept). A broken fetch resumes
  from the bytes already written.
* When the hub asks for one of this agency's documents (a ``document_request`` frame on
  the Connect stream), ``push`` answers with a node-initiated ``PushDocument`` stream:
  the node never needs an inbound port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from client_sdk import pb
from client_sdk.errors import from_rpc_error
from node.agency import Agency
from node.core.documents import check_media_type, check_size, document_uri, parse_document_uri
from node.core.errors import ChaparError, Code
from node.document_store import DocumentStore
from node.rpc.errors import abort

if TYPE_CHECKING:
    from node.rpc.hub_link import HubLink

__all__ = ["Documents", "push"]

log = logging.getLogger("chapar.documents")
_FETCH_ATTEMPTS = 3


class Documents(pb.DocumentServiceServicer):
    def __init__(self, agency: Agency, store: DocumentStore) -> None:
        self.agency = agency
        self.store = store
        self.link: HubLink | None = None
        self._fetching: dict[bytes, asyncio.Lock] = {}

    # -- upload -------------------------------------------------------------------------

    async def UploadDocument(  # type: ignore[override]  # answers via context.write
        self,
        request_iterator: AsyncIterator[pb.UploadDocumentRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            self.agency._authorize(context)
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
            writer = self.store.writer(expected_size=header.size, expected_sha256=header.sha256)
            try:
                await context.write(pb.UploadDocumentResponse())  # header accepted: send on
                async for message in request_iterator:
                    if message.WhichOneof("part") != "chunk":
                        raise ChaparError(
                            Code.INVALID_ARGUMENT,
                            "UNEXPECTED_HEADER",
                            "only the first message of an upload is a header",
                        )
                    writer.write(message.chunk)
                digest, size, existed = await writer.commit()
            finally:
                writer.discard()
        except ChaparError as exc:
            log.info("upload refused: %s %s", exc.reason, exc.message)
            await abort(context, exc)
            return
        uri = document_uri(self.agency.config.agency, digest)
        log.info("document %s stored (%d bytes%s)", uri, size, ", existed" if existed else "")
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
            self.agency._authorize(context, read_only=True)
            _, digest = parse_document_uri(request.uri)
        except ChaparError as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc
        size = self.store.size(digest)
        if size is None:
            return pb.StatDocumentResponse(stored=False)
        return pb.StatDocumentResponse(
            stored=True, document=pb.DocumentInfo(uri=request.uri, sha256=digest, size=size)
        )

    async def DownloadDocument(  # type: ignore[override]  # answers via context.write
        self, request: pb.DownloadDocumentRequest, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            self.agency._authorize(context, read_only=True)
            owner, digest = parse_document_uri(request.uri)
            if request.offset < 0:
                raise ChaparError(
                    Code.INVALID_ARGUMENT,
                    "INVALID_OFFSET",
                    "offset is negative",
                    field_violations=[("offset", "negative")],
                )
            size = self.store.size(digest)
            if size is None:
                if owner == self.agency.config.agency:
                    raise ChaparError(
                        Code.NOT_FOUND,
                        "DOCUMENT_NOT_FOUND",
                        f"this node holds no document {request.uri}",
                        metadata={"uri": request.uri},
                    )
                size = await self.fetch(request.uri, digest)
            if request.offset > size:
                raise ChaparError(
                    Code.OUT_OF_RANGE,
                    "OFFSET_OUT_OF_RANGE",
                    f"offset {request.offset} is past the end ({size} bytes)",
                    metadata={"size": str(size)},
                )
        except ChaparError as exc:
            log.info("download refused: %s %s", exc.reason, exc.message)
            await abort(context, exc)
            return
        info = pb.DocumentInfo(uri=request.uri, sha256=digest, size=size)
        # A whole-file read is checked on the way out too: a copy corrupted on this disk
        # is dropped (the next download fetches it again) instead of served twice.
        hasher = hashlib.sha256() if request.offset == 0 else None
        first = True
        async with contextlib.aclosing(self.store.read(digest, request.offset)) as chunks:
            async for chunk in chunks:
                if hasher is not None:
                    hasher.update(chunk)
                await context.write(
                    pb.DownloadDocumentResponse(document=info if first else None, chunk=chunk)
                )
                first = False
        if first:
            await context.write(pb.DownloadDocumentResponse(document=info))
        if hasher is not None and hasher.digest() != digest:
            log.error("stored document %s is corrupt; dropping this copy", request.uri)
            if owner != self.agency.config.agency:
                self.store.remove(digest)
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

    async def fetch(self, uri: str, digest: bytes) -> int:
        """Fetches another agency's document into the store; returns its size.

        One fetch per digest at a time; a second downloader waits and then reads the copy.
        """
        lock = self._fetching.setdefault(digest, asyncio.Lock())
        async with lock:
            size = self.store.size(digest)
            if size is not None:
                return size
            try:
                return await self._fetch(uri, digest)
            finally:
                self._fetching.pop(digest, None)

    async def _fetch(self, uri: str, digest: bytes) -> int:
        link = self.link
        stub = link.stub if link is not None else None
        if stub is None:
            raise ChaparError(
                Code.UNAVAILABLE,
                "HUB_UNAVAILABLE",
                "the node is not connected to the hub; retry",
                retry_after_s=1.0,
            )
        writer = self.store.writer(expected_sha256=digest)
        try:
            for attempt in range(1, _FETCH_ATTEMPTS + 1):
                offset = writer.size
                try:
                    call = stub.FetchDocument(pb.FetchDocumentRequest(uri=uri, offset=offset))
                    async for message in call:
                        if message.size:
                            check_size(message.size, self.store.limits)
                            writer.expected_size = message.size
                        writer.write(message.chunk)
                    break
                except grpc.aio.AioRpcError as exc:
                    error = from_rpc_error(exc)
                    retry = exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.CANCELLED,
                    )
                    if not retry or attempt == _FETCH_ATTEMPTS or writer.size == offset:
                        raise ChaparError(
                            _code(exc.code()),
                            error.reason or exc.code().name,
                            f"fetching {uri} through the hub: {error.message}",
                            metadata={"uri": uri, **error.metadata},
                            retry_after_s=error.retry_after,
                        ) from exc
                    log.warning(
                        "fetch of %s broke at %d bytes (%s); resuming", uri, writer.size, exc.code()
                    )
            _, size, _ = await writer.commit()
        finally:
            writer.discard()
        log.info("fetched %s (%d bytes), digest verified", uri, size)
        return size


def _code(code: grpc.StatusCode) -> Code:
    try:
        return Code(code.value[0])
    except ValueError:
        return Code.UNAVAILABLE


async def push(stub: pb.HubServiceStub, store: DocumentStore, request: pb.DocumentRequest) -> None:
    """Answers the hub's document_request: streams the document from the asked offset."""
    size = store.size(request.sha256)

    call = stub.PushDocument()
    try:
        if size is None or request.offset < 0 or request.offset > size:
            await call.write(
                pb.PushDocumentRequest(
                    header=pb.PushHeader(
                        request_id=request.request_id, error_reason="DOCUMENT_NOT_FOUND"
                    )
                )
            )
        else:
            await call.write(
                pb.PushDocumentRequest(
                    header=pb.PushHeader(request_id=request.request_id, size=size)
                )
            )
            async with contextlib.aclosing(store.read(request.sha256, request.offset)) as chunks:
                async for chunk in chunks:
                    await call.write(pb.PushDocumentRequest(chunk=chunk))
        await call.done_writing()
        await call
    except asyncio.InvalidStateError:
        log.info("push of %s ended early by the hub", request.request_id)
    except grpc.aio.AioRpcError as exc:
        log.warning("push of %s ended: %s %s", request.request_id, exc.code(), exc.details())
