"""The document store on disk (node.document_store) and document addresses (node.core.documents).

Real files under tmp_path: what is visible after a write, a refusal, or a crash's leftovers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from collections.abc import AsyncGenerator, Generator
from pathlib import Path

import pytest

from node import document_store
from node.core.documents import DocumentLimits, document_uri, parse_document_uri
from node.core.errors import ChaparError, Code
from node.document_store import CHUNK_BYTES, SET_ASIDE_OWN, DocumentStore

LIMITS = DocumentLimits(max_file_bytes=1000, media_types=frozenset({"application/pdf"}))


def _store(tmp_path: Path) -> DocumentStore:
    return DocumentStore(tmp_path / "docs", LIMITS)


def _visible(store: DocumentStore) -> list[Path]:
    return sorted(p for p in (store.root / "sha256").rglob("*") if p.is_file())


def _temporary(store: DocumentStore) -> list[Path]:
    return list((store.root / "tmp").iterdir())


async def test_written_document_appears_only_at_commit_under_its_digest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.writer()
    for piece in (b"Budget ", b"report ", b"2026"):
        writer.write(piece)
    assert _visible(store) == []
    assert len(_temporary(store)) == 1
    digest, size, existed = await writer.commit()
    assert digest == hashlib.sha256(b"Budget report 2026").digest()
    assert (size, existed) == (18, False)
    assert _visible(store) == [store.path(digest)]
    assert store.path(digest).read_bytes() == b"Budget report 2026"
    assert store.size(digest) == 18
    assert _temporary(store) == []
    assert b"".join([c async for c in store.read(digest, 7)]) == b"report 2026"


async def test_same_content_written_twice_is_stored_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first, second = store.writer(), store.writer()
    first.write(b"same")
    second.write(b"same")
    assert (await first.commit())[2] is False
    assert (await second.commit())[2] is True
    assert len(_visible(store)) == 1
    assert _temporary(store) == []


@pytest.mark.parametrize("name", ["EPERM", "EOPNOTSUPP", "EXDEV", "EMLINK"])
async def test_where_hard_links_are_refused_a_document_is_stored_by_a_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # On a file system without hard links (some SMB and FUSE mounts) the link into place
    # failed, and with it every upload. A rename places the checked file instead; a copy
    # already there is reported as existed, and replaced (which repairs one rotted).
    code = getattr(errno, name)

    def no_links(*_: object, **__: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(document_store.os, "link", no_links)
    store = _store(tmp_path)
    first = store.writer()
    first.write(b"on a share")
    digest, size, existed = await first.commit()
    assert (digest, size, existed) == (hashlib.sha256(b"on a share").digest(), 10, False)
    assert _visible(store) == [store.path(digest)]
    assert store.path(digest).read_bytes() == b"on a share"
    store.path(digest).write_bytes(b"on a shar3")  # rotted on the disk
    again = store.writer()
    again.write(b"on a share")
    assert (await again.commit())[2] is True
    assert store.path(digest).read_bytes() == b"on a share"
    assert _visible(store) == [store.path(digest)]
    assert _temporary(store) == []


async def test_a_link_failing_otherwise_fails_the_upload_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(document_store.os, "link", broken)
    store = _store(tmp_path)
    writer = store.writer()
    writer.write(b"lost")
    with pytest.raises(OSError, match="Input/output error"):
        await writer.commit()
    assert _visible(store) == []
    assert _temporary(store) == []


async def test_an_upload_of_a_stored_document_counts_as_its_use_before_retention_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retention removes documents unused since its cutoff, between two awaits of the event
    # loop. Uploading a document the store holds is a use of it: it must count before the
    # commit's first await, or retention could take the file the upload is about to name.
    store = _store(tmp_path)
    first = store.writer()
    first.write(b"kept")
    digest, _, _ = await first.commit()
    stale = time.time() - 1000
    os.utime(store.path(digest), (stale, stale))
    removed: list[bool] = []
    real = document_store.fsync_path

    def retention_meanwhile(path: Path) -> None:  # runs where the commit awaits
        removed.append(store.remove_unused(digest, time.time() - 100))
        real(path)

    monkeypatch.setattr(document_store, "fsync_path", retention_meanwhile)
    again = store.writer()
    again.write(b"kept")
    assert (await again.commit())[2] is True
    assert removed == [False]
    assert store.path(digest).exists()


async def test_content_growing_past_the_limit_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.writer()
    writer.write(b"x" * 600)
    with pytest.raises(ChaparError) as info:
        writer.write(b"x" * 401)
    assert (info.value.code, info.value.reason) == (Code.RESOURCE_EXHAUSTED, "DOCUMENT_TOO_LARGE")
    assert info.value.metadata == {"limit": "1000", "size": "1001"}
    assert _visible(store) == []
    assert _temporary(store) == []


def test_announced_size_over_the_limit_is_refused_before_a_file_exists(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ChaparError) as info:
        store.writer(expected_size=1001)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert _temporary(store) == []


async def test_content_that_is_not_the_expected_digest_is_refused_and_nothing_kept(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    writer = store.writer(expected_sha256=hashlib.sha256(b"hello").digest())
    writer.write(b"hellO")
    with pytest.raises(ChaparError) as info:
        await writer.commit()
    assert (info.value.code, info.value.reason) == (Code.DATA_LOSS, "DIGEST_MISMATCH")
    assert _visible(store) == []
    assert _temporary(store) == []


@pytest.mark.parametrize(("announced", "sent"), [(5, b"four"), (3, b"four")])
async def test_content_of_another_size_than_announced_is_refused(
    tmp_path: Path, announced: int, sent: bytes
) -> None:
    store = _store(tmp_path)
    writer = store.writer(expected_size=announced)

    async def upload() -> None:
        writer.write(sent)
        await writer.commit()

    with pytest.raises(ChaparError) as info:
        await upload()
    assert (info.value.code, info.value.reason) == (Code.INVALID_ARGUMENT, "SIZE_MISMATCH")
    assert _visible(store) == []
    assert _temporary(store) == []


def test_leftovers_of_an_interrupted_upload_are_removed_at_start(tmp_path: Path) -> None:
    store = _store(tmp_path)
    writer = store.writer()
    writer.write(b"half an upload")  # never committed: the process died here
    writer._file.close()
    assert len(_temporary(store)) == 1
    again = _store(tmp_path)
    assert _temporary(again) == []
    assert _visible(again) == []


def test_document_address_round_trips_and_refuses_anything_else() -> None:
    digest = hashlib.sha256(b"x").digest()
    uri = document_uri("000.00.00.G22", digest)
    assert uri == f"chapar://000.00.00.G22/documents/sha256/{digest.hex()}"
    assert parse_document_uri(uri) == ("000.00.00.G22", digest)
    for bad in (
        uri.upper(),
        uri + "0",
        uri.replace("chapar://", "https://"),
        uri.replace("/sha256/", "/md5/"),
        f"chapar://g22/documents/sha256/{digest.hex()}",
        "",
    ):
        with pytest.raises(ChaparError) as info:
            parse_document_uri(bad)
        assert info.value.reason == "INVALID_DOCUMENT_URI"


async def test_a_download_waiting_on_a_cancelled_fetch_gets_an_answer_not_a_cancellation(
    tmp_path: Path,
) -> None:
    """A fetch cancelled under a waiting download (the node stopping) must end that
    download with a status: a CancelledError out of the handler sends the client none."""
    import asyncio

    from node.documents import _Fetch

    fetch = _Fetch(_store(tmp_path).writer())
    try:
        fetch.task = asyncio.create_task(asyncio.sleep(3600))
        waiting = asyncio.create_task(fetch.total())
        await asyncio.sleep(0)
        fetch.task.cancel()
        with pytest.raises(ChaparError) as info:
            await waiting
        assert info.value.code == Code.UNAVAILABLE
        assert info.value.reason == "FETCH_INTERRUPTED"
        # A download cancelled itself still ends cancelled.
        fetch.task = asyncio.create_task(asyncio.sleep(3600))
        waiting = asyncio.create_task(fetch.total())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        fetch.task.cancel()
    finally:
        fetch.writer.discard()


async def _stored(store: DocumentStore, content: bytes, mtime: float | None = None) -> bytes:
    writer = store.writer()
    writer.write(content)
    digest, _, _ = await writer.commit()
    if mtime is not None:
        os.utime(store.path(digest), (mtime, mtime))
    return digest


async def test_only_documents_unused_since_the_cutoff_are_candidates_and_removed(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    now = time.time()
    old = await _stored(store, b"old", now - 1000)
    touched = await _stored(store, b"touched again", now - 1000)
    fresh = await _stored(store, b"fresh")
    store.touch(touched)
    assert store.unused_since(now - 100) == [old]
    assert store.remove_unused(old, now - 100)
    assert not store.remove_unused(old, now - 100)  # already gone
    assert not store.remove_unused(fresh, now - 100)  # used since the cutoff
    assert store.size(old) is None
    assert store.size(touched) == len(b"touched again")
    assert store.size(fresh) == len(b"fresh")


async def test_a_fetch_that_ends_without_error_but_short_resumes_from_the_bytes_held(
    tmp_path: Path,
) -> None:
    """A fetch call that ends OK short of the size the owner announced (the hub's relay
    cut as it shut down) is a break, resumed from the offset held, not a finished file."""
    from collections.abc import AsyncIterator
    from types import SimpleNamespace

    from client_sdk import pb
    from node.documents import Documents, _Fetch

    content = os.urandom(100)
    digest = hashlib.sha256(content).digest()
    offsets: list[int] = []

    class _Call:
        def __init__(self, offset: int) -> None:
            self.offset = offset

        async def __aiter__(self) -> AsyncIterator[pb.FetchDocumentResponse]:
            if self.offset == 0:  # the first call: announced 100 bytes, ends after 40
                yield pb.FetchDocumentResponse(size=len(content))
                yield pb.FetchDocumentResponse(chunk=content[:40])
            else:
                yield pb.FetchDocumentResponse(chunk=content[self.offset :])

        def cancel(self) -> None:
            pass

    class _Stub:
        def FetchDocument(self, request: pb.FetchDocumentRequest) -> _Call:
            offsets.append(request.offset)
            return _Call(request.offset)

    async def wait_stub(timeout: float) -> _Stub:
        return _Stub()

    recorded: list[tuple[bytes, str]] = []

    async def record_fetch(digest: bytes, owner: str) -> None:
        recorded.append((digest, owner))

    async def signed_sizes(uri: str) -> set[int]:
        return {len(content)}  # what the letter naming it signs

    store = _store(tmp_path)
    agency = SimpleNamespace(
        store=SimpleNamespace(record_fetch=record_fetch, signed_sizes=signed_sizes)
    )
    documents = Documents(agency=agency, store=store)  # type: ignore[arg-type]
    documents.link = SimpleNamespace(stub=_Stub(), wait_stub=wait_stub)  # type: ignore[assignment]
    fetch = _Fetch(store.writer(expected_sha256=digest))
    uri = document_uri("SENDER.A", digest)
    assert await documents._fetch(uri, digest, fetch) == len(content)
    assert offsets == [0, 40]
    assert store.path(digest).read_bytes() == content
    assert recorded == [(digest, "SENDER.A")]  # verified: its owner had it (record_fetch)


async def test_a_fetch_of_bytes_changed_on_the_way_is_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    """The owner's push checks its copy as it reads it (a corrupt one ends the push with
    DOCUMENT_CORRUPT); bytes changed after that, on the way, are the fetching node's own
    check's to find: DATA_LOSS / DIGEST_MISMATCH, nothing kept, no fetch recorded."""
    from collections.abc import AsyncIterator
    from types import SimpleNamespace

    from client_sdk import pb
    from node.documents import Documents, _Fetch

    content = os.urandom(100)
    digest = hashlib.sha256(content).digest()
    changed = content[:50] + bytes([content[50] ^ 1]) + content[51:]

    class _Call:
        async def __aiter__(self) -> AsyncIterator[pb.FetchDocumentResponse]:
            yield pb.FetchDocumentResponse(size=len(content))
            yield pb.FetchDocumentResponse(chunk=changed)

        def cancel(self) -> None:
            pass

    class _Stub:
        def FetchDocument(self, request: pb.FetchDocumentRequest) -> _Call:
            return _Call()

    recorded: list[tuple[bytes, str]] = []

    async def record_fetch(digest: bytes, owner: str) -> None:
        recorded.append((digest, owner))

    async def signed_sizes(uri: str) -> set[int]:
        return {len(content)}

    store = _store(tmp_path)
    agency = SimpleNamespace(
        store=SimpleNamespace(record_fetch=record_fetch, signed_sizes=signed_sizes)
    )
    documents = Documents(agency=agency, store=store)  # type: ignore[arg-type]
    documents.link = SimpleNamespace(stub=_Stub())  # type: ignore[assignment]
    fetch = _Fetch(store.writer(expected_sha256=digest))
    with pytest.raises(ChaparError) as info:
        await documents._fetch(document_uri("SENDER.A", digest), digest, fetch)
    assert (info.value.code, info.value.reason) == (Code.DATA_LOSS, "DIGEST_MISMATCH")
    assert _visible(store) == []
    assert _temporary(store) == []
    assert recorded == []


