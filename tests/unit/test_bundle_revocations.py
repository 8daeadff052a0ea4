"""A bundle's revoked serials apply to that bundle, not to every bundle verified after it.

``Tracking.verify`` adds a saved bundle's revoked serials to the ``TrustStore`` it is
given, and keeps them there. A bundle is untrusted input (anyone may hand an auditor one):
one listing an honest agency's signing serial, even one that does not verify itself,
makes every later verification with the same store refuse that agency's honest letters
and evidence as CERTIFICATE_REVOKED.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from certs.pki import init_pki, load_certs
from client_sdk import Tracking, pb
from client_sdk.signing import Signer, sha256
from client_sdk.trust import TrustStore, VerificationError, set_timestamp

SENDER = "000.00.00.G22"
RECIPIENT = "10861234567"


def test_a_bundles_revocations_do_not_stay_in_the_verifiers_trust_store(tmp_path: Path) -> None:
    layout = init_pki(tmp_path / "pki", hub="national", agencies=[SENDER, RECIPIENT])
    folder = layout.agency_dir(SENDER)
    signer = Signer.from_files(folder / "signing.key", folder / "signing.crt")
    body = b"an honest letter"
    header = pb.EnvelopeHeader(
        shams=pb.Shams(origin=SENDER, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=1),
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.sender.agency = SENDER
    header.recipients.add(agency=RECIPIENT)
    set_timestamp(header.create_time, dt.datetime.now(dt.UTC))
    envelope = pb.Envelope(header=header.SerializeToString(), body=body)
    signer.seal_envelopes([envelope])
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    honest = pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(envelope=envelope, certificates=[der])
    ).SerializeToString()

    trust = TrustStore(load_certs(layout.root_cert), load_certs(layout.intermediate_cert))
    Tracking.from_bundle(honest).verify(trust)  # verifies

    # A bundle whose letter is not even signed, listing the agency's signing serial.
    unsigned = pb.EnvelopeHeader(
        shams=pb.Shams(origin=RECIPIENT, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=9)
    )
    hostile = pb.EvidenceBundle(
        letter=pb.GetEnvelopeResponse(envelope=pb.Envelope(header=unsigned.SerializeToString())),
        revoked_serials=[f"{signer.certificate.serial_number:x}"],
    ).SerializeToString()
    with pytest.raises(VerificationError) as refused:
        Tracking.from_bundle(hostile).verify(trust)
    assert refused.value.reason == "SIGNER_UNKNOWN"

    # The honest bundle, verified again with the same store, must still verify.
    Tracking.from_bundle(honest).verify(trust)
