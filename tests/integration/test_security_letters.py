"""Security of letters and evidence against real hub and node processes (mutual TLS).

One cluster for the whole module: agencies A and B with nodes, C without (the tests speak
raw gRPC to the hub as C's node). The hub re-reads its configuration and revocation file
every 0.2 s, so revocations and suspensions take effect without restarting anything;
every test that changes either restores it in a ``finally`` and waits for the change to
reach the nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from certs.pki import generate_key, issue_certificate, load_certs, load_key
from client_sdk import (
    Credentials,
    Draft,
    ExchangeClient,
    FailedPrecondition,
    Letter,
    NotFound,
    PermissionDenied,
    Tracking,
    Unauthenticated,
    pb,
)
from client_sdk.errors import from_rpc_error
from client_sdk.shams import format_shams, parse_shams
from client_sdk.signing import ENVELOPE_PAYLOAD_TYPE, EVIDENCE_PAYLOAD_TYPE, Signer, sha256
from client_sdk.trust import TrustStore, VerificationError
from node.cluster import Cluster, ServerProcess
from node.core.evidence import evidence_content
from node.status import fetch, render
from tests.conftest import HUB_PEER_OPTIONS, client_credentials
from tests.conftest import node_tls as _tls

pytestmark = pytest.mark.integration

A = "000.00.00.G22"
B = "10861234567"
C = "MOFA.IR"  # in the directory, no node: the tests act as its node
E = pb.EvidenceEvent
HUB_NAME = "national"
HUB_SETTINGS = "\n".join(
    [
        'revocation_file = "revoked.txt"',
        "reload_interval_s = 0.2",
        "clock_skew_s = 60",
        "max_letter_age_s = 86400",
    ]
)
NODE_SETTINGS = "\n".join(
    [
        "reconnect_max_s = 1.0",
        "[[clients]]",
        'name = "registry"',
        'mailboxes = ["registry"]',
    ]
)
RELOAD_S = 0.2  # the hub's reload_interval_s above
PROPAGATION_S = 10.0  # hub reload (0.2 s) + directory_update + the node's refetch, generously
DELIVERED = {"DELIVERED", "HANDED_OVER"}
YEAR = dt.datetime.now(dt.UTC).year
_sequences = itertools.count(101)
T = TypeVar("T")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("security")
    started = asyncio.run(
        Cluster.start(
            root,
            [A, B, C],
            without_node=[C],
            hub_settings=HUB_SETTINGS,
            node_settings=NODE_SETTINGS,
        )
    )
    try:
        yield started
    finally:
        codes = started.stop()
        assert all(code == 0 for code in codes.values()), codes


# -- helpers -----------------------------------------------------------------------------


def _hub_db(cluster: Cluster) -> Path:
    return cluster.root / "hub" / "hub.db"


def _node_db(cluster: Cluster, code: str) -> Path:
    return cluster.root / f"node-{code}" / "node.db"


def _count(db: Path, sql: str, params: tuple[object, ...] = ()) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


def _revocation_file(cluster: Cluster) -> Path:
    return cluster.root / "hub" / "revoked.txt"


def _write_replacing(path: Path, text: str) -> None:
    """Writes through a temporary file and a rename, so the hub never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _serial(path: Path) -> str:
    """The hexadecimal serial of the first certificate in a PEM file, as the file lists it."""
    return format(load_certs(path)[0].serial_number, "x")


async def _eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = PROPAGATION_S
) -> T:
    """Calls ``probe`` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result is not None and result is not False:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.1)


async def _list_agencies(
    cluster: Cluster, code: str, credentials: Credentials | None = None
) -> pb.ListAgenciesResponse:
    """Raw ListAgencies on ``code``'s node (A's back-end credentials unless told)."""
    creds = credentials or cluster.credentials(code)
    async with grpc.aio.secure_channel(
        cluster.nodes[code].address, creds.channel_credentials()
    ) as channel:
        response: pb.ListAgenciesResponse = await pb.NodeServiceStub(channel).ListAgencies(
            pb.ListAgenciesRequest(), timeout=10
        )
        return response


def _auditor(cluster: Cluster) -> Credentials:
    d = cluster.pki.auditor_dir("auditor")
    return Credentials.from_files(
        ca=cluster.pki.root_cert, cert=d / "client.crt", key=d / "client.key"
    )


async def _versions(cluster: Cluster) -> dict[str, int]:
    """Each node's directory version, read with the auditor's (never revoked) credentials."""
    auditor = _auditor(cluster)
    return {
        code: (await _list_agencies(cluster, code, auditor)).directory_version
        for code in cluster.nodes
    }


async def _wait_for_new_directory(cluster: Cluster, before: dict[str, int]) -> dict[str, int]:
    """Waits until every node holds a directory version newer than ``before``."""

    async def newer() -> dict[str, int] | None:
        now = await _versions(cluster)
        return now if all(now[c] > before[c] for c in before) else None

    return await _eventually(newer, f"a directory version newer than {before}")


@contextlib.asynccontextmanager
async def _revoked(cluster: Cluster, *cert_files: Path, since: str = "") -> AsyncIterator[None]:
    """Lists the certificates' serials in the revocation file until the block ends (from
    ``since`` on, an RFC 3339 time, when given).

    Waits for the new directory to reach every node on the way in and on the way out.
    """
    path = _revocation_file(cluster)
    before = await _versions(cluster)
    lines = (f"{_serial(f)} {since}  # revoked by a test\n" for f in cert_files)
    _write_replacing(path, "".join(lines))
    try:
        await _wait_for_new_directory(cluster, before)
        yield
    finally:
        before = await _versions(cluster)
        _write_replacing(path, "")
        await _wait_for_new_directory(cluster, before)


def _client(cluster: Cluster, code: str) -> ExchangeClient:
    return ExchangeClient(cluster.nodes[code].address, cluster.credentials(code))


async def _status(client: ExchangeClient, shams: str, agency: str) -> str:
    return (await client.track(shams)).statuses.get(agency, "")


async def _wait_delivered(client: ExchangeClient, shams: str, agency: str) -> None:
    async def delivered() -> bool:
        return await _status(client, shams, agency) in DELIVERED

    await _eventually(delivered, f"{shams} delivered to {agency}", timeout=20)


def _contents(evidence: list[pb.Evidence]) -> list[pb.EvidenceContent]:
    return [pb.EvidenceContent.FromString(e.content) for e in evidence]


# -- raw hub access as C's node (copied from test_walking_skeleton) ----------------------


def _signer(cluster: Cluster, code: str) -> Signer:
    d = cluster.pki.agency_dir(code)
    return Signer.from_files(d / "signing.key", d / "signing.crt")


def _shams(sequence: int, origin: str = C) -> pb.Shams:
    return pb.Shams(
        origin=origin, domain=pb.ShamsDomain.SHAMS_DOMAIN_OUTGOING, year=YEAR, sequence=sequence
    )


def _header(
    *,
    sequence: int,
    subject: str = "raw",
    body: bytes = b"raw letter",
    created: dt.datetime | None = None,
    to: str = B,
) -> bytes:
    """A header from C, built field by field so create_time can be anything."""
    header = pb.EnvelopeHeader(
        shams=_shams(sequence),
        sender=pb.Address(agency=C),
        recipients=[pb.Address(agency=to)],
        subject=subject,
        kind=pb.LetterKind.LETTER_KIND_LETTER,
        priority=pb.Priority.PRIORITY_NORMAL,
        content_type="text/plain; charset=utf-8",
        body_sha256=sha256(body),
        body_size=len(body),
    )
    header.create_time.FromDatetime(created or dt.datetime.now(dt.UTC))
    return header.SerializeToString(deterministic=True)


def _letter(
    cluster: Cluster,
    *,
    sequence: int,
    subject: str = "raw",
    body: bytes = b"raw letter",
    created: dt.datetime | None = None,
    signer: Signer | None = None,
    to: str = B,
) -> pb.Envelope:
    header = _header(sequence=sequence, subject=subject, body=body, created=created, to=to)
    signer = signer or _signer(cluster, C)
    return pb.Envelope(
        header=header, signature=signer.sign(ENVELOPE_PAYLOAD_TYPE, header), body=body
    )


async def _hub_answer(
    cluster: Cluster, request: pb.ConnectRequest, frame: str
) -> pb.ConnectResponse:
    """Connects to the hub as C's node, sends one frame, returns the first ``frame`` answer."""
    async with grpc.aio.secure_channel(
        cluster.hub.address, _tls(cluster, C), options=HUB_PEER_OPTIONS
    ) as channel:
        call = pb.HubServiceStub(channel).Connect()
        await call.write(pb.ConnectRequest(hello=pb.ConnectHello(software_version="test")))
        welcome = await call.read()
        assert welcome.WhichOneof("frame") == "welcome"
        await call.write(request)
        while True:
            answer = await asyncio.wait_for(call.read(), 10)
            if answer is grpc.aio.EOF:
                raise AssertionError("stream ended without an answer")
            if answer.WhichOneof("frame") == frame:
                call.cancel()
                response: pb.ConnectResponse = answer
                return response


