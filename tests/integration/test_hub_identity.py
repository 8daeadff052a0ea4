"""Who a node takes for the hub: only a server that signs the node's nonce with a hub's
signing key for the node's own agency (ConnectWelcome.attestation), and that hub the one
the node knows (its saved directory's, or node.hub_name's) once it knows one.

Identity lives in the SAN URI, never in the host name (DESIGN.md section 3). Every agency's
TLS certificate is a server certificate too (serverAuth: its node serves its back-ends), so
a host-name check alone lets any agency's node, or anyone holding its TLS key, answer a
node's dial to the hub: it is handed the node's directory to apply and every letter the
node relays. (Found by a review; the node now checks the hub's attestation before it
sends or reads anything else, tests/unit/test_hub_attestation.py has the other cases.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import issue_party, load_certs
from client_sdk import pb
from client_sdk.identity import Identity, identity_of_certificate
from client_sdk.signing import HUB_ATTESTATION_PAYLOAD_TYPE, Signer
from client_sdk.trust import set_timestamp
from node.cluster import Cluster
from node.storage.node_store import NodeStore

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"
C = "MOFA.IR"  # the letter's recipient: B is no party to it
STAGING = "urn:chapar:hub:staging"


def _der(path: Path) -> bytes:
    return load_certs(path)[0].public_bytes(serialization.Encoding.DER)


class _AgencyPosingAsHub(pb.HubServiceServicer):
    """A HubService served with agency B's own TLS certificate (not a hub's)."""

    def __init__(self, directory: pb.Directory) -> None:
        self.directory = directory
        self.directory_served_to: list[str] = []
        self.connected: list[str] = []
        self.envelopes: list[pb.Envelope] = []
        self.got_letter = asyncio.Event()

    @staticmethod
    def _caller(context: grpc.aio.ServicerContext) -> str:
        from cryptography import x509

        pem = context.auth_context()["x509_pem_cert"][0]
        identity = identity_of_certificate(x509.load_pem_x509_certificate(pem))
        return identity.uri if identity else "?"

    async def GetDirectory(
        self, request: pb.GetDirectoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDirectoryResponse:
        self.directory_served_to.append(self._caller(context))
        return pb.GetDirectoryResponse(directory=self.directory)

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        self.connected.append(self._caller(context))
        await context.write(
            pb.ConnectResponse(
                welcome=pb.ConnectWelcome(
                    hub="urn:chapar:hub:national",
                    directory_version=self.directory.version,
                    max_frame_bytes=32 * 1024 * 1024,
                )
            )
        )
        async for frame in request_iterator:
            if frame.WhichOneof("frame") == "envelopes":
                self.envelopes.extend(frame.envelopes.envelopes)
                self.got_letter.set()


async def test_a_node_refuses_a_hub_whose_certificate_is_an_agencys(tmp_path: Path) -> None:
    cluster = Cluster.prepare(tmp_path, [A, B, C])  # PKI and configurations; the hub not run
    pki = cluster.pki
    b_dir = pki.agency_dir(B)
    # The directory B hands out: its own choice (no revocations, any state it likes).
    directory = pb.Directory(
        version=1,
        hub="urn:chapar:hub:national",
        hub_signing_certificates=[_der(pki.hub_dir("national") / "signing.crt")],
        intermediate_certificates=[_der(pki.intermediate_cert)],
    )
    for code in (A, B, C):
        directory.agencies.add(
            code=code,
            display_name=code,
            state=pb.AGENCY_STATE_ACTIVE,
            signing_certificates=[_der(pki.agency_dir(code) / "signing.crt")],
        )
    fake = _AgencyPosingAsHub(directory)
    server = grpc.aio.server()
    pb.add_HubServiceServicer_to_server(fake, server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [((b_dir / "tls.key").read_bytes(), (b_dir / "tls.crt").read_bytes())],
            root_certificates=pki.root_cert.read_bytes(),
            require_client_auth=True,
        ),
    )
    await server.start()
    node = Cluster._node_process(tmp_path, pki, A, f"127.0.0.1:{port}", "")
    node.start()
    try:
        # The node dials, reads the welcome, finds no hub's signed word in it and goes no
        # further: not ready (no directory), nothing relayed, nothing read from it.
        for _ in range(200):
            if "as the hub" in node.log_tail(50):
                break
            await asyncio.sleep(0.1)
        assert "it did not attest that it is the hub" in node.log_tail(50)
        served = identity_of_certificate(load_certs(b_dir / "tls.crt")[0])
        assert served is not None
        assert served.kind == "agency"
        assert fake.connected, "the node never dialled the server posing as the hub"
        assert fake.envelopes == []
        assert fake.directory_served_to == [], (
            f"node {A} took {served.uri} for the hub: it read its directory"
        )
    finally:
        node.terminate()
        await server.stop(0)


class _StagingHub(_AgencyPosingAsHub):
    """A HubService served with a second hub identity of the same CA (`chapar pki issue
    --hub staging`), which signs the node's nonce as a hub does: a valid attestation."""

    def __init__(self, directory: pb.Directory, signer: Signer) -> None:
        super().__init__(directory)
        self.signer = signer

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> None:
        self.connected.append(self._caller(context))
        hello = await anext(aiter(request_iterator))
        agency = self._caller(context).rpartition(":")[2]
        content = pb.HubAttestationContent(hub=STAGING, agency=agency, nonce=hello.hello.nonce)
        set_timestamp(content.attest_time, dt.datetime.now(dt.UTC))
        raw = content.SerializeToString()
        welcome = pb.ConnectWelcome(
            hub=STAGING,
            directory_version=self.directory.version,
            max_frame_bytes=32 * 1024 * 1024,
            attestation=pb.HubAttestation(
                content=raw,
                signature=self.signer.sign(HUB_ATTESTATION_PAYLOAD_TYPE, raw),
                certificates=[self.signer.certificate.public_bytes(serialization.Encoding.DER)],
            ),
        )
        await context.write(pb.ConnectResponse(welcome=welcome))
        async for frame in request_iterator:
            if frame.WhichOneof("frame") == "envelopes":
                self.envelopes.extend(frame.envelopes.envelopes)
                self.got_letter.set()


