"""Where save_into puts a verified attachment when its name is taken, or long, or odd;
the fake document server of test_sdk, a real client, the real file system."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client_sdk import ExchangeClient, errors, pb
from client_sdk._pb.chapar.exchange.v1.document_service_pb2_grpc import (
    add_DocumentServiceServicer_to_server,
)
from client_sdk.client import _place, partial_path
from client_sdk.signing import sha256
from tests.unit.test_sdk import _attachment_of, _GatedDocuments, _serve

ONE, TWO = b"document one", b"document two!"


@pytest.fixture
async def client() -> AsyncIterator[ExchangeClient]:
    docs = _GatedDocuments([ONE, TWO])
    docs.gate.set()
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    yield ExchangeClient.from_channel(channel)
    await channel.close()
    await server.stop(None)


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_a_directory_of_the_attachments_name_is_left_and_it_is_saved_beside(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # _place opened the directory to hash it: IsADirectoryError, and the partial file left.
    await asyncio.to_thread((tmp_path / "contract.pdf").mkdir)
    saved = await _attachment_of(ONE, "contract.pdf", client).save_into(tmp_path)
    assert saved.name == f"contract-{sha256(ONE).hex()[:16]}.pdf"
    assert _names(tmp_path) == sorted(["contract.pdf", saved.name])


async def test_a_name_with_a_long_text_after_its_last_dot_is_saved_beside_within_255_bytes(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # "report." and 120 Persian letters (247 bytes): its "suffix" is no extension, and the
    # name beside it went past 255 bytes (ENAMETOOLONG), leaving the partial file.
    name = "report." + "\u0646" * 120
    first = await _attachment_of(ONE, name, client).save_into(tmp_path)
    second = await _attachment_of(TWO, name, client).save_into(tmp_path)
    assert first.name == name
    assert second != first
    assert len(os.fsencode(second.name)) <= 255
    assert second.name.endswith(sha256(TWO).hex()[:16])
    assert _names(tmp_path) == sorted([first.name, second.name])


async def test_save_into_works_where_the_file_system_has_no_hard_links(
    client: ExchangeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FAT, many SMB and FUSE mounts refuse link(2): a raw PermissionError escaped, and the
    # whole document stayed behind as a hidden partial file.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    first = await _attachment_of(ONE, "b.pdf", client).save_into(tmp_path)
    second = await _attachment_of(TWO, "b.pdf", client).save_into(tmp_path)
    again = await _attachment_of(ONE, "b.pdf", client).save_into(tmp_path)
    assert [first.name, again.name] == ["b.pdf", "b.pdf"]
    assert second.name == f"b-{sha256(TWO).hex()[:16]}.pdf"
    assert [p.read_bytes() for p in (first, second)] == [ONE, TWO]
    assert _names(tmp_path) == sorted([first.name, second.name])


def test_a_pipe_of_the_attachments_name_is_not_opened(tmp_path: Path) -> None:
    # Hashing what held the name opened a FIFO, which blocks until a writer comes.
    part = tmp_path / ".x.pdf.part"
    part.write_bytes(ONE)
    os.mkfifo(tmp_path / "x.pdf")
    saved = _place(part, tmp_path / "x.pdf", sha256(ONE))
    assert saved.name == f"x-{sha256(ONE).hex()[:16]}.pdf"
    assert saved.read_bytes() == ONE
    assert not part.exists()


async def test_a_file_name_that_is_not_utf_8_is_saved(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # A path os.listdir gives for a name whose bytes are not UTF-8 (surrogate escapes):
    # cutting names to 255 bytes encoded them strictly (UnicodeEncodeError).
    target = tmp_path / os.fsdecode(b"name\xe9.pdf")
    saved = await _attachment_of(ONE, "x.pdf", client).save(target)
    assert saved == target
    assert saved.read_bytes() == ONE
    assert _names(tmp_path) == [target.name]


async def test_an_attachment_named_with_a_nul_byte_is_saved_under_a_usable_name(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # The name is the sender's (a node of another agency, or an older one, checks nothing
    # of it): with a NUL in it save_into raised a bare ValueError ("embedded null byte")
    # on every try, and the attachment could not be saved into a directory at all.
    saved = await _attachment_of(ONE, "minutes\x00.pdf", client).save_into(tmp_path)
    assert saved == tmp_path / "minutes_.pdf"
    assert saved.read_bytes() == ONE
    assert _names(tmp_path) == ["minutes_.pdf"]


async def test_when_both_names_are_taken_the_verified_download_waits_for_a_free_name(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # A raw FileExistsError escaped and the whole verified download was deleted.
    await asyncio.to_thread((tmp_path / "c.pdf").write_bytes, b"someone else's file")
    beside = tmp_path / f"c-{sha256(ONE).hex()[:16]}.pdf"
    await asyncio.to_thread(beside.write_bytes, b"a truncated copy")
    with pytest.raises(errors.FailedPrecondition) as info:
        await _attachment_of(ONE, "c.pdf", client).save_into(tmp_path)
    assert info.value.reason == "SAVE_NAMES_TAKEN"
    assert len([n for n in _names(tmp_path) if n.endswith(".part")]) == 1
    await asyncio.to_thread(beside.unlink)
    saved = await _attachment_of(ONE, "c.pdf", client).save_into(tmp_path)
    assert saved == beside
    assert saved.read_bytes() == ONE
    assert _names(tmp_path) == sorted(["c.pdf", beside.name])


async def test_without_hard_links_a_copy_that_fails_leaves_no_file_under_the_name(
    client: ExchangeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name was claimed with an empty file and the download renamed over it: a failure
    # between the two left that empty file under the attachment's name for good (every
    # later save went beside it), and deleted the verified download.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    with pytest.raises(OSError, match="No space"):
        await _attachment_of(ONE, "x.pdf", client).save_into(tmp_path)
    assert [n for n in _names(tmp_path) if not n.endswith(".part")] == []
    monkeypatch.undo()
    saved = await _attachment_of(ONE, "x.pdf", client).save_into(tmp_path)
    assert saved.name == "x.pdf"
    assert saved.read_bytes() == ONE
    assert _names(tmp_path) == ["x.pdf"]


# -- modes: an attachment is letter content, no other local user's to read -------------------


class _AskedDocuments(_GatedDocuments):
    """``_GatedDocuments`` that also says when a download was asked for, and from where."""

    def __init__(self, contents: list[bytes]) -> None:
        super().__init__(contents)
        self.asked = asyncio.Event()
        self.offsets: list[int] = []

    async def DownloadDocument(
        self, request: pb.DownloadDocumentRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDocumentResponse]:
        self.offsets.append(request.offset)
        self.asked.set()
        async for response in super().DownloadDocument(request, context):
            yield response


@pytest.fixture
async def asked() -> AsyncIterator[tuple[_AskedDocuments, ExchangeClient]]:
    """A document server whose downloads wait at its gate, and a client of it."""
    docs = _AskedDocuments([ONE, TWO])
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    yield docs, ExchangeClient.from_channel(channel)
    docs.gate.set()
    await channel.close()
    await server.stop(None)


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most accounts have (022): files made with the default mode come out 0644,
    readable by every local user."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


@pytest.mark.usefixtures("usual_umask")
@pytest.mark.parametrize("into", [False, True], ids=["save", "save_into"])
async def test_an_attachment_is_saved_readable_by_its_owner_only_from_its_first_byte(
    asked: tuple[_AskedDocuments, ExchangeClient], tmp_path: Path, into: bool
) -> None:
    # An attachment holds letter content, as an evidence bundle does (chapar track --save
    # writes it 0600): its partial file and the saved file came out with the umask's 0644.
    docs, client = asked
    attachment = _attachment_of(ONE, "contract.pdf", client)
    saving = asyncio.create_task(
        attachment.save_into(tmp_path) if into else attachment.save(tmp_path / "contract.pdf")
    )
    await asyncio.wait_for(docs.asked.wait(), 5)  # the partial file is open, nothing in it
    (part,) = [tmp_path / n for n in _names(tmp_path)]
    assert (part.stat().st_size, _mode(part)) == (0, oct(0o600))
    docs.gate.set()
    saved = await asyncio.wait_for(saving, 5)
    assert saved.read_bytes() == ONE
    assert _mode(saved) == oct(0o600)


@pytest.mark.usefixtures("usual_umask")
async def test_where_there_are_no_hard_links_the_claimed_file_is_readable_by_its_owner_only(
    client: ExchangeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The name is claimed by an exclusive create and the content copied in: that file was
    # made 0644.
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    saved = await _attachment_of(ONE, "b.pdf", client).save_into(tmp_path)
    assert (saved.name, saved.read_bytes()) == ("b.pdf", ONE)
    assert _mode(saved) == oct(0o600)


@pytest.mark.usefixtures("usual_umask")
async def test_a_resumed_partial_file_readable_by_others_is_made_owner_only_before_more_comes(
    asked: tuple[_AskedDocuments, ExchangeClient], tmp_path: Path
) -> None:
    # A partial download left by an earlier version (0644) was appended to as it was, and
    # the whole document then saved under that mode.
    docs, client = asked
    target = tmp_path / "contract.pdf"
    part = partial_path(target, sha256(ONE))
    half = len(ONE) // 2
    await asyncio.to_thread(part.write_bytes, ONE[:half])
    await asyncio.to_thread(part.chmod, 0o644)
    saving = asyncio.create_task(_attachment_of(ONE, "contract.pdf", client).save(target))
    await asyncio.wait_for(docs.asked.wait(), 5)
    assert docs.offsets == [half]  # resumed, and nothing more written yet
    assert (part.stat().st_size, _mode(part)) == (half, oct(0o600))
    docs.gate.set()
    saved = await asyncio.wait_for(saving, 5)
    assert (saved.read_bytes(), _mode(saved)) == (ONE, oct(0o600))


async def test_a_link_at_the_partial_files_name_is_not_followed(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # The partial file's name is fixed (from the target's name and the digest): another
    # local user able to write in the directory could put a link there to a file of the
    # saving user's, which the download appended to and then renamed into place.
    victim = tmp_path / "elsewhere" / "notes.txt"
    await asyncio.to_thread(victim.parent.mkdir)
    await asyncio.to_thread(victim.write_bytes, b"mine")
    target = tmp_path / "contract.pdf"
    await asyncio.to_thread(partial_path(target, sha256(ONE)).symlink_to, victim)
    with pytest.raises(OSError, match="many levels of symbolic links") as raised:
        await _attachment_of(ONE, "contract.pdf", client).save(target)
    assert raised.value.errno == errno.ELOOP
    assert await asyncio.to_thread(victim.read_bytes) == b"mine"
    assert not target.exists()


class _Overlong(pb.DocumentServiceServicer):
    """Serves more bytes than the attachment's signed size: a first chunk already past it,
    then, after a pause, much more. Records whether it got to send the rest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent_all = False

    async def DownloadDocument(
        self, request: pb.DownloadDocumentRequest, context: Any
    ) -> AsyncIterator[pb.DownloadDocumentResponse]:
        digest = bytes.fromhex(request.uri.rsplit("/", 1)[1])
        info = pb.DocumentInfo(uri=request.uri, sha256=digest, size=self.size)
        yield pb.DownloadDocumentResponse(document=info, chunk=b"x" * (self.size + 1))
        await asyncio.sleep(1.0)  # a client still reading gets the rest
        for _ in range(16):
            yield pb.DownloadDocumentResponse(chunk=b"x" * 65536)
        self.sent_all = True


async def test_a_download_past_the_signed_size_stops_at_once_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    # The signed reference says how many bytes the attachment has; the node relays what
    # the owner announces and sends (up to its own max_file_bytes, 2 GiB by default).
    # fetch() wrote all of it into the partial file and only then found it was not the
    # document: a hostile sender made every save of a 10-byte attachment write gigabytes.
    docs = _Overlong(len(ONE))
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    try:
        with pytest.raises(errors.DataLoss) as info:
            await _attachment_of(ONE, "a.pdf", ExchangeClient.from_channel(channel)).save(
                tmp_path / "a.pdf"
            )
        await asyncio.sleep(1.5)  # the server would have sent the rest by now
    finally:
        await channel.close()
        await server.stop(None)
    assert info.value.reason == "DIGEST_MISMATCH"
    assert not docs.sent_all, "the client read on past the signed size"
    assert _names(tmp_path) == []