def _hub_trust(cluster: Cluster) -> TrustStore:
    trust = TrustStore.from_pem_files(cluster.pki.root_cert, cluster.pki.intermediate_cert)
    trust.add_certificates(load_certs(cluster.pki.hub_dir(HUB_NAME) / "signing.crt"))
    return trust


async def _relay_one(cluster: Cluster, envelope: pb.Envelope) -> pb.EvidenceContent:
    """Relays one letter as C; returns the hub's single answer, its signature verified."""
    answer = await _hub_answer(
        cluster,
        pb.ConnectRequest(envelopes=pb.EnvelopeBatch(envelopes=[envelope])),
        "relay_results",
    )
    (evidence,) = answer.relay_results.evidence
    content = _hub_trust(cluster).verify_evidence(evidence)
    assert content.issuer == f"urn:chapar:hub:{HUB_NAME}"
    assert content.envelope_sha256 == sha256(envelope.header)
    return content


def _letters_with(cluster: Cluster, sequence: int) -> int:
    return _count(
        _hub_db(cluster),
        "SELECT count(*) FROM letters WHERE shams = ?",
        (format_shams(_shams(sequence)),),
    )


# -- 1. the hub's relay checks ---------------------------------------------------------


def _one_hour_ahead(cluster: Cluster, seq: int) -> pb.Envelope:
    return _letter(cluster, sequence=seq, created=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))


def _two_days_old(cluster: Cluster, seq: int) -> pb.Envelope:
    return _letter(cluster, sequence=seq, created=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))


def _ed25519_labelled_ecdsa(cluster: Cluster, seq: int) -> pb.Envelope:
    envelope = _letter(cluster, sequence=seq)
    assert envelope.signature.algorithm == pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ED25519
    envelope.signature.algorithm = pb.SignatureAlgorithm.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
    return envelope


def _signed_by_unlisted_key(cluster: Cluster, seq: int) -> pb.Envelope:
    """A fresh key with a certificate validly issued for C, but not in the directory."""
    key = generate_key("ed25519")
    cert = issue_certificate(
        issuer_cert=load_certs(cluster.pki.intermediate_cert)[0],
        issuer_key=load_key(cluster.pki.intermediate_key),
        subject_key=key,
        identity_uri=f"urn:chapar:agency:{C}",
        kind="signing",
    )
    return _letter(cluster, sequence=seq, signer=Signer(key, cert))


def _body_changed_after_signing(cluster: Cluster, seq: int) -> pb.Envelope:
    envelope = _letter(cluster, sequence=seq, body=b"the signed body")
    envelope.body = b"another body"
    return envelope


def _batch_sealed(cluster: Cluster, seq: int) -> list[pb.Envelope]:
    """Letter ``seq`` and the next number, signed as one Merkle batch (as nodes sign)."""
    pair = [_letter(cluster, sequence=seq + i, subject=f"batch {i}") for i in range(2)]
    for envelope in pair:
        envelope.ClearField("signature")
    _signer(cluster, C).seal_envelopes(pair)
    assert all(e.HasField("batch_proof") for e in pair)
    return pair


def _batch_member_changed_after_signing(cluster: Cluster, seq: int) -> pb.Envelope:
    envelope = _batch_sealed(cluster, seq)[0]
    header = pb.EnvelopeHeader.FromString(envelope.header)
    header.subject = "changed after signing"
    envelope.header = header.SerializeToString(deterministic=True)
    return envelope


def _batch_member_with_another_leaf_index(cluster: Cluster, seq: int) -> pb.Envelope:
    envelope = _batch_sealed(cluster, seq)[0]
    envelope.batch_proof.leaf_index = 1
    return envelope


def _status_update_naming_no_letter_number(cluster: Cluster, seq: int) -> pb.Envelope:
    """A status update whose in_reply_to is no SHAMS number: its recipient's node could
    not link it, and used to fail on it (a frame rolled back, pushed again for ever)."""
    header = pb.EnvelopeHeader.FromString(_header(sequence=seq))
    header.kind = pb.LetterKind.LETTER_KIND_STATUS_UPDATE
    header.status = pb.BusinessStatus.BUSINESS_STATUS_ACCEPTED
    header.in_reply_to.CopyFrom(pb.Shams(origin="X"))
    data = header.SerializeToString(deterministic=True)
    signature = _signer(cluster, C).sign(ENVELOPE_PAYLOAD_TYPE, data)
    return pb.Envelope(header=data, signature=signature, body=b"raw letter")


def _status_update_naming_no_letter(cluster: Cluster, seq: int) -> pb.Envelope:
    """A status update with no in_reply_to: a status about nothing, which its recipient's
    node could judge against nothing (and delivered, with its status)."""
    header = pb.EnvelopeHeader.FromString(_header(sequence=seq))
    header.kind = pb.LetterKind.LETTER_KIND_STATUS_UPDATE
    header.status = pb.BusinessStatus.BUSINESS_STATUS_COMPLETED
    data = header.SerializeToString(deterministic=True)
    signature = _signer(cluster, C).sign(ENVELOPE_PAYLOAD_TYPE, data)
    return pb.Envelope(header=data, signature=signature, body=b"raw letter")


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (_batch_member_changed_after_signing, "SIGNATURE_INVALID"),
        (_batch_member_with_another_leaf_index, "SIGNATURE_INVALID"),
        (_one_hour_ahead, "CREATE_TIME_OUT_OF_WINDOW"),
        (_two_days_old, "CREATE_TIME_OUT_OF_WINDOW"),
        (_ed25519_labelled_ecdsa, "SIGNATURE_ALGORITHM_MISMATCH"),
        (_signed_by_unlisted_key, "SIGNER_UNKNOWN"),
        (_body_changed_after_signing, "BODY_DIGEST_MISMATCH"),
        (_status_update_naming_no_letter_number, "INVALID_SHAMS"),
        (_status_update_naming_no_letter, "MISSING_IN_REPLY_TO"),
    ],
    ids=[
        "batch-header",
        "batch-leaf-index",
        "create-time-1h-ahead",
        "create-time-2d-old",
        "algorithm-label",
        "unlisted-key",
        "body",
        "in-reply-to",
        "status-update-about-nothing",
    ],
)
async def test_hub_rejects_faulty_letter_with_signed_reason_and_stores_nothing(
    cluster: Cluster, forge: Callable[[Cluster, int], pb.Envelope], reason: str
) -> None:
    letters = _count(_hub_db(cluster), "SELECT count(*) FROM letters")
    seq = next(_sequences)
    content = await _relay_one(cluster, forge(cluster, seq))
    assert content.event == E.EVIDENCE_EVENT_RELAY_REJECTION
    assert content.reason == reason
    assert content.recipient == ""
    assert format_shams(content.shams) == format_shams(_shams(seq))
    assert _count(_hub_db(cluster), "SELECT count(*) FROM letters") == letters
    assert _letters_with(cluster, seq) == 0


