"""A review's proof: the hub admits a node's ``Connect`` stream once, before it waits for
the node's first frame, and never again. A directory change while the hub waits (the
agency suspended, its node's TLS certificate revoked) is applied to the sessions
registered then; the stream still waiting is not one of them, and once its hello comes
it becomes a full session: the suspended (or revoked) node receives its queued letters,
bodies and all, and has its own letters relayed with RELAY_ACCEPTANCE.

A node need not be quick to be in that window: nothing bounds the wait for the hello, so
a node (or whoever holds its TLS key) that expects to be cut off opens a stream and
sends nothing until the hub has published the change."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from certs.pki import load_certs
from client_sdk import ExchangeClient, pb
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, Signer, sha256
from node.cluster import Cluster
from tests.conftest import node_tls

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
C = "MOFA.IR"  # in the directory, no node: the test acts as its node
YEAR = dt.datetime.now(dt.UTC).year
HUB_SETTINGS = 'revocation_file = "revoked.txt"\nreload_interval_s = 0.2'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("admission")
    started = asyncio.run(Cluster.start(root, [A, C], without_node=[C], hub_settings=HUB_SETTINGS))
    try:
        yield started
    finally:
        started.stop()


def _write_replacing(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _with_state(config: str, code: str, state: str) -> str:
    pattern = re.compile(rf'(code = "{re.escape(code)}"\nname = "[^"\n]*"\nstate = )"[a-z]+"')
    changed, n = pattern.subn(rf'\1"{state}"', config)
    assert n == 1
    return changed


async def _until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _queued_for(cluster: Cluster, code: str) -> int:
    conn = sqlite3.connect(f"file:{cluster.root / 'hub' / 'hub.db'}?mode=ro", uri=True)
    try:
        return int(
            conn.execute("SELECT count(*) FROM queue WHERE recipient = ?", (code,)).fetchone()[0]
        )
    finally:
        conn.close()


async def _directory(cluster: Cluster) -> pb.Directory:
    """The hub's directory, read as A's node (never suspended or revoked here)."""
    async with grpc.aio.secure_channel(cluster.hub.address, node_tls(cluster, A)) as channel:
        answer = await pb.HubServiceStub(channel).GetDirectory(pb.GetDirectoryRequest(), timeout=10)
        return answer.directory


def _letter_from_c(cluster: Cluster, sequence: int) -> pb.Envelope:
    body = b"from C, after it was cut off"
    header = pb.EnvelopeHeader(
        shams=pb.Shams(
            origin=C, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=YEAR, sequence=sequence
        ),
        sender=pb.Address(agency=C),
        recipients=[pb.Address(agency=A)],
        subject="after the cut",
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.create_time.FromDatetime(dt.datetime.now(dt.UTC))
    raw = header.SerializeToString(deterministic=True)
    d = cluster.pki.agency_dir(C)
    signer = Signer.from_files(d / "signing.key", d / "signing.crt")
    return pb.Envelope(header=raw, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, raw), body=body)


async def _held_stream_after(
    cluster: Cluster, cut_off: Callable[[], Awaitable[None]], sequence: int
) -> dict[str, object]:
    """Opens a Connect stream as C's node and sends nothing; ``cut_off`` changes the
    directory (and waits until the hub published it); then the hello and one letter go.
    Returns what the hub answered on that stream."""
    seen: dict[str, object] = {"frames": [], "delivered": 0, "relay_events": [], "error": None}
    async with grpc.aio.secure_channel(cluster.hub.address, node_tls(cluster, C)) as channel:
        call = pb.HubServiceStub(channel).Connect()
        await call.wait_for_connection()
        await asyncio.sleep(1.0)  # the hub has admitted the call and waits for its hello
        await cut_off()
        # A fresh stream is refused now, as it should be ...
        async with grpc.aio.secure_channel(cluster.hub.address, node_tls(cluster, C)) as other:
            fresh = pb.HubServiceStub(other).Connect()

            async def hello_and_read() -> object:
                # Refused at once (its hello's write may already fail) or at the first read.
                await fresh.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="t")))
                return await asyncio.wait_for(fresh.read(), 10)

            with pytest.raises(grpc.aio.AioRpcError):
                await hello_and_read()
        # ... but the one held open since before the change:
        try:
            await call.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="t")))
            await call.write(
                pb.ConnectRequest(
                    envelopes=pb.EnvelopeBatch(envelopes=[_letter_from_c(cluster, sequence)])
                )
            )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    answer = await asyncio.wait_for(call.read(), deadline - time.monotonic())
                except TimeoutError:
                    break
                if answer is grpc.aio.EOF:
                    break
                kind = answer.WhichOneof("frame")
                seen["frames"].append(kind)  # type: ignore[union-attr]
                if kind == "deliveries":
                    seen["delivered"] += len(answer.deliveries.envelopes)  # type: ignore[operator]
                if kind == "relay_results":
                    seen["relay_events"] += [  # type: ignore[operator]
                        pb.EvidenceEvent.Name(pb.EvidenceContent.FromString(e.content).event)
                        for e in answer.relay_results.evidence
                    ]
        except grpc.aio.AioRpcError as exc:
            seen["error"] = (exc.code(), exc.details())
        except asyncio.InvalidStateError:  # refused after the hello, before the letter's write
            seen["error"] = (await call.code(), await call.details())
        call.cancel()
    return seen


async def _letter_queued_for_c(cluster: Cluster) -> None:
    before = _queued_for(cluster, C)
    async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
        await a.send(to=[C], subject="waiting for C", body="confidential body")

    async def queued() -> bool:
        return _queued_for(cluster, C) > before

    await _until(queued, "A's letter queued for C at the hub")


async def test_a_stream_held_open_across_a_suspension_is_admitted_as_a_full_session(
    cluster: Cluster,
) -> None:
    await _letter_queued_for_c(cluster)
    config = cluster.hub.config
    original = config.read_text()

    async def suspend() -> None:
        _write_replacing(config, _with_state(original, C, "suspended"))

        async def published() -> bool:
            agencies = {a.code: a.state for a in (await _directory(cluster)).agencies}
            return agencies.get(C) == pb.AGENCY_STATE_SUSPENDED

        await _until(published, "C suspended in the hub's directory")

    try:
        seen = await _held_stream_after(cluster, suspend, 501)
    finally:
        _write_replacing(config, original)
    # C is suspended: the hub must neither deliver to its node nor relay for it.
    assert "welcome" not in seen["frames"], seen  # type: ignore[operator]
    assert seen["delivered"] == 0, seen
    assert "EVIDENCE_EVENT_RELAY_ACCEPTANCE" not in seen["relay_events"], seen  # type: ignore[operator]


async def test_a_stream_held_open_across_a_revocation_of_its_tls_certificate_is_admitted(
    cluster: Cluster,
) -> None:
    async def active() -> bool:
        agencies = {a.code: a.state for a in (await _directory(cluster)).agencies}
        return agencies.get(C) == pb.AGENCY_STATE_ACTIVE

    await _until(active, "C active again")
    await _letter_queued_for_c(cluster)
    revoked = cluster.root / "hub" / "revoked.txt"
    serial = format(load_certs(cluster.pki.agency_dir(C) / "tls.crt")[0].serial_number, "x")

    async def revoke() -> None:
        _write_replacing(revoked, f"{serial}  # C's node key lost\n")

        async def published() -> bool:
            return serial in (await _directory(cluster)).revoked_serials

        await _until(published, "C's TLS certificate revoked in the hub's directory")

    try:
        seen = await _held_stream_after(cluster, revoke, 502)
    finally:
        _write_replacing(revoked, "")
    assert "welcome" not in seen["frames"], seen  # type: ignore[operator]
    assert seen["delivered"] == 0, seen
    assert "EVIDENCE_EVENT_RELAY_ACCEPTANCE" not in seen["relay_events"], seen  # type: ignore[operator]
