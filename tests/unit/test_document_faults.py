"""The node's document service when the file system fails under it (node/documents.py).

Faults are simulated by replacing the store's ``os`` calls: the tests run as root, which
permissions (chmod) would not stop. Each call must still end with a status that has a
canonical code and a reason, and the log must say what the disk refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from client_sdk import pb
from client_sdk.identity import Identity
from node import document_store, documents
from node.agency import Access, Agency, _OpenStream
from node.core.documents import DocumentLimits, document_uri
from node.document_store import DocumentStore
from node.documents import Documents
from node.metrics import REJECTIONS
from tests.unit.conftest import RECIPIENT, SENDER
from tests.unit.test_fetch_signed_size import _Context

CONTENT = b"an annex that rots on the disk"
DIGEST = hashlib.sha256(CONTENT).digest()
ROTTEN = b"an annex that rots on the dusk"


async def _rotten(store: DocumentStore) -> None:
    """``CONTENT`` stored, then changed on the disk."""
    writer = store.writer()
    writer.write(CONTENT)
    await writer.commit()
    store.path(DIGEST).write_bytes(ROTTEN)


@pytest.fixture
def service(agency: Agency, tmp_path: Path) -> Documents:
    """SENDER's DocumentService; its caller may use every document (an unlimited client)."""
    store = DocumentStore(tmp_path / "docs", agency.config.documents)
    agency.document_store = store
    anyone = Access(Identity.for_client(SENDER, "clerk"), None)

    def open_stream(_context: object, *, read_only: bool = False) -> _OpenStream:
        return _OpenStream(anyone, cast(Any, None))  # no certificate here

    agency._open_stream = open_stream  # type: ignore[method-assign,assignment]
    return Documents(agency, store)


