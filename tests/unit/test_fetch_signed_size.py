"""A recipient node fetching an attachment never writes more of it than its letter signed.

The node fetches another agency's document from its owner through the hub (node/documents.py
``Documents._fetch``). It took the size the owner announces in the first FetchDocument
message, bounded only by ``max_file_bytes`` (2 GiB by default), and found out at the end,
by the digest, that it was not the document: a hostile owner made a recipient node write
up to that limit into its temporary directory at every download. The letters naming the
document sign its size; here the owner (a stand-in for the hub's FetchDocument stream)
announces or sends more than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.shams import format_shams
from node.agency import Access, Agency, _OpenStream
from node.core.documents import document_uri
from node.document_store import DocumentStore
from node.documents import Documents
from tests.unit.conftest import RECIPIENT, SENDER

CONTENT = b"RECIPIENT's annex, as its letter signs it"
DIGEST = hashlib.sha256(CONTENT).digest()
URI = document_uri(RECIPIENT, DIGEST)
MORE = 64 * 1024  # each of the owner's chunks past the first


class _Context:
    """Enough of a grpc servicer context for DownloadDocument."""

    def __init__(self) -> None:
        self.written: list[pb.DownloadDocumentResponse] = []
        self.aborted: grpc.StatusCode | None = None
        self.reason = ""  # of the abort's ErrorInfo

    async def write(self, message: pb.DownloadDocumentResponse) -> None:
        self.written.append(message)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self.aborted = code
        for key, value in trailing_metadata:
            if key == "grpc-status-details-bin":
                for detail in status_pb2.Status.FromString(value).details:
                    info = error_details_pb2.ErrorInfo()
                    if detail.Unpack(info):
                        self.reason = info.reason
        raise grpc.aio.AbortError()


class _Owner:
    """The hub's FetchDocument stream, relaying an owner that announces ``announced``
    bytes, then sends ``first`` and 16 chunks of ``MORE`` bytes. Before each message it
    measures what the node's temporary directory holds (the node asks for the next message
    once it wrote the last chunk)."""

    def __init__(self, tmp: Path, announced: int, first: bytes) -> None:
        self.tmp = tmp
        self.announced = announced
        self.first = first
        self.most_held = 0
        self.sent = 0  # chunks the node asked for

    @property
    def stub(self) -> _Owner:
        return self

    async def wait_stub(self, timeout: float) -> _Owner:
        return self

    def FetchDocument(self, request: pb.FetchDocumentRequest) -> _Call:
        return _Call(self._messages(request.offset))

    async def _messages(self, offset: int) -> AsyncIterator[pb.FetchDocumentResponse]:
        assert offset == 0
        yield pb.FetchDocumentResponse(size=self.announced)
        for chunk in [self.first] + [b"x" * MORE] * 16:
            self._measure()
            self.sent += 1
            yield pb.FetchDocumentResponse(chunk=chunk)
        self._measure()

    def _measure(self) -> None:
        held = sum(p.stat().st_size for p in self.tmp.iterdir())
        self.most_held = max(self.most_held, held)


class _Call:
    def __init__(self, messages: AsyncIterator[pb.FetchDocumentResponse]) -> None:
        self._messages = messages

    def __aiter__(self) -> AsyncIterator[pb.FetchDocumentResponse]:
        return self._messages

    def cancel(self) -> bool:
        return True


@pytest.fixture
async def documents(agency: Agency, tmp_path: Path) -> Documents:
    """SENDER's DocumentService, mailbox m1 of which received a letter from RECIPIENT
    attaching RECIPIENT's document URI, signed with its size and digest."""
    store = DocumentStore(tmp_path / "docs", agency.config.documents)
    agency.document_store = store
    shams = pb.Shams(origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=5)
    header = pb.EnvelopeHeader(
        shams=shams,
        sender=pb.Address(agency=RECIPIENT, mailbox="x"),
        recipients=[pb.Address(agency=SENDER, mailbox="m1")],
    )
    header.attachments.add(
        uri=URI, sha256=DIGEST, size=len(CONTENT), media_type="application/pdf", file_name="a.pdf"
    )
    envelope = pb.Envelope(header=header.SerializeToString(), body=b"b")
    delivery = pb.Evidence(content=pb.EvidenceContent(evidence_id="d-5").SerializeToString())
    await agency.store.store_incoming(
        [(format_shams(shams), RECIPIENT, ["m1"], envelope)],
        lambda _i: delivery,
        documents=[[DIGEST]],
    )
    m1 = Access(Identity.for_client(SENDER, "clerk"), frozenset({"m1"}))

    def open_stream(_context: object, *, read_only: bool = False) -> _OpenStream:
        return _OpenStream(m1, cast(Any, None))  # no certificate here

    agency._open_stream = open_stream  # type: ignore[method-assign,assignment]
    return Documents(agency, store)


async def _download(documents: Documents, owner: _Owner) -> _Context:
    documents.link = cast(Any, owner)
    context = _Context()
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(
            documents.DownloadDocument(pb.DownloadDocumentRequest(uri=URI), cast(Any, context)),
            10,
        )
    return context


@pytest.mark.parametrize(
    "announced",
    [len(CONTENT), len(CONTENT) + 1 + 16 * MORE],
    ids=["announced-as-signed", "announced-more"],
)
async def test_a_fetch_past_the_signed_size_stops_at_once_and_keeps_nothing(
    documents: Documents, announced: int
) -> None:
    owner = _Owner(documents.store._tmp, announced, CONTENT + b"!")  # one byte too many
    context = await _download(documents, owner)
    assert owner.most_held <= len(CONTENT), "the node wrote more than the letter signed"
    # An announcement other than the signed size is refused before any chunk is taken;
    # otherwise the fetch ends at the first chunk past it.
    assert owner.sent == (0 if announced != len(CONTENT) else 1)
    assert (context.aborted, context.reason) == (grpc.StatusCode.DATA_LOSS, "SIZE_MISMATCH")
    assert b"".join(m.chunk for m in context.written) == b""  # nothing past the size relayed
    assert list(documents.store._tmp.iterdir()) == []  # nothing kept
    assert documents.store.size(DIGEST) is None


async def test_a_fetch_of_the_signed_size_is_kept(documents: Documents) -> None:
    class _Honest(_Owner):
        async def _messages(self, offset: int) -> AsyncIterator[pb.FetchDocumentResponse]:
            yield pb.FetchDocumentResponse(size=len(CONTENT))
            yield pb.FetchDocumentResponse(chunk=CONTENT)

    context = await _download(documents, _Honest(documents.store._tmp, 0, b""))
    assert context.aborted is None, context.reason
    assert b"".join(m.chunk for m in context.written) == CONTENT
    assert documents.store.size(DIGEST) == len(CONTENT)
