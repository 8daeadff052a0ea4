"""Attachments travel as addresses: the document store, end to end on real processes.

A module cluster with nodes for A, B and C: A uploads and sends, B is the recipient and
downloads through its own node (which fetches from A through the hub), C is not a
recipient. The 1 GiB test measures the peak RSS of every process, the CLI clients included.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client_sdk import ExchangeClient, Letter, SyncExchangeClient, pb
from client_sdk.client import partial_path
from client_sdk.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from loadtest.harness import proc_stats
from node.cluster import Cluster
from tests.conftest import AGENCY_A, AGENCY_B, AGENCY_C, client_credentials
from tests.conftest import node_tls as _node_tls

pytestmark = pytest.mark.integration

GIB = 1024 * 1024 * 1024
_SETTINGS = f"""
[documents]
max_file_bytes = {GIB}
media_types = ["application/pdf", "application/octet-stream", "text/plain"]
[[clients]]
name = "registry"
mailboxes = ["registry"]
"""
_RSS_LIMIT_MB = 150.0


@pytest.fixture(scope="module")
def docs_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("docs")
    started = asyncio.run(
        Cluster.start(root, [AGENCY_A, AGENCY_B, AGENCY_C], node_settings=_SETTINGS)
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


def _client(cluster: Cluster, agency: str) -> ExchangeClient:
    return ExchangeClient(cluster.nodes[agency].address, cluster.credentials(agency))


def _store(cluster: Cluster, agency: str) -> Path:
    return cluster.nodes[agency].config.parent / "documents"


def _stored_files(cluster: Cluster, agency: str) -> list[Path]:
    return sorted(p for p in (_store(cluster, agency) / "sha256").rglob("*") if p.is_file())


def _partials(directory: Path) -> list[Path]:
    """Partial downloads left in ``directory`` (hidden ones included)."""
    return sorted(directory.glob("*.part"))


def _temp_files(cluster: Cluster, agency: str) -> list[Path]:
    return list((_store(cluster, agency) / "tmp").iterdir())


def _write_random(path: Path, size: int, chunk: int = 4 * 1024 * 1024) -> str:
    """Random content streamed to disk (never whole in memory); returns its SHA-256 hex."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(4 * 1024 * 1024):
            digest.update(data)
    return digest.hexdigest()


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


async def _receive(client: ExchangeClient, shams: str, timeout: float = 30.0) -> Letter:
    async with asyncio.timeout(timeout):
        async for letter in client.inbox():
            if letter.shams == shams:
                await letter.ack()
                return letter
    raise AssertionError("inbox ended")


async def _send_with(
    cluster: Cluster, path: Path, b: ExchangeClient
) -> tuple[pb.AttachmentRef, Letter]:
    """A sends B a letter attaching ``path``; B's client receives it."""
    async with _client(cluster, AGENCY_A) as a:
        receipt = await a.send(to=[AGENCY_B], subject=f"with {path.name}",
                               body="see the attachment", attachments=[path])  # fmt: skip
        tracking = await a.track(receipt.shams)
    (ref,) = tracking.header.attachments
    return ref, await _receive(b, receipt.shams)


# -- the path of an attachment ---------------------------------------------------------------