@pytest.mark.parametrize("digest", [b"", b"\xab" * 31], ids=["empty", "31-bytes"])
def test_a_digest_that_is_not_32_bytes_names_no_stored_document(
    tmp_path: Path, digest: bytes
) -> None:
    """An empty digest's path is the store's sha256/ directory itself: its size was taken
    for a document's, and a push of it then failed reading a directory."""
    store = _store(tmp_path)
    assert store.size(digest) is None


@pytest.mark.parametrize("digest", [b"", b"\xab" * 31], ids=["empty", "31-bytes"])
async def test_a_push_asked_for_a_digest_that_is_not_32_bytes_says_not_found(
    tmp_path: Path, digest: bytes
) -> None:
    """The hub's document_request names the document by its digest; one that cannot be a
    SHA-256 is answered DOCUMENT_NOT_FOUND, as any document the node does not hold."""
    import asyncio

    from client_sdk import pb
    from node.documents import push

    store = _store(tmp_path)
    writer = store.writer()
    writer.write(b"held")
    await writer.commit()
    writer.discard()
    sent: list[pb.PushDocumentRequest] = []

    class _Call:
        async def write(self, message: pb.PushDocumentRequest) -> None:
            sent.append(message)

        async def done_writing(self) -> None:
            pass

        def __await__(self) -> Generator[None, None, pb.PushDocumentResponse]:
            return asyncio.sleep(0, pb.PushDocumentResponse()).__await__()

    class _Stub:
        def PushDocument(self) -> _Call:
            return _Call()

    request = pb.DocumentRequest(request_id="r1", sha256=digest)
    await push(_Stub(), store, request, "SENDER.A")  # type: ignore[arg-type]
    assert [m.WhichOneof("part") for m in sent] == ["header"]
    assert sent[0].header.error_reason == "DOCUMENT_NOT_FOUND"