@pytest.mark.parametrize("knows", ["node.hub_name", "saved-directory", "nothing"])
async def test_a_node_refuses_another_hub_of_the_ca_once_it_knows_its_hub(
    tmp_path: Path, knows: str
) -> None:
    # A review's finding (F2): any hub certificate of the CA was "the hub". The staging
    # hub's welcome verifies (its key chains to the root); a node that knows its hub, by
    # the directory it saved or by node.hub_name, refuses it before it reads or sends
    # anything. A node that knows none takes the first hub to attest: trust on first use.
    cluster = Cluster.prepare(tmp_path, [A, B, C])
    pki = cluster.pki
    issue_party(pki.root, Identity.for_hub("staging"))
    staging = pki.hub_dir("staging")
    directory = pb.Directory(
        version=1,
        hub=STAGING,
        hub_signing_certificates=[_der(staging / "signing.crt")],
        intermediate_certificates=[_der(pki.intermediate_cert)],
    )
    directory.agencies.add(code=A, display_name=A, state=pb.AGENCY_STATE_ACTIVE)
    fake = _StagingHub(
        directory, Signer.from_files(staging / "signing.key", staging / "signing.crt")
    )
    server = grpc.aio.server()
    pb.add_HubServiceServicer_to_server(fake, server)
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [((staging / "tls.key").read_bytes(), (staging / "tls.crt").read_bytes())],
            root_certificates=pki.root_cert.read_bytes(),
            require_client_auth=True,
        ),
    )
    await server.start()
    extra = 'hub_name = "national"' if knows == "node.hub_name" else ""
    if knows == "saved-directory":  # what a node that has talked to the national hub holds
        (tmp_path / f"node-{A}").mkdir()
        store = await NodeStore.open(tmp_path / f"node-{A}" / "node.db", "normal")
        await store.save_directory(pb.Directory(version=1, hub="urn:chapar:hub:national"))
        await store.close()
    node = Cluster._node_process(tmp_path, pki, A, f"127.0.0.1:{port}", extra)
    node.start()
    try:
        for _ in range(200):
            if "as the hub" in node.log_tail(50) or fake.directory_served_to:
                break
            await asyncio.sleep(0.1)
        assert fake.connected, "the node never dialled the staging hub"
        if knows == "nothing":
            assert fake.directory_served_to == [f"urn:chapar:agency:{A}"]
            return
        assert (
            f"its attestation is signed by {STAGING}, not by urn:chapar:hub:national"
            in node.log_tail(50)
        )
        assert fake.directory_served_to == []
        assert fake.envelopes == []
    finally:
        node.terminate()
        await server.stop(0)