def _refuse(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """The store's ``os.<name>`` fails with ``code``."""

    def refused(*_: object, **__: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(document_store.os, name, refused)


async def _download(service: Documents, uri: str) -> _Context:
    context = _Context()
    with contextlib.suppress(grpc.aio.AbortError):
        await asyncio.wait_for(
            service.DownloadDocument(pb.DownloadDocumentRequest(uri=uri), cast(Any, context)), 10
        )
    return context


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
async def test_a_corrupt_own_copy_that_cannot_be_moved_aside_still_ends_the_download_data_loss(
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    # A whole-file download of the agency's own document finds it corrupt and moves it
    # aside (DocumentStore.quarantine). When the disk refuses the move, the OSError left
    # the handler: the back-end got INTERNAL / STORAGE_FAILED (the server's incident), not
    # that the copy is corrupt, and the log did not say the copy was.
    await _rotten(service.store)
    _refuse(monkeypatch, "replace", code)
    uri = document_uri(SENDER, DIGEST)
    with caplog.at_level(logging.ERROR, logger="chapar.documents"):
        context = await _download(service, uri)
    assert (context.aborted, context.reason) == (grpc.StatusCode.DATA_LOSS, "DIGEST_MISMATCH")
    said = [r.getMessage() for r in caplog.records if uri in r.getMessage()]
    assert len(said) == 1, said
    assert f"our document {uri} is corrupt" in said[0]
    assert "could not be moved aside" in said[0], said
    assert os.strerror(code) in said[0], said
    assert service.store.path(DIGEST).read_bytes() == ROTTEN  # left in place, said so


async def test_a_corrupt_fetched_copy_that_cannot_be_removed_still_ends_the_download_data_loss(
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The same for a copy fetched from another agency, which is dropped (DocumentStore.
    # remove): a refused unlink left the handler as the move aside did.
    await _rotten(service.store)
    path = service.store.path(DIGEST)
    unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self == path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    uri = document_uri(RECIPIENT, DIGEST)
    with caplog.at_level(logging.ERROR, logger="chapar.documents"):
        context = await _download(service, uri)
    assert (context.aborted, context.reason) == (grpc.StatusCode.DATA_LOSS, "DIGEST_MISMATCH")
    said = " ".join(r.getMessage() for r in caplog.records if uri in r.getMessage())
    assert "could not be dropped" in said, said
    assert os.strerror(errno.EROFS) in said, said


_STORAGE = {
    errno.EROFS: (grpc.StatusCode.INTERNAL, "STORAGE_FAILED"),
    errno.EACCES: (grpc.StatusCode.INTERNAL, "STORAGE_FAILED"),
    errno.ENOSPC: (grpc.StatusCode.RESOURCE_EXHAUSTED, "STORAGE_FULL"),
}


@pytest.mark.parametrize("code", list(_STORAGE), ids=["EROFS", "EACCES", "ENOSPC"])
async def test_a_fetch_whose_temporary_file_cannot_be_made_ends_as_an_upload_would(
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
) -> None:
    # The first download of another agency's document fetches it into a temporary file
    # of the store. A disk that refused to make it (read-only, permissions, full) raised
    # out of the handler: the back-end got its status through the server's path for
    # unexpected errors, with an incident id, and the log a traceback, unlike any other
    # failure of a fetch. It ends now as an upload does for the same error, and says it.
    def refused(*_: object, **__: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(document_store.tempfile, "mkstemp", refused)
    uri = document_uri(RECIPIENT, DIGEST)
    with caplog.at_level(logging.INFO, logger="chapar"):
        context = await _download(service, uri)
    assert (context.aborted, context.reason) == _STORAGE[code]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1, said
    assert uri in said[0], said
    assert os.strerror(code) in said[0], said
    assert not service._fetches


async def test_a_fetch_whose_temporary_file_cannot_be_read_leaves_none_behind(
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The download reads the fetch's temporary file as it grows (_Fetch.open_reader).
    # When that open failed, the file just made stayed in the store's tmp/ until the
    # node's next start, and the error left the handler as above.
    def refused(self: object) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(documents._Fetch, "open_reader", refused)
    uri = document_uri(RECIPIENT, DIGEST)
    with caplog.at_level(logging.INFO, logger="chapar"):
        context = await _download(service, uri)
    assert (context.aborted, context.reason) == _STORAGE[errno.EACCES]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert list((service.store.root / "tmp").iterdir()) == []
    assert not service._fetches


class _Push:
    """The owner's PushDocument call, as the hub takes it: records what is written."""

    def __init__(self) -> None:
        self.sent: list[pb.PushDocumentRequest] = []
        self.cancelled = False

    async def write(self, message: pb.PushDocumentRequest) -> None:
        self.sent.append(message)

    async def done_writing(self) -> None:
        pass

    def __await__(self) -> Generator[None, None, pb.PushDocumentResponse]:
        return asyncio.sleep(0, pb.PushDocumentResponse()).__await__()

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _corrupt_count() -> float:
    return REJECTIONS.labels(code="DATA_LOSS", reason="DOCUMENT_CORRUPT")._value.get()


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["EROFS", "ENOSPC"])
async def test_a_push_of_a_corrupt_copy_that_cannot_be_moved_aside_still_says_it_is_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    # The owner's push finds its copy corrupt and moves it aside. When the disk refused the
    # move, the OSError was taken for a failed read ("push of r1 failed reading the
    # document"): the push was cancelled without its DOCUMENT_CORRUPT, which the hub then
    # passes on as a broken push (UNAVAILABLE / PUSH_INTERRUPTED, to retry, or resumed from
    # the bytes the fetching node had, unchecked at the owner), and the owner's log never
    # said its copy is corrupt.
    store = DocumentStore(tmp_path / "docs", DocumentLimits())
    await _rotten(store)
    _refuse(monkeypatch, "replace", code)
    call = _Push()

    class _Stub:
        def PushDocument(self) -> _Push:
            return call

    counted = _corrupt_count()
    uri = document_uri(SENDER, DIGEST)
    request = pb.DocumentRequest(request_id="r1", sha256=DIGEST)
    with caplog.at_level(logging.ERROR, logger="chapar.documents"):
        await documents.push(cast(Any, _Stub()), store, request, SENDER)
    assert not call.cancelled
    assert [m.WhichOneof("part") for m in call.sent] == ["header", "error_reason"]
    assert call.sent[-1].error_reason == "DOCUMENT_CORRUPT"
    said = [r.getMessage() for r in caplog.records]
    assert any(
        f"our document {uri} is corrupt" in line
        and "could not be moved aside" in line
        and os.strerror(code) in line
        for line in said
    ), said
    assert _corrupt_count() == counted + 1


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOTDIR], ids=["EIO", "ENOTDIR"])
async def test_a_push_whose_store_cannot_be_read_answers_at_once_that_its_storage_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    # The owner's push first looks its document up (DocumentStore.size, file_id: a stat).
    # An error there other than "no such file" (a disk error; a file where a sha256/xx
    # folder belongs) was raised before the push's call was even made: it left the push's
    # task (asyncio's "Task exception was never retrieved" the only trace in the log), and
    # the hub waited 30 s for an answer and ended the fetch OWNER_NOT_ANSWERING.
    store = DocumentStore(tmp_path / "docs", DocumentLimits())
    path = store.path(DIGEST)
    if code == errno.ENOTDIR:
        path.parent.write_bytes(b"not a folder")  # a real fault: stat says ENOTDIR
    else:
        stat = Path.stat

        def refused(self: Path, **kwargs: Any) -> os.stat_result:
            if self == path:
                raise OSError(code, os.strerror(code), str(self))
            return stat(self, **kwargs)

        monkeypatch.setattr(Path, "stat", refused)
    call = _Push()

    class _Stub:
        def PushDocument(self) -> _Push:
            return call

    request = pb.DocumentRequest(request_id="r1", sha256=DIGEST)
    with caplog.at_level(logging.INFO, logger="chapar.documents"):
        await asyncio.wait_for(documents.push(cast(Any, _Stub()), store, request, SENDER), 5)
    assert not call.cancelled
    assert [m.WhichOneof("part") for m in call.sent] == ["header"]
    assert call.sent[0].header.request_id == "r1"
    assert call.sent[0].header.error_reason == "STORAGE_FAILED"
    said = [r for r in caplog.records if "r1" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]  # once
    assert said[0].levelno == logging.ERROR
    assert os.strerror(code) in said[0].getMessage()
    assert document_uri(SENDER, DIGEST) in said[0].getMessage()
    assert said[0].exc_info is None  # the OS error, not a traceback


async def _stored(store: DocumentStore, content: bytes, mtime: float | None = None) -> bytes:
    writer = store.writer()
    writer.write(content)
    digest, _, _ = await writer.commit()
    if mtime is not None:
        os.utime(store.path(digest), (mtime, mtime))
    return digest


async def test_a_letter_attaching_a_stored_document_is_accepted_when_its_use_cannot_be_marked(
    agency: Agency,
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With [documents] retention_s, a submission marks each attached document used
    # (DocumentStore.touch, the file's mtime). On a store the node may read but not change
    # (remounted read-only after disk errors, files restored under another owner) that
    # failed, and with it the whole batch: a letter attaching a document the node holds
    # and can serve was refused with the storage's error.
    agency.config = dataclasses.replace(agency.config, documents_retention_s=3600.0)
    digest = await _stored(service.store, CONTENT)
    _refuse(monkeypatch, "utime", errno.EROFS)
    draft = pb.LetterDraft(
        sender_mailbox="m1", recipients=[pb.Address(agency=RECIPIENT)], subject="s", body=b"b"
    )
    draft.attachments.add(
        uri=document_uri(SENDER, digest),
        sha256=digest,
        size=len(CONTENT),
        media_type="application/pdf",
        file_name="a.pdf",
    )
    everyone = Access(Identity.for_agency(SENDER), None)
    with caplog.at_level(logging.WARNING, logger="chapar.documents"):
        for _ in range(2):
            (receipt,) = await agency._submit([pb.SubmitEnvelopeRequest(draft=draft)], everyone)
            assert isinstance(receipt, pb.Receipt), receipt
    said = [
        r.getMessage() for r in caplog.records if "cannot mark documents used" in r.getMessage()
    ]
    assert len(said) == 1, said  # once, not at every letter
    assert os.strerror(errno.EROFS) in said[0]


async def test_retention_goes_on_past_a_document_it_cannot_remove(
    agency: Agency,
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Document retention removes, one by one, the documents unused since its cutoff. One
    # the disk refused to remove (a folder restored under another owner, an immutable file)
    # raised out of the walk: the documents after it were never removed, at this run or
    # any later one (the walk meets them in the same order), and the disk filled.
    store = service.store
    old = time.time() - 1000
    digests = [await _stored(store, bytes([n]) * 10, old) for n in range(6)]
    stuck = digests[0]
    unlink = Path.unlink

    def refused(self: Path, missing_ok: bool = False) -> None:
        if self == store.path(stuck):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level(logging.WARNING):
        removed = await agency.purge_documents(time.time() - 100)
    assert removed == 5
    assert [d for d in digests if store.size(d) is not None] == [stuck]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert os.strerror(errno.EACCES) in said, said


async def test_retention_walks_on_past_a_folder_it_cannot_read(
    agency: Agency,
    service: Documents,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The walk for documents unused since the cutoff (DocumentStore.unused_since) lists
    # each sha256/ folder. One it could not list (restored under another owner, a disk
    # error) ended the walk, and with it every run of document retention: nothing removed
    # again, whatever the other folders held.
    store = service.store
    old = time.time() - 1000
    digests = [await _stored(store, bytes([n]) * 10, old) for n in range(6)]
    unreadable = store.path(digests[0]).parent
    scandir = os.scandir

    def refused(path: Any) -> Any:
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)

    monkeypatch.setattr(document_store.os, "scandir", refused)
    with caplog.at_level(logging.WARNING):
        await agency.purge_documents(time.time() - 100)
    assert [d for d in digests if store.size(d) is not None] == [
        d for d in digests if store.path(d).parent == unreadable
    ]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert str(unreadable) in said, said
    assert os.strerror(errno.EACCES) in said, said
