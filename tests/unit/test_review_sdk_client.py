"""Review of today's client-side changes (aa44039..07ec00e): proofs of the defects found,
each of which failed on the code as reviewed and passes since its mend.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import PkiLayout, init_pki, issue_party, load_certs
from client_sdk import Correspondence, ExchangeClient, Tracking, pb
from client_sdk._pb.chapar.exchange.v1.document_service_pb2_grpc import (
    add_DocumentServiceServicer_to_server,
)
from client_sdk.client import partial_path
from client_sdk.identity import Identity
from client_sdk.signing import sha256
from client_sdk.trust import TrustStore, VerificationError
from node import cli_client
from tests.unit.test_bundle_hub import _evidence, _letter, _signer
from tests.unit.test_sdk import _attachment_of, _GatedDocuments, _serve

SENDER = "000.00.00.G22"
RECIPIENT = "10861234567"
NATIONAL = "urn:chapar:hub:national"
STAGING = "urn:chapar:hub:staging"
NATION = "urn:chapar:hub:nation"  # another hub of the CA whose URI is a part of NATIONAL's
E = pb.EvidenceEvent
HUB_NAMES = {NATIONAL: "national", STAGING: "staging", NATION: "nation"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    layout = init_pki(
        tmp_path_factory.mktemp("review-sdk") / "pki", hub="national", agencies=[SENDER, RECIPIENT]
    )
    issue_party(layout.root, Identity.for_hub("staging"))  # the hub renamed, or a staging one
    issue_party(layout.root, Identity.for_hub("nation"))
    return layout


def _letter_and_evidence(
    pki: PkiLayout, *hub_events: tuple[str, pb.EvidenceEvent.ValueType]
) -> tuple[pb.Envelope, list[pb.Evidence], list[bytes]]:
    """The letter, its SUBMISSION_ACCEPTANCE then each (hub, event) given, and the
    certificates a node gives with them (the signers' and the intermediate CA's)."""
    envelope = _letter(pki)
    sender = _signer(pki.agency_dir(SENDER))
    hubs = {uri: _signer(pki.hub_dir(name)) for uri, name in HUB_NAMES.items()}
    evidence = [
        _evidence(sender, f"urn:chapar:agency:{SENDER}", envelope, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE)
    ] + [_evidence(hubs[uri], uri, envelope, event) for uri, event in hub_events]  # fmt: skip
    certificates = [
        c.public_bytes(serialization.Encoding.DER)
        for c in (
            *(s.certificate for s in (sender, *hubs.values())),
            *load_certs(pki.intermediate_cert),
        )
    ]
    return envelope, evidence, certificates


def _bundle(
    pki: PkiLayout, *hub_events: tuple[str, pb.EvidenceEvent.ValueType]
) -> pb.EvidenceBundle:
    envelope, evidence, certificates = _letter_and_evidence(pki, *hub_events)
    return pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(
            envelope=envelope, evidence=evidence, certificates=certificates
        )
    )


def _trust(pki: PkiLayout) -> TrustStore:
    return TrustStore(load_certs(pki.root_cert))  # the root CA alone, as an auditor holds


RELAYED = (NATIONAL, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)


# -- R1: Correspondence.verify takes hub evidence from any hub of the CA ------------------------


def test_a_tree_letters_evidence_from_another_hub_beside_its_relaying_hubs_is_refused(
    pki: PkiLayout,
) -> None:
    # The same evidence Tracking.verify refuses (test_bundle_hub.py::
    # test_another_hubs_evidence_beside_the_relaying_hubs_is_refused), shown as a tree.
    envelope, evidence, certificates = _letter_and_evidence(
        pki, RELAYED, (STAGING, E.EVIDENCE_EVENT_EXPIRY)
    )
    header = pb.EnvelopeHeader.FromString(envelope.header)
    as_bundle = Tracking.from_bundle(_bundle(pki, RELAYED, (STAGING, E.EVIDENCE_EVENT_EXPIRY)))
    with pytest.raises(VerificationError) as refused:
        as_bundle.verify(_trust(pki), hubs=[NATIONAL])
    assert refused.value.reason == "ISSUER_NOT_ALLOWED"
    tree = Correspondence.from_response(
        pb.TrackCorrespondenceResponse(
            letters=[
                pb.TrackedLetter(
                    shams=header.shams,
                    sender=SENDER,
                    recipients=[RECIPIENT],
                    envelope=envelope,
                    evidence=evidence,
                )
            ],
            certificates=certificates,
        )
    )
    # Without a hub named, any hub the CA certified (a hub renamed while the letter went
    # signs under both names), each evidence shown with its issuer, as Tracking.verify.
    verified = tree.verify(_trust(pki))
    assert [v.issuer for v in verified][1:] == [NATIONAL, STAGING]
    with pytest.raises(VerificationError) as refused:
        tree.verify(_trust(pki), hubs=[NATIONAL])  # verified whatever the hubs before
    assert refused.value.reason == "ISSUER_NOT_ALLOWED"


# -- R2: chapar track of a letter relayed across a hub rename ----------------------------------


class _FakeClient:
    def __init__(self, bundle: pb.EvidenceBundle) -> None:
        self._bundle = bundle

    async def __aenter__(self) -> _FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def evidence_bundle(self, shams: str) -> pb.EvidenceBundle:
        return self._bundle


class _FakeCredentials:
    def __init__(self, pki: PkiLayout) -> None:
        self._pki = pki

    def trust_store(self) -> TrustStore:
        return _trust(self._pki)


class _FakeConnection:
    def __init__(self, pki: PkiLayout, bundle: pb.EvidenceBundle) -> None:
        self.credentials = _FakeCredentials(pki)
        self._bundle = bundle

    def client(self) -> _FakeClient:
        return _FakeClient(self._bundle)


def _chapar(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="chapar")
    cli_client.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(list(argv))
    code: int = ns.func(ns)
    return code


def test_chapar_track_verifies_a_letter_relayed_across_a_hub_rename(
    pki: PkiLayout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # OPERATIONS.md "A hub renamed": the hub relays as OLD (here national), is restarted as
    # NEW (here staging); a letter still queued then expires under NEW. The node takes both
    # (SECURITY.md: "evidence the hub issued under its old name before a rename must still
    # be taken") and serves both in the letter's bundle.
    renamed = _bundle(pki, RELAYED, (STAGING, E.EVIDENCE_EVENT_EXPIRY))
    monkeypatch.setattr(cli_client, "_connection", lambda ns: _FakeConnection(pki, renamed))
    shams = "000.00.00.G22/O/2026/0000001"
    code = _chapar(
        "track", "--node", "localhost:1", "--pki", "/nonexistent", "--agency", SENDER, shams
    )
    out, err = capsys.readouterr()
    assert (code, err) == (0, ""), err
    assert "NOT VERIFIED" not in out


# -- R3: hubs given as one string is matched as a substring ------------------------------------


def test_hubs_given_as_one_uri_string_take_no_hub_whose_uri_is_a_part_of_it(
    pki: PkiLayout,
) -> None:
    forged = Tracking.from_bundle(_bundle(pki, (NATION, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)))
    with pytest.raises(VerificationError) as refused:
        forged.verify(_trust(pki), hubs=[NATIONAL])
    assert refused.value.reason == "ISSUER_NOT_ALLOWED"  # as a list: refused
    forged = Tracking.from_bundle(_bundle(pki, (NATION, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)))
    with pytest.raises((VerificationError, TypeError)):
        forged.verify(_trust(pki), hubs=NATIONAL)  # as one string: verified, "RELAY_ACCEPTANCE"


# -- R4: a partial file another local user placed under the fixed name -------------------------

ONE = b"document one"


@pytest.fixture
async def client() -> AsyncIterator[ExchangeClient]:
    docs = _GatedDocuments([ONE])
    docs.gate.set()
    server, address = await _serve(docs, add_DocumentServiceServicer_to_server)
    channel = grpc.aio.insecure_channel(address)
    yield ExchangeClient.from_channel(channel)
    await channel.close()
    await server.stop(None)


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a file of another user (chown)")
async def test_a_partial_file_of_another_user_is_not_written_into_nor_saved(
    client: ExchangeClient, tmp_path: Path
) -> None:
    # The threat 89ac6e9 names: another local user able to write in the directory (a shared
    # incoming directory), who knows the attachment's name and digest (headers show them).
    # Instead of a link, that user leaves an empty file of their own, mode 0666.
    os.chmod(tmp_path, 0o1777)
    target = tmp_path / "contract.pdf"
    part = partial_path(target, sha256(ONE))
    part.touch()
    os.chown(part, 65534, 65534)
    part.chmod(0o666)
    # Saved before, 0600 as documented, but in the other user's inode: its owner could
    # chmod it back, and read (or change, after the digest check) the letter's attachment.
    with pytest.raises(PermissionError, match="partial file of another user"):
        await _attachment_of(ONE, "contract.pdf", client).save(target)
    assert not target.exists()
    assert part.stat().st_size == 0  # nothing written into it


# -- R5: OUTPUT_FAILED in place of a verification failure --------------------------------------


class _FullDisk(io.TextIOWrapper):
    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


@contextlib.contextmanager
def _stdout_on_a_full_disk() -> Iterator[None]:
    before = sys.stdout
    sys.stdout = _FullDisk()
    try:
        yield
    finally:
        sys.stdout = before


def test_a_bundle_that_fails_verification_says_so_when_its_output_fails_too(
    pki: PkiLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    forged = tmp_path / "forged.bundle"
    forged.write_bytes(
        _bundle(pki, (STAGING, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)).SerializeToString()
    )
    argv = ("verify", str(forged), "--ca", str(pki.root_cert), "--hub", "national")
    assert _chapar(*argv) == 1
    assert "VERIFICATION_FAILED ISSUER_NOT_ALLOWED" in capsys.readouterr().err
    with _stdout_on_a_full_disk():
        code = _chapar(*argv)
    err = capsys.readouterr().err
    assert code == 1
    assert "ISSUER_NOT_ALLOWED" in err or "VERIFICATION_FAILED" in err, err


# -- R6: a hub whose tls.ca holds the CA bundle publishes no intermediate ----------------------


def test_a_hub_whose_tls_ca_holds_the_ca_bundle_still_gives_the_intermediate(
    pki: PkiLayout, tmp_path: Path
) -> None:
    from node.config import SigningConfig, TlsConfig
    from node.server import _read_tls
    from node.server import _trust as server_trust

    # tls.ca holding the CA bundle, root and intermediate, "as operators often give it"
    # (test_pki.py::test_a_revoked_trust_anchor_refuses_a_chain_at_its_first_verification;
    # SECURITY.md: "an intermediate given in tls.ca, which the servers take as a root").
    ca_bundle = tmp_path / "ca-bundle.pem"
    ca_bundle.write_bytes(pki.root_cert.read_bytes() + pki.intermediate_cert.read_bytes())
    hub = pki.hub_dir("national")
    trust = server_trust(
        _read_tls(TlsConfig(ca=ca_bundle, cert=hub / "tls.crt", key=hub / "tls.key"),
                  Identity.parse(NATIONAL)),
        SigningConfig(cert=hub / "signing.crt", key=hub / "signing.key",
                      intermediates=pki.intermediate_cert),
    )  # fmt: skip
    # What the hub publishes as the directory's intermediate_certificates (build_directory)
    # and every node adds to GetEnvelope's certificates, so to every saved evidence bundle.
    published = [c.public_bytes(serialization.Encoding.DER) for c in trust.intermediates]
    envelope, evidence, certificates = _letter_and_evidence(pki, RELAYED)
    intermediate_der = load_certs(pki.intermediate_cert)[0].public_bytes(serialization.Encoding.DER)
    signers = [c for c in certificates if c != intermediate_der]
    bundle = pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(
            envelope=envelope, evidence=evidence, certificates=[*signers, *published]
        )
    )
    # chapar verify --ca root.crt: the auditor's root CA alone. CERTIFICATE_UNTRUSTED now.
    verified = Tracking.from_bundle(bundle).verify(_trust(pki))
    assert [v.event for v in verified] == ["SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE"]
