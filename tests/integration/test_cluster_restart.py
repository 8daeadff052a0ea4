"""Servers stopping and restarting: a restart on its pinned port waits out whoever holds
the port for a moment; a node stops without waiting for its back-ends' streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives import serialization

from certs.pki import generate_key, issue_certificate, load_certs, load_key
from client_sdk import Draft, ExchangeClient, Unavailable, pb
from client_sdk.identity import Identity
from node.cluster import Cluster, ServerProcess
from tests.conftest import HUB_PEER_OPTIONS, db_count
from tests.conftest import node_tls as _tls

A = "SENDER.A"
B = "RECIPIENT.B"
T = TypeVar("T")


async def test_a_restart_whose_port_is_briefly_taken_comes_up_on_the_same_port(
    tmp_path: Path,
) -> None:
    # The kill-hub fault of the load harness once failed this way: after SIGKILL, an
    # outgoing connection took the hub's (ephemeral) port before the hub came back.
    cluster = Cluster.prepare(tmp_path, [A])
    hub = cluster.hub
    hub.start()
    address = await hub.wait_ready()
    try:
        hub.kill()
        host, port = address.rsplit(":", 1)
        squatter = socket.socket()
        squatter.bind((host, int(port)))
        squatter.listen()
        hub.start()
        waiting = asyncio.create_task(hub.wait_ready())
        await asyncio.sleep(1.5)
        assert not waiting.done()  # refused while the port is taken, and trying again
        squatter.close()
        assert await asyncio.wait_for(waiting, 20) == address
        assert "(address in use?)" in hub.log_file.read_text()
    finally:
        cluster.stop()


async def test_a_node_stops_at_once_while_a_back_end_holds_its_acknowledgement_stream(
    tmp_path: Path,
) -> None:
    # A back-end keeps its acknowledgement stream open for as long as it runs. The node's
    # stop ends that stream, as it ends inbox streams, instead of waiting out its grace
    # period (60 s here: terminate gives up after 30 s and kills, exit code -9).
    cluster = await Cluster.start(tmp_path, [A, B], node_settings="shutdown_grace_s = 60")
    node = cluster.nodes[B]
    try:
        async with (
            ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a,
            ExchangeClient(node.address, cluster.credentials(B)) as b,
        ):
            await a.send(to=[B], subject="before the stop", body="x")
            async with contextlib.aclosing(b.inbox()) as inbox:
                letter = await anext(inbox)
            first = await letter.ack()  # the stream is open from now on
            again = await _stopped_at_once_then(node, letter.ack)  # on a new stream
            assert again == first  # the same evidence
    finally:
        cluster.stop()


async def test_a_node_stops_at_once_while_a_back_end_holds_a_shared_submission_stream(
    tmp_path: Path,
) -> None:
    # The README's advice for busy back-ends is one SharedStream for all their producers,
    # open for as long as they run: the node's stop ends it too (60 s grace, as above).
    cluster = await Cluster.start(tmp_path, [A, B], node_settings="shutdown_grace_s = 60")
    node = cluster.nodes[A]
    try:
        async with (
            ExchangeClient(node.address, cluster.credentials(A)) as a,
            a.shared_stream() as shared,
        ):
            first = await shared.send(Draft(to=[B], subject="before the stop", body="x"))
            draft = Draft(to=[B], subject="after the restart", body="y")
            second = await _stopped_at_once_then(node, lambda: shared.send(draft))
            assert second.shams != first.shams
    finally:
        cluster.stop()


async def _stopped_at_once_then(node: ServerProcess, again: Callable[[], Awaitable[T]]) -> T:
    """Stops ``node`` with SIGTERM (given 30 s against its 60 s grace), starts it again and
    returns ``again()`` once the client's channel has reconnected."""
    assert await asyncio.to_thread(node.terminate, 30) == 0
    node.start()
    await node.wait_ready()
    for _ in range(60):
        try:
            return await again()
        except Unavailable:
            await asyncio.sleep(0.5)
    raise AssertionError("the restarted node was not reached")


async def test_a_restarted_node_still_verifies_a_key_rotated_out_while_its_letters_waited(
    tmp_path: Path,
) -> None:
    # A's signing key is rotated out of the directory (the hub lists another certificate)
    # while a letter it signed waits at the hub for B, which is down. Without a restart a
    # node keeps every signing certificate it has seen; after one it must too, or B refuses
    # the letter (DELIVERY_FAILURE, SIGNER_UNKNOWN) and it is lost to B.
    cluster = await Cluster.start(tmp_path, [A, B], hub_settings="reload_interval_s = 0.2")
    try:
        recipient = cluster.nodes[B]
        assert await asyncio.to_thread(recipient.terminate, 30) == 0
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            receipt = await a.send(to=[B], subject="signed with the old key", body="x")
            hub_db = cluster.root / "hub" / "hub.db"

            async def queued() -> bool:
                return db_count(hub_db, "SELECT count(*) FROM queue") == 1

            await _until(queued)
            config = cluster.root / "hub" / "hub.toml"
            old = json.dumps(str(cluster.pki.agency_dir(A) / "signing.crt"))
            assert old in config.read_text()
            new = json.dumps(str(_new_signing_certificate(cluster, tmp_path)))
            config.write_text(config.read_text().replace(old, new))
            old_der = load_certs(cluster.pki.agency_dir(A) / "signing.crt")[0].public_bytes(
                serialization.Encoding.DER
            )

            async def rotated() -> bool:
                (entry,) = [e for e in await a.agencies() if e.code == A]
                return old_der not in entry.signing_certificates

            await _until(rotated)
        # B fetched that directory before its last stop (it was up, its backlog still
        # queued): it starts with the new directory cached, which lists A's new key only.
        async with grpc.aio.secure_channel(
            cluster.hub.address, _tls(cluster, B), options=HUB_PEER_OPTIONS
        ) as channel:
            answer = await pb.HubServiceStub(channel).GetDirectory(
                pb.GetDirectoryRequest(), timeout=10
            )
        assert old_der not in {c for e in answer.directory.agencies for c in e.signing_certificates}
        with contextlib.closing(sqlite3.connect(cluster.root / f"node-{B}" / "node.db")) as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('directory', ?)",
                (answer.directory.SerializeToString(),),
            )
            db.commit()
        recipient.start()
        await recipient.wait_ready()
        async with (
            ExchangeClient(recipient.address, cluster.credentials(B)) as b,
            contextlib.aclosing(b.inbox()) as inbox,
        ):
            letter = await asyncio.wait_for(anext(inbox), 30)
        assert letter.shams == receipt.shams
    finally:
        cluster.stop()


async def _until(probe: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _new_signing_certificate(cluster: Cluster, where: Path) -> Path:
    """Another signing certificate for A, issued by the exchange's intermediate CA."""
    cert = issue_certificate(
        issuer_cert=load_certs(cluster.pki.intermediate_cert)[0],
        issuer_key=load_key(cluster.pki.intermediate_key),
        subject_key=generate_key("ed25519"),
        identity_uri=Identity.for_agency(A).uri,
        kind="signing",
    )
    path = where / "new-signing.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