async def test_stray_entries_in_the_store_do_not_stop_retention(tmp_path: Path) -> None:
    # An operator's note or a restore's leftovers among the stored documents: a file where
    # a folder belongs made every retention walk fail (NotADirectoryError, documents never
    # removed again); a folder or a short hex name where a document belongs was taken for
    # one. Only what has a document's place and name is a candidate.
    store = _store(tmp_path)
    now = time.time()
    old = await _stored(store, b"old", now - 1000)
    root = store.path(old).parent.parent
    (root / "README").write_text("notes")
    (root / old.hex()[:2] / "ab").write_text("not a document")
    (root / old.hex()[:2] / ("0" * 64)).mkdir()
    for path in (root / "README", root / old.hex()[:2] / "ab", root / old.hex()[:2] / ("0" * 64)):
        os.utime(path, (now - 1000, now - 1000))
    assert store.unused_since(now - 100) == [old]
    assert store.remove_unused(old, now - 100)


class _EndedPush:
    """A push call the hub ended at once (the fetching node refused the size announced, or
    its back-end went away): each write of a chunk fails."""

    async def write(self, message: object) -> None:
        import asyncio

        from client_sdk import pb

        assert isinstance(message, pb.PushDocumentRequest)
        if message.WhichOneof("part") == "chunk":
            raise asyncio.InvalidStateError("the hub ended the call")

    async def done_writing(self) -> None:
        pass

    def __await__(self) -> Generator[None, None, object]:
        import asyncio

        from client_sdk import pb

        return asyncio.sleep(0, pb.PushDocumentResponse()).__await__()

    def cancel(self) -> bool:
        return True


