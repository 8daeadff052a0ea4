"""Edges of DocumentService.UploadDocument that only a raw gRPC client reaches.

The SDK always announces the size and half-closes after the last chunk; an integrator's
client in another language may announce nothing, cancel mid-way or write past a limit.
One node (A) with a small size limit, real processes and real mutual TLS on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from client_sdk import pb
from node.cluster import Cluster
from node.documents import MAX_EMPTY_CHUNKS
from tests.conftest import AGENCY_A, AGENCY_B

pytestmark = pytest.mark.integration

LIMIT = 100_000  # the node's [documents] max_file_bytes
_SETTINGS = f"""
[documents]
max_file_bytes = {LIMIT}
media_types = ["application/octet-stream", "text/plain"]
"""
READ_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("upload-edges")
    started = asyncio.run(
        Cluster.start(root, [AGENCY_A, AGENCY_B], node_settings=_SETTINGS, without_node=[AGENCY_B])
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


def _store(cluster: Cluster) -> Path:
    return cluster.nodes[AGENCY_A].config.parent / "documents"


def _stored(cluster: Cluster) -> set[str]:
    return {p.name for p in (_store(cluster) / "sha256").rglob("*") if p.is_file()}


def _temp_files(cluster: Cluster) -> list[Path]:
    return list((_store(cluster) / "tmp").iterdir())


def _channel(cluster: Cluster) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        cluster.nodes[AGENCY_A].address, cluster.credentials(AGENCY_A).channel_credentials()
    )


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason of a status, None when it carries none."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)  # type: ignore[arg-type]
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return None


def _header(**fields: object) -> pb.UploadDocumentRequest:
    return pb.UploadDocumentRequest(
        header=pb.UploadHeader(media_type="application/octet-stream", **fields)  # type: ignore[arg-type]
    )


# -- 1. an upload cancelled by its client ------------------------------------------------------


def _incidents(cluster: Cluster) -> int:
    """Errors the node logged as unexpected (an exception out of a servicer)."""
    return cluster.nodes[AGENCY_A].log_file.read_text().count("failed unexpectedly")


@pytest.mark.parametrize("announced", [False, True], ids=["nothing-announced", "size-announced"])
async def test_an_upload_cancelled_mid_stream_stores_nothing_and_is_no_incident(
    cluster: Cluster, announced: bool
) -> None:
    """A client that cancels after some chunks has not sent a document. gRPC hands the
    node the cancel as the end of the request stream, the cancellation itself a moment
    later: the prefix must not be stored (nothing announced), nor refused with a status
    that can no longer be sent, logged as an unexpected failure (size announced)."""
    before, incidents = _stored(cluster), _incidents(cluster)
    for attempt in range(4):
        prefix = b"the first part of a file, then the client gave up %d " % attempt * 100
        async with _channel(cluster) as channel:
            call = pb.DocumentServiceStub(channel).UploadDocument()
            await call.write(_header(size=2 * len(prefix)) if announced else _header())
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert first is not grpc.aio.EOF
            await call.write(pb.UploadDocumentRequest(chunk=prefix))
            await asyncio.sleep(0.3)  # the node has read the chunk
            call.cancel()
        await asyncio.sleep(0.5)  # a commit or refusal the cancel raced has happened by now
        assert hashlib.sha256(prefix).hexdigest() not in _stored(cluster)
    assert _stored(cluster) == before
    assert not _temp_files(cluster)
    assert _incidents(cluster) == incidents


# -- 2. past the size limit with no size announced ---------------------------------------------


async def _refusal_while_writing(
    cluster: Cluster, header: pb.UploadDocumentRequest, chunks: list[bytes]
) -> grpc.aio.AioRpcError:
    """Writes the header then ``chunks`` as fast as grpc takes them, then half-closes; the
    status the node ended the call with, as a raw client first sees it (from a write or
    from the read that follows)."""
    async with _channel(cluster) as channel:
        call = pb.DocumentServiceStub(channel).UploadDocument()
        try:
            await call.write(header)
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert first is not grpc.aio.EOF
            assert not first.HasField("document")
            try:
                with contextlib.suppress(asyncio.InvalidStateError):  # the node ended the call
                    for chunk in chunks:
                        await call.write(pb.UploadDocumentRequest(chunk=chunk))
                    await call.done_writing()
                answer = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                return err
            raise AssertionError(f"the upload was accepted: {answer}")
        finally:
            call.cancel()


async def test_an_unannounced_upload_past_the_limit_is_resource_exhausted_with_its_reason(
    cluster: Cluster,
) -> None:
    """Nothing announced, so the limit is found in the content, while the client still
    writes: it must get RESOURCE_EXHAUSTED / DOCUMENT_TOO_LARGE every time, not (about one
    time in two) a bare INTERNAL "Internal error from Core" from its write, the refusal
    lost because the node ended the call under it (grpc/grpc#36066). The file is under
    twice the limit: the node reads (and drops) up to the limit again after its refusal,
    and no further (a client sending more may still see INTERNAL)."""
    chunks = [b"z" * 16_384] * 12  # 196 608 bytes; the limit is passed at the 7th
    assert LIMIT < sum(map(len, chunks)) < 2 * LIMIT
    before = _stored(cluster)
    for _ in range(8):
        err = await _refusal_while_writing(cluster, _header(), chunks)
        assert (err.code(), _reason(err)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "DOCUMENT_TOO_LARGE",
        ), (err.code(), err.details())
    assert _stored(cluster) == before
    assert not _temp_files(cluster)  # removed before the status went


# -- 3. empty chunks, which no size counts ---------------------------------------------------


async def test_an_upload_of_too_many_empty_chunks_is_refused_with_its_reason(
    cluster: Cluster,
) -> None:
    """A 0-byte chunk adds nothing to the size any limit checks: a raw client could send
    them for ever, holding the upload open (the SDK never sends one). More than a generous
    number is INVALID_ARGUMENT / UPLOAD_EMPTY_CHUNKS, nothing stored; a few pass."""
    before = _stored(cluster)
    err = await _refusal_while_writing(
        cluster, _header(), [b"some content"] + [b""] * (MAX_EMPTY_CHUNKS + 200)
    )
    assert (err.code(), _reason(err)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UPLOAD_EMPTY_CHUNKS",
    ), (err.code(), err.details())
    assert _stored(cluster) == before
    assert not _temp_files(cluster)

    content = b"an integrator's client that sends an empty last read"
    async with _channel(cluster) as channel:
        call = pb.DocumentServiceStub(channel).UploadDocument()
        await call.write(_header(size=len(content)))
        for chunk in [b"", content, b"", b""]:
            await call.write(pb.UploadDocumentRequest(chunk=chunk))
        await call.done_writing()
        answers = [answer async for answer in call]
    assert answers[-1].document.size == len(content)


async def test_a_refused_upload_is_not_held_open_by_empty_chunks(cluster: Cluster) -> None:
    """After a refusal the node reads the rest of the upload (so that the client sees the
    status, grpc/grpc#36066) up to a bound in bytes, which 0-byte chunks never reach: a
    client sending them without end held the call, and the node's reading, open for ever.
    The call must end while the client still writes (how many writes grpc took before
    it saw the end depends on its buffers, not on the node)."""
    sent, started = 0, asyncio.get_running_loop().time()
    async with _channel(cluster) as channel:
        call = pb.DocumentServiceStub(channel).UploadDocument()
        try:
            await call.write(_header(size=10))
            first = await asyncio.wait_for(call.read(), READ_TIMEOUT)
            assert first is not grpc.aio.EOF
            with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
                await call.write(pb.UploadDocumentRequest(chunk=b"eleven byte"))  # refused
                while asyncio.get_running_loop().time() - started < 10:
                    await call.write(pb.UploadDocumentRequest(chunk=b""))
                    sent += 1
            took = asyncio.get_running_loop().time() - started
            assert took < 10, f"the node still read after {sent} empty chunks and {took:.1f} s"
            code = await asyncio.wait_for(call.code(), READ_TIMEOUT)
        finally:
            call.cancel()
    assert code != grpc.StatusCode.OK
