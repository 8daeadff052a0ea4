"""A revocation may say from when: what the key signed before stands.

A certificate retired in the ordinary way (staff change, key rotation, a node
decommissioned) is revoked from a time T on (RFC 5280's revocation date): evidence and
letters signed before T still verify, as of their own time; what is signed at or after T
does not, and every live check (asked at now) refuses it from T on. A revocation with no
time is for all time, as before.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from certs.pki import init_pki, load_certs
from client_sdk import pb
from client_sdk.signing import Signer
from client_sdk.trust import TrustStore, VerificationError, set_timestamp

AGENCY = "000.00.00.G22"
NOW = dt.datetime.now(dt.UTC)
SIGNED_AT = NOW - dt.timedelta(minutes=2)  # inside the test PKI's validity (5 minutes back)


def _setup(tmp_path: Path) -> tuple[TrustStore, Signer, x509.Certificate, pb.Evidence]:
    layout = init_pki(tmp_path / "pki", hub="national", agencies=[AGENCY])
    folder = layout.agency_dir(AGENCY)
    signer = Signer.from_files(folder / "signing.key", folder / "signing.crt")
    intermediate = load_certs(layout.intermediate_cert)[0]
    trust = TrustStore(load_certs(layout.root_cert), [intermediate])
    trust.add_certificates([signer.certificate])
    content = pb.EvidenceContent(
        evidence_id="e1",
        event=pb.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE,
        issuer=f"urn:chapar:agency:{AGENCY}",
    )
    set_timestamp(content.event_time, SIGNED_AT)
    [evidence] = signer.sign_evidence([content.SerializeToString()])
    return trust, signer, intermediate, evidence


def _reason(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except VerificationError as exc:
        return exc.reason
    return "OK"


@pytest.mark.parametrize("whose", ["signer", "intermediate CA"])
def test_evidence_signed_before_the_revocations_time_verifies_after_it_not_before(
    tmp_path: Path, whose: str
) -> None:
    trust, signer, intermediate, evidence = _setup(tmp_path)
    serial = (signer.certificate if whose == "signer" else intermediate).serial_number
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"  # and its chain cached
    trust.set_revoked([serial], since={serial: SIGNED_AT + dt.timedelta(minutes=1)})
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"
    trust.set_revoked([serial], since={serial: SIGNED_AT})  # at its very time: revoked
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([serial], since={serial: SIGNED_AT - dt.timedelta(minutes=1)})
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([serial])  # no time: for all time, as before
    assert _reason(lambda: trust.verify_evidence(evidence)) == "CERTIFICATE_REVOKED"
    trust.set_revoked([])
    assert _reason(lambda: trust.verify_evidence(evidence)) == "OK"


@pytest.mark.parametrize("whose", ["signer", "intermediate CA"])
def test_a_live_check_at_now_passes_before_the_revocations_time_and_refuses_after(
    tmp_path: Path, whose: str
) -> None:
    trust, signer, intermediate, _ = _setup(tmp_path)
    cert = signer.certificate
    serial = (cert if whose == "signer" else intermediate).serial_number
    live = lambda: trust.verify_certificate(cert, "signing")  # noqa: E731
    assert _reason(live) == "OK"
    trust.set_revoked([serial], since={serial: NOW + dt.timedelta(hours=1)})  # scheduled
    assert _reason(live) == "OK"
    assert not trust.chain_revoked(cert)
    trust.set_revoked([serial], since={serial: NOW - dt.timedelta(seconds=1)})
    assert _reason(live) == "CERTIFICATE_REVOKED"
    assert trust.chain_revoked(cert)
    snapshot = trust.snapshot()  # what /metrics' threads read keeps the time
    assert snapshot.chain_revoked(cert)
    trust.set_revoked([serial], since={serial: NOW + dt.timedelta(hours=1)})
    assert not trust.snapshot().chain_revoked(cert)
    assert trust.chain_revoked(cert, at=NOW + dt.timedelta(hours=2))


def test_revocations_added_to_those_held_keep_the_earlier_of_two() -> None:
    trust = TrustStore([])
    early, late = NOW - dt.timedelta(days=2), NOW - dt.timedelta(days=1)
    trust.set_revoked([1, 2], since={2: late, 3: late, 4: early})
    trust.add_revoked([3, 5], since={1: early, 2: early, 4: late, 6: late})
    assert trust.revoked_serials == {1, 2, 3, 4, 5, 6}
    assert trust.revoked_since == {2: early, 4: early, 6: late}  # 1, 3, 5: for all time