async def test_hub_relays_letters_signed_as_one_batch_each_on_its_own(cluster: Cluster) -> None:
    seq = next(_sequences)
    next(_sequences)  # the batch uses two numbers
    for envelope in _batch_sealed(cluster, seq):
        content = await _relay_one(cluster, envelope)
        assert content.event == E.EVIDENCE_EVENT_RELAY_ACCEPTANCE, content.reason
        assert _letters_with(cluster, pb.EnvelopeHeader.FromString(envelope.header).shams.sequence)


async def test_reused_number_is_rejected_and_the_original_letter_keeps_its_evidence(
    cluster: Cluster,
) -> None:
    hub_db = _hub_db(cluster)
    seq = next(_sequences)
    x = _letter(cluster, sequence=seq, subject="X: the first letter under this number")
    y = _letter(cluster, sequence=seq, subject="Y: another letter under the same number")

    letters = _count(hub_db, "SELECT count(*) FROM letters")
    first = await _relay_one(cluster, x)
    assert first.event == E.EVIDENCE_EVENT_RELAY_ACCEPTANCE
    assert first.recipient == B
    assert _count(hub_db, "SELECT count(*) FROM letters") == letters + 1

    reused = await _relay_one(cluster, y)
    assert reused.event == E.EVIDENCE_EVENT_RELAY_REJECTION
    assert reused.reason == "SHAMS_REUSED"
    assert reused.envelope_sha256 == sha256(y.header)
    assert _count(hub_db, "SELECT count(*) FROM letters") == letters + 1
    # The stored letter under the number is still X.
    assert (
        _count(
            hub_db,
            "SELECT count(*) FROM letters WHERE shams = ? AND envelope_sha256 = ?",
            (format_shams(_shams(seq)), sha256(x.header)),
        )
        == 1
    )

    again = await _relay_one(cluster, x)
    assert again.event == E.EVIDENCE_EVENT_RELAY_ACCEPTANCE
    assert again.evidence_id == first.evidence_id
    assert _count(hub_db, "SELECT count(*) FROM letters") == letters + 1


# -- 2. evidence signed by someone other than its issuer -----------------------------------


def _forged_delivery(cluster: Cluster, letter: pb.Envelope) -> pb.Evidence:
    """DELIVERY evidence claiming to come from B, signed with C's signing key."""
    # C would gain by it: the hub would take C's letter as delivered on B's word.
    header = pb.EnvelopeHeader.FromString(letter.header)
    content = evidence_content(
        E.EVIDENCE_EVENT_DELIVERY,
        issuer=f"urn:chapar:agency:{B}",
        shams=header.shams,
        envelope_sha256=sha256(letter.header),
        recipient=header.recipients[0].agency,
        now=dt.datetime.now(dt.UTC),
    )
    return pb.Evidence(
        content=content, signature=_signer(cluster, C).sign(EVIDENCE_PAYLOAD_TYPE, content)
    )


async def test_evidence_signed_by_other_than_its_issuer_is_neither_stored_nor_acknowledged(
    cluster: Cluster,
) -> None:
    hub_db = _hub_db(cluster)
    # Addressed to C (no node): nothing else adds evidence about it while the test runs.
    letter = _letter(cluster, sequence=next(_sequences), subject="falsely receipted", to=C)
    shams = format_shams(pb.EnvelopeHeader.FromString(letter.header).shams)
    assert (await _relay_one(cluster, letter)).event == E.EVIDENCE_EVENT_RELAY_ACCEPTANCE
    forged = _forged_delivery(cluster, letter)
    forged_id = pb.EvidenceContent.FromString(forged.content).evidence_id
    # Control: evidence C really issued (about a letter not addressed to C) verifies, so it
    # is acknowledged (and still not stored): the frame was read and answered.
    honest_content = evidence_content(
        E.EVIDENCE_EVENT_DELIVERY_FAILURE,
        issuer=f"urn:chapar:agency:{C}",
        shams=_shams(next(_sequences)),
        envelope_sha256=sha256(b"no such letter"),
        recipient=C,
        now=dt.datetime.now(dt.UTC),
        reason="TEST",
    )
    honest = pb.Evidence(
        content=honest_content,
        signature=_signer(cluster, C).sign(EVIDENCE_PAYLOAD_TYPE, honest_content),
    )
    honest_id = pb.EvidenceContent.FromString(honest_content).evidence_id

    evidence_rows = _count(hub_db, "SELECT count(*) FROM evidence WHERE shams = ?", (shams,))
    assert evidence_rows == 1  # its RELAY_ACCEPTANCE
    answer = await _hub_answer(
        cluster,
        pb.ConnectRequest(receipts=pb.EvidenceBatch(evidence=[forged, honest])),
        "receipt_acks",
    )
    acked = list(answer.receipt_acks.evidence_ids)
    assert forged_id not in acked
    assert acked == [honest_id]
    assert (
        _count(hub_db, "SELECT count(*) FROM evidence WHERE shams = ?", (shams,)) == evidence_rows
    )
    assert _count(hub_db, "SELECT count(*) FROM evidence WHERE evidence_id = ?", (forged_id,)) == 0
    # Still queued for C: the forged DELIVERY did not take it off the queue.
    assert (
        _count(hub_db, "SELECT count(*) FROM queue WHERE recipient = ? AND shams = ?", (C, shams))
        == 1
    )


def test_trust_store_refuses_evidence_signed_by_other_than_its_issuer(cluster: Cluster) -> None:
    trust = TrustStore.from_pem_files(cluster.pki.root_cert, cluster.pki.intermediate_cert)
    trust.add_certificates(load_certs(cluster.pki.agency_dir(C) / "signing.crt"))
    forged = _forged_delivery(cluster, _letter(cluster, sequence=next(_sequences)))
    with pytest.raises(VerificationError) as err:
        trust.verify_evidence(forged)
    assert err.value.reason == "ISSUER_MISMATCH"


# -- 3. revocation without a restart ---------------------------------------------------


