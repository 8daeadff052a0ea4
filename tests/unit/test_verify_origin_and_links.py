# ruff: noqa: F811  # pki is test_sdk's fixture, imported to be used by name
"""Review of the offline verification of a letter's tracking (``Tracking.verify``,
``Tracking.from_bundle``, ``chapar verify``): tampered or forged bundles that must not
verify."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

from client_sdk import Correspondence, Tracking, pb
from client_sdk.shams import format_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, EVIDENCE_PAYLOAD_TYPE, sha256
from client_sdk.trust import TrustStore, VerificationError
from node.hub import Hub
from node.storage.db import Database
from node.storage.hub_store import MIGRATIONS as HUB_MIGRATIONS
from node.storage.hub_store import HubStore
from tests.unit.test_sdk import (  # noqa: F401  # pki: the module's fixture
    OTHER,
    SENDER,
    THIRD,
    Pki,
    get_response,
    pki,
    shams_of,
    signed_evidence,
    signed_letter,
)


def _signed_by_third_under(pki: Pki, number: pb.Shams) -> pb.Envelope:
    """A letter THIRD signs with its own, listed key, under a number whose origin is
    SENDER: the hub never relays it (a number's origin is its sender), but nothing stops
    THIRD from signing it."""
    body = b"a letter under someone else's number"
    header = pb.EnvelopeHeader(
        shams=number,
        sender=pb.Address(agency=THIRD),
        recipients=[pb.Address(agency=OTHER)],
        subject="Budget 2026",
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.create_time.FromDatetime(dt.datetime.now(dt.UTC))
    data = header.SerializeToString()
    return pb.Envelope(
        header=data, signature=pki.third_signer.sign(ENVELOPE_PAYLOAD_TYPE, data), body=body
    )


def _submission_by_third(pki: Pki, envelope: pb.Envelope) -> pb.Evidence:
    """THIRD's own SUBMISSION_ACCEPTANCE of it (a submission is its sender's to attest)."""
    evidence = signed_evidence(pki, envelope, pb.EvidenceEvent.EVIDENCE_EVENT_SUBMISSION_ACCEPTANCE)
    content = pb.EvidenceContent.FromString(evidence.content)
    content.issuer = f"urn:chapar:agency:{THIRD}"
    data = content.SerializeToString()
    return pb.Evidence(content=data, signature=pki.third_signer.sign(EVIDENCE_PAYLOAD_TYPE, data))


def test_a_bundle_of_a_letter_whose_sender_is_not_its_numbers_origin_does_not_verify(
    pki: Pki,
) -> None:
    # SENDER's number 000.00.00.G22/O/2026/0000021, signed by THIRD as the sender of a
    # letter of its own. Correspondence.verify refuses such a letter ("its sender is not
    # the origin of its number", TRACK_MISMATCH); Tracking.verify, Tracking.from_bundle
    # and `chapar verify` accepted it: a bundle "proving" that THIRD sent the letter that
    # number names.
    number = shams_of(21)
    assert number.origin == SENDER
    forged = _signed_by_third_under(pki, number)
    response = get_response(pki, forged)
    del response.evidence[:]
    response.evidence.append(_submission_by_third(pki, forged))
    bundle = pb.EvidenceBundle(letter=response)
    tracking = Tracking.from_bundle(bundle.SerializeToString())
    assert tracking.shams == format_shams(number)
    assert tracking.header.sender.agency == THIRD

    # The same letter in a correspondence tree is refused.
    tree = Correspondence.from_response(
        pb.TrackResponse(
            letters=[
                pb.TrackedLetter(
                    shams=number,
                    sender=THIRD,
                    recipients=[OTHER],
                    kind=pb.LetterKind.LETTER_KIND_LETTER,
                    envelope=pb.Envelope(header=forged.header, signature=forged.signature),
                )
            ],
            certificates=[
                c.public_bytes(serialization.Encoding.DER) for c in pki.signing_certificates
            ],
        )
    )
    with pytest.raises(VerificationError) as refused:
        tree.verify(TrustStore([pki.root], [pki.intermediate]))
    assert refused.value.reason == "TRACK_MISMATCH"

    # Fails today: verify returns [SUBMISSION_ACCEPTANCE] and raises nothing.
    with pytest.raises(VerificationError):
        tracking.verify(TrustStore([pki.root], [pki.intermediate]))


async def test_an_honest_tree_with_a_letter_whose_links_are_not_known_yet_verifies(
    pki: Pki, tmp_path: Path
) -> None:
    # A letter the hub accepted before the correspondence tree (hub schema 7), its envelope
    # still held: until the background linking (Hub.link_held_letters_later) reaches it,
    # the hub shows it `links_unknown` (kind, status and in_reply_to unknown: 0 / unset)
    # WITH its signed envelope. Correspondence.verify compares that account with the
    # header and refuses the hub's honest answer: TRACK_MISMATCH, and `chapar track
    # --tree` prints NOT VERIFIED, for every letter of such a hub until it is linked.
    envelope = signed_letter(pki, 31)  # a REPLY, in_reply_to set: a real header
    number = shams_of(31)
    text = format_shams(number)
    path = tmp_path / "hub.db"
    old = await Database.open(path, HUB_MIGRATIONS[:7])
    try:

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO letters (shams, sender, envelope_sha256, relay_evidence,"
                " accepted_at, purged) VALUES (?, ?, ?, x'', ?, 0)",
                (text, SENDER, sha256(envelope.header), time.time()),
            )
            conn.execute(
                "INSERT INTO recipient_state (shams, recipient, state) VALUES (?, ?, 1)",
                (text, OTHER),
            )
            conn.execute(
                "INSERT INTO envelopes (shams, envelope) VALUES (?, ?)",
                (text, envelope.SerializeToString()),
            )

        await old.write(insert)
    finally:
        await old.close()
    store = await HubStore.open(path, durability="normal")
    try:
        tree = await store.tree(text)  # before link_held_letters reached it
    finally:
        await store.close()
    assert tree is not None
    assert tree.letters[0].kind is None
    assert tree.letters[0].envelope is not None
    hub_trust = TrustStore([pki.root], [pki.intermediate])
    hub_trust.add_certificates(pki.signing_certificates)
    hub = SimpleNamespace(trust=hub_trust, directory=SimpleNamespace(message=pb.Directory()))
    answer = Hub._tracked(hub, tree)  # type: ignore[arg-type]
    assert answer.letters[0].links_unknown
    assert answer.letters[0].HasField("envelope")
    correspondence = Correspondence.from_response(answer, asked=text)
    assert correspondence.letters[0].signed
    # Fails today: TRACK_MISMATCH "the hub's account of the letter is not what its header
    # signs" (kind 0 and no in_reply_to, against the signed REPLY and its in_reply_to).
    correspondence.verify(TrustStore([pki.root], [pki.intermediate]))
