"""What the hub judges in a letter's signed header before it relays it, driven through
``Hub._relay`` with a real hub (its checks, signer, trust store and a real HubStore) and a
sender's letters signed by a real agency key under a CA the hub trusts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from certs.pki import generate_key, issue_certificate
from client_sdk import pb
from client_sdk.identity import Identity
from client_sdk.signing import Signer, sha256
from client_sdk.trust import TrustStore, der
from node.config import HubConfig, SigningConfig, TlsConfig
from node.hub import Hub
from node.storage.hub_store import HubStore

A, B = "000.00.00.G22", "10861234567"
E = pb.EvidenceEvent
STATUS_UPDATE = pb.LetterKind.LETTER_KIND_STATUS_UPDATE
ACCEPTED = pb.BusinessStatus.BUSINESS_STATUS_ACCEPTED


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[tuple[Hub, Signer]]:
    """A hub whose directory holds agencies A and B, and A's signer."""
    ca_key = generate_key("ed25519")
    ca = issue_certificate(issuer_cert=None, issuer_key=ca_key, subject_key=ca_key,
                           identity_uri=None, kind="root")  # fmt: skip

    def signer(uri: str) -> Signer:
        key = generate_key("ed25519")
        cert = issue_certificate(issuer_cert=ca, issuer_key=ca_key, subject_key=key,
                                 identity_uri=uri, kind="signing")  # fmt: skip
        return Signer(key, cert)

    hub_signer, a_signer = signer("urn:chapar:hub:test"), signer(Identity.for_agency(A).uri)
    directory = pb.Directory(
        version=1,
        hub="urn:chapar:hub:test",
        hub_signing_certificates=[der(hub_signer.certificate)],
        agencies=[
            pb.Agency(code=A, display_name=A, state=pb.AGENCY_STATE_ACTIVE,
                      signing_certificates=[der(a_signer.certificate)]),
            pb.Agency(code=B, display_name=B, state=pb.AGENCY_STATE_ACTIVE),
        ],
    )  # fmt: skip
    unused = tmp_path / "unused"
    config = HubConfig(
        name="test",
        listen="127.0.0.1:0",
        database=tmp_path / "hub.db",
        tls=TlsConfig(unused, unused, unused),
        signing=SigningConfig(unused, unused),
        agencies=[],
    )
    store = await HubStore.open(config.database, durability="normal")
    try:
        yield Hub(config, store, hub_signer, TrustStore([ca]), directory), a_signer
    finally:
        await store.close()


def _signed(signer: Signer, header: pb.EnvelopeHeader) -> pb.Envelope:
    header.sender.agency = A
    header.recipients.add(agency=B)
    header.subject = f"letter {header.shams.sequence}"
    header.body_sha256 = sha256(b"")
    header.create_time.FromSeconds(int(time.time()))
    envelope = pb.Envelope(header=header.SerializeToString())
    signer.seal_envelopes([envelope])
    return envelope


def _number(sequence: int) -> pb.Shams:
    return pb.Shams(origin=A, domain=pb.SHAMS_DOMAIN_OUTGOING, year=2026, sequence=sequence)


@pytest.mark.parametrize("kind", [STATUS_UPDATE, pb.LetterKind.LETTER_KIND_REPLY])
async def test_a_status_update_that_names_no_letter_is_rejected_with_its_reason(
    hub: tuple[Hub, Signer], kind: pb.LetterKind.ValueType
) -> None:
    # A status update says what its sender did with a letter: without in_reply_to it is
    # about nothing, and was relayed and delivered with its status all the same (the
    # recipient's node judges only an update that names a letter). Honest nodes never
    # build one (MISSING_IN_REPLY_TO at submission): only an old or hostile node sends it.
    relay, signer = hub
    letter = _signed(signer, pb.EnvelopeHeader(shams=_number(1)))
    # A reply naming no letter likewise (relayed before: threaded to nothing).
    status = ACCEPTED if kind == STATUS_UPDATE else None
    update = pb.EnvelopeHeader(shams=_number(2), kind=kind, status=status)
    about = pb.EnvelopeHeader(shams=_number(3), kind=kind, status=status)
    about.in_reply_to.CopyFrom(_number(1))
    frame = [letter, _signed(signer, update), _signed(signer, about)]
    answers = [pb.EvidenceContent.FromString(e.content) for e in await relay._relay(A, frame)]
    assert [(c.event, c.reason, c.shams.sequence) for c in answers] == [
        (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "", 1),
        (E.EVIDENCE_EVENT_RELAY_REJECTION, "MISSING_IN_REPLY_TO", 2),
        (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, "", 3),
    ]
    assert answers[1].detail  # says why
    assert await relay.store.queue_depth(B) == 2  # the letter and the update naming it
    assert await relay.store.parties(f"{A}/O/2026/0000002") is None  # nothing stored


@pytest.mark.parametrize(
    ("uri", "digest", "size", "reason"),
    [
        (f"chapar://{B}/documents/sha256/{'ab' * 32}", bytes.fromhex("ab" * 32), 5, "DOCUMENT_NOT_OWNED"),
        (f"chapar://{A}/documents/sha256/{'ab' * 32}", bytes.fromhex("cd" * 32), 5, "DOCUMENT_DIGEST_MISMATCH"),
        (f"chapar://{A}/documents/{'ab' * 32}", bytes.fromhex("ab" * 32), 5, "INVALID_DOCUMENT_URI"),
        (f"chapar://{A}/documents/sha256/{'ab' * 32}", bytes.fromhex("ab" * 32), -1, "INVALID_SIZE"),
    ],
)  # fmt: skip
async def test_a_letter_whose_attachment_no_recipient_could_fetch_is_rejected(
    hub: tuple[Hub, Signer], uri: str, digest: bytes, size: int, reason: str
) -> None:
    # A reference to another agency's document (or whose address and digest differ) grants
    # its recipients nothing: their downloads are refused for good, and the letter, relayed
    # and delivered, carried an attachment nobody could ever read. Honest nodes refuse to
    # number it (validate_attachments); a hostile node's was relayed.
    relay, signer = hub
    header = pb.EnvelopeHeader(shams=_number(1))
    header.attachments.add(uri=uri, sha256=digest, size=size, media_type="application/pdf")
    own = pb.EnvelopeHeader(shams=_number(2))
    own.attachments.add(
        uri=f"chapar://{A}/documents/sha256/{'ab' * 32}",
        sha256=bytes.fromhex("ab" * 32),
        size=0,
        media_type="application/pdf",
    )
    frame = [_signed(signer, header), _signed(signer, own)]
    answers = [pb.EvidenceContent.FromString(e.content) for e in await relay._relay(A, frame)]
    assert [(c.event, c.reason) for c in answers] == [
        (E.EVIDENCE_EVENT_RELAY_REJECTION, reason),
        (E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, ""),
    ]
    assert answers[0].detail
    assert await relay.store.parties(f"{A}/O/2026/0000001") is None  # nothing stored
