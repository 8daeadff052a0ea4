"""Offline, a bundle's relay and expiry evidence counts only from the hub that relayed it.

The exchange's CA may certify more than one hub (`chapar pki issue --hub staging`: a
staging hub, a hub renamed, an operator's slip), and every such certificate chains to the
root an auditor holds. ``check_attestation`` took a relay or an expiry from any
``urn:chapar:hub:*``: whoever holds a second hub's key could add a RELAY_ACCEPTANCE or an
EXPIRY to a saved bundle (which is not signed as a whole) and ``chapar verify`` showed it
verified (a review's finding, F2). Now that evidence counts only from the hubs the
verifier names (``Tracking.verify(hubs=...)``, ``chapar verify --hub``), or, when it names
none, only when all of it comes from one hub.
"""

from __future__ import annotations

import argparse
import datetime as dt
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import PkiLayout, init_pki, issue_party, load_certs
from client_sdk import Tracking, pb
from client_sdk.identity import Identity
from client_sdk.signing import EVIDENCE_PAYLOAD_TYPE, Signer, sha256
from client_sdk.trust import TrustStore, VerificationError, set_timestamp
from node import cli_client

SENDER = "000.00.00.G22"
RECIPIENT = "10861234567"
NATIONAL = "urn:chapar:hub:national"
STAGING = "urn:chapar:hub:staging"
E = pb.EvidenceEvent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    layout = init_pki(
        tmp_path_factory.mktemp("bundle-hub") / "pki", hub="national", agencies=[SENDER, RECIPIENT]
    )
    issue_party(layout.root, Identity.for_hub("staging"))  # the same CA's second hub
    return layout


def _signer(folder: Path) -> Signer:
    return Signer.from_files(folder / "signing.key", folder / "signing.crt")


def _letter(pki: PkiLayout) -> pb.Envelope:
    body = b"kept for the court"
    header = pb.EnvelopeHeader(
        shams=pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=1),
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.sender.agency = SENDER
    header.recipients.add(agency=RECIPIENT)
    set_timestamp(header.create_time, dt.datetime.now(dt.UTC))
    envelope = pb.Envelope(header=header.SerializeToString(), body=body)
    _signer(pki.agency_dir(SENDER)).seal_envelopes([envelope])
    return envelope


def _evidence(
    signer: Signer, issuer: str, envelope: pb.Envelope, event: pb.EvidenceEvent.ValueType
) -> pb.Evidence:
    content = pb.EvidenceContent(
        evidence_id=str(uuid.uuid4()),
        event=event,
        issuer=issuer,
        shams=pb.EnvelopeHeader.FromString(envelope.header).shams,
        envelope_sha256=sha256(envelope.header),
        recipient="" if event == E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE else RECIPIENT,
    )
    set_timestamp(content.event_time, dt.datetime.now(dt.UTC))
    data = content.SerializeToString()
    return pb.Evidence(content=data, signature=signer.sign(EVIDENCE_PAYLOAD_TYPE, data))


def _bundle(pki: PkiLayout, *hub_events: tuple[str, pb.EvidenceEvent.ValueType]) -> bytes:
    """A bundle of the letter: its SUBMISSION_ACCEPTANCE, then each (hub, event) given."""
    envelope = _letter(pki)
    sender = _signer(pki.agency_dir(SENDER))
    hubs = {uri: _signer(pki.hub_dir(uri.rpartition(":")[2])) for uri in (NATIONAL, STAGING)}
    evidence = [
        _evidence(sender, f"urn:chapar:agency:{SENDER}", envelope, E.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE)
    ] + [_evidence(hubs[uri], uri, envelope, event) for uri, event in hub_events]  # fmt: skip
    certificates = [  # as a node gives them: the signers' and the intermediate CA's
        c.public_bytes(serialization.Encoding.DER)
        for c in (
            *(s.certificate for s in (sender, *hubs.values())),
            *load_certs(pki.intermediate_cert),
        )
    ]
    return pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(
            envelope=envelope, evidence=evidence, certificates=certificates
        )
    ).SerializeToString()