async def test_revoked_signing_certificate_gets_letters_rejected_at_the_hub_until_unrevoked(
    cluster: Cluster,
) -> None:
    signing = cluster.pki.agency_dir(B) / "signing.crt"
    before = (await _list_agencies(cluster, A)).directory_version
    async with _client(cluster, B) as b:
        async with _revoked(cluster, signing):
            after = (await _list_agencies(cluster, A)).directory_version
            assert after > before
            receipt = await b.send(to=[A], subject="signed with a revoked key", body="x")

            async def rejection() -> pb.EvidenceContent | None:
                tracking = await b.track(receipt.shams)
                found = [
                    c
                    for c in _contents(tracking.evidence)
                    if c.event == E.EVIDENCE_EVENT_RELAY_REJECTION
                ]
                return found[0] if found else None

            rejected = await _eventually(rejection, "the hub's RELAY_REJECTION at node B")
            assert rejected.reason == "CERTIFICATE_REVOKED"
            assert rejected.issuer == f"urn:chapar:hub:{HUB_NAME}"
            assert (
                _count(
                    _hub_db(cluster),
                    "SELECT count(*) FROM letters WHERE shams = ?",
                    (receipt.shams,),
                )
                == 0
            )
            assert (
                _count(
                    _node_db(cluster, A),
                    "SELECT count(*) FROM inbox WHERE shams = ?",
                    (receipt.shams,),
                )
                == 0
            )
            # The lifecycle must say so too (checked last, after the recovery below).
            statuses_when_rejected = (await b.track(receipt.shams)).statuses

        again = await b.send(to=[A], subject="signed with the un-revoked key", body="y")
        await _wait_delivered(b, again.shams, A)
        assert (
            _count(
                _node_db(cluster, A), "SELECT count(*) FROM inbox WHERE shams = ?", (receipt.shams,)
            )
            == 0
        )
    assert statuses_when_rejected == {A: "REJECTED"}


async def test_offline_verification_learns_revocations_from_the_node(cluster: Cluster) -> None:
    # An auditor holding a letter's evidence verifies it offline: what a revoked key signed
    # must fail there too, which needs the revocation list (ListAgencies carries it).
    signing = cluster.pki.agency_dir(B) / "signing.crt"
    async with _client(cluster, B) as b:
        receipt = await b.send(to=[A], subject="signed before the revocation", body="x")
        await _wait_delivered(b, receipt.shams, A)
        tracking = await b.track(receipt.shams)
        assert tracking.verify(cluster.credentials(B).trust_store())
        assert await b.revocations() == []
        # From the root CA alone, the directory gives what every evidence needs: the
        # intermediate CA, the agencies' and the hub's signing certificates.
        root_only = TrustStore.from_pem_files(cluster.pki.root_cert)
        trust = await b.trust_from_directory(root_only)
        issuers = {trust.verify_evidence(e).issuer for e in tracking.evidence}
        assert {f"urn:chapar:agency:{B}", f"urn:chapar:hub:{HUB_NAME}"} <= issuers
        async with _revoked(cluster, signing):
            revoked = await b.revocations()
            assert revoked == [load_certs(signing)[0].serial_number]
            trust = cluster.credentials(B).trust_store()
            trust.set_revoked(revoked)
            with pytest.raises(VerificationError) as refused:
                tracking.verify(trust)
            assert refused.value.reason == "CERTIFICATE_REVOKED"
            learned = await b.trust_from_directory(TrustStore.from_pem_files(cluster.pki.root_cert))
            with pytest.raises(VerificationError) as refused:
                learned.verify_evidence(tracking.evidence[0])  # B's SUBMISSION_ACCEPTANCE
            assert refused.value.reason == "CERTIFICATE_REVOKED"


