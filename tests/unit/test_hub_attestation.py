"""The hub's signed word in its welcome (ConnectWelcome.attestation), as a node checks it
(node.rpc.hub_link.check_hub_attestation): only a hub's signing key, chained to the node's
roots and not revoked, for the node's own nonce and agency. TLS alone admitted any server
certificate of the exchange's CA, an agency node's too (a review's finding)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import PkiLayout, init_pki, load_certs
from client_sdk import pb
from client_sdk.signing import HUB_ATTESTATION_PAYLOAD_TYPE, Signer
from client_sdk.trust import TrustStore, set_timestamp
from node.rpc.hub_link import _NotTheHub, check_hub_attestation

A, B = "000.00.00.G22", "10861234567"
NONCE = b"n" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    return init_pki(tmp_path_factory.mktemp("attest") / "pki", hub="national", agencies=[A, B])


def _trust(pki: PkiLayout) -> TrustStore:
    return TrustStore(load_certs(pki.root_cert), load_certs(pki.intermediate_cert))


def _signer(folder: Path) -> Signer:
    return Signer.from_files(folder / "signing.key", folder / "signing.crt")


def _welcome(signer: Signer, *, hub: str, agency: str, nonce: bytes) -> pb.ConnectWelcome:
    content = pb.HubAttestationContent(hub=hub, agency=agency, nonce=nonce)
    set_timestamp(content.attest_time, dt.datetime.now(dt.UTC))
    raw = content.SerializeToString()
    welcome = pb.ConnectWelcome(hub=hub)
    welcome.attestation.CopyFrom(
        pb.HubAttestation(
            content=raw,
            signature=signer.sign(HUB_ATTESTATION_PAYLOAD_TYPE, raw),
            certificates=[signer.certificate.public_bytes(serialization.Encoding.DER)],
        )
    )
    return welcome


def test_the_hubs_attestation_for_this_node_and_nonce_is_taken(pki: PkiLayout) -> None:
    hub = _signer(pki.hub_dir("national"))
    trust = _trust(pki)
    welcome = _welcome(hub, hub="urn:chapar:hub:national", agency=A, nonce=NONCE)
    assert check_hub_attestation(trust, welcome, A, NONCE) == "urn:chapar:hub:national"
    assert trust.certificate(hub.key_id) is None  # its certificates never enter the store


@pytest.mark.parametrize(
    "case",
    ["none", "relayed-for-another-agency", "another-nonce", "an-agency-signs", "revoked",
     "malformed", "not-the-signed-content"],
)  # fmt: skip
def test_anything_else_is_not_the_hub(pki: PkiLayout, case: str) -> None:
    hub = _signer(pki.hub_dir("national"))
    trust = _trust(pki)
    uri = "urn:chapar:hub:national"
    welcome = _welcome(hub, hub=uri, agency=A, nonce=NONCE)
    if case == "none":
        welcome = pb.ConnectWelcome(hub=uri)
    elif case == "relayed-for-another-agency":
        # B's server dials the real hub as B and hands A the hub's welcome with A's nonce.
        welcome = _welcome(hub, hub=uri, agency=B, nonce=NONCE)
    elif case == "another-nonce":
        welcome = _welcome(hub, hub=uri, agency=A, nonce=b"o" * 32)
    elif case == "an-agency-signs":
        welcome = _welcome(_signer(pki.agency_dir(B)), hub=uri, agency=A, nonce=NONCE)
    elif case == "revoked":
        trust.set_revoked({hub.certificate.serial_number})
    elif case == "malformed":
        del welcome.attestation.certificates[:]
        welcome.attestation.certificates.append(b"not a certificate")
    else:
        welcome.attestation.content += b"\x10\x01"  # more than was signed
    with pytest.raises(_NotTheHub):
        check_hub_attestation(trust, welcome, A, NONCE)