async def test_attachment_goes_a_to_b_through_the_hub_and_arrives_intact(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "report.pdf"
    digest = _write_random(source, 3 * 1024 * 1024 + 17)
    b = _client(docs_cluster, AGENCY_B)
    ref, letter = await _send_with(docs_cluster, source, b)
    assert ref.uri == f"chapar://{AGENCY_A}/documents/sha256/{digest}"
    assert (ref.sha256.hex(), ref.size) == (digest, source.stat().st_size)
    assert (ref.media_type, ref.file_name) == ("application/pdf", "report.pdf")
    # The reference is part of the signed header the recipient verified.
    (attachment,) = letter.attachments
    assert attachment.uri == ref.uri
    assert attachment.sha256 == ref.sha256
    async with b:
        assert not (await b.stat(ref.uri)).stored
        (tmp_path / "out").mkdir()
        saved = await attachment.save(tmp_path / "out" / "report.pdf")
        assert _sha256_file(saved) == digest
        stat = await b.stat(ref.uri)
        assert stat.stored
        assert stat.document.size == ref.size
    # B's node kept a verified copy; nothing partial is left anywhere.
    assert any(p.name == digest for p in _stored_files(docs_cluster, AGENCY_B))
    assert not _temp_files(docs_cluster, AGENCY_A)
    assert not _temp_files(docs_cluster, AGENCY_B)
    assert not _partials(tmp_path / "out")


def test_sync_client_sends_and_saves_an_attachment(docs_cluster: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("Biên bản họp\n" * 1000, encoding="utf-8")
    a_node, b_node = docs_cluster.nodes[AGENCY_A], docs_cluster.nodes[AGENCY_B]
    with (
        SyncExchangeClient(a_node.address, docs_cluster.credentials(AGENCY_A)) as a,
        SyncExchangeClient(b_node.address, docs_cluster.credentials(AGENCY_B)) as b,
    ):
        receipt = a.send(to=[AGENCY_B], subject="minutes", body="attached", attachments=[source])
        for letter in b.inbox():
            letter.ack()
            if letter.shams == receipt.shams:
                break
        (attachment,) = letter.attachments
        assert (attachment.media_type, attachment.file_name) == ("text/plain", "notes.txt")
        saved = attachment.save(tmp_path / "notes-copy.txt")
        assert b"".join(b.download(attachment.uri, offset=4)) == source.read_bytes()[4:]
    assert saved.read_bytes() == source.read_bytes()


async def test_concurrent_uploads_of_the_same_content_store_it_once(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "same.pdf"
    digest = _write_random(source, 2 * 1024 * 1024 + 5)
    before = {p.name for p in _stored_files(docs_cluster, AGENCY_A)}
    async with _client(docs_cluster, AGENCY_A) as a:
        refs = await asyncio.gather(*(a.upload(source) for _ in range(8)))
    assert {r.uri for r in refs} == {f"chapar://{AGENCY_A}/documents/sha256/{digest}"}
    after = [p for p in _stored_files(docs_cluster, AGENCY_A) if p.name not in before]
    assert [p.name for p in after] == [digest]
    assert after[0].stat().st_size == source.stat().st_size
    assert not _temp_files(docs_cluster, AGENCY_A)


async def test_agency_that_is_not_a_recipient_is_refused(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "secret.pdf"
    _write_random(source, 300_000)
    async with _client(docs_cluster, AGENCY_B) as b:
        ref, _ = await _send_with(docs_cluster, source, b)
    async with _client(docs_cluster, AGENCY_C) as c:
        with pytest.raises(PermissionDenied) as info:
            await c.fetch(ref, tmp_path / "stolen.pdf")
    assert info.value.reason == "NOT_A_RECIPIENT"
    assert not (tmp_path / "stolen.pdf").exists()
    assert not _partials(tmp_path)
    assert ref.sha256.hex() not in {p.name for p in _stored_files(docs_cluster, AGENCY_C)}


async def _read(client: ExchangeClient, uri: str) -> bytes:
    return b"".join([chunk async for chunk in client.download(uri)])


async def _sent_from(b: ExchangeClient, mailbox: str, path: Path) -> pb.AttachmentRef:
    """B's back-end sends A a letter from ``mailbox`` attaching ``path``; its reference."""
    receipt = await b.send(
        to=[AGENCY_A], subject=f"from {mailbox}", body="x", sender_mailbox=mailbox,
        attachments=[path],
    )  # fmt: skip
    (ref,) = (await b.track(receipt.shams)).header.attachments
    return ref


async def test_a_client_limited_to_a_mailbox_uses_only_the_documents_of_its_mailboxes(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    """B's "registry" client ([[clients]]: mailboxes ["registry"]) may download, stat and
    attach what a letter of its mailbox carries, or what it uploaded; not what A sent to
    B's legal department, though B's node holds it, nor what legal sent."""
    files = {}
    for name in ("legal", "registry", "own", "legal-out", "for-registry"):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_bytes(os.urandom(3000))
    registry_credentials = client_credentials(docs_cluster, AGENCY_B, "registry")
    async with (
        _client(docs_cluster, AGENCY_A) as a,
        _client(docs_cluster, AGENCY_B) as b,
        ExchangeClient(docs_cluster.nodes[AGENCY_B].address, registry_credentials) as registry,
    ):
        refs = {}
        for box in ("legal", "registry"):
            receipt = await a.send(
                to=[(AGENCY_B, box)],
                subject=f"for {box}",
                body="attached",
                attachments=[files[box]],
            )
            (refs[box],) = (await a.track(receipt.shams)).header.attachments
            await _receive(b, receipt.shams)
        # Held at B once the unlimited back-end has read it: only the mailbox decides.
        assert await _read(b, refs["legal"].uri) == files["legal"].read_bytes()
        legal_out = await _sent_from(b, "legal", files["legal-out"])

        for refused in (
            _read(registry, refs["legal"].uri),
            registry.stat(refs["legal"].uri),
            _read(registry, legal_out.uri),
            registry.send(
                to=[AGENCY_A],
                subject="fwd",
                body="x",
                sender_mailbox="registry",
                attachments=[legal_out],
            ),
        ):
            with pytest.raises(PermissionDenied) as err:
                await refused
            assert err.value.reason == "MAILBOX_NOT_ALLOWED"

        assert await _read(registry, refs["registry"].uri) == files["registry"].read_bytes()
        own = await registry.upload(files["own"])
        assert (await registry.stat(own.uri)).stored
        assert await _read(registry, own.uri) == files["own"].read_bytes()
        sent = await registry.send(
            to=[AGENCY_A], subject="ours", body="x", sender_mailbox="registry", attachments=[own]
        )
        assert sent.shams.startswith(f"{AGENCY_B}/O/")
        # Sent from the registry's mailbox by the unlimited back-end: the registry's too.
        for_registry = await _sent_from(b, "registry", files["for-registry"])
        assert await _read(registry, for_registry.uri) == files["for-registry"].read_bytes()


async def test_a_limited_client_gets_a_received_document_from_its_owner_not_a_copy_held_here(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    """B's node holds a content for its own reasons (an upload by its unlimited back-end,
    for another mailbox); A's letter to B's registry names the same digest as A's. The
    registry's client gets it only as fetched from A through the hub, never B's copy: with
    A's copy gone, the download fails and a stat says nothing is held, though B holds it
    (review F4: a sender needs only the digest to name it). Once A has it again, the
    fetch from A brings it, and from then on B's copy serves the registry."""
    source = tmp_path / "both.txt"
    digest = _write_random(source, 5000)
    registry_credentials = client_credentials(docs_cluster, AGENCY_B, "registry")
    async with (
        _client(docs_cluster, AGENCY_A) as a,
        _client(docs_cluster, AGENCY_B) as b,
        ExchangeClient(docs_cluster.nodes[AGENCY_B].address, registry_credentials) as registry,
    ):
        await b.upload(source)  # held at B, for another mailbox's use
        receipt = await a.send(
            to=[(AGENCY_B, "registry")], subject="same content", body="x", attachments=[source]
        )
        (ref,) = (await a.track(receipt.shams)).header.attachments
        await _receive(registry, receipt.shams)
        (_store(docs_cluster, AGENCY_A) / "sha256" / digest[:2] / digest).unlink()

        with pytest.raises(NotFound) as err:
            await _read(registry, ref.uri)
        assert err.value.reason == "DOCUMENT_NOT_FOUND"
        assert not (await registry.stat(ref.uri)).stored
        assert (await b.stat(ref.uri)).stored  # an unlimited client may use every mailbox's

        await a.upload(source)
        assert await _read(registry, ref.uri) == source.read_bytes()
        assert (await registry.stat(ref.uri)).stored
        (_store(docs_cluster, AGENCY_A) / "sha256" / digest[:2] / digest).unlink()
        assert await _read(registry, ref.uri) == source.read_bytes()  # B's copy now


async def test_interrupted_download_resumes_from_its_offset(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "long.pdf"
    digest = _write_random(source, 5 * 1024 * 1024 + 3)
    content = source.read_bytes()
    out = tmp_path / "long-copy.pdf"
    part = partial_path(out, bytes.fromhex(digest))
    async with _client(docs_cluster, AGENCY_B) as b:
        ref, letter = await _send_with(docs_cluster, source, b)
        # A download cut after three chunks: the bytes so far are in its partial file.
        stream = b.download(ref.uri)
        with part.open("wb") as f:
            got = 0
            async for chunk in stream:
                f.write(chunk)
                got += 1
                if got == 3:
                    break
        await stream.aclose()
        offset = part.stat().st_size
        assert 0 < offset < len(content)
        # The node serves exactly the tail from an offset ...
        tail = b"".join([c async for c in b.download(ref.uri, offset=offset)])
        assert tail == content[offset:]
        # ... and save() resumes from the partial file instead of starting again.
        saved = await letter.attachments[0].save(out)
        assert _sha256_file(saved) == digest
        assert not part.exists()
        with pytest.raises(OutOfRange) as info:
            async for _ in b.download(ref.uri, offset=len(content) + 1):
                pass
        assert info.value.reason == "OFFSET_OUT_OF_RANGE"
        # A stale partial file longer than the document (left by another download to the
        # same path) is no piece of it: fetching by bare address (no size to compare)
        # starts again instead of failing the same way at every retry.
        other = tmp_path / "other-copy.pdf"
        stale = partial_path(other, bytes.fromhex(digest))
        stale.write_bytes(os.urandom(len(content) + 10))
        fetched = await b.fetch(ref.uri, other)
        assert _sha256_file(fetched) == digest
        assert not stale.exists()


async def test_corrupted_byte_at_the_owner_is_detected_and_nothing_is_kept(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "tampered.pdf"
    size = 1024 * 1024 + 1
    digest = _write_random(source, size)
    async with _client(docs_cluster, AGENCY_B) as b, _client(docs_cluster, AGENCY_A) as a:
        _, letter = await _send_with(docs_cluster, source, b)
        stored = next(p for p in _stored_files(docs_cluster, AGENCY_A) if p.name == digest)
        _flip_byte(stored, size // 2)
        with pytest.raises(DataLoss) as info:
            await letter.attachments[0].save(tmp_path / "bad.pdf")
        # The owner's push finds it (and sets its copy aside): the fetch ends with that.
        assert info.value.reason == "DOCUMENT_CORRUPT"
        assert not (tmp_path / "bad.pdf").exists()
        assert not _partials(tmp_path)
        assert digest not in {p.name for p in _stored_files(docs_cluster, AGENCY_B)}
        assert not _temp_files(docs_cluster, AGENCY_B)
        await a.upload(source)  # repaired at the owner: the same reference now works
        saved = await letter.attachments[0].save(tmp_path / "good.pdf")
    assert _sha256_file(saved) == digest


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)


def _sample(cluster: Cluster, agency: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` of a node's /metrics (0 when it has none)."""
    address = cluster.nodes[agency].metrics
    assert address, f"the node of {agency} serves no metrics"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def _rejected(cluster: Cluster, agency: str, code: str, reason: str) -> float:
    """chapar_rejections_total{code, reason} of a node's /metrics."""
    return _sample(cluster, agency, "chapar_rejections_total", code=code, reason=reason)


def _set_aside(cluster: Cluster, agency: str, kind: str) -> float:
    """chapar_documents_set_aside_total{kind} of a node's /metrics."""
    return _sample(cluster, agency, "chapar_documents_set_aside_total", kind=kind)


@pytest.mark.parametrize(
    ("size", "damage", "refused"),
    [
        (1024 * 1024 + 1, lambda p: _flip_byte(p, 512 * 1024), "DOCUMENT_CORRUPT"),
        (100 * 1024 + 3, lambda p: _flip_byte(p, 7), "DOCUMENT_CORRUPT"),
        # The fetching node refuses the size announced (its letter signs another) before
        # a byte comes: the owner's push is ended early, and still reads it to the end.
        (3 * 1024 * 1024 + 5, lambda p: _truncate(p, 2 * 1024 * 1024), "SIZE_MISMATCH"),
    ],
    ids=["flipped-byte", "flipped-byte-one-chunk", "truncated"],
)
async def test_an_owner_that_pushes_a_corrupt_copy_sets_it_aside_and_says_so(
    docs_cluster: Cluster,
    tmp_path: Path,
    size: int,
    damage: Callable[[Path], None],
    refused: str,
) -> None:
    # Nobody at the owner reads its copy whole: only the recipient's fetch, through the
    # owner's push, does. The push checks what it reads: the owner moves the copy aside
    # (as a whole-file download of its own would), logs it once and counts it; the fetch
    # gets a status that says so, and the next one finds nothing to fetch until the file
    # is uploaded again.
    source = tmp_path / "rotten.pdf"
    digest = _write_random(source, size)
    uri = f"chapar://{AGENCY_A}/documents/sha256/{digest}"
    counted = _rejected(docs_cluster, AGENCY_A, "DATA_LOSS", "DOCUMENT_CORRUPT")
    set_aside = _set_aside(docs_cluster, AGENCY_A, "own")
    async with _client(docs_cluster, AGENCY_B) as b, _client(docs_cluster, AGENCY_A) as a:
        _, letter = await _send_with(docs_cluster, source, b)
        stored = next(p for p in _stored_files(docs_cluster, AGENCY_A) if p.name == digest)
        damage(stored)
        with pytest.raises(DataLoss) as info:
            await letter.attachments[0].save(tmp_path / "bad.pdf")
        assert info.value.reason == refused
        assert not info.value.retryable
        assert not _partials(tmp_path)
        assert not _temp_files(docs_cluster, AGENCY_B)
        deadline = time.monotonic() + 10
        while stored.exists():  # a push ended early finishes its check after the fetch
            assert time.monotonic() < deadline, "the owner kept its corrupt copy in place"
            await asyncio.sleep(0.05)
        aside = list((_store(docs_cluster, AGENCY_A) / "corrupt").glob(f"{digest}.*"))
        assert len(aside) == 1
        with pytest.raises(NotFound) as gone:
            await letter.attachments[0].save(tmp_path / "again.pdf")
        assert gone.value.reason == "DOCUMENT_NOT_FOUND"
        log = docs_cluster.nodes[AGENCY_A].log_file.read_text()
        assert log.count(f"our document {uri} is corrupt") == 1
        assert _rejected(docs_cluster, AGENCY_A, "DATA_LOSS", "DOCUMENT_CORRUPT") == counted + 1
        assert _set_aside(docs_cluster, AGENCY_A, "own") == set_aside + 1
        await a.upload(source)  # the repair: the same reference works again
        saved = await letter.attachments[0].save(tmp_path / "good.pdf")
    assert _sha256_file(saved) == digest


async def test_a_corrupt_copy_of_an_agencys_own_document_is_repaired_by_uploading_it_again(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # The owner's node finds its own copy corrupt when it serves it. It cannot fetch it
    # from anyone, but the copy must not stay in place either: uploading the file again
    # (the back-end's only way to repair it) would find it "existing" and keep it.
    source = tmp_path / "own.pdf"
    size = 300 * 1024 + 7
    digest = _write_random(source, size)
    async with _client(docs_cluster, AGENCY_A) as a:
        ref = await a.upload(source)
        stored = next(p for p in _stored_files(docs_cluster, AGENCY_A) if p.name == digest)
        _flip_byte(stored, size // 3)
        with pytest.raises(DataLoss) as info:
            await _read(a, ref.uri)
        assert info.value.reason == "DIGEST_MISMATCH"
        again = await a.upload(source)
        assert again.uri == ref.uri
        assert hashlib.sha256(await _read(a, ref.uri)).hexdigest() == digest


async def test_uploading_again_repairs_a_corrupt_copy_a_recipient_fetches(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # The owner's copy rots and nobody at the owner reads it whole: the owner's push for
    # the recipient's fetch through the hub finds it (DOCUMENT_CORRUPT). Uploading the file
    # again must store it afresh, not find the rotten copy "existing" and keep it.
    source = tmp_path / "rots.pdf"
    size = 200 * 1024 + 3
    digest = _write_random(source, size)
    async with _client(docs_cluster, AGENCY_B) as b, _client(docs_cluster, AGENCY_A) as a:
        _, letter = await _send_with(docs_cluster, source, b)
        stored = next(p for p in _stored_files(docs_cluster, AGENCY_A) if p.name == digest)
        _flip_byte(stored, size // 2)
        with pytest.raises(DataLoss) as info:
            await letter.attachments[0].save(tmp_path / "bad.pdf")
        assert info.value.reason == "DOCUMENT_CORRUPT"
        await a.upload(source)
        assert _sha256_file(stored) == digest
        saved = await letter.attachments[0].save(tmp_path / "good.pdf")
    assert _sha256_file(saved) == digest


async def test_a_reader_of_a_corrupt_copy_leaves_alone_the_good_copy_stored_since(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # A slow whole-file download opens the corrupt copy; another finds it corrupt and moves
    # it aside; the file is uploaded again. When the slow one ends (DIGEST_MISMATCH: it read
    # the corrupt file) it must not move aside the good copy now in its place, nor log that
    # it moved it aside (the copy in place is the good one).
    source = tmp_path / "slow.pdf"
    size = 20 * 1024 * 1024
    digest = _write_random(source, size)
    async with _client(docs_cluster, AGENCY_A) as a, _client(docs_cluster, AGENCY_A) as slow:
        ref = await a.upload(source)
        stored = next(p for p in _stored_files(docs_cluster, AGENCY_A) if p.name == digest)
        _flip_byte(stored, size // 4)
        chunks = slow.download(ref.uri)
        await anext(chunks)  # the slow reader has the corrupt file open
        with pytest.raises(DataLoss):
            await _read(a, ref.uri)
        await a.upload(source)
        with pytest.raises(DataLoss):
            async for _ in chunks:
                pass
        assert (await a.stat(ref.uri)).stored
        assert _sha256_file(stored) == digest
        assert hashlib.sha256(await _read(a, ref.uri)).hexdigest() == digest
    log = docs_cluster.nodes[AGENCY_A].log_file.read_text()
    assert log.count(f"our document {ref.uri} is corrupt") == 1, log


@contextlib.contextmanager
def _files_limited(cluster: Cluster, agency: str, limit: int) -> Iterator[None]:
    """The node's process may write no file past ``limit`` bytes (EFBIG), as if its disk
    were full; its database stays far below."""
    proc = cluster.nodes[agency].proc
    assert proc is not None
    before = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, before[1]))  # the soft one
    try:
        yield
    finally:
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, before)


@pytest.mark.parametrize("size", [24 * 1024 * 1024, 16 * 1024 * 1024 + 100])
async def test_an_upload_onto_a_full_disk_is_resource_exhausted_and_keeps_nothing(
    docs_cluster: Cluster, tmp_path: Path, size: int
) -> None:
    # The disk fails while the back-end still sends (24 MiB) and on the last chunk
    # (16 MiB + 100): a status the SDK can act on, never UNKNOWN with a Python exception.
    source = tmp_path / "big.bin"
    _write_random(source, size)
    async with _client(docs_cluster, AGENCY_C) as c:
        with (
            _files_limited(docs_cluster, AGENCY_C, 16 * 1024 * 1024),
            pytest.raises(ResourceExhausted) as info,
        ):
            await c.upload(source, media_type="application/octet-stream")
        assert info.value.reason == "STORAGE_FULL"
        assert info.value.retry_after is not None
        assert not _temp_files(docs_cluster, AGENCY_C)
        ref = await c.upload(source, media_type="application/octet-stream")  # room again
        assert (await c.stat(ref.uri)).stored


_STRICT = """
[documents]
max_file_bytes = 100000
media_types = ["application/pdf", "text/plain"]
"""


async def test_a_letter_whose_attachment_the_recipient_would_not_take_is_refused_at_delivery(
    tmp_path: Path,
) -> None:
    # A's store takes what B's does not (bigger files, other media types). Delivered, such
    # a letter was DELIVERED and handed over while B could never download the attachment
    # (or downloaded a type its allow-list forbids): B's node refuses it at delivery, and
    # A holds a DELIVERY_FAILURE that says why.
    cluster = await Cluster.start(
        tmp_path, [AGENCY_A, AGENCY_B], node_settings=_SETTINGS, without_node=[AGENCY_B]
    )
    try:
        strict = cluster.add_node(AGENCY_B, _STRICT)
        strict.start()
        await strict.wait_ready()
        big, small, text = tmp_path / "big.pdf", tmp_path / "small.pdf", tmp_path / "a.bin"
        _write_random(big, 200_000)
        _write_random(small, 50_000)
        _write_random(text, 1_000)
        async with _client(cluster, AGENCY_A) as a, _client(cluster, AGENCY_B) as b:
            other = await a.upload(text, media_type="application/octet-stream")
            refused = {
                (await a.send(to=[AGENCY_B], subject="s", body="b", attachments=[att])).shams: why
                for att, why in ((big, "DOCUMENT_TOO_LARGE"), (other, "MEDIA_TYPE_NOT_ALLOWED"))
            }
            taken = await a.send(to=[AGENCY_B], subject="s", body="b", attachments=[small])
            letter = await _receive(b, taken.shams)  # the control, sent last: after the others
            assert letter.attachments[0].size == 50_000
            trust = cluster.credentials(AGENCY_A).trust_store()
            for shams, why in refused.items():
                deadline = time.monotonic() + 30
                while (tracking := await a.track(shams)).statuses.get(AGENCY_B) != "FAILED":
                    assert time.monotonic() < deadline, tracking.statuses
                    await asyncio.sleep(0.1)
                (failure,) = [v for v in tracking.verify(trust) if v.event == "DELIVERY_FAILURE"]
                assert (failure.issuer, failure.reason) == (f"urn:chapar:agency:{AGENCY_B}", why)
            with contextlib.suppress(TimeoutError):  # nothing else in B's inbox
                async with asyncio.timeout(1):
                    async for extra in b.inbox():
                        raise AssertionError(f"delivered: {extra.shams}")
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_a_download_whose_file_another_writer_appends_to_is_not_kept(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # Two downloads into one path at once append to one .part file; each hashes only the
    # bytes it wrote, so the first to finish used to rename a mixed file into place as
    # verified. Here the test is the other writer.
    source = tmp_path / "big.pdf"
    digest = _write_random(source, 32 * 1024 * 1024)
    out = tmp_path / "copy.pdf"
    part = partial_path(out, bytes.fromhex(digest))
    async with _client(docs_cluster, AGENCY_B) as b:
        _, letter = await _send_with(docs_cluster, source, b)
        saving = asyncio.create_task(letter.attachments[0].save(out))
        async with asyncio.timeout(30):
            while not part.exists():  # noqa: ASYNC110  (a file, no event to wait on)
                await asyncio.sleep(0.001)
        with part.open("ab") as f:
            f.write(b"written by another download")
        with pytest.raises(DataLoss):
            await saving
    assert not out.exists()
    assert not part.exists()


async def test_two_saves_into_one_path_at_once_both_end_with_the_verified_file(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # A letter read twice at once (two workers): both saves went into one .part and both
    # failed. The second now waits for the first (a lock on the .part) and keeps its file.
    source = tmp_path / "twice.pdf"
    digest = _write_random(source, 8 * 1024 * 1024 + 5)
    out = tmp_path / "twice-copy.pdf"
    async with _client(docs_cluster, AGENCY_B) as b:
        _, letter = await _send_with(docs_cluster, source, b)
        (attachment,) = letter.attachments
        saved = await asyncio.gather(attachment.save(out), attachment.save(out))
    assert saved == [out, out]
    assert _sha256_file(out) == digest
    assert not _partials(tmp_path)


async def test_corrupted_byte_in_the_recipient_copy_is_detected_and_refetched(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "copy.pdf"
    size = 700_001
    digest = _write_random(source, size)
    async with _client(docs_cluster, AGENCY_B) as b:
        _, letter = await _send_with(docs_cluster, source, b)
        await letter.attachments[0].save(tmp_path / "first.pdf")
        copy = next(p for p in _stored_files(docs_cluster, AGENCY_B) if p.name == digest)
        _flip_byte(copy, size - 1)
        dropped = _set_aside(docs_cluster, AGENCY_B, "fetched")
        with pytest.raises(DataLoss) as info:
            await letter.attachments[0].save(tmp_path / "second.pdf")
        assert info.value.reason == "DIGEST_MISMATCH"
        assert _set_aside(docs_cluster, AGENCY_B, "fetched") == dropped + 1
        assert not (tmp_path / "second.pdf").exists()
        assert not _partials(tmp_path)
        saved = await letter.attachments[0].save(tmp_path / "third.pdf")  # fetched again
    assert _sha256_file(saved) == digest


async def test_upload_whose_content_is_not_the_announced_digest_is_refused(
    docs_cluster: Cluster,
) -> None:
    async with _client(docs_cluster, AGENCY_A) as a:
        call = pb.DocumentServiceStub(a._channel).UploadDocument()
        header = pb.UploadHeader(
            media_type="text/plain", size=5, sha256=hashlib.sha256(b"hello").digest()
        )
        await call.write(pb.UploadDocumentRequest(header=header))
        assert not (await call.read()).HasField("document")  # header accepted
        await call.write(pb.UploadDocumentRequest(chunk=b"hellO"))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert not _temp_files(docs_cluster, AGENCY_A)
    assert hashlib.sha256(b"hellO").hexdigest() not in {
        p.name for p in _stored_files(docs_cluster, AGENCY_A)
    }


# -- limits and references ---------------------------------------------------------------------


async def test_file_over_the_limit_is_refused_at_its_header_before_anything_is_stored(
    docs_cluster: Cluster,
) -> None:
    before = _stored_files(docs_cluster, AGENCY_A)
    async with _client(docs_cluster, AGENCY_A) as a:
        call = pb.DocumentServiceStub(a._channel).UploadDocument()
        header = pb.UploadHeader(media_type="application/pdf", size=GIB + 1)
        await call.write(pb.UploadDocumentRequest(header=header))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()  # refused before a single byte of content is sent
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _stored_files(docs_cluster, AGENCY_A) == before
    assert not _temp_files(docs_cluster, AGENCY_A)


async def test_media_type_not_allowed_is_refused(docs_cluster: Cluster, tmp_path: Path) -> None:
    program = tmp_path / "setup.exe"
    program.write_bytes(b"MZ" + os.urandom(1000))
    async with _client(docs_cluster, AGENCY_A) as a:
        with pytest.raises(InvalidArgument) as info:
            await a.upload(program, media_type="application/x-msdownload")
    assert info.value.reason == "MEDIA_TYPE_NOT_ALLOWED"


async def test_submit_refuses_references_the_node_does_not_hold_or_with_another_size(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "held.pdf"
    _write_random(source, 10_000)
    async with _client(docs_cluster, AGENCY_A) as a:
        ref = await a.upload(source)
        wrong_size = pb.AttachmentRef()
        wrong_size.CopyFrom(ref)
        wrong_size.size = 9_999
        with pytest.raises(InvalidArgument) as size_info:
            await a.send(to=[AGENCY_B], subject="s", body="b", attachments=[wrong_size])
        missing = pb.AttachmentRef(
            uri=f"chapar://{AGENCY_A}/documents/sha256/" + "cd" * 32,
            sha256=b"\xcd" * 32,
            size=10,
            media_type="application/pdf",
        )
        with pytest.raises(NotFound) as missing_info:
            await a.send(to=[AGENCY_B], subject="s", body="b", attachments=[missing])
        big = pb.AttachmentRef()
        big.CopyFrom(ref)
        big.size = GIB + 1
        with pytest.raises(ResourceExhausted):
            await a.send(to=[AGENCY_B], subject="s", body="b", attachments=[big])
    assert size_info.value.reason == "DOCUMENT_SIZE_MISMATCH"
    assert missing_info.value.reason == "DOCUMENT_NOT_FOUND"


def test_cli_fetch_by_a_non_recipient_prints_one_error_line(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "memo.pdf"
    _write_random(source, 20_000)
    sent, _ = _cli(docs_cluster, AGENCY_A, "send", "--to", AGENCY_B, "--subject", "memo",
                   "--body", "b", "--attach", str(source))  # fmt: skip
    (ref,) = sent["attachments"]  # type: ignore[misc]
    result = subprocess.run(
        [sys.executable, "-m", "node", "fetch", ref["uri"], "--out", str(tmp_path / "x.pdf"),
         "--pki", str(docs_cluster.pki.root), "--agency", AGENCY_C,
         "--node", docs_cluster.nodes[AGENCY_C].address],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("error: PERMISSION_DENIED NOT_A_RECIPIENT: ")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "x.pdf").exists()


async def test_owner_offline_is_unavailable_and_the_fetch_works_once_it_is_back(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "later.pdf"
    digest = _write_random(source, 400_000)
    owner = docs_cluster.nodes[AGENCY_A]
    async with _client(docs_cluster, AGENCY_B) as b:
        _, letter = await _send_with(docs_cluster, source, b)
        await asyncio.to_thread(owner.terminate)
        try:
            with pytest.raises(Unavailable) as info:
                await letter.attachments[0].save(tmp_path / "later-copy.pdf")
            assert info.value.reason == "OWNER_OFFLINE"
            assert info.value.retryable
        finally:
            owner.start()
            await owner.wait_ready()
        deadline = time.monotonic() + 30
        while True:  # the owner's node reconnects to the hub with backoff
            try:
                saved = await letter.attachments[0].save(tmp_path / "later-copy.pdf")
                break
            except Unavailable:
                assert time.monotonic() < deadline, "the owner's node did not come back"
                await asyncio.sleep(0.2)
    assert _sha256_file(saved) == digest


async def test_an_owner_whose_store_fails_to_look_a_document_up_says_so_at_once(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    # A file where the owner's sha256/xx folder belongs (a restore gone wrong; a disk error
    # does the same): its push raised before it answered the hub, which ended the fetch
    # after 30 s, UNAVAILABLE / OWNER_NOT_ANSWERING.
    source = tmp_path / "shelved.pdf"
    digest = _write_random(source, 300_000)
    async with _client(docs_cluster, AGENCY_B) as b:
        _, letter = await _send_with(docs_cluster, source, b)
        folder = _store(docs_cluster, AGENCY_A) / "sha256" / digest[:2]
        aside = folder.with_name(f"{folder.name}.aside")
        folder.rename(aside)
        try:
            folder.write_bytes(b"not a folder")
            began = time.monotonic()
            with pytest.raises(Unavailable) as info:
                await letter.attachments[0].save(tmp_path / "shelved-copy.pdf")
            assert time.monotonic() - began < 10
            assert info.value.reason == "OWNER_STORAGE_FAILED"
            assert info.value.retryable
        finally:
            folder.unlink(missing_ok=True)
            aside.rename(folder)
        saved = await letter.attachments[0].save(tmp_path / "shelved-copy.pdf")
    assert _sha256_file(saved) == digest
    assert not _temp_files(docs_cluster, AGENCY_B)


async def _cut_hub(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.hub.terminate)
    cluster.hub.start()
    await cluster.hub.wait_ready()


async def _kill_owner(cluster: Cluster) -> None:
    cluster.nodes[AGENCY_A].kill()
    cluster.nodes[AGENCY_A].start()
    await cluster.nodes[AGENCY_A].wait_ready()


@pytest.mark.parametrize("cut", [_cut_hub, _kill_owner], ids=["hub-restarts", "owner-killed"])
async def test_a_fetch_cut_mid_transfer_resumes_from_its_offset(
    tmp_path: Path, cut: Callable[[Cluster], Awaitable[None]]
) -> None:
    """While B's node fetches a document from A through the hub, the hub restarts, or A's
    node is killed mid-push (the hub must then tell B's fetch that the push broke: it
    waited for the next chunk for ever). B's node tries again and goes on from the bytes it
    has, and B's back-end, reading all along, gets the whole document in one download."""
    size = 96 * 1024 * 1024
    source = tmp_path / "large.bin"
    digest = _write_random(source, size)
    settings = "reconnect_max_s = 0.5\n" + _SETTINGS
    cluster = await Cluster.start(tmp_path / "c", [AGENCY_A, AGENCY_B], node_settings=settings)
    try:
        async with _client(cluster, AGENCY_B) as b:
            ref, _ = await _send_with(cluster, source, b)
            received = hashlib.sha256()
            got = 0
            done = False
            async with asyncio.timeout(90), contextlib.aclosing(b.download(ref.uri)) as chunks:
                async for chunk in chunks:
                    received.update(chunk)
                    got += len(chunk)
                    if not done and got >= 8 * 1024 * 1024:
                        done = True
                        await cut(cluster)
            assert done
        assert got == size
        assert received.hexdigest() == digest
        log = (cluster.root / f"node-{AGENCY_B}" / "node.log").read_text()
        assert "resuming" in log  # it went on from its offset, not from the start
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_document_retention_removes_what_no_kept_letter_needs(tmp_path: Path) -> None:
    """[documents] retention_s = 1: a document goes once unused for a second and every
    letter referencing it has had its body purged; one attached to a letter still on its
    way stays, however old."""
    settings = "retention_s = 1\npurge_interval_s = 0.3\n" + _SETTINGS.replace(
        "[documents]\n", "[documents]\nretention_s = 1\n"
    )
    cluster = await Cluster.start(
        tmp_path / "c",
        [AGENCY_A, AGENCY_B, AGENCY_C],
        node_settings=settings,
        without_node=[AGENCY_C],
    )
    files = {}
    for name in ("loose", "delivered", "pending"):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_bytes(os.urandom(2000))
    try:
        async with _client(cluster, AGENCY_A) as a, _client(cluster, AGENCY_B) as b:
            loose = await a.upload(files["loose"])
            ref, _ = await _send_with(cluster, files["delivered"], b)
            assert await _read(b, ref.uri) == files["delivered"].read_bytes()  # B holds a copy
            await a.send(to=[AGENCY_C], subject="waits", body="x", attachments=[files["pending"]])

        def held(agency: str) -> set[str]:
            return {p.name for p in _stored_files(cluster, agency)}

        deadline = time.monotonic() + 30
        while held(AGENCY_A) & {loose.sha256.hex(), ref.sha256.hex()} or ref.sha256.hex() in held(
            AGENCY_B
        ):
            assert time.monotonic() < deadline, (held(AGENCY_A), held(AGENCY_B))
            await asyncio.sleep(0.2)
        pending = hashlib.sha256(files["pending"].read_bytes()).hexdigest()
        assert pending in held(AGENCY_A)  # its letter to C is not delivered: body kept
        log = (cluster.root / f"node-{AGENCY_A}" / "node.log").read_text()
        assert "retention: removed" in log
    finally:
        codes = cluster.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_hub_takes_a_push_only_for_a_request_it_sent_that_node(
    docs_cluster: Cluster,
) -> None:
    async with grpc.aio.secure_channel(
        docs_cluster.hub.address, _node_tls(docs_cluster, AGENCY_C)
    ) as channel:
        call = pb.HubServiceStub(channel).PushDocument()
        header = pb.PushHeader(request_id="guessed-request-id", size=5)
        await call.write(pb.PushDocumentRequest(header=header))
        with contextlib.suppress(asyncio.InvalidStateError):
            await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "NO_SUCH_REQUEST" in str(info.value.trailing_metadata())


async def test_hub_refuses_a_fetch_by_a_node_without_a_grant(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "granted.pdf"
    _write_random(source, 1000)
    async with _client(docs_cluster, AGENCY_B) as b:
        ref, _ = await _send_with(docs_cluster, source, b)
    async with grpc.aio.secure_channel(
        docs_cluster.hub.address, _node_tls(docs_cluster, AGENCY_C)
    ) as channel:
        call = pb.HubServiceStub(channel).FetchDocument(pb.FetchDocumentRequest(uri=ref.uri))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- one gibibyte, flat memory -------------------------------------------------------------------

# The client's own peak: VmHWM, of this process's memory since its exec. (getrusage's
# ru_maxrss also counts the RSS of the pytest process it was forked from, which passes
# 150 MB late in a full run.)
_MEASURED_CLI = """
import re, sys
from pathlib import Path
from node.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
peak = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(f"PEAK_RSS_KB={peak}", file=sys.stderr)
sys.exit(code)
"""


def _cli(cluster: Cluster, agency: str, *args: str) -> tuple[dict[str, object], float]:
    """Runs a ``chapar`` client command in its own process; (JSON output, peak RSS MB)."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI, *args, "--pki", str(cluster.pki.root),
         "--agency", agency, "--node", cluster.nodes[agency].address, "--json"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak = next(
        int(line.split("=")[1]) / 1024
        for line in result.stderr.splitlines()
        if line.startswith("PEAK_RSS_KB=")
    )
    return json.loads(result.stdout.splitlines()[-1]), peak


async def test_one_gib_file_goes_a_to_hub_to_b_with_every_process_under_150_mb(
    docs_cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "big.bin"
    digest = _write_random(source, GIB)
    out = tmp_path / "big-copy.bin"
    try:
        started = time.monotonic()
        sent, send_rss = await asyncio.to_thread(
            _cli, docs_cluster, AGENCY_A, "send", "--to", AGENCY_B, "--subject", "1 GiB",
            "--body", "attached", "--attach", str(source),
        )  # fmt: skip
        uploaded = time.monotonic()
        (ref,) = sent["attachments"]  # type: ignore[misc]
        assert ref["sha256"] == digest
        assert ref["size"] == GIB
        fetched, fetch_rss = await asyncio.to_thread(
            _cli, docs_cluster, AGENCY_B, "fetch", ref["uri"], "--out", str(out)
        )
        done = time.monotonic()
        assert fetched["size"] == GIB
        assert _sha256_file(out) == digest
        peaks = {
            "hub": proc_stats(docs_cluster.hub)["peak_rss_mb"],
            **{
                f"node {code}": proc_stats(proc)["peak_rss_mb"]
                for code, proc in docs_cluster.nodes.items()
            },
            "client send": round(send_rss, 1),
            "client fetch": round(fetch_rss, 1),
        }
        upload_s, transfer_s = uploaded - started, done - uploaded
        report = {
            "peak_rss_mb": peaks,
            "upload_s": round(upload_s, 1),
            "upload_mb_s": round(GIB / 2**20 / upload_s, 1),
            "fetch_s": round(transfer_s, 1),
            "fetch_mb_s": round(GIB / 2**20 / transfer_s, 1),
        }
        print(json.dumps(report))
        assert all(0 < v < _RSS_LIMIT_MB for v in peaks.values()), report
    finally:
        source.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