class _EndedPushStub:
    def PushDocument(self) -> _EndedPush:
        return _EndedPush()


async def _counted_reads(store: DocumentStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many chunks each read of the store yielded, one entry a read."""
    read = store.read
    counts: list[int] = []

    async def counted(digest: bytes, offset: int = 0) -> AsyncGenerator[bytes, None]:
        counts.append(0)
        async for chunk in read(digest, offset):
            counts[-1] += 1
            yield chunk

    monkeypatch.setattr(store, "read", counted)
    return counts


async def test_a_push_ended_early_reads_on_for_its_check_once_a_file_then_only_when_little_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push the hub ends at its first chunk reads the rest of the file to check it, so
    that a truncated copy is found; a file already found sound so is not read whole again
    (a large rest): a fetch cancelled at its start each time would otherwise make the owner
    read and hash a whole 2 GiB file each time."""
    from client_sdk import pb
    from node import documents

    monkeypatch.setattr(documents, "PUSH_CHECK_REST_BYTES", 2 * CHUNK_BYTES)
    store = DocumentStore(tmp_path / "docs", DocumentLimits(max_file_bytes=8 * CHUNK_BYTES))
    digest = await _stored(store, os.urandom(8 * CHUNK_BYTES))
    counts = await _counted_reads(store, monkeypatch)
    request = pb.DocumentRequest(request_id="r1", sha256=digest)
    for _ in range(3):
        with contextlib.suppress(Exception):
            await documents.push(_EndedPushStub(), store, request, "SENDER.A")  # type: ignore[arg-type]
    # The first write comes once the second chunk is read (each goes once the next is).
    assert counts == [8, 2, 2]
    assert store.path(digest).exists()  # a sound copy stays where it is, checked or not


async def test_a_truncated_copy_is_set_aside_by_a_push_ended_at_its_size_whatever_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner's copy lost its end (a disk or a copy cut short): it announces the size
    of what it holds, which the fetching node refuses at once (SIZE_MISMATCH: not what the
    letters sign), ending the push. Its check read on only when at most
    PUSH_CHECK_REST_BYTES was left: a truncated copy larger than that was never set aside,
    every fetch of it refused, and nothing said the owner's copy was corrupt."""
    from client_sdk import pb
    from node import documents

    monkeypatch.setattr(documents, "PUSH_CHECK_REST_BYTES", 2 * CHUNK_BYTES)
    store = DocumentStore(tmp_path / "docs", DocumentLimits(max_file_bytes=8 * CHUNK_BYTES))
    digest = await _stored(store, os.urandom(8 * CHUNK_BYTES))
    os.truncate(store.path(digest), 6 * CHUNK_BYTES)
    set_aside = SET_ASIDE_OWN._value.get()
    request = pb.DocumentRequest(request_id="r1", sha256=digest)
    with contextlib.suppress(Exception):
        await documents.push(_EndedPushStub(), store, request, "SENDER.A")  # type: ignore[arg-type]
    assert not store.path(digest).exists()
    assert [p.name.split(".")[0] for p in (store.root / "corrupt").iterdir()] == [digest.hex()]
    assert SET_ASIDE_OWN._value.get() == set_aside + 1


@pytest.mark.parametrize(
    ("owner", "hex_in_uri", "size", "reason"),
    [
        ("OTHER", "ab" * 32, 5, "DOCUMENT_NOT_OWNED"),
        ("SENDER", "cd" * 32, 5, "DOCUMENT_DIGEST_MISMATCH"),
        ("SENDER", "AB" * 32, 5, "INVALID_DOCUMENT_URI"),
        ("SENDER", "ab" * 32, -1, "INVALID_SIZE"),
        ("SENDER", "ab" * 32, 0, None),
    ],
)
def test_a_received_letter_whose_attachment_no_recipient_could_fetch_is_refused(
    owner: str, hex_in_uri: str, size: int, reason: str | None
) -> None:
    # A hostile sender's node (or a hub that let it through) delivers a letter naming
    # another agency's document, or an address whose digest is not the reference's: no
    # fetch of it is ever granted, so the letter was DELIVERED and handed over with an
    # attachment its recipients could never read. Refused at delivery instead.
    from client_sdk import pb
    from node.core.documents import refused_attachment

    header = pb.EnvelopeHeader()
    header.sender.agency = "SENDER"
    header.attachments.add(
        uri=f"chapar://{owner}/documents/sha256/{hex_in_uri}",
        sha256=bytes.fromhex("ab" * 32),
        size=size,
        media_type="application/pdf",
    )
    unfit = refused_attachment(header, LIMITS)
    assert (unfit[0] if unfit else None) == reason
