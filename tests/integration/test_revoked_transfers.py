"""A revocation holds on every call of the port, not only on the letter streams: document
transfers already under way end (at the hub and at a node) with the status a new call of
that certificate gets, and nothing half-sent is kept as a document; health checks,
reflection and ``/metrics`` over mutual TLS refuse a revoked certificate too.

One cluster for the module: nodes for A and B, C without one (the tests speak raw gRPC
to the hub as C's node). The hub re-reads its revocation file every 0.2 s; every test
that revokes lifts it again in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import sys
import time
import urllib.error
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client_sdk import Credentials, ExchangeClient, pb
from client_sdk.errors import from_rpc_error
from node.cluster import Cluster
from node.status import client_context, fetch
from tests.conftest import (
    AGENCY_A,
    AGENCY_B,
    AGENCY_C,
    HUB_PEER_OPTIONS,
    client_credentials,
    node_tls,
)

pytestmark = pytest.mark.integration

A, B, C = AGENCY_A, AGENCY_B, AGENCY_C
MIB = 1024 * 1024
HUB_SETTINGS = 'revocation_file = "revoked.txt"\nreload_interval_s = 0.2\nmetrics_tls = true'
NODE_SETTINGS = f"""reconnect_max_s = 1.0
metrics_tls = true
[documents]
max_file_bytes = {1024 * MIB}
media_types = ["application/octet-stream"]
"""
PROPAGATION_S = 10.0  # hub reload (0.2 s) + directory_update + the node's refetch, generously
ENDS_WITHIN_S = 10.0  # from the revocation in force to the transfer's end


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("revoked-transfers")
    started = asyncio.run(
        Cluster.start(
            root,
            [A, B, C],
            without_node=[C],
            hub_settings=HUB_SETTINGS,
            node_settings=NODE_SETTINGS,
        )
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


# -- helpers -----------------------------------------------------------------------------


def _serial_of_pem(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


def _write_replacing(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _auditor(cluster: Cluster) -> Credentials:
    d = cluster.pki.auditor_dir("auditor")
    return Credentials.from_files(
        ca=cluster.pki.root_cert, cert=d / "client.crt", key=d / "client.key"
    )


async def _node_revokes(cluster: Cluster, code: str, serial: str) -> bool:
    """Whether ``code``'s node holds a directory revoking ``serial`` (asked as the auditor)."""
    async with grpc.aio.secure_channel(
        cluster.nodes[code].address, _auditor(cluster).channel_credentials()
    ) as channel:
        answer = await pb.NodeServiceStub(channel).ListAgencies(
            pb.ListAgenciesRequest(), timeout=10
        )
    async with grpc.aio.secure_channel(
        cluster.hub.address, node_tls(cluster, code), options=HUB_PEER_OPTIONS
    ) as channel:
        hub = await pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
    return hub.directory.version == answer.directory_version and serial in (
        hub.directory.revoked_serials
    )


async def _hub_revokes(cluster: Cluster, serial: str) -> bool:
    """Whether the hub publishes ``serial`` as revoked (asked as a node not revoked)."""
    b_tls = _serial_of_pem((cluster.pki.agency_dir(B) / "tls.crt").read_bytes())
    asker = A if serial == b_tls else B
    async with grpc.aio.secure_channel(
        cluster.hub.address, node_tls(cluster, asker), options=HUB_PEER_OPTIONS
    ) as channel:
        hub = await pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
    return serial in hub.directory.revoked_serials


async def _wait(what: str, check: object, timeout: float = PROPAGATION_S) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _revoked(
    cluster: Cluster, serial: str, *, at_node: str | None = None
) -> AsyncIterator[None]:
    """``serial`` listed in the hub's revocation file until the block ends; in force at the
    hub (and at ``at_node``'s node, if named) on the way in."""
    path = cluster.root / "hub" / "revoked.txt"
    _write_replacing(path, f"{serial}  # revoked by a test\n")
    try:
        await _wait("the hub revoking it", lambda: _hub_revokes(cluster, serial))
        if at_node is not None:
            await _wait(
                f"node {at_node} revoking it", lambda: _node_revokes(cluster, at_node, serial)
            )
        yield
    finally:
        _write_replacing(path, "")
        await _wait("the hub lifting it", lambda: _not(_hub_revokes(cluster, serial)))