async def _chapar(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node", *map(str, args)]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def test_a_saved_evidence_bundle_verifies_offline_until_its_signer_is_revoked(
    cluster: Cluster, tmp_path: Path
) -> None:
    # An auditor or a court keeps a letter as a file (`chapar track --save`) and checks it
    # later with the root CA alone (`chapar verify`): it must fail once a signer is revoked,
    # whether the revocation came with the bundle or after it, and when a byte is changed.
    signing = cluster.pki.agency_dir(B) / "signing.crt"
    serial = f"{load_certs(signing)[0].serial_number:x}"
    folder = cluster.pki.agency_dir(B)
    node = ["--node", cluster.nodes[B].address, "--ca", cluster.pki.root_cert]
    node += ["--cert", folder / "client.crt", "--key", folder / "client.key"]
    async with _client(cluster, B) as b:
        receipt = await b.send(to=[A], subject="kept for the court", body="x")
        await _wait_delivered(b, receipt.shams, A)
    before, during = tmp_path / "before.bundle", tmp_path / "during.bundle"
    saved = await _chapar("track", *node, receipt.shams, "--save", before)
    assert saved.returncode == 0, saved.stderr
    checked = await _chapar("verify", before, "--pki", cluster.pki.root, "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["shams"] == receipt.shams
    assert report["verified"] is True
    assert {"SUBMISSION_ACCEPTANCE", "RELAY_ACCEPTANCE", "DELIVERY"} <= {
        e["event"] for e in report["evidence"]
    }
    # The hub's relay evidence counts from the hub named, not from another of the CA's.
    named = await _chapar("verify", before, "--pki", cluster.pki.root, "--hub", HUB_NAME)
    assert named.returncode == 0, named.stderr
    other = await _chapar("verify", before, "--pki", cluster.pki.root, "--hub", "staging")
    assert other.returncode == 1
    assert "VERIFICATION_FAILED ISSUER_NOT_ALLOWED" in other.stderr, other.stderr
    async with _revoked(cluster, signing):
        tracked = await _chapar("track", *node, receipt.shams, "--save", during)
        assert tracked.returncode == 1
        assert "VERIFICATION_FAILED CERTIFICATE_REVOKED" in tracked.stderr
    assert pb.EvidenceBundle.FromString(during.read_bytes()).revoked_serials == [serial]
    # A key retired (not stolen) from a time after the letter and its evidence: what it
    # signed before that time still verifies, saved with the revocation and after it.
    retired, since = tmp_path / "retired.bundle", dt.datetime.now(dt.UTC).isoformat()
    async with _revoked(cluster, signing, since=since):
        tracked = await _chapar("track", *node, receipt.shams, "--save", retired)
        assert tracked.returncode == 0, tracked.stderr
        # The correspondence tree applies the times too (it held the key revoked for all time).
        tree = await _chapar("track", *node, receipt.shams, "--tree")
        assert tree.returncode == 0, tree.stderr
    saved = pb.EvidenceBundle.FromString(retired.read_bytes())
    assert saved.revoked_serials == [serial]  # an older verifier: revoked for all time
    assert [r.serial for r in saved.revocations] == [serial]
    kept = await _chapar("verify", retired, "--ca", cluster.pki.root_cert)
    assert kept.returncode == 0, kept.stderr
    at = f"--revoked={serial}@{since}"  # one given after the bundle was saved, the same way
    kept = await _chapar("verify", before, "--ca", cluster.pki.root_cert, at)
    assert kept.returncode == 0, kept.stderr
    for bundle, extra in ((during, []), (before, ["--revoked", serial])):
        refused = await _chapar("verify", bundle, "--ca", cluster.pki.root_cert, *extra)
        assert refused.returncode == 1, refused.stdout
        assert "VERIFICATION_FAILED CERTIFICATE_REVOKED" in refused.stderr
    bundle = pb.EvidenceBundle.FromString(before.read_bytes())
    last = bundle.letter.evidence[-1]
    content = pb.EvidenceContent.FromString(last.content)
    content.reason = "ALTERED"
    last.content = content.SerializeToString()
    altered = tmp_path / "altered.bundle"
    altered.write_bytes(bundle.SerializeToString())
    forged = await _chapar("verify", altered, "--ca", cluster.pki.root_cert)
    assert forged.returncode == 1
    assert f"VERIFICATION_FAILED SIGNATURE_INVALID: evidence {len(bundle.letter.evidence)}:" in (
        forged.stderr
    )
    (tmp_path / "junk.bundle").write_bytes(b"not a bundle")
    junk = await _chapar("verify", tmp_path / "junk.bundle", "--ca", cluster.pki.root_cert)
    assert junk.returncode == 1
    assert "VERIFICATION_FAILED BUNDLE_MALFORMED" in junk.stderr, junk.stderr


async def test_revoked_client_certificate_is_refused_by_its_node_until_unrevoked(
    cluster: Cluster,
) -> None:
    client_cert = cluster.pki.agency_dir(A) / "client.crt"
    async with _client(cluster, A) as a:
        assert await a.agencies()
        async with _revoked(cluster, client_cert):

            async def refused() -> Unauthenticated | None:
                try:
                    await a.agencies()
                except Unauthenticated as exc:
                    return exc
                return None

            err = await _eventually(refused, "node A refusing its revoked back-end client")
            assert err.reason == "CERTIFICATE_REVOKED"
            with pytest.raises(Unauthenticated) as again:
                await a.send(to=[B], subject="from a revoked client", body="x")
            assert again.value.reason == "CERTIFICATE_REVOKED"

        async def admitted() -> bool:
            try:
                return bool(await a.agencies())
            except Unauthenticated:
                return False

        await _eventually(admitted, "node A admitting the un-revoked client again")
        receipt = await a.send(to=[B], subject="from the un-revoked client", body="y")
        assert receipt.shams.startswith(f"{A}/O/")


async def test_a_revoked_client_loses_the_streams_it_had_open(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A back-end keeps its inbox and submission streams open for as long as it runs: a
    # revocation must end them, not only refuse its next call.
    reader, writer = (
        client_credentials(cluster, B, "reader"),
        client_credentials(cluster, A, "writer"),
    )
    chains = tmp_path / "reader.crt", tmp_path / "writer.crt"
    for path, creds in zip(chains, (reader, writer), strict=True):
        path.write_bytes(creds.certificate_chain)
    async with (
        ExchangeClient(cluster.nodes[A].address, writer) as a,
        ExchangeClient(cluster.nodes[B].address, reader) as b,
        a.shared_stream() as shared,
        contextlib.aclosing(b.inbox()) as inbox,
    ):
        first = await shared.send(Draft(to=[B], subject="before the revocation", body="x"))
        while (letter := await asyncio.wait_for(anext(inbox), 30)).shams != first.shams:
            await letter.ack()  # earlier tests' letters
        await letter.ack()
        async with _revoked(cluster, *chains):
            with pytest.raises(Unauthenticated) as ended:
                await asyncio.wait_for(anext(inbox), 20)
            assert ended.value.reason == "CERTIFICATE_REVOKED"
            with pytest.raises(Unauthenticated) as refused:
                await shared.send(Draft(to=[B], subject="after the revocation", body="y"))
            assert refused.value.reason == "CERTIFICATE_REVOKED"


async def test_a_clients_streams_end_when_its_scheduled_revocation_comes_due(
    cluster: Cluster, tmp_path: Path
) -> None:
    # A retirement scheduled (a revocation from a time still ahead) refuses new calls from
    # its time on; a stream admitted before must end at that time too, as at a revocation
    # without one, not run on until the next directory change.
    retiring = client_credentials(cluster, B, "retiring")
    chain = tmp_path / "retiring.crt"
    chain.write_bytes(retiring.certificate_chain)

    async def read_until_refused(inbox: AsyncIterator[Letter]) -> tuple[float, Unauthenticated]:
        try:
            async for letter in inbox:
                await letter.ack()  # earlier tests' letters
        except Unauthenticated as exc:
            return time.time(), exc
        raise AssertionError("the inbox stream ended without a refusal")

    async with (
        ExchangeClient(cluster.nodes[B].address, retiring) as b,
        contextlib.aclosing(b.inbox()) as inbox,
    ):
        await b.agencies()  # admitted
        reading = asyncio.create_task(read_until_refused(inbox))
        since = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
        async with _revoked(cluster, chain, since=since.isoformat()):
            assert dt.datetime.now(dt.UTC) < since, "the directory came after the time"
            assert not reading.done()
            ended_at, refused = await asyncio.wait_for(reading, 20)
            assert refused.reason == "CERTIFICATE_REVOKED"
            assert ended_at >= since.timestamp() - 0.5  # at its time, not at the directory's
            with pytest.raises(Unauthenticated):
                await b.agencies()


async def test_a_revocation_file_that_vanishes_keeps_its_revocations(cluster: Cluster) -> None:
    # An editor saving by rename, or a deploy tool, leaves the file missing for a moment;
    # a reload then must not lift every revocation. Emptying the file lifts them.
    client_cert = cluster.pki.agency_dir(A) / "client.crt"
    path = _revocation_file(cluster)
    async with _client(cluster, A) as a, _revoked(cluster, client_cert):
        before = await _versions(cluster)
        path.unlink()
        try:
            await asyncio.sleep(3 * RELOAD_S)  # several reloads' time
            assert await _versions(cluster) == before
            with pytest.raises(Unauthenticated):
                await a.agencies()
            assert "revocation file" in cluster.hub.log_file.read_text()
            # The configuration still reloads meanwhile (C suspended), with the same
            # revocations in force.
            config = cluster.hub.config
            text = config.read_text()
            _write_replacing(config, _with_state(text, C, "suspended"))
            try:
                await _wait_state(cluster, A, C, pb.AGENCY_STATE_SUSPENDED)
                with pytest.raises(Unauthenticated):
                    await a.agencies()
            finally:
                _write_replacing(config, text)
                await _wait_state(cluster, A, C, pb.AGENCY_STATE_ACTIVE)
        finally:
            _write_replacing(path, f"{_serial(client_cert)}\n")
        # Back with the same serials: whatever the hub publishes, A's client stays refused.
        with pytest.raises(Unauthenticated):
            await a.agencies()


async def _hub_directory_as_c(cluster: Cluster) -> pb.GetDirectoryResponse:
    async with grpc.aio.secure_channel(
        cluster.hub.address, _tls(cluster, C), options=HUB_PEER_OPTIONS
    ) as channel:
        response: pb.GetDirectoryResponse = await pb.HubServiceStub(channel).GetDirectory(
            pb.GetDirectoryRequest(), timeout=10
        )
        return response


async def test_revoked_node_tls_certificate_is_refused_by_the_hub_until_unrevoked(
    cluster: Cluster,
) -> None:
    assert (await _hub_directory_as_c(cluster)).directory.version > 0
    tls = cluster.pki.agency_dir(C) / "tls.crt"
    async with _revoked(cluster, tls):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _hub_directory_as_c(cluster)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert from_rpc_error(err.value).reason == "CERTIFICATE_REVOKED"
    directory = (await _hub_directory_as_c(cluster)).directory
    assert _serial(tls) not in directory.revoked_serials


# -- 4. suspension without a restart ---------------------------------------------------


def _with_state(config: str, code: str, state: str) -> str:
    pattern = re.compile(rf'(code = "{re.escape(code)}"\nname = "[^"\n]*"\nstate = )"[a-z]+"')
    changed, n = pattern.subn(rf'\1"{state}"', config)
    assert n == 1, f"no [[agencies]] block for {code} in the hub configuration"
    return changed


async def _state_at(cluster: Cluster, node: str, code: str) -> int | None:
    """``code``'s state in ``node``'s directory; None if it lists no such agency."""
    agencies = (await _list_agencies(cluster, node, _auditor(cluster))).agencies
    return next((a.state for a in agencies if a.code == code), None)


async def _wait_state(
    cluster: Cluster, node: str, code: str, state: pb.AgencyState.ValueType
) -> bool:
    async def reached() -> bool:
        return await _state_at(cluster, node, code) == state

    await _eventually(reached, f"node {node} seeing {code} as {pb.AgencyState.Name(state)}")
    return True


async def _retried(node: ServerProcess, times: int) -> int:
    """Waits for ``node`` to dial the hub ``times`` more times; returns where its log
    stood before (what it logged while retrying starts there)."""
    logged = len(node.log_file.read_text())
    reconnects = fetch(node.metrics).value("chapar_hub_link_reconnects_total", 0.0)
    assert reconnects is not None

    async def retried() -> bool:
        now = fetch(node.metrics).value("chapar_hub_link_reconnects_total", 0.0)
        return now is not None and now >= reconnects + times

    await _eventually(retried, f"{node.name} retrying the hub")
    return logged


async def test_suspended_agency_can_neither_send_nor_receive_until_reactivated(
    cluster: Cluster,
) -> None:
    config = cluster.hub.config
    original = config.read_text()
    outbox_a = _count(_node_db(cluster, A), "SELECT count(*) FROM outbox")
    outbox_b = _count(_node_db(cluster, B), "SELECT count(*) FROM outbox")
    node_b = cluster.nodes[B]
    log_start = len(node_b.log_file.read_text())
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        try:
            _write_replacing(config, _with_state(original, B, "suspended"))
            await _wait_state(cluster, A, B, pb.AGENCY_STATE_SUSPENDED)
            with pytest.raises(FailedPrecondition) as to_b:
                await a.send(to=[B], subject="to a suspended agency", body="x")
            assert to_b.value.reason == "RECIPIENT_INACTIVE"
            assert to_b.value.metadata.get("agency") == B
            assert _count(_node_db(cluster, A), "SELECT count(*) FROM outbox") == outbox_a

            # B's node must learn it too, although the hub closes B's stream on suspension
            # (and grpc may report the hub's refusal of its reconnection as INTERNAL). Its
            # refusal is checked after the recovery below, so one failure does not hide
            # whether reactivation works.
            learned = True
            try:
                await _wait_state(cluster, B, B, pb.AGENCY_STATE_SUSPENDED)
            except AssertionError:
                learned = False
            from_b: FailedPrecondition | None = None
            try:
                await b.send(to=[A], subject="from a suspended agency", body="x")
            except FailedPrecondition as exc:
                from_b = exc
            outbox_b_while_suspended = _count(_node_db(cluster, B), "SELECT count(*) FROM outbox")

            # It keeps retrying (reconnect_max_s = 1), saying so once, not at every retry.
            learned_at = await _retried(node_b, 3)
            assert fetch(node_b.metrics).value("chapar_ready") == 0
            log = node_b.log_file.read_text()
            told = [r for r in _complaints(log[log_start:]) if r.get("agency") == B]
            link_complaints = [
                r for r in _complaints(log[learned_at:]) if r["logger"] == "chapar.link"
            ]
            health = _health_lines(log[log_start:])
        finally:
            _write_replacing(config, original)
            await _wait_state(cluster, A, B, pb.AGENCY_STATE_ACTIVE)
            await _wait_state(cluster, B, B, pb.AGENCY_STATE_ACTIVE)

        to_b_again = await a.send(to=[B], subject="to B, active again", body="y")
        from_b_again = await b.send(to=[A], subject="from B, active again", body="y")
        await _wait_delivered(a, to_b_again.shams, B)
        await _wait_delivered(b, from_b_again.shams, A)

    assert learned, "node B never learned that B was suspended"
    assert from_b is not None, "node B accepted a letter from B while B was suspended"
    assert from_b.reason == "SENDER_INACTIVE"
    assert outbox_b_while_suspended == outbox_b
    assert [r.get("reason") for r in told] == ["SENDER_INACTIVE"]
    assert "is suspended in the hub's directory" in told[0]["message"]
    assert link_complaints == []
    # Its log says why it is not serving: the suspension, which it learns after the hub
    # closed its stream (it said "hub stream down" first, and no more).
    why = "health: NOT_SERVING (agency suspended in the hub's directory)"
    assert health[-1:] == [why], health


async def test_a_retry_of_a_letter_accepted_before_its_recipient_was_suspended_gets_its_receipt(
    cluster: Cluster,
) -> None:
    # A duplicate submission is not an error: its answer is the first one. A retry after
    # the recipient was suspended (the first answer lost with a connection, say) was
    # checked again and refused RECIPIENT_INACTIVE, denying a letter that was accepted
    # and will be delivered.
    config = cluster.hub.config
    original = config.read_text()
    async with _client(cluster, A) as a:
        first = await a.send(
            to=[B], subject="accepted, then retried", body="r", request_id="kept-1"
        )
        try:
            _write_replacing(config, _with_state(original, B, "suspended"))
            await _wait_state(cluster, A, B, pb.AGENCY_STATE_SUSPENDED)
            again = await a.send(
                to=[B], subject="accepted, then retried", body="r", request_id="kept-1"
            )
            assert again.shams == first.shams
            with pytest.raises(FailedPrecondition) as changed:  # another draft under it
                await a.send(to=[B], subject="not the same letter", body="r", request_id="kept-1")
            assert changed.value.reason == "RECIPIENT_INACTIVE"
            with pytest.raises(FailedPrecondition) as other:  # a new letter is refused
                await a.send(
                    to=[B], subject="accepted, then retried", body="r", request_id="kept-2"
                )
            assert other.value.reason == "RECIPIENT_INACTIVE"
        finally:
            _write_replacing(config, original)
            await _wait_state(cluster, A, B, pb.AGENCY_STATE_ACTIVE)
            await _wait_state(cluster, B, B, pb.AGENCY_STATE_ACTIVE)  # for the tests after


def _without_agency(config: str, code: str) -> str:
    pattern = re.compile(rf'\[\[agencies\]\]\ncode = "{re.escape(code)}"\n(?:[a-z_]+ = [^\n]*\n)+')
    changed, n = pattern.subn("", config)
    assert n == 1, f"no [[agencies]] block for {code} in the hub configuration"
    return changed


def _health_lines(log: str) -> list[str]:
    """What (a part of) a server's log says of its health, in order."""
    said = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            message = json.loads(line).get("message", "")
            if message.startswith("health: "):
                said.append(message)
    return said


def _complaints(log: str) -> list[dict[str, str]]:
    """The warning and error records in (a part of) a server's JSON log."""
    records = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("level") in {"warning", "error"}:
                records.append(record)
    return records


async def test_agency_removed_from_the_directory_is_refused_at_its_node_until_added_back(
    cluster: Cluster,
) -> None:
    # Removed, not suspended: the hub refuses B's node everything (Connect and
    # GetDirectory, PERMISSION_DENIED UNKNOWN_SENDER), so B's node cannot read its state
    # from a directory. It must still stop taking letters that could never go, say so
    # once in its log (not at every retry) and in its metrics, keep retrying, and come
    # back by itself when B is listed again; letters it took before must not be lost.
    # One is taken while the hub is down, and B removed before the hub comes back: it
    # waits in B's outbox.
    config = cluster.hub.config
    original = config.read_text()
    node_b = cluster.nodes[B]
    log_start = len(node_b.log_file.read_text())
    accepted: list[str] = []  # letters B's node took before it learned (none is lost)
    async with _client(cluster, A) as a, _client(cluster, B) as b:
        try:
            assert cluster.hub.terminate() == 0
            held = await b.send(
                to=[A], subject="taken while the hub is down", body="h", request_id="held-1"
            )
            _write_replacing(config, _without_agency(original, B))
            await cluster.hub.restart()

            async def gone_at_a() -> bool:
                return await _state_at(cluster, A, B) is None

            await _eventually(gone_at_a, f"node {A} seeing {B} removed")

            async def refused() -> FailedPrecondition | None:
                try:
                    receipt = await b.send(to=[A], subject="from a removed agency", body="x")
                except FailedPrecondition as exc:
                    return exc
                accepted.append(receipt.shams)
                await asyncio.sleep(0.4)
                return None

            refusal = await _eventually(refused, f"node {B} refusing letters from {B}")
            assert refusal.reason == "AGENCY_NOT_IN_DIRECTORY", refusal
            assert refusal.metadata.get("agency") == B
            retried = await b.send(  # its first answer, not a refusal: it was accepted
                to=[A], subject="taken while the hub is down", body="h", request_id="held-1"
            )
            assert retried.shams == held.shams
            outbox = _count(_node_db(cluster, B), "SELECT count(*) FROM outbox")
            batch = await b.send_many(
                [Draft(to=[A], subject=f"batch {i}", body="x") for i in range(2)]
            )
            assert [getattr(r, "reason", "accepted") for r in batch] == [
                "AGENCY_NOT_IN_DIRECTORY"
            ] * 2
            assert _count(_node_db(cluster, B), "SELECT count(*) FROM outbox") == outbox
            assert (
                _count(
                    _node_db(cluster, B),
                    "SELECT count(*) FROM outbox WHERE shams = ? AND relay_state = 0",
                    (held.shams,),
                )
                == 1
            )

            # It keeps retrying (reconnect_max_s = 1), saying so once, not at every retry.
            learned_at = await _retried(node_b, 3)
            snapshot = fetch(node_b.metrics)
            assert snapshot.value("chapar_ready") == 0
            assert snapshot.value("chapar_node_in_directory") == 0
            assert "not in the hub's directory" in render(snapshot, B)
            log = node_b.log_file.read_text()
            told = [r for r in _complaints(log[log_start:]) if r.get("agency") == B]
            assert [r.get("reason") for r in told] == ["AGENCY_NOT_IN_DIRECTORY"], told
            health = _health_lines(log[log_start:])
            why = "health: NOT_SERVING (agency not in the hub's directory)"
            assert health[-1:] == [why], health
            assert [r for r in _complaints(log[learned_at:]) if r["logger"] == "chapar.link"] == []
        finally:
            _write_replacing(config, original)
            await _wait_state(cluster, A, B, pb.AGENCY_STATE_ACTIVE)

        async def taken() -> str | None:
            try:
                return (await b.send(to=[A], subject="from B, listed again", body="y")).shams
            except FailedPrecondition:
                return None

        again = await _eventually(taken, f"node {B} taking letters again")
        to_b = await a.send(to=[B], subject="to B, listed again", body="y")
        for shams in [held.shams, *accepted, again]:
            await _wait_delivered(b, shams, A)
        await _wait_delivered(a, to_b.shams, B)

    async def listed_again() -> bool:
        return fetch(node_b.metrics).value("chapar_node_in_directory") == 1

    await _eventually(listed_again, f"node {B} reporting {B} in the directory")


# -- 5. authorisation at the node --------------------------------------------------------


async def test_auditor_may_track_and_verify_but_not_send_or_read_the_inbox(
    cluster: Cluster,
) -> None:
    credentials = _auditor(cluster)
    outbox = _count(_node_db(cluster, A), "SELECT count(*) FROM outbox")
    async with (
        _client(cluster, A) as a,
        ExchangeClient(cluster.nodes[A].address, credentials) as auditor,
    ):
        receipt = await a.send(to=[B], subject="for the auditor's eyes", body="audited")
        await _wait_delivered(a, receipt.shams, B)
        outbox += 1

        tracking = await auditor.track(receipt.shams)
        verified = tracking.verify(credentials.trust_store())
        events = [v.event for v in verified]
        assert events[0] == "SUBMISSION_ACCEPTANCE"
        assert {"RELAY_ACCEPTANCE", "DELIVERY"} <= set(events)
        assert all(v.issuer for v in verified)
        assert tracking.statuses[B] in DELIVERED
        # What the auditor keeps verifies later from the file and the root CA alone.
        kept = (await auditor.evidence_bundle(receipt.shams)).SerializeToString()
        later = Tracking.from_bundle(kept).verify(TrustStore.from_pem_files(cluster.pki.root_cert))
        assert [v.event for v in later] == events

        with pytest.raises(PermissionDenied) as send:
            await auditor.send(to=[B], subject="an auditor writing", body="x")
        assert send.value.reason == "AUDITOR_READ_ONLY"
        letters = auditor.inbox()
        with pytest.raises(PermissionDenied) as inbox:
            await anext(letters)
        await letters.aclose()
        assert inbox.value.reason == "AUDITOR_READ_ONLY"
    assert _count(_node_db(cluster, A), "SELECT count(*) FROM outbox") == outbox


async def test_node_knows_nothing_of_a_letter_between_two_other_agencies(
    cluster: Cluster,
) -> None:
    async with _client(cluster, B) as b, _client(cluster, A) as a:
        receipt = await b.send(to=[C], subject="between B and C", body="not for A")
        assert (await b.track(receipt.shams)).statuses.get(C) in {"SUBMITTED", "RELAYED"}
        with pytest.raises(NotFound) as err:
            await a.track(receipt.shams)
    assert err.value.reason == "LETTER_NOT_FOUND"


async def _inbox_for(
    client: ExchangeClient, seconds: float, mailbox: str | None = None
) -> set[str]:
    """The SHAMS numbers an inbox stream (of ``mailbox``, if given) yields within
    ``seconds``."""
    seen: set[str] = set()

    async def read() -> None:
        async with contextlib.aclosing(client.inbox(mailbox)) as letters:
            async for letter in letters:
                seen.add(letter.shams)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), seconds)
    return seen