def _trust(pki: PkiLayout) -> TrustStore:
    return TrustStore(load_certs(pki.root_cert))  # the root CA alone, as an auditor holds


def _events(pki: PkiLayout, bundle: bytes, hubs: list[str] | None = None) -> list[str]:
    tracking = Tracking.from_bundle(bundle)
    # Without hubs, called as before they could be given.
    verified = (
        tracking.verify(_trust(pki)) if hubs is None else tracking.verify(_trust(pki), hubs=hubs)
    )
    return [v.event for v in verified]


RELAYED = (NATIONAL, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)


def test_a_bundle_relayed_by_one_hub_verifies_with_or_without_its_name(pki: PkiLayout) -> None:
    bundle = _bundle(pki, RELAYED)
    assert _events(pki, bundle) == ["SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE"]
    assert _events(pki, bundle, [NATIONAL]) == ["SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE"]


def test_another_hubs_evidence_beside_the_relaying_hubs_is_refused_when_the_hub_is_named(
    pki: PkiLayout,
) -> None:
    # Verified whatever the hubs before: the staging hub's EXPIRY beside the national hub's
    # relay. Without a name, any hub the CA certified counts (a hub renamed while a letter
    # went signs under both names, and a rule of one hub a bundle made such letters fail);
    # each evidence says its issuer.
    bundle = _bundle(pki, RELAYED, (STAGING, E.EVIDENCE_EVENT_EXPIRY))
    verified = Tracking.from_bundle(bundle).verify(_trust(pki))
    assert [v.issuer for v in verified][1:] == [NATIONAL, STAGING]
    with pytest.raises(VerificationError) as refused:
        _events(pki, bundle, [NATIONAL])
    assert refused.value.reason == "ISSUER_NOT_ALLOWED"
    assert str(refused.value).startswith(f"evidence 3: {STAGING} may not attest EVIDENCE_EVENT_")
    assert str(refused.value).endswith(f"the hub is {NATIONAL}")


def test_a_hub_the_verifier_does_not_name_is_refused(pki: PkiLayout) -> None:
    # All of the hub's evidence forged with the staging key is consistent: only the name
    # the verifier gives tells it from the hub's (the bundle itself names no hub).
    forged = _bundle(pki, (STAGING, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE))
    assert _events(pki, forged) == ["SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE"]
    with pytest.raises(VerificationError) as refused:
        _events(pki, forged, [NATIONAL])
    assert refused.value.reason == "ISSUER_NOT_ALLOWED"
    # A hub renamed while the letter went: both names given, both count.
    renamed = _bundle(pki, RELAYED, (STAGING, E.EVIDENCE_EVENT_EXPIRY))
    assert _events(pki, renamed, [NATIONAL, STAGING])[1:] == ["RELAY_ACCEPTANCE", "EXPIRY"]


def _chapar_verify(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="chapar")
    cli_client.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["verify", *argv])
    code: int = ns.func(ns)
    return code


def test_chapar_verify_takes_the_hub_by_name_or_uri(
    pki: PkiLayout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    honest, forged = tmp_path / "honest.bundle", tmp_path / "forged.bundle"
    honest.write_bytes(_bundle(pki, RELAYED))
    forged.write_bytes(_bundle(pki, (STAGING, E.EVIDENCE_EVENT_RELAY_ACCEPTANCE)))
    ca = ["--ca", str(pki.root_cert)]
    for hub in ("national", NATIONAL):
        assert _chapar_verify(str(honest), *ca, "--hub", hub) == 0
    capsys.readouterr()
    assert _chapar_verify(str(forged), *ca, "--hub", "national") == 1
    assert "VERIFICATION_FAILED ISSUER_NOT_ALLOWED" in capsys.readouterr().err
    assert _chapar_verify(str(honest), *ca, "--hub", "National Hub") == 1
    assert "INVALID_ARGUMENT BAD_VALUE" in capsys.readouterr().err
