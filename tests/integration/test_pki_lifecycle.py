"""The PKI's life on a running exchange, done with the ``chapar pki`` commands an operator
has: a new agency issued and listed, its signing key renewed, its back-end revoked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import load_certs
from client_sdk import Correspondence, ExchangeClient, Unauthenticated, pb
from client_sdk.shams import parse_shams
from client_sdk.signing import sha256
from client_sdk.trust import TrustStore
from node.cluster import Cluster

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"
D = "NEW.AGENCY"


async def _chapar(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", *map(str, args)]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def _until(probe: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _agency_entry(code: str, certificates: list[Path]) -> str:
    listed = ", ".join(json.dumps(str(p)) for p in certificates)
    return (
        f'\n[[agencies]]\ncode = "{code}"\nname = "Agency {code}"\nstate = "active"\n'
        f"signing_certificates = [{listed}]\n"
    )


def _der(path: Path) -> bytes:
    return load_certs(path)[0].public_bytes(serialization.Encoding.DER)


async def test_an_agency_issued_renewed_and_revoked_with_chapar_pki_on_a_running_exchange(
    tmp_path: Path,
) -> None:
    cluster = await Cluster.start(
        tmp_path, [A, B], hub_settings='reload_interval_s = 0.2\nrevocation_file = "revoked.txt"'
    )
    try:
        folder = cluster.pki.agency_dir(D)
        config = cluster.root / "hub" / "hub.toml"
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:

            async def listed(certificates: int) -> bool:
                entries = [e for e in await a.agencies() if e.code == D]
                return bool(entries) and len(entries[0].signing_certificates) == certificates

            # 1. A new agency: certificates from the exchange's CA, an entry at the hub, a
            # node; it receives a letter over mutual TLS with what was issued.
            issued = await _chapar("pki", "issue", "--dir", cluster.pki.root, "--agency", D)
            assert issued.returncode == 0, issued.stderr
            again = await _chapar("pki", "issue", "--dir", cluster.pki.root, "--agency", D)
            assert again.returncode == 2
            assert "already has" in again.stderr  # nothing replaced
            with config.open("a") as out:
                out.write(_agency_entry(D, [folder / "signing.crt"]))
            await _until(lambda: listed(1), f"{D} in the directory")
            node = cluster.add_node(D)
            node.start()
            await node.wait_ready()
            first = await a.send(to=[D], subject="welcome", body="x")
            async with (
                ExchangeClient(node.address, cluster.credentials(D)) as d,
                contextlib.aclosing(d.inbox()) as inbox,
            ):
                letter = await asyncio.wait_for(anext(inbox), 30)
                assert letter.shams == first.shams
                await letter.ack()

            # 2. Its signing key renewed: the new pair under the old names, the old one kept
            # and listed beside it, the node restarted; what each key signed verifies.
            old_der = _der(folder / "signing.crt")
            renewed = await _chapar(
                "pki", "renew", "--dir", cluster.pki.root, folder / "signing.crt"
            )
            assert renewed.returncode == 0, renewed.stderr
            (kept,) = folder.glob("signing.*.crt")
            assert _der(kept) == old_der
            assert _der(folder / "signing.crt") != old_der
            text = config.read_text()
            config.write_text(
                text.replace(_agency_entry(D, [folder / "signing.crt"]), "")
                + _agency_entry(D, [folder / "signing.crt", kept])
            )
            await _until(lambda: listed(2), f"{D}'s two signing certificates listed")
            await node.restart()
            async with ExchangeClient(node.address, cluster.credentials(D)) as d:
                answer = await d.send(to=[A], subject="signed with the new key", body="y")

            async def handed_over() -> bool:
                tracking = await a.track(first.shams)
                return tracking.statuses.get(D) == "HANDED_OVER"

            await _until(handed_over, "the first letter's HANDOVER")
            trust = cluster.credentials(A).trust_store()
            # the DELIVERY and HANDOVER of the first letter: D's old key
            assert (await a.track(first.shams)).verify(trust)
            async with contextlib.aclosing(a.inbox()) as inbox:
                reply = await asyncio.wait_for(anext(inbox), 30)
            assert reply.shams == answer.shams
            assert reply.envelope.signature.key_id == sha256(_der(folder / "signing.crt"))
            assert (await a.track(answer.shams)).verify(trust)  # D's new key

            # 3. Its back-end's certificate revoked in the hub's revocation file: the node
            # learns it from the directory and refuses the back-end.
            revoked = await _chapar(
                "pki",
                "revoke",
                "--file",
                cluster.root / "hub" / "revoked.txt",
                folder / "client.crt",
                "--note",
                "a test",
            )
            assert revoked.returncode == 0, revoked.stderr

            async def refused() -> bool:
                async with ExchangeClient(node.address, cluster.credentials(D)) as d:
                    try:
                        await d.agencies()
                    except Unauthenticated as exc:
                        return exc.reason == "CERTIFICATE_REVOKED"
                return False

            await _until(refused, f"{D}'s node refusing its revoked back-end")
    finally:
        cluster.stop()


def _auditor_tls(cluster: Cluster) -> grpc.ChannelCredentials:
    d = cluster.pki.auditor_dir("auditor")
    return grpc.ssl_channel_credentials(
        root_certificates=cluster.pki.root_cert.read_bytes(),
        private_key=(d / "client.key").read_bytes(),
        certificate_chain=(d / "client.crt").read_bytes(),
    )


async def _hub_track(cluster: Cluster, shams: str) -> pb.TrackResponse:
    async with grpc.aio.secure_channel(cluster.hub.address, _auditor_tls(cluster)) as channel:
        response: pb.TrackResponse = await pb.HubServiceStub(channel).Track(
            pb.TrackRequest(shams=parse_shams(shams)), timeout=10
        )
        return response


async def test_evidence_the_hub_signed_before_its_signing_key_was_renewed_verifies_after_it(
    tmp_path: Path,
) -> None:
    """The hub's signing certificate renewed with ``chapar pki renew`` and the hub
    restarted, as OPERATIONS.md says: the RELAY_ACCEPTANCE its old key signed must still
    verify, for an auditor tracking at the hub (the root alone) and for a back-end that
    learns its trust from the directory, as the new key's evidence does."""
    cluster = await Cluster.start(tmp_path, [A, B])
    try:
        hub_signing = cluster.pki.hub_dir("national") / "signing.crt"
        root = TrustStore.from_pem_files(cluster.pki.root_cert)
        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            before = await a.send(to=[B], subject="before the renewal", body="x")
            old_der = _der(hub_signing)

            async def relayed() -> bool:  # the hub answers, with its evidence of the letter
                try:
                    response = await _hub_track(cluster, before.shams)
                except grpc.aio.AioRpcError:
                    return False
                return any(e.signature.key_id for t in response.letters for e in t.evidence)

            await _until(relayed, "the first letter's relay evidence at the hub")
            verified = Correspondence.from_response(await _hub_track(cluster, before.shams))
            assert "urn:chapar:hub:national" in {v.issuer for v in verified.verify(root)}

            renewed = await _chapar("pki", "renew", "--dir", cluster.pki.root, hub_signing)
            assert renewed.returncode == 0, renewed.stderr
            assert _der(hub_signing) != old_der
            await cluster.hub.restart()

        async with ExchangeClient(cluster.nodes[A].address, cluster.credentials(A)) as a:
            after = await a.send(to=[B], subject="after the renewal", body="y")
            await _until(relayed, "the hub answering again")
            tree = Correspondence.from_response(await _hub_track(cluster, before.shams))
            signers = {e.signature.key_id for t in tree.letters for e in t.evidence}
            assert sha256(old_der) in signers  # the old key's RELAY_ACCEPTANCE
            fresh = TrustStore.from_pem_files(cluster.pki.root_cert)  # `root` learnt the old one
            assert "urn:chapar:hub:national" in {v.issuer for v in tree.verify(fresh)}

            # A back-end trusting what the directory lists verifies both keys' evidence.
            async def listed_new() -> bool:
                response = await a.trust_from_directory(cluster.credentials(A).trust_store())
                return response.certificate(sha256(_der(hub_signing))) is not None

            await _until(listed_new, "the node's directory from the restarted hub")
            trust = await a.trust_from_directory(cluster.credentials(A).trust_store())
            assert trust.certificate(sha256(old_der)) is not None

            async def tracked_after() -> bool:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    tree = Correspondence.from_response(await _hub_track(cluster, after.shams))
                    fresh = TrustStore.from_pem_files(cluster.pki.root_cert)
                    return any(v.issuer == "urn:chapar:hub:national" for v in tree.verify(fresh))
                return False

            await _until(tracked_after, "the second letter's relay evidence (the new key)")
    finally:
        cluster.stop()