async def test_a_letter_to_two_mailboxes_reaches_the_second_after_the_first_acknowledges(
    cluster: Cluster,
) -> None:
    """A letter to two mailboxes of one agency is stored once. The registry's back-end
    (a client limited to it) reads and acknowledges it: legal's reader must still get it,
    and the whole agency's stream too, until legal has it; the HANDOVER evidence is the
    one the first acknowledgement issued. Before, the registry's acknowledgement took the
    letter out of every stream: legal's back-end never saw a letter addressed to it."""
    registry_credentials = client_credentials(cluster, A, "registry")
    async with (
        _client(cluster, B) as b,
        _client(cluster, A) as backend,
        ExchangeClient(cluster.nodes[A].address, registry_credentials) as registry,
    ):
        both = await b.send(to=[(A, "registry"), (A, "legal")], subject="to two", body="2")
        inbox_a = _node_db(cluster, A)

        async def arrived() -> bool:
            return _count(inbox_a, "SELECT count(*) FROM inbox WHERE shams = ?", (both.shams,)) == 1

        await _eventually(arrived, "the letter to two mailboxes at A", timeout=20)
        async with contextlib.aclosing(registry.inbox()) as letters:
            async for letter in letters:
                if letter.shams == both.shams:
                    first = await letter.ack()
                    break
        assert both.shams not in await _inbox_for(registry, 1.0)
        assert both.shams in await _inbox_for(backend, 1.0, "legal")
        assert both.shams in await _inbox_for(backend, 1.0)
        assert await registry.ack(both.shams) == first  # again: the same evidence
        (by_legal,) = await backend.ack_many([both.shams])
        assert by_legal == first
        assert both.shams not in await _inbox_for(backend, 1.0, "legal")
        assert both.shams not in await _inbox_for(backend, 1.0)
        assert (
            _count(
                inbox_a,
                "SELECT count(*) FROM evidence WHERE shams = ? AND event = ?",
                (both.shams, E.EVIDENCE_EVENT_HANDOVER),
            )
            == 1
        )