async def _not(probe: object) -> bool:
    return not await probe  # type: ignore[misc]


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            data = os.urandom(min(4 * MIB, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def _documents(cluster: Cluster, code: str) -> Path:
    return cluster.nodes[code].config.parent / "documents"


def _stored(cluster: Cluster, code: str, digest_hex: str) -> bool:
    return any(p.name == digest_hex for p in (_documents(cluster, code) / "sha256").rglob("*"))


def _temporaries(cluster: Cluster, code: str) -> list[Path]:
    return list((_documents(cluster, code) / "tmp").iterdir())


async def _letter_to_c(cluster: Cluster, tmp_path: Path, size: int) -> str:
    """A sends C (no node: its letters wait at the hub) a letter attaching ``size`` random
    bytes; returns the attachment's URI, which C may fetch through the hub."""
    source = tmp_path / "large.bin"
    await asyncio.to_thread(_random_file, source, size)
    async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
        receipt = await a.send(to=[C], subject="large", body="see attached", attachments=[source])
        deadline = time.monotonic() + PROPAGATION_S
        # The hub records C's right to the document when it accepts the letter.
        while (tracking := await a.track(receipt.shams)).statuses.get(C) != "RELAYED":
            assert time.monotonic() < deadline, tracking.statuses
            await asyncio.sleep(0.1)
    (ref,) = tracking.header.attachments
    return ref.uri


async def _read_slowly_until_ended(
    call: AsyncIterator[object], revoked: asyncio.Event, pause: float
) -> tuple[grpc.aio.AioRpcError | None, float, int]:
    """Reads ``call`` a message every ``pause`` s; returns how it ended (None: OK), how long
    after ``revoked`` was set, and how many messages came."""
    count = 0
    ended: grpc.aio.AioRpcError | None = None
    since: float | None = None
    try:
        async for _ in call:
            count += 1
            if revoked.is_set() and since is None:
                since = time.monotonic()
            if since is not None and time.monotonic() - since > ENDS_WITHIN_S:
                break  # went on past the revocation: the caller's assertion says so
            await asyncio.sleep(pause)
    except grpc.aio.AioRpcError as exc:
        ended = exc
    return ended, (time.monotonic() - since) if since is not None else 0.0, count


def _reason(error: grpc.aio.AioRpcError) -> str:
    return from_rpc_error(error).reason


# -- the hub's pipe between nodes --------------------------------------------------------


async def test_a_fetch_through_the_hub_ends_when_the_fetchers_certificate_is_revoked(
    cluster: Cluster, tmp_path: Path
) -> None:
    uri = await _letter_to_c(cluster, tmp_path, 64 * MIB)
    serial = _serial_of_pem((cluster.pki.agency_dir(C) / "tls.crt").read_bytes())
    revoked = asyncio.Event()
    async with grpc.aio.secure_channel(
        cluster.hub.address, node_tls(cluster, C), options=HUB_PEER_OPTIONS
    ) as channel:
        call = pb.HubServiceStub(channel).FetchDocument(pb.FetchDocumentRequest(uri=uri))
        reader = asyncio.create_task(_read_slowly_until_ended(call, revoked, 0.1))
        await asyncio.sleep(1.0)  # under way
        assert not reader.done(), reader
        async with _revoked(cluster, serial):
            revoked.set()
            ended, after, count = await asyncio.wait_for(reader, 60)
        call.cancel()
    assert ended is not None, f"the fetch went on for {after:.1f} s after the revocation"
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended
    assert _reason(ended) == "CERTIFICATE_REVOKED"
    assert count < 64 * MIB // (256 * 1024), "the whole document came"


async def test_a_fetch_through_the_hub_ends_when_the_owners_certificate_is_revoked(
    cluster: Cluster, tmp_path: Path
) -> None:
    uri = await _letter_to_c(cluster, tmp_path, 64 * MIB)
    owner_tls = cluster.pki.agency_dir(A) / "tls.crt"
    serial = _serial_of_pem(owner_tls.read_bytes())
    revoked = asyncio.Event()
    logged = len(cluster.hub.log_file.read_text())
    try:
        async with grpc.aio.secure_channel(
            cluster.hub.address, node_tls(cluster, C), options=HUB_PEER_OPTIONS
        ) as channel:
            call = pb.HubServiceStub(channel).FetchDocument(pb.FetchDocumentRequest(uri=uri))
            reader = asyncio.create_task(_read_slowly_until_ended(call, revoked, 0.1))
            await asyncio.sleep(1.0)
            assert not reader.done(), reader
            async with _revoked(cluster, serial):
                revoked.set()
                ended, after, count = await asyncio.wait_for(reader, 60)
                hub_log = cluster.hub.log_file.read_text()[logged:]
            call.cancel()
    finally:
        await _wait(
            "A's node connected again",
            lambda: _connected(cluster, A),
            timeout=30,
        )
    assert ended is not None, f"the fetch went on for {after:.1f} s after the revocation"
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    assert _reason(ended) == "OWNER_NOT_ADMITTED"
    assert count < 64 * MIB // (256 * 1024), "the whole document came"
    # The owner's push was ended by the hub itself, whatever its node does.
    assert f"ending a push by {A}: CERTIFICATE_REVOKED" in hub_log, hub_log[-3000:]


async def _connected(cluster: Cluster, code: str) -> bool:
    snapshot = await asyncio.to_thread(
        fetch, cluster.nodes[code].metrics, 10.0, _metrics_tls(cluster)
    )
    return snapshot.value("chapar_node_hub_connected") == 1


# -- a node's document service -----------------------------------------------------------


async def test_an_upload_under_way_ends_when_its_clients_certificate_is_revoked(
    cluster: Cluster,
) -> None:
    creds = client_credentials(cluster, A, "uploader")
    serial = _serial_of_pem(creds.certificate_chain)
    size = 256 * MIB
    chunk = os.urandom(256 * 1024)
    before = set(_temporaries(cluster, A))
    ended: grpc.aio.AioRpcError | None = None
    sent = 0
    async with grpc.aio.secure_channel(
        cluster.nodes[A].address, creds.channel_credentials()
    ) as channel:
        call = pb.DocumentServiceStub(channel).UploadDocument()
        header = pb.UploadHeader(media_type="application/octet-stream", size=size)
        await call.write(pb.UploadDocumentRequest(header=header))
        assert await call.read() == pb.UploadDocumentResponse()  # header accepted
        try:
            for _ in range(8):
                await call.write(pb.UploadDocumentRequest(chunk=chunk))
                sent += len(chunk)
            async with _revoked(cluster, serial, at_node=A):
                deadline = time.monotonic() + ENDS_WITHIN_S
                while time.monotonic() < deadline and sent < size:
                    await call.write(pb.UploadDocumentRequest(chunk=chunk))
                    sent += len(chunk)
                    await asyncio.sleep(0.05)
                with contextlib.suppress(asyncio.InvalidStateError):
                    await call.done_writing()
                await asyncio.wait_for(call.read(), ENDS_WITHIN_S)
        except grpc.aio.AioRpcError as exc:
            ended = exc
        except asyncio.InvalidStateError:  # a write after the status: read it
            try:
                await call.read()
            except grpc.aio.AioRpcError as exc:
                ended = exc
        finally:
            call.cancel()
    assert ended is not None, f"the upload went on to {sent} bytes after the revocation"
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended
    assert _reason(ended) == "CERTIFICATE_REVOKED"
    assert sent < size
    assert set(_temporaries(cluster, A)) <= before  # the partial upload is not kept


async def test_a_download_under_way_ends_when_its_clients_certificate_is_revoked(
    cluster: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "held.bin"
    await asyncio.to_thread(_random_file, source, 64 * MIB)
    async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
        ref = await a.upload(source)
    creds = client_credentials(cluster, A, "downloader")
    serial = _serial_of_pem(creds.certificate_chain)
    revoked = asyncio.Event()
    async with grpc.aio.secure_channel(
        cluster.nodes[A].address, creds.channel_credentials()
    ) as channel:
        call = pb.DocumentServiceStub(channel).DownloadDocument(
            pb.DownloadDocumentRequest(uri=ref.uri)
        )
        reader = asyncio.create_task(_read_slowly_until_ended(call, revoked, 0.1))
        await asyncio.sleep(1.0)
        assert not reader.done(), reader
        async with _revoked(cluster, serial, at_node=A):
            revoked.set()
            ended, after, count = await asyncio.wait_for(reader, 60)
        call.cancel()
    assert ended is not None, f"the download went on for {after:.1f} s after the revocation"
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, ended
    assert _reason(ended) == "CERTIFICATE_REVOKED"
    assert count < 64 * MIB // (256 * 1024)


# -- health, reflection and /metrics -----------------------------------------------------


def _metrics_tls(
    cluster: Cluster, creds: Credentials | None = None, tmp: Path | None = None
) -> ssl.SSLContext:
    if creds is None:
        d = cluster.pki.auditor_dir("auditor")
        return client_context(cluster.pki.root_cert, d / "client.crt", d / "client.key")
    assert tmp is not None
    (tmp / "c.crt").write_bytes(creds.certificate_chain)
    (tmp / "c.key").write_bytes(creds.private_key)
    (tmp / "c.key").chmod(0o600)
    return client_context(cluster.pki.root_cert, tmp / "c.crt", tmp / "c.key")


_ANSWERS = (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)


async def _health(address: str, creds: Credentials) -> int:
    async with grpc.aio.secure_channel(address, creds.channel_credentials()) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return int(answer.status)


async def _services(address: str, creds: Credentials, *, ask: bool = True) -> list[str]:
    """The services reflection lists; ``ask=False`` only reads, for a call the server
    refuses at its start: a write racing the refusal can fail bare and leave the call
    INTERNAL instead of the server's status (grpc/grpc#36066), about 1 run in 10. Read
    alone, an admitted call waits for a request until its deadline (DEADLINE_EXCEEDED)."""
    async with grpc.aio.secure_channel(address, creds.channel_credentials()) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=10)
        if ask:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        if answer is grpc.aio.EOF:
            raise AssertionError(f"reflection ended: {await call.code()}")
        call.cancel()
    return [s.name for s in answer.list_services_response.service]


async def test_health_reflection_and_metrics_refuse_a_revoked_certificate(
    cluster: Cluster, tmp_path: Path
) -> None:
    creds = client_credentials(cluster, A, "prober")
    serial = _serial_of_pem(creds.certificate_chain)
    context = _metrics_tls(cluster, creds, tmp_path)
    servers = [cluster.hub, cluster.nodes[A]]
    for server in servers:  # admitted before
        assert await _health(server.address, creds) in _ANSWERS
        assert await _services(server.address, creds)
        assert fetch(server.metrics, tls=context).value("chapar_ready") is not None
    async with _revoked(cluster, serial, at_node=A):
        for server in servers:
            with pytest.raises(grpc.aio.AioRpcError) as health:
                await _health(server.address, creds)
            assert health.value.code() == grpc.StatusCode.UNAUTHENTICATED, server.name
            assert _reason(health.value) == "CERTIFICATE_REVOKED", server.name
            with pytest.raises(grpc.aio.AioRpcError) as listed:
                await _services(server.address, creds, ask=False)
            assert listed.value.code() == grpc.StatusCode.UNAUTHENTICATED, server.name
            with pytest.raises(urllib.error.HTTPError) as scraped:
                fetch(server.metrics, tls=context)
            assert scraped.value.code == 403, server.name
            assert b"CERTIFICATE_REVOKED" in scraped.value.read()
            # `chapar status` with that certificate says why, not only "403: Forbidden".
            status = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "node", "status", server.metrics,
                "--ca", str(cluster.pki.root_cert),
                "--cert", str(tmp_path / "c.crt"), "--key", str(tmp_path / "c.key"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, said = await status.communicate()
            assert status.returncode == 1, server.name
            assert said.count(b"\n") == 1, said
            assert b"HTTP 403: CERTIFICATE_REVOKED" in said, said
            # Others are still served.
            auditor = _auditor(cluster)
            assert await _health(server.address, auditor) in _ANSWERS
            assert (
                fetch(server.metrics, tls=_metrics_tls(cluster)).value("chapar_ready") is not None
            )


async def test_health_watch_and_reflection_streams_end_when_their_certificate_is_revoked(
    cluster: Cluster,
) -> None:
    """A health Watch or a reflection stream opened before the revocation does not go on
    after it: each ends UNAUTHENTICATED / CERTIFICATE_REVOKED, at the hub and at a node, as
    the letter streams and transfers do."""
    creds = client_credentials(cluster, A, "watcher")
    serial = _serial_of_pem(creds.certificate_chain)
    servers = [cluster.hub, cluster.nodes[A]]
    async with contextlib.AsyncExitStack() as stack:
        watches: list[grpc.aio.UnaryStreamCall[Any, Any]] = []
        reflections: list[grpc.aio.StreamStreamCall[Any, Any]] = []
        for server in servers:  # open and answered before the revocation
            channel = await stack.enter_async_context(
                grpc.aio.secure_channel(server.address, creds.channel_credentials())
            )
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status in _ANSWERS, server.name
            watches.append(watch)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            await reflection.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            assert (await reflection.read()).list_services_response.service, server.name
            reflections.append(reflection)
        async with _revoked(cluster, serial, at_node=A):
            for server, call in [
                *zip(servers, watches, strict=True),
                *zip(servers, reflections, strict=True),
            ]:
                ended: grpc.aio.AioRpcError | None = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ENDS_WITHIN_S):
                        try:
                            while await call.read() is not grpc.aio.EOF:
                                pass
                        except grpc.aio.AioRpcError as exc:
                            ended = exc
                assert ended is not None, (
                    f"{server.name}: still open {ENDS_WITHIN_S} s after revocation"
                )
                assert ended.code() == grpc.StatusCode.UNAUTHENTICATED, server.name
                assert _reason(ended) == "CERTIFICATE_REVOKED", server.name
