"""A node whose own signing certificate is expired or not yet valid: the hub refuses every
letter it signs (RELAY_REJECTION CERTIFICATE_EXPIRED: Hub._check_letter verifies the
signer's certificate as of now), so the node refuses them at submission, before it numbers
or stores them, instead of answering SUBMISSION_ACCEPTANCE and a number for a letter that
can never leave."""

from __future__ import annotations

import datetime as dt

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.signing import Signer
from node.agency import Access, Agency
from node.core.errors import ChaparError, Code
from tests.unit.conftest import RECIPIENT, SENDER


def _request(request_id: str) -> pb.SubmitEnvelopeRequest:
    return pb.SubmitEnvelopeRequest(
        request_id=request_id,
        draft=pb.LetterDraft(recipients=[pb.Address(agency=RECIPIENT)], subject="s", body=b"b"),
    )


def _signer(not_before: dt.datetime, not_after: dt.datetime) -> Signer:
    key = generate_key("ed25519")
    certificate = issue_certificate(
        issuer_cert=None,
        issuer_key=key,
        subject_key=key,
        identity_uri=Identity.for_agency(SENDER).uri,
        kind="signing",
        not_before=not_before,
        not_after=not_after,
    )
    return Signer(key, certificate)


@pytest.mark.parametrize("case", ["expired", "not-yet-valid"])
async def test_a_node_whose_signing_certificate_is_not_valid_refuses_letters_unnumbered(
    agency: Agency, case: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    access = Access(Identity.for_agency(SENDER), None)
    (first,) = await agency._submit([_request("before")], access)
    assert isinstance(first, pb.Receipt)
    valid = agency.signer
    if case == "expired":
        agency.signer = _signer(now - dt.timedelta(days=30), now - dt.timedelta(minutes=1))
        when = "expired at"
    else:
        agency.signer = _signer(now + dt.timedelta(hours=1), now + dt.timedelta(days=30))
        when = "is not valid before"
    (refused,) = await agency._submit([_request("during")], access)
    assert isinstance(refused, ChaparError), refused
    assert (refused.code, refused.reason) == (Code.FAILED_PRECONDITION, "CERTIFICATE_EXPIRED")
    assert f"this node's signing certificate {when}" in refused.message
    assert refused.metadata["certificate"] == "signing"
    # A retry of a letter accepted before still gets its receipt; nothing new is stored.
    (again,) = await agency._submit([_request("before")], access)
    assert isinstance(again, pb.Receipt)
    assert again.shams_text == first.shams_text
    assert await agency.store.count("outbox") == 1
    # Renewed (a restart with the new certificate): taken again, with the next number.
    agency.signer = valid
    (after,) = await agency._submit([_request("during")], access)
    assert isinstance(after, pb.Receipt), after
    assert after.shams.sequence == first.shams.sequence + 1