async def test_client_limited_to_a_mailbox_sees_and_acts_only_on_that_mailbox(
    cluster: Cluster,
) -> None:
    registry_credentials = client_credentials(cluster, A, "registry")
    identity = registry_credentials.identity()
    assert identity is not None
    assert identity.uri == f"urn:chapar:client:{A}:registry"
    inbox_a = _node_db(cluster, A)
    async with (
        _client(cluster, B) as b,
        _client(cluster, A) as backend,
        ExchangeClient(cluster.nodes[A].address, registry_credentials) as registry,
    ):
        to_registry = await b.send(to=[(A, "registry")], subject="for the registry", body="r")
        to_legal = await b.send(to=[(A, "legal")], subject="for legal", body="l")

        async def both_arrived() -> bool:
            return (
                _count(
                    inbox_a,
                    "SELECT count(*) FROM inbox WHERE shams IN (?, ?)",
                    (to_registry.shams, to_legal.shams),
                )
                == 2
            )

        await _eventually(both_arrived, "both letters in A's inbox", timeout=20)

        assert await _inbox_for(registry, 1.0) == {to_registry.shams}
        everything = await _inbox_for(backend, 1.0)
        assert {to_registry.shams, to_legal.shams} <= everything

        with pytest.raises(PermissionDenied) as ack:
            await registry.ack(to_legal.shams)
        assert ack.value.reason == "MAILBOX_NOT_ALLOWED"
        # The same per letter in a batch, as a call and on the acknowledgement stream.
        (batched,) = await registry.ack_many([to_legal.shams])
        assert isinstance(batched, PermissionDenied), batched
        with pytest.raises(PermissionDenied) as streamed:
            await registry._acks.ack(parse_shams(to_legal.shams))  # what Letter.ack() does
        assert (batched.reason, streamed.value.reason) == ("MAILBOX_NOT_ALLOWED",) * 2
        assert (
            _count(
                inbox_a,
                "SELECT count(*) FROM inbox WHERE shams = ? AND handover IS NOT NULL",
                (to_legal.shams,),
            )
            == 0
        )
        with pytest.raises(PermissionDenied) as track:
            await registry.track(to_legal.shams)
        assert track.value.reason == "MAILBOX_NOT_ALLOWED"
        assert (await registry.track(to_registry.shams)).direction == "INCOMING"

        outbox = _count(inbox_a, "SELECT count(*) FROM outbox")
        with pytest.raises(PermissionDenied) as send:
            await registry.send(to=[B], subject="as legal", body="x", sender_mailbox="legal")
        assert send.value.reason == "MAILBOX_NOT_ALLOWED"
        # Nor report a status on a letter of another mailbox (from its own).
        with pytest.raises(PermissionDenied) as report:
            await registry.send_status(to_legal.shams, "accepted", sender_mailbox="registry")
        assert report.value.reason == "MAILBOX_NOT_ALLOWED"
        assert _count(inbox_a, "SELECT count(*) FROM outbox") == outbox
        received = await registry.send_status(
            to_registry.shams, "received", sender_mailbox="registry"
        )
        assert [u.shams for u in (await registry.track(to_registry.shams)).status_updates] == [
            received.shams
        ]
        sent = await registry.send(
            to=[B], subject="as the registry", body="x", sender_mailbox="registry"
        )
        assert sent.shams.startswith(f"{A}/O/")
        assert (await registry.track(sent.shams)).header.sender.mailbox == "registry"

        await registry.ack(to_registry.shams)
        await backend.ack(to_legal.shams)

        # Nor see, in a letter's track, status updates of another mailbox: on a letter to
        # both mailboxes, B's recall addressed to legal and legal's own report; on a
        # letter the registry sent, B's report addressed to legal (and its status).
        both = await b.send(to=[(A, "registry"), (A, "legal")], subject="for both", body="b")
        b_db = _node_db(cluster, B)

        async def held(db: Path, shams: str) -> bool:
            return _count(db, "SELECT count(*) FROM inbox WHERE shams = ?", (shams,)) == 1

        await _eventually(lambda: held(inbox_a, both.shams), "the letter to both mailboxes")
        await _eventually(lambda: held(b_db, sent.shams), "the registry's letter at B")
        recall = await b.send_status(both.shams, "recall-requested", to=[(A, "legal")])
        reported = await b.send_status(sent.shams, "accepted", to=[(A, "legal")])
        by_legal = await backend.send_status(both.shams, "accepted", sender_mailbox="legal")
        by_registry = await registry.send_status(both.shams, "received", sender_mailbox="registry")

        async def linked(shams: str, n: int) -> Tracking | None:
            tracking = await backend.track(shams)
            return tracking if len(tracking.status_updates) == n else None

        everyone = await _eventually(lambda: linked(both.shams, 3), "3 updates linked at A")
        assert {u.shams for u in everyone.status_updates} == {
            recall.shams,
            by_legal.shams,
            by_registry.shams,
        }
        mine = await registry.track(both.shams)
        assert [u.shams for u in mine.status_updates] == [by_registry.shams]
        mine.verify(await registry.trust_from_directory(registry_credentials.trust_store()))
        outgoing = await _eventually(lambda: linked(sent.shams, 1), "B's report linked at A")
        assert outgoing.business_statuses == {B: "ACCEPTED"}
        hidden = await registry.track(sent.shams)
        assert (hidden.status_updates, hidden.business_statuses) == ([], {})
        hidden.verify(await registry.trust_from_directory(registry_credentials.trust_store()))
        # A letter the registry sends to legal (its own agency) and B: legal's report goes
        # back to the registry, which sees it in the letter's track and may read it (a
        # letter to itself is found as the sent copy: it was legal's only).
        to_self = await registry.send(
            to=[(A, "legal"), B], subject="to legal and B", body="s", sender_mailbox="registry"
        )
        await _eventually(lambda: held(inbox_a, to_self.shams), "the letter to itself back at A")
        report = await backend.send_status(to_self.shams, "accepted", sender_mailbox="legal")

        async def seen() -> Tracking | None:
            tracking = await registry.track(to_self.shams)
            return tracking if tracking.status_updates else None

        shown = await _eventually(seen, "legal's report in the registry's track")
        assert [u.shams for u in shown.status_updates] == [report.shams]
        assert shown.business_statuses == {A: "ACCEPTED"}
        assert (await registry.track(report.shams)).header.sender.mailbox == "legal"
        for acked in await backend.ack_many([both.shams, recall.shams, reported.shams]):
            assert isinstance(acked, pb.Evidence), acked
